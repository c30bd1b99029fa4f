"""The order in which an admission sends a FineTuneJob's children: what the pods need goes first, the status last."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from kubetune.config import OperatorConfig
from kubetune.controllers import training as finetunejob
from kubetune.controllers.context import Context
from kubetune.k8s.status_writer import StatusWriter

KEY = ("ns", "sft")


class RecordingKube:
    """Records each round trip to the API server: a list of the kinds sent together."""

    def __init__(self) -> None:
        self.trips: list[list[str]] = []
        self.created: list[dict[str, Any]] = []
        self.statuses: list[dict[str, Any]] = []
        self._together: list[str] | None = None

    def _send(self, kind: str) -> None:
        if self._together is not None:
            self._together.append(kind)
        else:
            self.trips.append([kind])

    def create(self, manifest: dict[str, Any]) -> dict[str, Any]:
        self._send(manifest["kind"])
        self.created.append(manifest)
        return {**manifest, "metadata": {**manifest["metadata"], "uid": "c1", "resourceVersion": "1"}, "status": {}}

    def start_all(self, calls: Iterable[Callable[[], Any]]) -> Callable[[], tuple[list[Any], list[Exception]]]:
        self._together = []
        results = [call() for call in calls]
        self.trips.append(self._together)
        self._together = None
        return lambda: (results, [])

    def patch_status(self, kind: str, namespace: str, name: str, status: dict[str, Any]) -> dict[str, Any]:
        self.trips.append([f"{kind}/status"])
        self.statuses.append(status)
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


def admit(nodes: int, namespace_written: bool = False) -> list[list[str]]:
    return admitted(nodes, namespace_written=namespace_written).trips


def admitted(
    nodes: int, prepare_job: dict[str, Any] | None = None, namespace_written: bool = False, **spec: Any
) -> RecordingKube:
    kube: Any = RecordingKube()
    ctx = Context(kube=kube, config=OperatorConfig(), status=StatusWriter(kube))
    prepare_jobs = {KEY: [prepare_job]} if prepare_job else {}
    ctx.indexes = {"finetunejobs": {}, "training_jobs": {}, "training_pods": {}, "prepare_jobs": prepare_jobs}
    ctx.indexes["modelservers"] = {}
    ctx.indexes["training_workloads"] = {}
    if namespace_written:
        ctx.trainer_access.add("ns")
    job = body(nodes)
    job["spec"].update(spec)
    finetunejob.admit(ctx, job, None)
    return kube


def test_the_training_job_waits_for_the_prepare_step() -> None:
    # No GPU is requested before the prepare pod (CPU only) has fetched and checked the inputs.
    first = admitted(nodes=1)
    (prepare,) = [m for m in first.created if m["kind"] == "Job"]
    assert prepare["metadata"]["name"] == "sft-prep"
    (container,) = prepare["spec"]["template"]["spec"]["containers"]
    assert container["command"][:2] == ["kubetune", "prepare"]
    assert "nvidia.com/gpu" not in container["resources"]["limits"]
    # Its success (the Job Complete, for these inputs) lets the training Job be written.
    done = {**prepare, "status": {"conditions": [{"type": "Complete", "status": "True"}]}}
    second = admitted(nodes=1, prepare_job=done)
    assert [m["metadata"]["name"] for m in second.created if m["kind"] == "Job"] == ["sft"]
    # A prepare step that failed writes no training Job, and the run fails with the step's reason.
    failed = {**prepare, "status": {"conditions": [{"type": "Failed", "status": "True", "message": "x"}]}}
    third = admitted(nodes=1, prepare_job=failed)
    assert [m for m in third.created if m["kind"] == "Job"] == []
    assert ["Event"] in third.trips


def test_a_suspended_run_prepares_queued_or_not_and_only_its_training_waits() -> None:
    # The prepare pod needs no GPU and no quota: a run resumed later trains at once. A queued one gets its training
    # Job only when resumed (Kueue would hold it anyway), an unqueued one a suspended training Job.
    for queued in ({}, {"queueName": "team-a"}):
        first = admitted(nodes=1, suspend=True, **queued)
        assert [m["metadata"]["name"] for m in first.created if m["kind"] == "Job"] == ["sft-prep"], queued
        (status,) = first.statuses
        assert status["state"] == "Suspended", (queued, status)
        prepare = next(m for m in first.created if m["kind"] == "Job")
        done = {**prepare, "status": {"conditions": [{"type": "Complete", "status": "True"}]}}
        later = [m for m in admitted(nodes=1, prepare_job=done, suspend=True, **queued).created if m["kind"] == "Job"]
        assert [(m["metadata"]["name"], m["spec"].get("suspend")) for m in later] == ([] if queued else [("sft", True)])


def test_the_job_goes_after_everything_its_pods_need_and_the_status_last() -> None:
    trips = admit(nodes=1)
    # A pod must never run as an object that someone else put under the name of what it needs: the namespace's
    # trainer ServiceAccount, Role and RoleBinding are all written (and found to be kubetune's) first, together
    # in one round trip, and only then the Job. The Admitted status comes after every write, so an operator
    # killed in between admits the job again after its restart. An admission posts no Event (the status shows it).
    assert sorted(trips[0]) == ["Role", "RoleBinding", "ServiceAccount"]
    assert trips[1:] == [["Job"], ["FineTuneJob/status"]]


def test_the_next_job_of_a_namespace_sends_only_its_job_and_status() -> None:
    assert admit(nodes=1, namespace_written=True) == [["Job"], ["FineTuneJob/status"]]


def test_a_multi_node_jobs_service_goes_with_the_other_supporting_children() -> None:
    trips = admit(nodes=2)
    assert sorted(trips[0]) == ["Role", "RoleBinding", "Service", "ServiceAccount"]
    assert trips[1] == ["Job"]
    assert admit(nodes=2, namespace_written=True)[:2] == [["Service"], ["Job"]]
