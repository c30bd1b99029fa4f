"""The first program of every container: prepares its private mount namespace, then execs its command.

The agent starts ``unshare --mount --uts --propagation private <python> -I -S bootstrap.py SPEC.json``.
Inside the new namespaces (root needed) this bind-mounts each volume folder or file onto its mountPath
(creating the mount point when missing), sets the pod's hostname, changes to the working folder and
execs the command with the container's environment, so the command keeps the PID the agent knows.

Only the standard library is used, and nothing of kubetune is imported: it must start fast.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

MS_RDONLY = 1
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
EXIT_SETUP_FAILED = 128
EXIT_NOT_FOUND = 127
EXIT_NOT_EXECUTABLE = 126

libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)


def bind_mount(source_fd: int, target: str, read_only: bool) -> None:
    """Bind the file or folder open as ``source_fd`` onto ``target`` (made first when missing).

    Sources are opened before anything is mounted and mounted through /proc/self/fd, so that a mount
    over, say, /tmp does not hide the sources of later mounts that live under /tmp.
    """
    source = f"/proc/self/fd/{source_fd}"
    if os.path.isdir(source):
        os.makedirs(target, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(target) or "/", exist_ok=True)
        if not os.path.exists(target):
            with open(target, "a"):
                pass
    flags = MS_BIND | MS_REC
    if libc.mount(source.encode(), target.encode(), None, flags, None) != 0:
        raise OSError(ctypes.get_errno(), f"mount --bind {os.readlink(source)} {target}")
    if read_only and libc.mount(b"none", target.encode(), None, flags | MS_REMOUNT | MS_RDONLY, None) != 0:
        raise OSError(ctypes.get_errno(), f"remount read-only {target}")


def set_hostname(name: str) -> None:
    raw = name.encode()[:64]
    if libc.sethostname(raw, len(raw)) != 0:
        raise OSError(ctypes.get_errno(), f"sethostname {name}")


def fail(reports: list[int], code: int, message: str) -> None:
    """Report a start failure in the log, the termination message and a marker the agent reads."""
    print(f"kubetune dev agent: {message}", file=sys.stderr, flush=True)
    for fd in reports:
        with contextlib.suppress(OSError):
            os.write(fd, (message + "\n").encode())
    os._exit(code)


def main(spec_path: str) -> None:
    spec: dict[str, Any] = json.loads(Path(spec_path).read_text())
    os.unlink(spec_path)  # it holds the environment, secrets included
    # Opened now, written only on failure (after mounts may hide the paths); closed by exec.
    reports = [
        os.open(spec[key], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644) for key in ("terminationLog", "startError")
    ]
    try:
        if spec.get("hostname"):
            set_hostname(spec["hostname"])
        mounts = sorted(spec.get("mounts") or [], key=lambda m: m["target"].rstrip("/").count("/"))
        sources = [os.open(mount["source"], os.O_PATH) for mount in mounts]
        for mount, fd in zip(mounts, sources, strict=True):
            bind_mount(fd, mount["target"], bool(mount.get("readOnly")))
        for fd in sources:
            os.close(fd)
        workdir = spec.get("workingDir") or "/"
        os.makedirs(workdir, exist_ok=True)
        os.chdir(workdir)
    except OSError as error:
        fail(reports, EXIT_SETUP_FAILED, f"container setup failed: {error}")
    # Python ignores SIGPIPE and SIGXFSZ; ignored signals would stay ignored across exec.
    for name in ("SIGPIPE", "SIGXFSZ"):
        signal.signal(getattr(signal, name), signal.SIG_DFL)
    argv: list[str] = spec["argv"]
    try:
        os.execvpe(argv[0], argv, spec["env"])
    except FileNotFoundError:
        fail(reports, EXIT_NOT_FOUND, f'exec: "{argv[0]}": executable file not found in $PATH')
    except PermissionError:
        fail(reports, EXIT_NOT_EXECUTABLE, f'exec: "{argv[0]}": permission denied')
    except OSError as error:
        fail(reports, EXIT_SETUP_FAILED, f'exec: "{argv[0]}": {error}')


if __name__ == "__main__":
    main(sys.argv[1])
