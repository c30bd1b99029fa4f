"""The ModelServer controller (controllers/serving.py) as a function of plain inputs: a Context built from dicts, a
recording API client and a fake ReplicaClient; no kopf, no cluster, no HTTP."""

from __future__ import annotations

from typing import Any

from kubetune.adapters import Replica
from kubetune.config import OperatorConfig
from kubetune.controllers import serving
from kubetune.controllers.context import Context
from kubetune.k8s.status_writer import StatusWriter
from tests.unit.test_adapter_replicas import FakeReplicas

KEY = ("ns", "qwen")
ADAPTER_PATH = "/mnt/pvc/adapters/sft/adapter"


class RecordingKube:
    """Records creations, status patches and Events."""

    field_manager = "kubetune-operator"

    def __init__(self) -> None:
        self.created: list[str] = []
        self.status_patches: list[dict[str, Any]] = []
        self.events: list[tuple[str, str]] = []

    def create(self, manifest: dict[str, Any]) -> dict[str, Any]:
        self.created.append(f"{manifest['kind']} {manifest['metadata']['name']}")
        return manifest

    def patch_status(self, kind: str, namespace: str, name: str, status: dict[str, Any]) -> dict[str, Any]:
        self.status_patches.append(status)
        return {"metadata": {"resourceVersion": str(len(self.status_patches) + 1)}}

    def request(self, method: str, path: str, body: dict[str, Any] | None = None, **_: Any) -> dict[str, Any]:
        if body and body.get("kind") == "Event":
            self.events.append((body["type"], body["reason"]))
        return {}


def server() -> dict[str, Any]:
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "ModelServer",
        "metadata": {"name": "qwen", "namespace": "ns", "uid": "u-1", "generation": 1, "resourceVersion": "1"},
        "spec": {
            "baseModel": {"uri": "hf://Qwen/Qwen2.5-7B"},
            "adapters": [{"name": "sql", "fromFineTuneJob": "sft"}],
            "gpuType": "rtx-4090d",
        },
    }


def succeeded_job() -> dict[str, Any]:
    return {
        "metadata": {"name": "sft", "namespace": "ns", "labels": {}},
        "spec": {"output": {"uri": "pvc://adapters/sft"}},
        "status": {"state": "Succeeded", "adapter": {"baseModel": "hf://Qwen/Qwen2.5-7B", "rank": 16}},
    }


def ready_pod() -> dict[str, Any]:
    status = {"podIP": "10.0.0.7", "conditions": [{"type": "Ready", "status": "True"}]}
    return {"metadata": {"name": "qwen-0", "namespace": "ns", "uid": "p-1"}, "status": status}


def context(kube: RecordingKube, replicas: FakeReplicas) -> Context:
    fake: Any = kube
    ctx = Context(kube=fake, config=OperatorConfig(), status=StatusWriter(fake), replicas=replicas)
    deployment = {"metadata": {"name": "qwen"}, "spec": {"replicas": 1}, "status": {"replicas": 1, "readyReplicas": 1}}
    ctx.indexes = {
        "modelservers": {KEY: [server()]},
        "finetunejobs": {("ns", "sft"): [succeeded_job()]},
        "server_deployments": {KEY: [deployment]},
        "server_pods": {KEY: [ready_pod()]},
    }
    ctx.later_once = lambda *args: None  # type: ignore[method-assign]
    return ctx


def test_reconcile_writes_the_children_loads_the_adapter_and_reports_it() -> None:
    kube, replicas = RecordingKube(), FakeReplicas({"qwen-0": {}})
    ctx = context(kube, replicas)
    serving.reconcile(ctx, KEY)
    assert kube.created == ["Service qwen", "Deployment qwen"]
    # The ready pod, at its IP and the configured ports, got the job's adapter at its path inside the pod.
    assert ("load", "qwen-0", "sql") in replicas.calls
    assert replicas.loaded["qwen-0"] == {"sql": ADAPTER_PATH}
    (patch,) = kube.status_patches
    assert patch["state"] == "Ready" and patch["loadedAdapters"] == "1/1"
    assert [(a["name"], a["state"]) for a in patch["adapters"]] == [("sql", "Loaded")]
    assert ("Normal", "AdapterLoaded") in kube.events

    serving.reconcile(ctx, KEY)  # nothing changed: nothing written again, nothing loaded again
    assert len(kube.created) == 2 and len(kube.status_patches) == 1
    assert [c for c in replicas.calls if c[0] == "load"] == [("load", "qwen-0", "sql")]


def test_the_replicas_are_the_ready_pods_at_their_ip() -> None:
    ctx = context(RecordingKube(), FakeReplicas({}))
    config = ctx.config
    expected = Replica("qwen-0", f"10.0.0.7:{config.server_port}", f"10.0.0.7:{config.server.fetcher_port}")
    assert serving.ready_replicas(ctx, KEY) == [expected]

