"""The shared model and dataset cache on a claim (docs/cache.md): keys, atomic entries, LRU eviction.

Layout under the root (the claim, mounted read-write only in prepare pods and servers' model init containers):

    entries/<key>/            one complete entry; `kubetune-entry.json` inside it is written before the rename
    staging/<key>.<random>/   an entry being written; renamed into entries/ when complete, never read
    used/<key>                touched at every use: its mtime is the entry's last use

An entry appears by one rename of a complete folder, so a reader never sees a half-written one and a download
killed midway leaves only a staging folder (removed by a later prepare step once it is old). Eviction takes the
least recently used entries until the new one fits (before a download whose size is known, and after the step),
but never one in `keep` (the entries named in the reports of the namespace's unfinished FineTuneJobs and the base
models of its ModelServers, which the operator passes in) nor one used after `not_after` (a job prepared moments
ago whose report the operator had not seen yet).
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubetune.storage import entry_key as entry_key  # its home: the operator names the entries servers read

MARKER = "kubetune-entry.json"


@dataclass(frozen=True)
class Entry:
    key: str
    size: int
    last_used: float


def choose_evictions(
    entries: Iterable[Entry], limit: int, incoming: int, keep: Iterable[str], not_after: float
) -> list[str]:
    """Keys to evict, least recently used first, until the entries plus `incoming` bytes fit in `limit`. Entries
    in `keep` (keys, or glob patterns of keys: storage.model_entries) or used after `not_after` are never chosen
    (then the cache may stay above its limit)."""
    entries = list(entries)
    kept = set(keep)
    patterns = [k for k in kept if "*" in k]
    total = sum(e.size for e in entries) + incoming
    chosen = []
    for entry in sorted(entries, key=lambda e: (e.last_used, e.key)):
        if total <= limit:
            break
        in_use = entry.key in kept or any(fnmatch.fnmatchcase(entry.key, p) for p in patterns)
        if in_use or entry.last_used > not_after:
            continue
        chosen.append(entry.key)
        total -= entry.size
    return chosen


@dataclass(frozen=True)
class Limit:
    """What eviction works with: the size limit in bytes, the entries in use, and the time after which a use
    protects an entry (`choose_evictions`)."""

    size: int
    keep: tuple[str, ...] = ()
    not_after: float = 0.0


def folder_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


class Cache:
    """One cache root (the claim's mount); `limit`: the size limit that `make_room` keeps (None: no limit)."""

    def __init__(self, root: Path, limit: Limit | None = None) -> None:
        self.root = root
        self.limit = limit

    def path(self, key: str) -> Path:
        return self.root / "entries" / key

    def lookup(self, key: str) -> Path | None:
        """The complete entry `key` (its use recorded), or None."""
        path = self.path(key)
        if not (path / MARKER).is_file():
            return None
        self.touch(key)
        return path

    def touch(self, key: str) -> None:
        used = self.root / "used" / key
        used.parent.mkdir(parents=True, exist_ok=True)
        used.touch()

    def fill(self, key: str, write: Callable[[Path], object], meta: dict[str, Any]) -> Path:
        """Make entry `key` with `write(folder)`, atomically; an entry another pod completed meanwhile wins."""
        staging = self.root / "staging" / f"{key}.{uuid.uuid4().hex[:8]}"
        staging.mkdir(parents=True)
        try:
            write(staging)
            marker = {**meta, "key": key, "bytes": folder_size(staging), "createdAt": time.time()}
            (staging / MARKER).write_text(json.dumps(marker))
            self.path(key).parent.mkdir(parents=True, exist_ok=True)
            if self.path(key).exists() and self.lookup(key) is None:
                self.discard(key)  # a folder without its marker (copied in by hand, say): never used, replaced
            try:
                staging.rename(self.path(key))
            except OSError:
                if self.lookup(key) is None:  # not another pod's complete entry: a real failure
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        self.touch(key)
        return self.path(key)

    def entries(self) -> list[Entry]:
        found = []
        for path in sorted((self.root / "entries").glob("*")):
            marker = path / MARKER
            if not marker.is_file():
                continue
            used = self.root / "used" / path.name
            last = used.stat().st_mtime if used.exists() else marker.stat().st_mtime
            found.append(Entry(path.name, int(json.loads(marker.read_text()).get("bytes", 0)), last))
        return found

    def evict(self, limit: int, incoming: int, keep: Iterable[str], not_after: float) -> list[str]:
        """Remove what `choose_evictions` picks: renamed out of entries/ first, so no reader finds half of it."""
        chosen = choose_evictions(self.entries(), limit, incoming, keep, not_after)
        for key in chosen:
            self.discard(key)
        return chosen

    def make_room(self, incoming: int, used: Iterable[str] = ()) -> list[str]:
        """Evict within the limit so that `incoming` more bytes fit, keeping also `used`: before a download (so
        that the new entry fits) and after a step (`incoming` 0). The evicted keys; none without a limit."""
        if self.limit is None:
            return []
        return self.evict(self.limit.size, incoming, [*self.limit.keep, *used], self.limit.not_after)

    def discard(self, key: str) -> None:
        trash = self.root / "staging" / f"removed-{key}.{uuid.uuid4().hex[:8]}"
        trash.parent.mkdir(parents=True, exist_ok=True)
        os.rename(self.path(key), trash)
        shutil.rmtree(trash, ignore_errors=True)
        (self.root / "used" / key).unlink(missing_ok=True)

    def clean_staging(self, older_than: float) -> list[str]:
        """Remove staging folders last changed before `older_than` (left by killed prepare pods)."""
        removed = []
        for path in (self.root / "staging").glob("*"):
            if path.stat().st_mtime < older_than:
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path.name)
        return removed
