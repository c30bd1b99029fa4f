"""The ModelServer controller (controllers/serving.py) as a function of plain inputs: a Context built from dicts, a
recording API client and a fake ReplicaClient; no kopf, no cluster, no HTTP."""

from __future__ import annotations

from typing import Any

from kubetune.adapters import Replica
from kubetune.config import OperatorConfig
from kubetune.controllers import serving
from kubetune.controllers.context import Context
from kubetune.k8s.client import ApiError
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
        self.pod_conditions: list[tuple[str, str, dict[str, Any]]] = []

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        return None

    def set_pod_condition(self, namespace: str, name: str, uid: str, condition: dict[str, Any]) -> dict[str, Any]:
        self.pod_conditions.append((name, uid, condition))
        return {}

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
    conditions = [{"type": "ContainersReady", "status": "True"}, {"type": "Ready", "status": "False"}]
    status = {"podIP": "10.0.0.7", "conditions": conditions}
    return {"metadata": {"name": "qwen-0", "namespace": "ns", "uid": "p-1"}, "status": status}


def context(kube: RecordingKube, replicas: FakeReplicas) -> Context:
    fake: Any = kube
    ctx = Context(kube=fake, config=OperatorConfig(), status=StatusWriter(fake), replica_client=replicas)
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
    expected = Replica("qwen-0", f"10.0.0.7:{config.server.fetcher_port}")
    assert serving.ready_replicas(ctx, KEY) == [expected]


def test_a_replica_joins_the_service_once_it_has_its_adapters() -> None:
    kube, replicas = RecordingKube(), FakeReplicas({"qwen-0": {}})
    ctx = context(kube, replicas)
    serving.reconcile(ctx, KEY)
    ((pod, uid, condition),) = kube.pod_conditions
    assert (pod, uid) == ("qwen-0", "p-1")
    assert (condition["type"], condition["status"], condition["reason"]) == (
        "kubetune.io/adapters-loaded",
        "True",
        "AdaptersLoaded",
    )
    # Not before: a replica that has not got it (vLLM refuses nothing here, the replica does not answer) stays out.
    kube2 = RecordingKube()
    serving.reconcile(context(kube2, FakeReplicas({"qwen-0": None})), KEY)
    assert kube2.pod_conditions == []


def test_a_refused_adapter_does_not_keep_a_replica_out() -> None:
    kube, replicas = RecordingKube(), FakeReplicas({"qwen-0": {}}, refused={"sql": (400, "LoRA rank 64 too big")})
    serving.reconcile(context(kube, replicas), KEY)
    assert [c[0] for c in kube.pod_conditions] == ["qwen-0"]


def test_a_spec_vllm_would_refuse_creates_nothing() -> None:
    kube = RecordingKube()
    ctx = context(kube, FakeReplicas({"qwen-0": {}}))
    body = server()
    body["spec"]["maxModelLen"] = 131072  # Qwen2.5-7B knows 32768, and no ropeScaling
    ctx.indexes = {**ctx.indexes, "modelservers": {KEY: [body]}}
    serving.reconcile(ctx, KEY)
    assert kube.created == []
    (patch,) = kube.status_patches
    assert patch["state"] == "Failed"
    assert patch["conditions"][0]["reason"] == "MaxModelLenTooLarge"
    assert ("Warning", "MaxModelLenTooLarge") in kube.events


class NoKeda(RecordingKube):
    """A cluster without KEDA: its ScaledObject path answers 404."""

    def create(self, manifest: dict[str, Any]) -> dict[str, Any]:
        if manifest["kind"] == "ScaledObject":
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        return super().create(manifest)


def test_autoscaling_without_keda_is_a_condition_and_a_later_look() -> None:
    kube = NoKeda()
    ctx = context(kube, FakeReplicas({"qwen-0": {}}))
    ctx.config.server.prometheus_address = "http://prometheus:9090"
    later: list[tuple[str, ...]] = []
    ctx.later_once = lambda token, *args: later.append(token)  # type: ignore[method-assign]
    body = server()
    body["spec"]["autoscaling"] = {"maxReplicas": 3}
    ctx.indexes = {**ctx.indexes, "modelservers": {KEY: [body]}}
    serving.reconcile(ctx, KEY)
    assert kube.created == ["Service qwen", "Deployment qwen"]  # the server runs all the same
    (patch,) = kube.status_patches
    autoscaling = next(c for c in patch["conditions"] if c["type"] == "Autoscaling")
    assert (autoscaling["status"], autoscaling["reason"]) == ("False", "KedaNotInstalled")
    assert patch["state"] == "Ready"
    assert ("modelserver-keda", *KEY) in later


class WithScaledObject(RecordingKube):
    """A cluster holding a ScaledObject named like the server, controlled by `owner`."""

    def __init__(self, owner: str) -> None:
        super().__init__()
        self.owner = owner
        self.deleted: list[tuple[str, str, str | None]] = []

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        if kind != "ScaledObject":
            return None
        ref = {"kind": "ModelServer", "name": name, "uid": self.owner, "controller": True}
        return {"metadata": {"name": name, "uid": "so-1", "ownerReferences": [ref]}}

    def delete(self, kind: str, namespace: str, name: str, propagation: str = "", uid: str | None = None) -> None:
        self.deleted.append((kind, name, uid))


def test_the_scaled_object_goes_with_spec_autoscaling_if_the_server_controls_it() -> None:
    mine = WithScaledObject("u-1")
    serving.reconcile(context(mine, FakeReplicas({"qwen-0": {}})), KEY)
    assert mine.deleted == [("ScaledObject", "qwen", "so-1")]
    theirs = WithScaledObject("someone-else")
    serving.reconcile(context(theirs, FakeReplicas({"qwen-0": {}})), KEY)
    assert theirs.deleted == []
