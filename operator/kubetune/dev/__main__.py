"""``python -m kubetune.dev up|down|status|logs|build|demo``: the local cluster from the command line.

``up`` starts the control plane with its simulated nodes, then (unless told not to) the node agent, which
runs the pods bound to its node as local processes, and the operator, both in the background.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from kubetune.dev.agent import daemons
from kubetune.dev.agent.logs import container_log, find_pod_log_dir, print_log
from kubetune.dev.binaries import ensure_binaries, ensure_helm
from kubetune.dev.controlplane import Cluster, ControlPlane, KubectlError, repo_root
from kubetune.dev.nodes import create_simulated_nodes, parse_pools, wait_nodes_ready

DEFAULT_NODES = "gpu=4,cpu=2"
AGENT_START_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class AgentOptions:
    """The node agent's Node, as ``up`` starts it."""

    node: str = "dev-gpu-0"
    gpus: int = 4
    cpu: str = "2"
    memory: str = "20Gi"


def crd_files(root: Path) -> list[Path]:
    """The CRD manifests in ``<root>/crds`` (none when the folder is missing)."""
    folder = root / "crds"
    return sorted([*folder.glob("*.yaml"), *folder.glob("*.yml")]) if folder.is_dir() else []


def up(
    state_dir: Path | None = None,
    nodes: str = DEFAULT_NODES,
    apply_crds: bool = True,
    agent: AgentOptions | None = None,
    operator: bool = False,
) -> Cluster:
    """Build or find the binaries, start the control plane, add the simulated nodes and the CRDs; then the
    node agent (when ``agent`` is given) and the operator in the background."""
    started = time.monotonic()
    plane = ControlPlane(state_dir, ensure_binaries())
    pools = parse_pools(nodes)
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
    if agent is not None:
        start_agent(plane.state_dir, plane.kubeconfig, agent)
    if operator:
        config = plane.state_dir / "operator.yaml"
        settings = daemons.dev_operator_config(agent is not None and os.geteuid() == 0)
        config.write_text(yaml.safe_dump(settings.model_dump(mode="json", by_alias=True, exclude_none=True)))
        daemon = daemons.operator_daemon(plane.kubeconfig, config)
        pid = daemons.start(plane.state_dir, daemon)
        print(f"kubetune dev: operator running (pid {pid}, log {daemons.log_file(plane.state_dir, daemon.name)})")
    return cluster


def start_agent(state_dir: Path, kubeconfig: Path, options: AgentOptions) -> None:
    """Start the node agent in the background and wait until it serves its Node."""
    if os.geteuid() != 0:
        print("kubetune dev: not starting the node agent: it needs root (pass --no-agent to silence this)")
        return
    daemon = daemons.agent_daemon(state_dir, kubeconfig, options.node, options.gpus, options.cpu, options.memory)
    pid = daemons.start(state_dir, daemon)
    deadline = time.monotonic() + AGENT_START_TIMEOUT_S
    while not daemons.agent_ready(state_dir, pid):
        report = daemons.exit_report(state_dir, daemon)
        if report:
            raise RuntimeError(f"the cluster runs, but the node agent did not start: {report}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the node agent did not get ready in {AGENT_START_TIMEOUT_S:.0f}s")
        time.sleep(0.2)
    log = daemons.log_file(state_dir, daemon.name)
    print(f"kubetune dev: node agent running (pid {pid}, node {options.node}, log {log})")


def apply_crd_files(cluster: Cluster, paths: list[Path]) -> None:
    """Server-side apply the CRDs and wait until they are Established."""
    files = [f"--filename={path}" for path in paths]
    try:
        cluster.kubectl("apply", "--server-side", "--force-conflicts", *files)
        cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", *files)
    except KubectlError as error:
        raise RuntimeError(f"the cluster runs, but applying crds/ failed:\n{error.stderr.strip()}") from error


def down(state_dir: Path | None = None, purge: bool = False) -> None:
    """Stop every component; with ``purge`` also delete the state folder (etcd data, certificates)."""
    plane = ControlPlane(state_dir)
    if plane.state_dir.is_dir():
        daemons.stop(plane.state_dir, daemons.OPERATOR, "operator")
        daemons.stop(plane.state_dir, daemons.AGENT, "kubetune.dev.agent")
    plane.stop()
    if purge:
        shutil.rmtree(plane.state_dir, ignore_errors=True)
    print(f"kubetune dev: stopped{' and removed' if purge else ''} {plane.state_dir}")


