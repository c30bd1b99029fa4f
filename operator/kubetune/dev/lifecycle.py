"""The local cluster's life: ``up``, ``down``, ``restart``, ``status`` and ``logs`` (``python -m kubetune.dev`` calls
them; so do the demo and the tests).

``up`` starts the control plane with its simulated nodes, then (unless told not to) the node agent, which
runs the pods bound to its node as local processes, and the operator, both in the background.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from kubetune.config import load as load_operator_config
from kubetune.dev import kueue as kueue_manager
from kubetune.dev.agent import daemons
from kubetune.dev.agent.logs import container_log, find_pod_log_dir, print_log
from kubetune.dev.binaries import KUEUE_VERSION, ensure_binaries, ensure_kueue
from kubetune.dev.controlplane import Cluster, ControlPlane, KubectlError, free_ports, repo_root
from kubetune.dev.nodes import create_simulated_nodes, parse_pools, wait_nodes_ready
from kubetune.dev.podranges import claim_pod_range, release_pod_range
from kubetune.signing import key_file

DEFAULT_NODES = "gpu=4,cpu=2"
DAEMON_START_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class AgentOptions:
    """The node agent's Node, as ``up`` starts it."""

    node: str = "dev-gpu-0"
    gpus: int = 4
    cpu: str = "2"
    memory: str = "20Gi"


@dataclass(frozen=True)
class OperatorOptions:
    """The operator, as ``up`` starts it."""

    config: Path | None = None
    """Its configuration file; None: the dev configuration (:func:`daemons.dev_operator_config`)."""
    metrics_port: int = 0
    """Its /metrics port on 127.0.0.1; 0: a free one."""


def crd_files(root: Path) -> list[Path]:
    """The CRD manifests in ``<root>/crds`` (none when the folder is missing)."""
    folder = root / "crds"
    return sorted([*folder.glob("*.yaml"), *folder.glob("*.yml")]) if folder.is_dir() else []


def up(
    state_dir: Path | None = None,
    nodes: str = DEFAULT_NODES,
    apply_crds: bool = True,
    agent: AgentOptions | None = None,
    operator: OperatorOptions | None = None,
    kueue: bool = False,
) -> Cluster:
    """Build or find the binaries, start the control plane, add the simulated nodes and the CRDs; then Kueue
    (when ``kueue``), the node agent (when ``agent`` is given) and the operator (when ``operator`` is) in the
    background.

    RuntimeError when a part does not start (with the end of its log); the parts started before it keep running.
    """
    started = time.monotonic()
    pools = parse_pools(nodes)
    operator_config = operator_config_text(operator.config, agent is not None) if operator else None
    plane = ControlPlane(state_dir, ensure_binaries())
    built_kueue = ensure_kueue() if kueue else None
    plane.start()
    names = create_simulated_nodes(plane.kubeconfig, pools)  # meanwhile the controllers start up
    plane.wait_ready()
    wait_nodes_ready(plane.kubeconfig, names)
    cluster = plane.cluster()
    print(
        f"kubetune dev: cluster ready in {time.monotonic() - started:.1f}s "
        f"({sum(p.count for p in pools)} simulated nodes)"
    )
    print(f"kubeconfig: {plane.kubeconfig}")
    print(f"export KUBECONFIG={plane.kubeconfig}")
    crds = crd_files(repo_root()) if apply_crds else []
    if crds:
        apply_crd_files(cluster, crds)
        print(f"kubetune dev: applied {len(crds)} CRD files from crds/")
    if built_kueue is not None:
        pid = kueue_manager.start(cluster, plane.state_dir, built_kueue)
        log = daemons.log_file(plane.state_dir, kueue_manager.NAME)
        print(f"kubetune dev: Kueue {KUEUE_VERSION} running (pid {pid}, log {log})")
    else:
        kueue_manager.stop(cluster, plane.state_dir)  # a Kueue of an earlier `up` must not keep its webhooks
    if agent is not None:
        start_agent(plane.state_dir, plane.kubeconfig, agent)
    if operator is not None and operator_config is not None:
        start_operator(plane.state_dir, plane.kubeconfig, operator_config, operator.metrics_port)
    return cluster


def operator_config_text(path: Path | None, agent: bool) -> str:
    """The operator's configuration as YAML: the file at ``path``, validated here so that a mistake fails
    at once (the operator would retry its start-up), else the dev configuration."""
    if path is None:
        settings = daemons.dev_operator_config(agent and os.geteuid() == 0)
    else:
        try:
            settings = load_operator_config(path)
        except (OSError, ValueError) as error:
            raise RuntimeError(f"--operator-config {path}: {error}") from error
    return yaml.safe_dump(settings.model_dump(mode="json", by_alias=True, exclude_none=True))


def start_agent(state_dir: Path, kubeconfig: Path, options: AgentOptions) -> None:
    """Start the node agent in the background, its pods in a loopback range of its own, and wait until it
    serves its Node."""
    if os.geteuid() != 0:
        print("kubetune dev: not starting the node agent: it needs root (pass --no-agent to silence this)")
        return
    pod_cidr = claim_pod_range(daemons.agent_dir(state_dir))
    daemon = daemons.agent_daemon(
        state_dir, kubeconfig, options.node, options.gpus, options.cpu, options.memory, pod_cidr
    )
    try:
        pid, _ = daemons.start_ready(state_dir, daemon, DAEMON_START_TIMEOUT_S)
    except RuntimeError as error:
        raise RuntimeError(f"the cluster runs, but {error}") from None
    log = daemons.log_file(state_dir, daemon.name)
    print(f"kubetune dev: node agent running (pid {pid}, node {options.node}, pods in {pod_cidr}, log {log})")


