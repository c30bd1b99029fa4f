"""Simulated node pools of the local cluster, and the kwok stages shipped with them."""

from __future__ import annotations

import pytest
import yaml

from kubetune.dev import nodes
from kubetune.dev.controlplane import stages_file


def test_default_pools_make_four_gpu_and_two_cpu_nodes() -> None:
    manifests = nodes.node_manifests(nodes.default_pools())
    names = [m["metadata"]["name"] for m in manifests]
    assert names == ["gpu-4090d-0", "gpu-4090d-1", "gpu-4090d-2", "gpu-4090d-3", "cpu-0", "cpu-1"]
    gpu, cpu = manifests[0], manifests[-1]
    assert gpu["metadata"]["labels"]["nvidia.com/gpu.product"] == "NVIDIA-GeForce-RTX-4090-D"
    assert gpu["metadata"]["labels"]["kubetune.io/gpu-type"] == "rtx-4090d"
    assert gpu["status"]["allocatable"] == {"cpu": "64", "memory": "256Gi", "pods": "110", "nvidia.com/gpu": "4"}
    assert gpu["spec"]["taints"] == [{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}]
    assert cpu["status"]["capacity"] == {"cpu": "32", "memory": "128Gi", "pods": "110"}
    assert cpu["spec"]["taints"] == []
    assert all(m["metadata"]["annotations"] == {"kwok.x-k8s.io/node": "fake"} for m in manifests)


def test_parse_pools_scales_the_gpu_pool() -> None:
    pools = nodes.parse_pools("gpu=250")
    assert [(p.prefix, p.count) for p in pools] == [("gpu-4090d", 250)]
    with pytest.raises(ValueError):
        nodes.parse_pools("tpu=3")


def test_kwok_stages_parse_and_include_the_failure_stage() -> None:
    stages = list(yaml.safe_load_all(stages_file().read_text()))
    by_name = {stage["metadata"]["name"]: stage for stage in stages}
    assert {"node-initialize", "pod-create", "pod-ready", "pod-complete", "pod-delete"} <= set(by_name)
    failure = by_name["pod-simulated-failure"]["spec"]
    keys = [e["key"] for e in failure["selector"]["matchExpressions"]]
    assert '.metadata.annotations["kubetune.io/simulate-failure"]' in keys
    assert "phase: Failed" in failure["next"]["statusTemplate"]
