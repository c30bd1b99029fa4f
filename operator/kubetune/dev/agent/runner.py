"""One run of a container: a process group started through ``unshare`` and the bootstrap, and its end."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from kubetune.dev.agent import bootstrap
from kubetune.dev.agent.logs import tail_bytes
from kubetune.dev.agent.volumes import Mount

BOOTSTRAP = Path(bootstrap.__file__).resolve()
MESSAGE_LIMIT = 4096
POD_UID_VARIABLE = "KUBETUNE_POD_UID"


@dataclass(frozen=True)
class Launch:
    """Everything the bootstrap needs to start a container."""

    argv: list[str]
    env: dict[str, str]
    hostname: str
    working_dir: str | None = None
    mounts: list[Mount] = field(default_factory=list)


class ContainerProcess:
    """A container's process, started in its own session and mount/UTS namespaces; output goes to ``log``.

    ``on_exit`` is called (from a waiter thread) once the main process has ended; what it left running in
    its process group is killed then, as the end of a container's PID 1 ends the container.
    """

    def __init__(self, folder: Path, log: Path, python: str, on_exit: Callable[[], None]) -> None:
        self.folder, self.log, self.python, self.on_exit = folder, log, python, on_exit
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_offset = 0
        self.exited = threading.Event()

    @property
    def termination_log(self) -> Path:
        return self.folder / "termination-log"

    @property
    def start_error_file(self) -> Path:
        return self.folder / "start-error"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self, launch: Launch, termination_path: str) -> int:
        """Start the container; its PID (also written to ``<folder>/pid``)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        self.termination_log.write_bytes(b"")
        self.start_error_file.unlink(missing_ok=True)
        mounts = [*launch.mounts]
        if not any(m.target == termination_path for m in mounts):
            mounts.append(Mount(str(self.termination_log), termination_path))
        spec = {
            "argv": launch.argv,
            "env": launch.env,
            "hostname": launch.hostname,
            "workingDir": launch.working_dir,
            "mounts": [m.as_dict() for m in mounts],
            "terminationLog": str(self.termination_log),
            "startError": str(self.start_error_file),
        }
        spec_path = self.folder / "launch.json"
        fd = os.open(spec_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump(spec, handle)
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as out:
            self.log_offset = out.tell()
            argv = ["unshare", "--mount", "--uts", "--propagation", "private"]
            self.proc = subprocess.Popen(
                [*argv, self.python, "-I", "-S", str(BOOTSTRAP), str(spec_path)],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env={"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"},
            )
        (self.folder / "pid").write_text(str(self.proc.pid))
        threading.Thread(target=self._wait, name=f"wait-{self.proc.pid}", daemon=True).start()
        return self.proc.pid

    def _wait(self) -> None:
        assert self.proc is not None
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitid(os.P_PID, self.proc.pid, os.WEXITED | os.WNOWAIT)  # ended, not yet reaped
        self.kill_group(signal.SIGKILL)  # while unreaped, the group ID cannot belong to anyone else
        self.proc.wait()
        (self.folder / "pid").unlink(missing_ok=True)
        self.exited.set()
        self.on_exit()

    def running(self) -> bool:
        return self.proc is not None and not self.exited.is_set()

    def kill_group(self, sig: int) -> None:
        """Send ``sig`` to the container's whole process group."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, sig)

    @property
    def exit_code(self) -> int:
        """The exit status as a container runtime reports it (128 + signal when killed)."""
        code = self.proc.returncode if self.proc and self.exited.is_set() else 0
        return 128 - code if code < 0 else code

    def start_error(self) -> str | None:
        """The bootstrap's message when the command could not be started."""
        try:
            return self.start_error_file.read_text().strip() or None
        except OSError:
            return None

    def termination_message(self, policy: str) -> str:
        """The termination-log file's content, or the log's end on failure with FallbackToLogsOnError."""
        try:
            message = self.termination_log.read_bytes()[:MESSAGE_LIMIT].decode(errors="replace")
        except OSError:
            message = ""
        if not message.strip() and policy == "FallbackToLogsOnError" and self.exit_code != 0:
            message = tail_bytes(self.log, start=self.log_offset)
        return message


def leftover_pid(folder: Path, pod_uid: str) -> int | None:
    """The PID recorded in a container folder if that process still runs for the pod ``pod_uid``."""
    try:
        pid = int((folder / "pid").read_text())
        environ = Path(f"/proc/{pid}/environ").read_bytes()
    except (OSError, ValueError):
        return None
    return pid if f"{POD_UID_VARIABLE}={pod_uid}".encode() in environ.split(b"\0") else None
