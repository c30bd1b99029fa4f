"""The local control plane behaves like a small GPU cluster: scheduling, kwok pods, GC, RBAC."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from kubetune.dev.controlplane import Cluster

GPU_NODES = [f"gpu-4090d-{i}" for i in range(4)]
CPU_NODES = ["cpu-0", "cpu-1"]
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


@pytest.fixture(scope="module")
def namespace(cluster: Cluster) -> Iterator[str]:
    """A fresh namespace whose default ServiceAccount exists (pods need it)."""
    name = f"cp-{uuid.uuid4().hex[:8]}"
    cluster.kubectl("create", "namespace", name)
    wait_for(
        lambda: cluster.kubectl("get", "serviceaccount", "default", "-n", name, check=False).returncode == 0,
        what=f"ServiceAccount default in {name}",
    )
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


def wait_for(condition: Any, what: str, timeout: float = 30.0) -> None:
    """Poll ``condition()`` until it is truthy."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.2)


def apply(cluster: Cluster, namespace: str, manifest: dict[str, Any]) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(manifest))


def get(cluster: Cluster, namespace: str, kind: str, name: str) -> dict[str, Any]:
    out = cluster.kubectl("get", kind, name, "-n", namespace, "-o", "json").stdout
    result: dict[str, Any] = json.loads(out)
    return result


def pod(name: str, *, gpus: int = 0, annotations: dict[str, str] | None = None) -> dict[str, Any]:
    """A one-container pod; with ``gpus`` it requests them and tolerates the GPU taint."""
    container: dict[str, Any] = {"name": "main", "image": "busybox"}
    spec: dict[str, Any] = {"containers": [container], "restartPolicy": "Never"}
    if gpus:
        container["resources"] = {"limits": {"nvidia.com/gpu": str(gpus)}}
        spec["tolerations"] = [GPU_TOLERATION]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "annotations": annotations or {}},
        "spec": spec,
    }


def job(name: str, annotations: dict[str, str] | None = None) -> dict[str, Any]:
    """A one-pod Job; ``annotations`` go on its pod template."""
    template = {
        "metadata": {"annotations": annotations or {}},
        "spec": {"containers": [{"name": "main", "image": "busybox"}], "restartPolicy": "Never"},
    }
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {"backoffLimit": 0, "template": template},
    }


def test_components_are_healthy(cluster: Cluster) -> None:
    assert cluster.kubectl("get", "--raw", "/readyz").stdout.strip() == "ok"
    assert cluster.kubectl("get", "--raw", "/livez").stdout.strip() == "ok"
    if cluster.control_plane is not None:
        statuses = cluster.control_plane.status()
        assert [s.name for s in statuses if not s.healthy] == [], statuses


def test_simulated_nodes_are_ready_with_gpus(cluster: Cluster) -> None:
    items = json.loads(cluster.kubectl("get", "nodes", "-o", "json").stdout)["items"]
    by_name = {node["metadata"]["name"]: node for node in items}
    assert set(GPU_NODES + CPU_NODES) <= set(by_name)
    for name in GPU_NODES + CPU_NODES:
        conditions = {c["type"]: c["status"] for c in by_name[name]["status"]["conditions"]}
        assert conditions["Ready"] == "True", name
    for name in GPU_NODES:
        node = by_name[name]
        assert node["status"]["allocatable"]["nvidia.com/gpu"] == "4"
        assert node["metadata"]["labels"]["nvidia.com/gpu.product"] == "NVIDIA-GeForce-RTX-4090-D"
        assert node["spec"]["taints"][0]["key"] == "nvidia.com/gpu"
    assert "nvidia.com/gpu" not in by_name["cpu-0"]["status"]["allocatable"]


def test_gpu_pod_is_scheduled_on_a_gpu_node_and_runs(cluster: Cluster, namespace: str) -> None:
    apply(cluster, namespace, pod("two-gpus", gpus=2))
    cluster.kubectl("wait", "-n", namespace, "pod/two-gpus", "--for=jsonpath={.status.phase}=Running", "--timeout=60s")
    body = get(cluster, namespace, "pod", "two-gpus")
    assert body["spec"]["nodeName"] in GPU_NODES
    assert body["status"]["containerStatuses"][0]["state"]["running"]["startedAt"]
    assert body["status"]["podIP"]


