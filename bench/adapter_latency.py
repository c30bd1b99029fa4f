"""Seconds from a FineTuneJob's Succeeded to its adapter answering on every replica of a ModelServer.

    sudo .venv/bin/python bench/adapter_latency.py [--replicas 2] [--adapters 3]

Starts its own control plane (kwok nodes simulate the FineTuneJobs), a node agent whose Node runs the server
pods for real (vLLM on CPU, the tiny Qwen2), the CRDs and the operator. Adapters are trained by kubetune's
trainer beforehand into the claim's folder; each FineTuneJob is created suspended (so its claim is mounted
when the server starts), gets the trainer's status.adapter report, and is resumed. The clock starts when
this process sees the job Succeeded and stops when a chat completion naming the adapter returns 200 on every
replica (each asked at its pod IP). Target (issue 6): < 10 s. Results go to stdout and
bench/results/adapter_latency.json. Needs root (the node agent) and the server environment.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "operator")]

from tests.integration import serving  # noqa: E402
from tests.integration.support import (  # noqa: E402
    AGENT_LABEL,
    AGENT_TAINT,
    AgentProcess,
    Api,
    OperatorProcess,
    operator_config_for_tests,
    wait_for,
)

from kubetune.dev.binaries import ensure_binaries  # noqa: E402
from kubetune.dev.controlplane import ControlPlane  # noqa: E402
from kubetune.dev.nodes import create_simulated_nodes, parse_pools, wait_nodes_ready  # noqa: E402

SELECTOR = {"serve-on": "bench"}


def measure(api: Api, ns: str, root: Path, replicas: int, adapters: int) -> dict[str, Any]:
    names = [f"adapter-{i}" for i in range(adapters)]
    for i, name in enumerate(names):
        serving.train_adapter(root, name, steps=2, seed=i)
        api.apply(serving.suspended_ftj(name, ns, SELECTOR, run_seconds=1))
    api.apply(serving.model_server("bench", ns, replicas=replicas, adapterSelector={"matchLabels": SELECTOR}))
    started = time.monotonic()
    addresses = wait_for(
        lambda: len(a := serving.replica_addresses(api, ns, "bench")) == replicas and a, 600, "ready replicas", 1
    )
    startup = time.monotonic() - started
    latencies = []
    for name in names:
        serving.report_adapter(api, ns, name)
        serving.resume(api, ns, name)
        seconds = serving.seconds_to_serve(api, ns, name, name, addresses)
        print(f"{name}: answering on {replicas} replica(s) {seconds:.2f} s after Succeeded", flush=True)
        latencies.append(round(seconds, 3))
    return {
        "replicas": replicas,
        "server_start_s": round(startup, 1),
        "latencies_s": latencies,
        "median_s": round(statistics.median(latencies), 3),
        "max_s": max(latencies),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--adapters", type=int, default=3)
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "adapter_latency.json")
    args = parser.parse_args()
    state = Path(tempfile.mkdtemp(prefix="kubetune-bench-adapters-"))
    plane = ControlPlane(state / "cluster", ensure_binaries())
    agent: AgentProcess | None = None
    operator: OperatorProcess | None = None
    try:
        plane.start()
        names = create_simulated_nodes(plane.kubeconfig, parse_pools("gpu=2,cpu=1"))
        plane.wait_ready()
        wait_nodes_ready(plane.kubeconfig, names)
        cluster = plane.cluster()
        api = Api(cluster)
        cluster.kubectl("apply", "--server-side", "-f", str(ROOT / "crds"))
        cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd/modelservers.kubetune.io")
        (state / "agent").mkdir()
        agent = AgentProcess(
            cluster,
            state / "agent",
            "bench-serving",
            "127.98.0.0/16",
            args.replicas,
            AGENT_TAINT,
            ("=".join(AGENT_LABEL),),
        )
        agent.start()
        config = state / "operator.yaml"
        config.write_text(yaml.safe_dump(operator_config_for_tests()))
        operator = OperatorProcess(plane.kubeconfig, state, config)
        operator.start()
        ns = api.create_namespace()
        wait_for(lambda: api.get("ServiceAccount", ns, "default"), 30, "the default ServiceAccount")
        for claim in ("models", "adapters"):
            api.create_bound_pvc(ns, claim)
        root = agent.state_dir / "pvc" / ns
        serving.build_model(root)
        result = measure(api, ns, root, args.replicas, args.adapters)
        api.kubectl("delete", "modelservers,deployments,pods", "--all", "-n", ns, "--wait=false", check=False)
        wait_for(lambda: not api.kube.list("Pod", ns, "app.kubernetes.io/component=server"), 60, "server pods to go")
    finally:
        if operator:
            operator.stop()
        if agent:
            agent.stop()
        plane.stop()
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    machine = (
        f"{platform.node()}: {os.cpu_count()} cores, {memory_gib:.0f} GiB, {platform.machine()}, "
        f"Python {platform.python_version()}"
    )
    print(
        f"\n{machine}\nadapter latency over {args.replicas} replica(s): median {result['median_s']} s, "
        f"max {result['max_s']} s (target < 10 s); server start {result['server_start_s']} s"
    )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"machine": machine, **result}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
