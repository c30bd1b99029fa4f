"""The background processes ``kubetune dev up`` adds to the control plane: the node agent and the operator.

Each has a pid file ``<state>/<name>.pid``, a log ``<state>/logs/<name>.log`` and its command line in
``<state>/<name>.json`` (so that ``kubetune dev restart`` starts it again as it was); a PID is trusted only
while its command line still names the daemon (PIDs get reused). A daemon counts as started only once it
is ready: the agent when it has registered its Node, the operator when kopf answers its liveness endpoint
(kopf serves it only after the operator's startup handlers, which load its configuration, succeeded).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

from kubetune.config import GPU_TOLERATION, OperatorConfig, Scheduling
from kubetune.dev.agent.agent import kill_leftovers
from kubetune.dev.agent.node import AGENT_LABEL
from kubetune.dev.controlplane import process_alive, terminate

AGENT = "node-agent"
OPERATOR = "operator"


@dataclass(frozen=True)
class Daemon:
    """A background process of the dev cluster."""

    name: str
    argv: list[str]
    marker: str
    env: dict[str, str] = field(default_factory=dict)
    health_url: str = ""
    """Answers 200 once the daemon is ready; empty for the agent (it writes its ready file instead)."""


def agent_daemon(
    state_dir: Path, kubeconfig: Path, node: str, gpus: int, cpu: str, memory: str, pod_cidr: str
) -> Daemon:
    argv = [sys.executable, "-m", "kubetune.dev.agent", "--kubeconfig", str(kubeconfig)]
    argv += ["--state-dir", str(agent_dir(state_dir)), "--node-name", node, "--gpus", str(gpus)]
    argv += ["--cpu", cpu, "--memory", memory, "--pod-cidr", pod_cidr]
    return Daemon(AGENT, argv, "kubetune.dev.agent")


def operator_daemon(kubeconfig: Path, config: Path, metrics_port: int, health_port: int) -> Daemon:
    """The operator with its metrics and liveness endpoints on 127.0.0.1 (on 0.0.0.0 they would take the
    ports of the agent's pods, vLLM's 8000 among them), on ports of its own cluster."""
    health_url = f"http://127.0.0.1:{health_port}/healthz"
    argv = [sys.executable, "-m", "kubetune", "operator", "--liveness", health_url]
    argv += ["--metrics-address", f"127.0.0.1:{metrics_port}", "--config", str(config)]
    return Daemon(OPERATOR, argv, "operator", {"KUBECONFIG": str(kubeconfig)}, health_url)


def dev_operator_config(agent: bool) -> OperatorConfig:
    """The dev operator's configuration: with a node agent, chat pages run on the agent's Node (really, not
    on a simulated one). That Node carries the GPU taint, so they tolerate it."""
    if not agent:
        return OperatorConfig()
    return OperatorConfig(ui_scheduling=Scheduling(node_selector={AGENT_LABEL: "true"}, tolerations=[GPU_TOLERATION]))


def agent_dir(state_dir: Path) -> Path:
    """The node agent's own state (pods, volumes, claims, container logs)."""
    return state_dir / "agent"


def pid_file(state_dir: Path, name: str) -> Path:
    return state_dir / f"{name}.pid"


def record_file(state_dir: Path, name: str) -> Path:
    """The daemon as it was last started (:class:`Daemon` as JSON)."""
    return state_dir / f"{name}.json"


