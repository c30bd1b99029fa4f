"""The order in which an admission sends a FineTuneJob's children: what the pods wait for goes first."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from kubetune.config import OperatorConfig
from kubetune.handlers import finetunejob
from kubetune.handlers.context import Context
from kubetune.k8s.status_writer import StatusWriter

KEY = ("ns", "sft")


class RecordingKube:
    """Records each round trip to the API server: a list of the kinds sent together."""

    def __init__(self) -> None:
        self.trips: list[list[str]] = []

    def apply(self, manifest: dict[str, Any]) -> dict[str, Any]:
        self.trips.append([manifest["kind"]])
        return {**manifest, "metadata": {**manifest["metadata"], "resourceVersion": "1"}, "status": {}}

    def start_applies(self, manifests: Iterable[dict[str, Any]]) -> Callable[[], list[dict[str, Any]]]:
        manifests = list(manifests)
        self.trips.append([m["kind"] for m in manifests])
        return lambda: [{**m, "status": {}} for m in manifests]

    def patch_status(self, kind: str, namespace: str, name: str, status: dict[str, Any]) -> dict[str, Any]:
        self.trips.append([f"{kind}/status"])
        return {"metadata": {"name": name, "namespace": namespace, "resourceVersion": "2"}, "status": status}

    def request(self, method: str, url: str, body: Any = None, **_: Any) -> dict[str, Any]:
        self.trips.append([body["kind"] if isinstance(body, dict) and "kind" in body else f"{method} {url}"])
        return {}


def body(nodes: int) -> dict[str, Any]:
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "sft", "namespace": "ns", "uid": "u1", "generation": 1, "resourceVersion": "1"},
        "spec": {
            "baseModel": {"uri": "hf://Qwen/Qwen2.5-0.5B"},
            "dataset": {"uri": "s3://data/train.jsonl"},
            "output": {"uri": "s3://out/sft"},
            "resources": {"nodes": nodes, "gpusPerNode": 1, "gpuType": "rtx-4090d"},
        },
    }


def admit(nodes: int) -> list[list[str]]:
    kube: Any = RecordingKube()
    ctx = Context(kube=kube, config=OperatorConfig(), status=StatusWriter(kube))
    ctx.indexes = {"finetunejobs": {}, "training_jobs": {}, "training_pods": {}}
    finetunejob.admit(ctx, body(nodes), None)
    return kube.trips


def test_the_job_goes_right_after_its_service_account_and_alone() -> None:
    trips = admit(nodes=1)
    # The API server admits the pods against the ServiceAccount; the pods, the scheduler and everything after
    # wait for the Job; the Role, RoleBinding and ConfigMap are needed only once a pod runs.
    # The latter go out together, and the status is written while they are in flight.
    assert trips[:3] == [["ServiceAccount"], ["Job"], ["Role", "RoleBinding", "ConfigMap"]]
    assert trips[3:] == [["FineTuneJob/status"], ["Event"]]


def test_a_multi_node_jobs_service_follows_the_job() -> None:
    trips = admit(nodes=2)
    assert trips[:2] == [["ServiceAccount"], ["Job"]]
    assert sorted(trips[2]) == ["ConfigMap", "Role", "RoleBinding", "Service"]
