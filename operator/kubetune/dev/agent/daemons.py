"""The background processes ``kubetune dev up`` adds to the control plane: the node agent and the operator.

Each has a pid file ``<state>/<name>.pid`` and a log ``<state>/logs/<name>.log``; a PID is trusted only
while its command line still names the daemon (PIDs get reused).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
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


def agent_daemon(state_dir: Path, kubeconfig: Path, node: str, gpus: int, cpu: str, memory: str) -> Daemon:
    argv = [sys.executable, "-m", "kubetune.dev.agent", "--kubeconfig", str(kubeconfig)]
    argv += ["--state-dir", str(agent_dir(state_dir)), "--node-name", node, "--gpus", str(gpus)]
    argv += ["--cpu", cpu, "--memory", memory]
    return Daemon(AGENT, argv, "kubetune.dev.agent")


def operator_daemon(kubeconfig: Path, config: Path) -> Daemon:
    # Pods listen on their own 127.1.x.y; the operator on 0.0.0.0 would take their ports (vLLM's 8000).
    argv = [sys.executable, "-m", "kubetune", "operator", "--liveness", "", "--metrics-address", "127.0.0.1:8000"]
    argv += ["--config", str(config)]
    return Daemon(OPERATOR, argv, "operator", {"KUBECONFIG": str(kubeconfig)})


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
    return proc.pid


def agent_ready(state_dir: Path, pid: int) -> bool:
    """Whether the agent with ``pid`` has registered its Node and listed its pods."""
    try:
        return int((agent_dir(state_dir) / "ready").read_text()) == pid
    except (OSError, ValueError):
        return False


def exit_report(state_dir: Path, daemon: Daemon) -> str | None:
    """None while the daemon runs; else why not: the end of its log."""
    # Looked at twice: a cold `make demo` once saw a starting agent as gone while it was running.
    for pause in (0.5, 0.0):
        if running_pid(state_dir, daemon.name, daemon.marker) is not None:
            return None
        time.sleep(pause)
    log = log_file(state_dir, daemon.name)
    tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:]) if log.exists() else ""
    return f"{daemon.name} exited; end of {log}:\n{tail}"


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