def recorded(state_dir: Path, name: str) -> Daemon | None:
    """The daemon as it was last started in ``state_dir``, if ever."""
    try:
        return Daemon(**json.loads(record_file(state_dir, name).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def log_file(state_dir: Path, name: str) -> Path:
    return state_dir / "logs" / f"{name}.log"


def running_pid(state_dir: Path, name: str, marker: str) -> int | None:
    """The daemon's PID if it runs."""
    try:
        pid = int(pid_file(state_dir, name).read_text())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return None
    return pid if process_alive(pid) and marker.encode() in cmdline else None


def start(state_dir: Path, daemon: Daemon) -> int:
    """Start the daemon unless it runs; its PID."""
    pid = running_pid(state_dir, daemon.name, daemon.marker)
    if pid is not None:
        return pid
    log = log_file(state_dir, daemon.name)
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        proc = subprocess.Popen(
            daemon.argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **daemon.env},
            start_new_session=True,
        )
    pid_file(state_dir, daemon.name).write_text(str(proc.pid))
    record_file(state_dir, daemon.name).write_text(json.dumps(asdict(daemon), indent=2) + "\n")
    return proc.pid


def start_ready(state_dir: Path, daemon: Daemon, timeout: float) -> tuple[int, Daemon]:
    """Start the daemon unless it runs, and wait until it is ready: its PID and the daemon as it was started
    (a daemon that ran already keeps its ports)."""
    pid = start(state_dir, daemon)
    running = recorded(state_dir, daemon.name) or daemon
    wait_ready(state_dir, running, pid, timeout)
    return pid, running


def restart(state_dir: Path, name: str, timeout: float) -> int:
    """Stop the daemon and start it again as it was last started (same command line, same ports); once
    ready, its new PID."""
    daemon = recorded(state_dir, name)
    if daemon is None:
        raise RuntimeError(f"no {name} was started in {state_dir}")
    stop(state_dir, name, daemon.marker)
    return start_ready(state_dir, daemon, timeout)[0]


def agent_ready(state_dir: Path, pid: int) -> bool:
    """Whether the agent with ``pid`` has registered its Node and listed its pods."""
    try:
        return int((agent_dir(state_dir) / "ready").read_text()) == pid
    except (OSError, ValueError):
        return False


def answers(url: str) -> bool:
    """Whether ``url`` answers 200."""
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return int(response.status) == 200
    except (OSError, urllib.error.URLError):
        return False


def ready(state_dir: Path, daemon: Daemon, pid: int) -> bool:
    """Whether the daemon started as ``pid`` is ready (see the module docstring)."""
    if daemon.name == AGENT:
        return agent_ready(state_dir, pid)
    if daemon.health_url:
        return answers(daemon.health_url)
    return running_pid(state_dir, daemon.name, daemon.marker) == pid


def wait_ready(state_dir: Path, daemon: Daemon, pid: int, timeout: float) -> None:
    """Wait until the daemon is ready; RuntimeError with the end of its log if it exits or is not ready in time."""
    deadline = time.monotonic() + timeout
    while not ready(state_dir, daemon, pid):
        report = exit_report(state_dir, daemon)
        if report:
            raise RuntimeError(f"the {daemon.name} did not start: {report}")
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"the {daemon.name} (pid {pid}) is not ready after {timeout:.0f}s; {log_tail(state_dir, daemon.name)}"
            )
        time.sleep(0.2)


def exit_report(state_dir: Path, daemon: Daemon) -> str | None:
    """None while the daemon runs; else why not: the end of its log."""
    # Looked at twice: a cold `make demo` once saw a starting agent as gone while it was running.
    for pause in (0.5, 0.0):
        if running_pid(state_dir, daemon.name, daemon.marker) is not None:
            return None
        time.sleep(pause)
    return f"it exited; {log_tail(state_dir, daemon.name)}"


def log_tail(state_dir: Path, name: str, lines: int = 15) -> str:
    """The end of a daemon's log, for error messages."""
    log = log_file(state_dir, name)
    tail = "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) if log.exists() else ""
    return f"end of {log}:\n{tail}"


def stop(state_dir: Path, name: str, marker: str) -> bool:
    """SIGTERM the daemon (SIGKILL after 10 s); True if it was running. The agent's leftovers are killed too."""
    pid = running_pid(state_dir, name, marker)
    if pid is not None:
        terminate(pid)
    pid_file(state_dir, name).unlink(missing_ok=True)
    if name == AGENT:
        pods = agent_dir(state_dir) / "pods"
        for folder in pods.iterdir() if pods.is_dir() else []:
            kill_leftovers(folder, folder.name)
    return pid is not None