def test_job_pod_completes_and_job_is_complete(cluster: Cluster, namespace: str) -> None:
    apply(cluster, namespace, job("quick"))
    cluster.kubectl("wait", "-n", namespace, "job/quick", "--for=condition=Complete", "--timeout=90s")
    pods = json.loads(cluster.kubectl("get", "pods", "-n", namespace, "-l", "job-name=quick", "-o", "json").stdout)[
        "items"
    ]
    assert [p["status"]["phase"] for p in pods] == ["Succeeded"]
    terminated = pods[0]["status"]["containerStatuses"][0]["state"]["terminated"]
    assert (terminated["reason"], terminated["exitCode"]) == ("Completed", 0)


def test_pod_complete_delay_annotation_keeps_the_pod_running(cluster: Cluster, namespace: str) -> None:
    apply(cluster, namespace, job("slow", {"pod-complete.stage.kwok.x-k8s.io/delay": "6s"}))
    cluster.kubectl(
        "wait", "-n", namespace, "pod", "-l", "job-name=slow", "--for=jsonpath={.status.phase}=Running", "--timeout=60s"
    )
    time.sleep(3)  # the default completion delay is 1 s: still Running means the annotation counts
    phases = cluster.kubectl(
        "get", "pods", "-n", namespace, "-l", "job-name=slow", "-o", "jsonpath={.items[*].status.phase}"
    ).stdout
    assert phases == "Running"
    cluster.kubectl("wait", "-n", namespace, "job/slow", "--for=condition=Complete", "--timeout=60s")


def test_pod_asking_too_many_gpus_stays_pending(cluster: Cluster, namespace: str) -> None:
    apply(cluster, namespace, pod("eight-gpus", gpus=8))
    cluster.kubectl(
        "wait",
        "-n",
        namespace,
        "pod/eight-gpus",
        "--timeout=60s",
        '--for=jsonpath={.status.conditions[?(@.type=="PodScheduled")].reason}=Unschedulable',
    )
    node_count = len(json.loads(cluster.kubectl("get", "nodes", "-o", "json").stdout)["items"])

    def failed_scheduling_messages() -> list[str]:
        events = json.loads(
            cluster.kubectl(
                "get",
                "events",
                "-n",
                namespace,
                "-o",
                "json",
                "--field-selector",
                "involvedObject.name=eight-gpus,reason=FailedScheduling",
            ).stdout
        )["items"]
        return [event["message"] for event in events]

    wait_for(failed_scheduling_messages, what="a FailedScheduling event")
    message = failed_scheduling_messages()[0]
    assert message.startswith(f"0/{node_count} nodes are available:"), message
    assert "Insufficient nvidia.com/gpu" in message
    body = get(cluster, namespace, "pod", "eight-gpus")
    assert body["status"]["phase"] == "Pending" and "nodeName" not in body["spec"]


def test_failure_annotation_ends_the_pod_oomkilled(cluster: Cluster, namespace: str) -> None:
    apply(cluster, namespace, pod("oom", annotations={"kubetune.io/simulate-failure": "OOMKilled"}))
    cluster.kubectl("wait", "-n", namespace, "pod/oom", "--for=jsonpath={.status.phase}=Failed", "--timeout=60s")
    terminated = get(cluster, namespace, "pod", "oom")["status"]["containerStatuses"][0]["state"]["terminated"]
    assert terminated["reason"] == "OOMKilled"
    assert terminated["exitCode"] == 137


def test_owner_reference_garbage_collection(cluster: Cluster, namespace: str) -> None:
    apply(cluster, namespace, {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "owner"}})
    owner_uid = get(cluster, namespace, "configmap", "owner")["metadata"]["uid"]
    owner_ref = {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner_uid}
    apply(
        cluster,
        namespace,
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "child", "ownerReferences": [owner_ref]}},
    )
    cluster.kubectl("delete", "-n", namespace, "configmap/owner")
    cluster.kubectl("wait", "-n", namespace, "configmap/child", "--for=delete", "--timeout=30s")


def test_rbac_denies_a_service_account_without_bindings(cluster: Cluster, namespace: str) -> None:
    cluster.kubectl("create", "serviceaccount", "nobody", "-n", namespace)
    user = f"system:serviceaccount:{namespace}:nobody"
    can_i = cluster.kubectl("auth", "can-i", "list", "pods", "-n", namespace, "--as", user, check=False)
    assert (can_i.returncode, can_i.stdout.strip()) == (1, "no")
    denied = cluster.kubectl("get", "pods", "-n", namespace, "--as", user, check=False)
    assert denied.returncode != 0
    assert "Forbidden" in denied.stderr and user in denied.stderr
    assert cluster.kubectl("auth", "can-i", "list", "pods", "-n", namespace).stdout.strip() == "yes"