def with_signing_key(config_text: str, state_dir: Path) -> str:
    """The operator's configuration with a signing key of the cluster's own (made once in the state folder, so
    that a restarted operator keeps it and the servers keep their pods), unless it names one."""
    settings = yaml.safe_load(config_text) or {}
    server = settings.setdefault("server", {})
    if not server.get("signingKeyFile"):
        server["signingKeyFile"] = str(key_file(state_dir / "signing-key.pem"))
    return yaml.safe_dump(settings)


def start_operator(state_dir: Path, kubeconfig: Path, config_text: str, metrics_port: int) -> None:
    """Start the operator in the background on ports of this cluster, and wait until it is ready."""
    config = state_dir / "operator.yaml"
    config.write_text(with_signing_key(config_text, state_dir))
    health_port, free_metrics_port = free_ports(2)
    daemon = daemons.operator_daemon(kubeconfig, config, metrics_port or free_metrics_port, health_port)
    try:
        pid, running = daemons.start_ready(state_dir, daemon, DAEMON_START_TIMEOUT_S)
    except RuntimeError as error:
        raise RuntimeError(f"the cluster runs, but {error}") from None
    metrics = running.argv[running.argv.index("--metrics-address") + 1]
    log = daemons.log_file(state_dir, daemon.name)
    print(f"kubetune dev: operator running (pid {pid}, metrics http://{metrics}/metrics, log {log})")


def apply_crd_files(cluster: Cluster, paths: list[Path]) -> None:
    """Server-side apply the files of crds/ (the CRDs and the trainer's status policy) and wait until the CRDs
    are Established."""
    files = [f"--filename={path}" for path in paths]
    crds = [f"--filename={path}" for path in paths if "CustomResourceDefinition" in path.read_text()]
    try:
        cluster.kubectl("apply", "--server-side", "--force-conflicts", *files)
        cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", *crds)
    except KubectlError as error:
        raise RuntimeError(f"the cluster runs, but applying crds/ failed:\n{error.stderr.strip()}") from error


def down(state_dir: Path | None = None, purge: bool = False) -> None:
    """Stop every component; with ``purge`` also delete the state folder (etcd data, certificates) and give
    up the agent's pod address range."""
    plane = ControlPlane(state_dir)
    if plane.state_dir.is_dir():
        daemons.stop(plane.state_dir, daemons.OPERATOR, "operator")
        daemons.stop(plane.state_dir, daemons.AGENT, "kubetune.dev.agent")
        kueue_manager.stop(plane.cluster() if plane.state_file.exists() else None, plane.state_dir)
    plane.stop()
    if purge:
        release_pod_range(daemons.agent_dir(plane.state_dir))
        shutil.rmtree(plane.state_dir, ignore_errors=True)
    print(f"kubetune dev: stopped{' and removed' if purge else ''} {plane.state_dir}")


def restart(state_dir: Path | None, component: str) -> None:
    """Stop one component and start it again with the same ports, certificates and command line."""
    plane = ControlPlane(state_dir)
    if component in (daemons.AGENT, daemons.OPERATOR, kueue_manager.NAME):
        pid = daemons.restart(plane.state_dir, component, DAEMON_START_TIMEOUT_S)
    else:
        pid = plane.restart(component)
    print(f"kubetune dev: {component} restarted (pid {pid})")


def status(state_dir: Path | None = None) -> bool:
    """Print each component's state; True when all are healthy (a daemon never started counts as healthy)."""
    plane = ControlPlane(state_dir)
    statuses = plane.status()
    for s in statuses:
        state = "healthy" if s.healthy else ("running" if s.running else "stopped")
        print(f"{s.name:<24} {state:<8} pid={s.pid or '-':<8} {s.detail}")
    healthy = all(s.healthy for s in statuses)
    for name in (kueue_manager.NAME, daemons.AGENT, daemons.OPERATOR):
        state, pid, detail = daemon_status(plane.state_dir, name)
        healthy = healthy and state in ("healthy", "stopped")
        print(f"{name:<24} {state:<8} pid={pid or '-':<8} {detail}")
    if plane.kubeconfig.exists():
        print(f"kubeconfig: {plane.kubeconfig}")
    return healthy


def daemon_status(state_dir: Path, name: str) -> tuple[str, int | None, str]:
    """(healthy, running (not ready), exited (its pid file is there) or stopped; its PID; a detail)."""
    daemon = daemons.recorded(state_dir, name)
    pid = daemons.running_pid(state_dir, name, daemon.marker) if daemon else None
    log = f"log {daemons.log_file(state_dir, name)}"
    if daemon is None or (pid is None and not daemons.pid_file(state_dir, name).exists()):
        return "stopped", None, "not running"
    if pid is None:
        return "exited", None, log
    return ("healthy" if daemons.ready(state_dir, daemon, pid) else "running"), pid, log


def logs(
    pod: str,
    namespace: str,
    container: str | None,
    follow: bool,
    tail: int | None,
    state_dir: Path | None = None,
    agent_state: Path | None = None,
) -> int:
    """Print a container's log as the node agent wrote it; the exit code."""
    root = (agent_state or daemons.agent_dir(ControlPlane(state_dir).state_dir)) / "logs"
    folder = find_pod_log_dir(root, namespace, pod)
    if folder is None:
        print(f"kubetune dev: no logs of pod {namespace}/{pod} under {root}", file=sys.stderr)
        return 1
    try:
        print_log(container_log(folder, container), follow=follow, tail=tail)
    except ValueError as error:
        print(f"kubetune dev: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0
