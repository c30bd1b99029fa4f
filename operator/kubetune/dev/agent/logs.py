"""Container logs: one file per container under ``<agent state>/logs/<namespace>/<pod>_<uid>/``.

Restarts append to the same file. Logs stay after the pod is deleted (the kubelet would remove them);
``kubetune dev logs POD`` shows the newest pod of that name.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import BinaryIO

FOLLOW_POLL_S = 0.5


def pod_log_dir(logs_root: Path, namespace: str, name: str, uid: str) -> Path:
    return logs_root / namespace / f"{name}_{uid}"


def find_pod_log_dir(logs_root: Path, namespace: str, name: str) -> Path | None:
    """The log folder of the newest pod named ``name`` in ``namespace`` (pod names have no ``_``)."""
    folders = [p for p in (logs_root / namespace).glob(f"{name}_*") if p.is_dir()]
    return max(folders, key=lambda p: p.stat().st_mtime, default=None)


def container_log(folder: Path, container: str | None) -> Path:
    """The log file of ``container``, or of the only container; ValueError listing the choices otherwise."""
    files = sorted(folder.glob("*.log"))
    names = [f.stem for f in files]
    if container is not None:
        if container not in names:
            raise ValueError(f"container {container!r} has no log; choose one of: {', '.join(names) or 'none'}")
        return folder / f"{container}.log"
    if len(files) != 1:
        raise ValueError(f"the pod has several containers; choose one with -c: {', '.join(names)}")
    return files[0]


def tail_bytes(path: Path, start: int = 0, limit: int = 2048, lines: int = 80) -> str:
    """At most the last ``lines`` lines and ``limit`` bytes of ``path`` from offset ``start``."""
    try:
        with path.open("rb") as handle:
            handle.seek(max(start, path.stat().st_size - limit * 4))
            data = handle.read()
    except OSError:
        return ""
    text = "\n".join(data.decode(errors="replace").splitlines()[-lines:])
    return text[-limit:]


def copy_to(handle: BinaryIO, out: BinaryIO) -> None:
    while chunk := handle.read(65536):
        out.write(chunk)
    out.flush()


def print_log(path: Path, follow: bool = False, tail: int | None = None, out: BinaryIO | None = None) -> None:
    """Write the log (its last ``tail`` lines) to ``out``; with ``follow`` keep writing what is appended."""
    out = out or sys.stdout.buffer
    with path.open("rb") as handle:
        if tail is not None:
            lines = handle.read().splitlines(keepends=True)
            out.write(b"".join(lines[-tail:] if tail else []))
            out.flush()
        else:
            copy_to(handle, out)
        while follow:
            time.sleep(FOLLOW_POLL_S)
            copy_to(handle, out)
