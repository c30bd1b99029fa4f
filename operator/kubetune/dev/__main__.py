"""``python -m kubetune.dev up|down|status|restart|logs|build|demo``: the local cluster from the command line.

The subcommands are carried out by dev/lifecycle.py (the cluster) and dev/demo.py (``demo``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kubetune.dev import kueue
from kubetune.dev.agent import daemons
from kubetune.dev.binaries import ensure_binaries, ensure_helm, ensure_kueue
from kubetune.dev.controlplane import COMPONENT_ALIASES, COMPONENTS
from kubetune.dev.lifecycle import DEFAULT_NODES, AgentOptions, OperatorOptions, down, logs, restart, status, up


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
    up_cmd.add_argument(
        "--operator-config", type=Path, default=None, help="the operator's configuration (default: the dev one)"
    )
    up_cmd.add_argument(
        "--operator-metrics-port", type=int, default=0, help="the operator's /metrics port on 127.0.0.1 (default: free)"
    )
    up_cmd.add_argument(
        "--kueue", action="store_true", help="run Kueue's manager (built from its Go module the first time)"
    )
    down_cmd = commands.add_parser("down", parents=[common], help="stop the cluster")
    down_cmd.add_argument("--purge", action="store_true", help="also delete the state folder")
    commands.add_parser("status", parents=[common], help="show each component's health")
    restart_cmd = commands.add_parser(
        "restart", parents=[common], help="restart one component with the same ports and certificates"
    )
    daemon_names = [daemons.AGENT, daemons.OPERATOR, kueue.NAME]
    restart_cmd.add_argument("component", choices=[*COMPONENTS, *COMPONENT_ALIASES, *daemon_names])
    logs_cmd = commands.add_parser("logs", parents=[common], help="print a container's log (pods of the node agent)")
    logs_cmd.add_argument("pod")
    logs_cmd.add_argument("-n", "--namespace", default="default")
    logs_cmd.add_argument("-c", "--container", default=None)
    logs_cmd.add_argument("-f", "--follow", action="store_true")
    logs_cmd.add_argument("--tail", type=int, default=None, help="only the last N lines")
    logs_cmd.add_argument(
        "--agent-dir", type=Path, default=None, help="the agent's state folder (default <state>/agent)"
    )
    build_cmd = commands.add_parser(
        "build", help="only build or fetch the binaries, Helm included (slow the first time), e.g. in CI"
    )
    build_cmd.add_argument("--kueue", action="store_true", help="also Kueue's manager (for the Kueue tests)")
    demo_cmd = commands.add_parser(
        "demo", parents=[common], help="train SFT then DPO on the agent, serve both adapters (make demo)"
    )
    demo_cmd.add_argument("--no-serve", action="store_true", help="stop after the DPO job")
    return root


def main(argv: list[str] | None = None) -> int:
    """Entry point; the exit code."""
    args = parser().parse_args(argv)
    try:
        return run_command(args)
    except (RuntimeError, TimeoutError, ValueError) as error:
        print(f"kubetune dev: {error}", file=sys.stderr)
        return 1


def run_command(args: argparse.Namespace) -> int:
    """Run the parsed subcommand; its exit code."""
    if args.command == "up":
        agent = AgentOptions(args.agent_node, args.agent_gpus, args.agent_cpu, args.agent_memory)
        operator = OperatorOptions(args.operator_config, args.operator_metrics_port)
        up(
            args.state_dir,
            nodes=args.nodes,
            apply_crds=not args.no_crds,
            agent=agent if args.agent else None,
            operator=operator if args.operator else None,
            kueue=args.kueue,
        )
        return 0
    if args.command == "restart":
        restart(args.state_dir, args.component)
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
        if args.kueue:
            print(f"kueue: {ensure_kueue().binary}")
        return 0
    if args.command == "logs":
        return logs(args.pod, args.namespace, args.container, args.follow, args.tail, args.state_dir, args.agent_dir)
    return 0 if status(args.state_dir) else 1


if __name__ == "__main__":
    sys.exit(main())
