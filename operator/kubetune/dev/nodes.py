"""Simulated nodes: the pools of kwok-managed Nodes that stand in for a GPU cluster."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

KWOK_ANNOTATION = "kwok.x-k8s.io/node"
KWOK_ANNOTATION_VALUE = "fake"
GPU_RESOURCE = "nvidia.com/gpu"
GPU_TAINT = {"key": GPU_RESOURCE, "value": "present", "effect": "NoSchedule"}


@dataclass(frozen=True)
class NodePool:
    """``count`` identical nodes named ``<prefix>-0 .. <prefix>-<count-1>``."""

    prefix: str
    count: int
    cpu: str
    memory: str
    pods: int = 110
    gpus: int = 0
    labels: dict[str, str] = field(default_factory=dict)
    taints: tuple[dict[str, str], ...] = ()

    def names(self) -> list[str]:
        """The node names of this pool."""
        return [f"{self.prefix}-{index}" for index in range(self.count)]


def rtx_4090d_pool(count: int = 4) -> NodePool:
    """GPU nodes with four 24 GiB RTX 4090 D each, tainted so only GPU pods land there."""
    return NodePool(
        prefix="gpu-4090d",
        count=count,
        cpu="64",
        memory="256Gi",
        gpus=4,
        labels={
            "nvidia.com/gpu.product": "NVIDIA-GeForce-RTX-4090-D",
            "nvidia.com/gpu.memory": "24564",
            "kubetune.io/gpu-type": "rtx-4090d",
        },
        taints=(GPU_TAINT,),
    )


def cpu_pool(count: int = 2) -> NodePool:
    """Plain CPU nodes for everything that needs no GPU."""
    return NodePool(prefix="cpu", count=count, cpu="32", memory="128Gi")


def default_pools(gpu_nodes: int = 4, cpu_nodes: int = 2) -> list[NodePool]:
    """The standard simulated cluster: 4 GPU nodes and 2 CPU nodes unless told otherwise."""
    return [pool for pool in (rtx_4090d_pool(gpu_nodes), cpu_pool(cpu_nodes)) if pool.count > 0]


def parse_pools(spec: str) -> list[NodePool]:
    """Pools from a CLI string such as ``gpu=250,cpu=2`` (a missing kind counts 0)."""
    counts = {"gpu": 0, "cpu": 0}
    for part in filter(None, (item.strip() for item in spec.split(","))):
        kind, _, number = part.partition("=")
        if kind not in counts or not number.isdigit():
            raise ValueError(f"bad node spec {part!r}: expected gpu=N or cpu=N")
        counts[kind] = int(number)
    return default_pools(gpu_nodes=counts["gpu"], cpu_nodes=counts["cpu"])


def node_manifest(pool: NodePool, name: str) -> dict[str, Any]:
    """The Node object of one simulated node, with its capacity in status (kwok keeps it)."""
    resources = {"cpu": pool.cpu, "memory": pool.memory, "pods": str(pool.pods)}
    if pool.gpus:
        resources[GPU_RESOURCE] = str(pool.gpus)
    labels = {
        "kubernetes.io/hostname": name,
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": "amd64",
        "type": "kwok",
        **pool.labels,
    }
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": labels, "annotations": {KWOK_ANNOTATION: KWOK_ANNOTATION_VALUE}},
        "spec": {"taints": [dict(taint) for taint in pool.taints]},
        "status": {"capacity": dict(resources), "allocatable": dict(resources)},
    }


def node_manifests(pools: Sequence[NodePool]) -> list[dict[str, Any]]:
    """Every Node object of ``pools``."""
    return [node_manifest(pool, name) for pool in pools for name in pool.names()]


def create_simulated_nodes(kubeconfig: Path | str, pools: Sequence[NodePool] | None = None) -> list[str]:
    """Create the Nodes of ``pools`` (default: :func:`default_pools`); existing ones are left alone.

    Returns the names of all nodes of the pools.
    """
    from kubernetes import client, config  # imported here: slow, and only this function needs it

    api = client.CoreV1Api(config.new_client_from_config(config_file=str(kubeconfig)))
    manifests = node_manifests(default_pools() if pools is None else pools)
    for manifest in manifests:
        try:
            api.create_node(cast(Any, manifest))  # the client sends a plain dict as it is
        except client.ApiException as error:
            if error.status != 409:
                raise
    return [manifest["metadata"]["name"] for manifest in manifests]


def wait_nodes_ready(kubeconfig: Path | str, names: Sequence[str], timeout: float = 60.0) -> None:
    """Wait until every named node has condition Ready=True."""
    from kubernetes import client, config

    api = client.CoreV1Api(config.new_client_from_config(config_file=str(kubeconfig)))
    deadline = time.monotonic() + timeout
    pending = set(names)
    while pending:
        ready = {node.metadata.name for node in api.list_node().items if node.metadata and is_ready(node)}
        pending -= ready
        if not pending:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"nodes not Ready after {timeout:.0f}s: {sorted(pending)}")
        time.sleep(0.3)


def is_ready(node: Any) -> bool:
    """Whether a Node (kubernetes client object) reports Ready=True."""
    conditions = (node.status and node.status.conditions) or []
    return any(c.type == "Ready" and c.status == "True" for c in conditions)
