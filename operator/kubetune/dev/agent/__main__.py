"""``python -m kubetune.dev.agent``: run the node agent in the foreground (as root) until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path
from types import FrameType

from kubetune.dev.agent.agent import Agent, AgentConfig
from kubetune.dev.agent.node import dev_gpu_node, parse_taint
from kubetune.dev.podranges import claim_pod_range


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m kubetune.dev.agent",
        description="A node agent that runs the pods bound to its Node as local processes (needs root).",
    )
    p.add_argument("--kubeconfig", default=os.environ.get("KUBECONFIG"), help="admin kubeconfig (default $KUBECONFIG)")
    p.add_argument("--state-dir", type=Path, required=True, help="pod folders, volumes, claims and logs")
    p.add_argument("--node-name", default="dev-gpu-0")
    p.add_argument("--gpus", type=int, default=4, help="nvidia.com/gpu capacity; >0 adds the 4090 D labels and taint")
    p.add_argument("--cpu", default="2")
    p.add_argument("--memory", default="20Gi")
    p.add_argument("--label", action="append", default=[], metavar="KEY=VALUE", help="an extra node label")
    p.add_argument("--taint", action="append", default=[], metavar="KEY=VALUE:EFFECT", help="an extra node taint")
    p.add_argument(
        "--pod-cidr",
        default=None,
        help="loopback range of pod addresses (default: a free /16 of 127.0.0.0/8, kept for --state-dir)",
    )
    p.add_argument("--backoff", type=float, default=10.0, help="first crash-loop back-off in seconds (doubles)")
    p.add_argument("--pass-env", action="append", default=[], metavar="NAME", help="pass this variable to all pods")
    p.add_argument("--verbose", "-v", action="store_true")
    return p


def config_from(args: argparse.Namespace) -> AgentConfig:
    node = dev_gpu_node(args.node_name, gpus=args.gpus, cpu=args.cpu, memory=args.memory)
    labels = dict(node.labels)
    for item in args.label:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"bad label {item!r}: expected KEY=VALUE")
        labels[key] = value
    taints = (*node.taints, *(parse_taint(t) for t in args.taint))
    node = type(node)(**{**node.__dict__, "labels": labels, "taints": taints})
    pass_env = {name: os.environ[name] for name in args.pass_env if name in os.environ}
    return AgentConfig(
        kubeconfig=args.kubeconfig,
        state_dir=args.state_dir,
        pod_cidr=args.pod_cidr or claim_pod_range(args.state_dir),
        node=node,
        backoff_initial_s=args.backoff,
        pass_env=pass_env,
    )


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("urllib3").setLevel(logging.WARNING)
    if not args.kubeconfig:
        print("kubetune dev agent: --kubeconfig or $KUBECONFIG is required", file=sys.stderr)
        return 2
    try:
        agent = Agent(config_from(args))
    except (ValueError, RuntimeError) as error:
        print(f"kubetune dev agent: {error}", file=sys.stderr)
        return 2

    def stop(signum: int, _frame: FrameType | None) -> None:
        logging.getLogger(__name__).info("signal %d: stopping", signum)
        agent.stop.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        agent.run()
    except RuntimeError as error:
        print(f"kubetune dev agent: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
