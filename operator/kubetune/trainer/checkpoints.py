"""Checkpoints under <output>/checkpoints: which are complete, which to resume from, which to delete.

The Trainer writes `checkpoint-<step>/`; the marker file is written last, after every rank finished writing,
so a directory without it (a pod killed mid-save) is never resumed from.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

MARKER = "kubetune-complete.json"
_NAME = re.compile(r"^checkpoint-(\d+)$")


@dataclass(frozen=True)
class Checkpoint:
    step: int
    path: Path

    @property
    def complete(self) -> bool:
        return (self.path / MARKER).is_file()


def checkpoints(root: Path) -> list[Checkpoint]:
    """All checkpoint directories under `root`, oldest step first."""
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = _NAME.match(entry.name)
        if match and entry.is_dir():
            found.append(Checkpoint(int(match.group(1)), entry))
    return sorted(found, key=lambda c: c.step)


def latest_complete(root: Path) -> Checkpoint | None:
    """The newest checkpoint whose marker exists, or None."""
    complete = [c for c in checkpoints(root) if c.complete]
    return complete[-1] if complete else None


def mark_complete(path: Path, step: int) -> None:
    """Write the marker that makes `path` eligible for resuming (atomically: write, then rename)."""
    tmp = path / f".{MARKER}.tmp"
    tmp.write_text(json.dumps({"step": step, "completedAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}))
    tmp.rename(path / MARKER)


def remove_incomplete(root: Path) -> list[Checkpoint]:
    """Delete half-written checkpoints (no marker); called before training starts or resumes."""
    removed = [c for c in checkpoints(root) if not c.complete]
    for c in removed:
        shutil.rmtree(c.path, ignore_errors=True)
    return removed


def rotate(root: Path, keep: int) -> list[Checkpoint]:
    """Keep the `keep` newest complete checkpoints; delete older complete ones. Returns the deleted ones."""
    complete = [c for c in checkpoints(root) if c.complete]
    stale = complete[:-keep] if keep > 0 else complete
    for c in stale:
        shutil.rmtree(c.path, ignore_errors=True)
    return stale
