"""An s3:// output: checkpoints and the final adapter go up from the local staging folder, and the newest
complete checkpoint comes down before a run resumes.

The layout in the bucket is the one on a claim (docs/trainer.md): <uri>/checkpoints/checkpoint-<step>/ and
<uri>/adapter/. A checkpoint counts only once its marker object (`kubetune-complete.json`) exists, and the
marker is uploaded after every other file of the checkpoint, so a pod killed during an upload leaves a
checkpoint that is never resumed from (and is deleted at the next start).
"""

from __future__ import annotations

import re
import shutil
from functools import cached_property
from pathlib import Path
from typing import Any

from kubetune import s3, storage
from kubetune.trainer.checkpoints import MARKER

_CHECKPOINT_KEY = re.compile(r"^checkpoint-(\d+)/(.+)$")
ADAPTER_METADATA = "kubetune.json"  # trainer/adapter.py writes it last; it is uploaded last too


def checkpoint_index(keys: list[str]) -> tuple[list[int], list[int]]:
    """(complete steps, incomplete steps), oldest first, from the keys under <uri>/checkpoints."""
    files: dict[int, set[str]] = {}
    for key in keys:
        match = _CHECKPOINT_KEY.match(key)
        if match:
            files.setdefault(int(match.group(1)), set()).add(match.group(2))
    complete = sorted(step for step, names in files.items() if MARKER in names)
    return complete, sorted(set(files) - set(complete))


class RemoteOutput:
    """The s3:// output of one run."""

    def __init__(self, uri: str, access: s3.Access) -> None:
        self.uri = uri.rstrip("/")
        self.access = access

    @classmethod
    def of(cls, output: Any) -> RemoteOutput | None:
        """For the spec's `output` when it is s3://; None for a mounted output."""
        return cls(output.uri, s3.Access.of(output.s3)) if output.uri.startswith("s3://") else None

    @cached_property
    def client(self) -> Any:
        return s3.client(self.access)

    @property
    def checkpoints_uri(self) -> str:
        return storage.join(self.uri, "checkpoints")

    def checkpoint_uri(self, step: int) -> str:
        return storage.join(self.checkpoints_uri, f"checkpoint-{step}")

    def index(self) -> tuple[list[int], list[int]]:
        return checkpoint_index(list(s3.list_keys(self.client, self.checkpoints_uri)))

    def restore_latest(self, root: Path, clean: bool = True) -> int | None:
        """Replace the local checkpoints under `root` by the newest complete one in the bucket (the bucket is the
        truth: a new pod's staging folder is empty anyway). With `clean`, incomplete ones there are deleted.
        Returns its step, or None when there is none."""
        complete, incomplete = self.index()
        if clean:
            for step in incomplete:
                s3.delete_prefix(self.client, self.checkpoint_uri(step))
        shutil.rmtree(root, ignore_errors=True)
        if not complete:
            return None
        step = complete[-1]
        s3.download(self.client, self.checkpoint_uri(step), root / f"checkpoint-{step}")
        return step

    def upload_checkpoint(self, path: Path) -> None:
        """Every file of a saved checkpoint but its marker (what this node wrote; ranks share the folder)."""
        s3.upload_dir(self.client, path, storage.join(self.checkpoints_uri, path.name), skip=[MARKER])

    def mark_complete(self, path: Path) -> None:
        """Upload the local marker: from now on the checkpoint can be resumed from."""
        s3.upload_file(self.client, path / MARKER, storage.join(self.checkpoints_uri, path.name, MARKER))

    def rotate(self, keep: int) -> list[int]:
        """Delete the complete checkpoints beyond the newest `keep` (their marker first). Returns their steps."""
        complete, _ = self.index()
        stale = complete[:-keep] if keep > 0 else complete
        for step in stale:
            s3.delete_keys(self.client, self.checkpoint_uri(step), [MARKER])
            s3.delete_prefix(self.client, self.checkpoint_uri(step))
        return stale

    def upload_adapter(self, folder: Path) -> str:
        """Upload the final adapter to <uri>/adapter, kubetune.json last, then delete what an older adapter there
        had and this one has not. Returns its URI."""
        uri = storage.join(self.uri, "adapter")
        before = set(s3.list_keys(self.client, uri)) - {""}
        uploaded = s3.upload_dir(self.client, folder, uri, last=[ADAPTER_METADATA])
        s3.delete_keys(self.client, uri, sorted(before - set(uploaded)))
        return uri