def status(state_dir: Path | None = None) -> bool:
    """Print each component's state; True when all are healthy."""
    plane = ControlPlane(state_dir)
    statuses = plane.status()
    for s in statuses:
        state = "healthy" if s.healthy else ("running" if s.running else "stopped")
        print(f"{s.name:<24} {state:<8} pid={s.pid or '-':<8} {s.detail}")
    for name, marker in ((daemons.AGENT, "kubetune.dev.agent"), (daemons.OPERATOR, "operator")):
        pid = daemons.running_pid(plane.state_dir, name, marker)
        detail = f"log {daemons.log_file(plane.state_dir, name)}" if pid else "not running"
        print(f"{name:<24} {'running' if pid else 'stopped':<8} pid={pid or '-':<8} {detail}")
    if plane.kubeconfig.exists():
        print(f"kubeconfig: {plane.kubeconfig}")
    return all(s.healthy for s in statuses)


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


def parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m kubetune.dev`` (and later ``kubetune dev``)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--state-dir", type=Path, default=None, help="state folder (default: ${KUBETUNE_STATE:-<repo>/.state}/cluster)"
    )
    root = argparse.ArgumentParser(prog="kubetune dev", description="The local control plane with simulated GPU nodes.")
    commands = root.add_subparsers(dest="command", required=True)
    up_cmd = commands.add_parser("up", parents=[common], help="start the cluster (builds the binaries the first time)")
    up_cmd.add_argument("--nodes", default=DEFAULT_NODES, help="simulated nodes, e.g. gpu=250,cpu=2")
    up_cmd.add_argument("--no-crds", action="store_true", help="do not apply crds/*.yaml")
    up_cmd.add_argument(
        "--agent", action=argparse.BooleanOptionalAction, default=True, help="run the node agent (needs root)"
    )
    up_cmd.add_argument("--agent-node", default=AgentOptions.node, help="the node agent's Node name")
    up_cmd.add_argument("--agent-gpus", type=int, default=AgentOptions.gpus, help="nvidia.com/gpu of that Node")
    up_cmd.add_argument("--agent-cpu", default=AgentOptions.cpu, help="cpu capacity of that Node")
    up_cmd.add_argument("--agent-memory", default=AgentOptions.memory, help="memory capacity of that Node")
    up_cmd.add_argument(
        "--operator", action=argparse.BooleanOptionalAction, default=True, help="run the kubetune operator"
    )
    down_cmd = commands.add_parser("down", parents=[common], help="stop the cluster")
    down_cmd.add_argument("--purge", action="store_true", help="also delete the state folder")
    commands.add_parser("status", parents=[common], help="show each component's health")
    logs_cmd = commands.add_parser("logs", parents=[common], help="print a container's log (pods of the node agent)")
    logs_cmd.add_argument("pod")
    logs_cmd.add_argument("-n", "--namespace", default="default")
    logs_cmd.add_argument("-c", "--container", default=None)
    logs_cmd.add_argument("-f", "--follow", action="store_true")
    logs_cmd.add_argument("--tail", type=int, default=None, help="only the last N lines")
    logs_cmd.add_argument(
        "--agent-dir", type=Path, default=None, help="the agent's state folder (default <state>/agent)"
    )
    commands.add_parser(
        "build", help="only build or fetch the binaries, Helm included (slow the first time), e.g. in CI"
    )
    demo_cmd = commands.add_parser(
        "demo", parents=[common], help="train SFT then DPO on the agent, serve both adapters (make demo)"
    )
    demo_cmd.add_argument("--no-serve", action="store_true", help="stop after the DPO job")
    return root


def main(argv: list[str] | None = None) -> int:
    """Entry point; the exit code."""
    args = parser().parse_args(argv)
    if args.command == "up":
        agent = AgentOptions(args.agent_node, args.agent_gpus, args.agent_cpu, args.agent_memory)
        try:
            up(
                args.state_dir,
                nodes=args.nodes,
                apply_crds=not args.no_crds,
                agent=agent if args.agent else None,
                operator=args.operator,
            )
        except RuntimeError as error:
            print(f"kubetune dev: {error}", file=sys.stderr)
            return 1
        return 0
    if args.command == "down":
        down(args.state_dir, purge=args.purge)
        return 0
    if args.command == "demo":
        from kubetune.dev import demo

        return demo.run(args.state_dir, serve_models=not args.no_serve)
    if args.command == "build":
        print(ensure_binaries())
        print(f"helm: {ensure_helm()}")
        return 0
    if args.command == "logs":
        return logs(args.pod, args.namespace, args.container, args.follow, args.tail, args.state_dir, args.agent_dir)
    return 0 if status(args.state_dir) else 1


if __name__ == "__main__":
    sys.exit(main())
