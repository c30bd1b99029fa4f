"""The operator's metrics: objects by state from the indexes, reconcile counters, adapter loads."""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from kubetune.adapters import Action, Replica
from kubetune.adapters.replicas import Outcome
from kubetune.config import OperatorConfig
from kubetune.controllers import metrics
from kubetune.controllers import training as finetunejob
from kubetune.controllers.context import Context
from kubetune.k8s.client import ApiError
from kubetune.k8s.status_writer import StatusWriter


def value(name: str, registry: CollectorRegistry = metrics.REGISTRY, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


def obj(name: str, status: dict[str, Any] | None = None, **meta: Any) -> dict[str, Any]:
    metadata = {"name": name, "namespace": "ns", "uid": f"uid-{name}", "generation": 1, **meta}
    return {"metadata": metadata, "spec": {}, "status": status or {}}


def ready_server(*adapter_states: str) -> dict[str, Any]:
    status = {
        "state": "Ready",
        "conditions": [{"type": "Ready", "status": "True"}],
        "adapters": [{"name": f"a{i}", "state": s} for i, s in enumerate(adapter_states)],
    }
    return obj("ready", status)


def test_objects_by_state_are_counted_from_the_indexes_at_scrape_time() -> None:
    indexes: dict[str, dict[Any, list[dict[str, Any]]]] = {}
    registry = CollectorRegistry()
    registry.register(metrics.ObjectsCollector(lambda: indexes))
    # Before the first watch event the indexes are empty: every state is there, at 0.
    assert registry.get_sample_value("kubetune_finetunejobs", {"state": "Succeeded"}) == 0
    assert registry.get_sample_value("kubetune_modelservers_ready", {}) == 0

    indexes["finetunejobs"] = {
        ("ns", "a"): [obj("a", {"state": "Succeeded"})],
        ("ns", "b"): [obj("b", {"state": "Succeeded"})],
        ("ns", "c"): [obj("c", {"state": "Running"})],
        ("ns", "new"): [obj("new")],  # not admitted yet
        ("ns", "gone"): [],  # kopf keeps empty stores of deleted objects
    }
    indexes["modelservers"] = {
        ("ns", "ready"): [ready_server("Loaded", "Loaded", "Failed")],
        ("ns", "starting"): [obj("starting", {"state": "Progressing"})],
    }
    assert value("kubetune_finetunejobs", registry, state="Succeeded") == 2
    assert value("kubetune_finetunejobs", registry, state="Running") == 1
    assert value("kubetune_finetunejobs", registry, state="Pending") == 1
    assert value("kubetune_finetunejobs", registry, state="Failed") == 0
    assert value("kubetune_modelservers", registry, state="Ready") == 1
    assert value("kubetune_modelservers", registry, state="Progressing") == 1
    assert value("kubetune_modelservers_ready", registry) == 1
    assert value("kubetune_modelserver_adapters", registry, state="Loaded") == 2
    assert value("kubetune_modelserver_adapters", registry, state="Failed") == 1

    indexes["finetunejobs"][("ns", "c")] = [obj("c", {"state": "Succeeded"})]
    assert value("kubetune_finetunejobs", registry, state="Succeeded") == 3  # exact at every scrape


def test_reconciling_counts_results_errors_and_durations() -> None:
    before = {r: value("kubetune_reconcile_total", controller="test", result=r) for r in ("ok", "retry", "error")}
    count = value("kubetune_reconcile_duration_seconds_count", controller="test")
    with metrics.reconciling("test"):
        pass
    with metrics.reconciling("test") as outcome:
        outcome.result = "retry"
    with metrics.reconciling("test") as outcome:
        outcome.failed(ApiError(500, "InternalError", "etcd"))
    with pytest.raises(KeyError), metrics.reconciling("test"):
        raise KeyError("a bug")
    assert value("kubetune_reconcile_total", controller="test", result="ok") == before["ok"] + 1
    assert value("kubetune_reconcile_total", controller="test", result="retry") == before["retry"] + 1
    assert value("kubetune_reconcile_total", controller="test", result="error") == before["error"] + 2
    assert value("kubetune_reconcile_errors_total", controller="test", error="ApiError") >= 1
    assert value("kubetune_reconcile_errors_total", controller="test", error="KeyError") >= 1
    assert value("kubetune_reconcile_duration_seconds_count", controller="test") == count + 4


class FailingKube:
    """An API server that refuses every status patch."""

    def patch_status(self, *args: Any) -> None:
        raise ApiError(503, "ServiceUnavailable", "try later")


def context(*bodies: dict[str, Any]) -> Context:
    kube: Any = FailingKube()
    ctx = Context(kube=kube, config=OperatorConfig(), status=StatusWriter(kube))
    ctx.indexes = {
        "finetunejobs": {("ns", b["metadata"]["name"]): [b] for b in bodies},
        "training_jobs": {},
        "training_pods": {},
    }
    return ctx


def test_finetunejob_reconcile_is_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    # Finished: an admitted job that still ran would have its children (none in this view) written again.
    admitted = {"state": "Succeeded", "conditions": [{"type": "Admitted", "status": "True", "observedGeneration": 1}]}
    ctx = context(obj("admitted", admitted), obj("invalid"))
    retries: list[Any] = []
    monkeypatch.setattr(ctx, "later", lambda *args: retries.append(args))
    ok = value("kubetune_reconcile_total", controller="finetunejob", result="ok")
    errors = value("kubetune_reconcile_errors_total", controller="finetunejob", error="ApiError")

    finetunejob.reconcile(ctx, ("ns", "admitted"))  # nothing to admit, no Job any more
    assert value("kubetune_reconcile_total", controller="finetunejob", result="ok") == ok + 1

    finetunejob.reconcile(ctx, ("ns", "invalid"))  # the InvalidSpec status cannot be written: retried later
    assert value("kubetune_reconcile_errors_total", controller="finetunejob", error="ApiError") == errors + 1
    assert len(retries) == 1


def test_adapter_loads_by_result_and_failures_by_reason() -> None:
    replica = Replica("pod-0", "10.0.0.1:8001")

    def load(status: int, message: str = "") -> Outcome:
        return Outcome(Action(replica, "load", "sql", "/adapters/sql"), status, message)

    names = [("kubetune_adapter_loads_total", {"result": r}) for r in ("ok", "failed", "unreachable")]
    reasons = ("AdapterNotFound", "ReplicaUnreachable")
    names += [("kubetune_adapter_load_failures_total", {"reason": r}) for r in reasons]
    before = [value(name, **labels) for name, labels in names]
    unload = Outcome(Action(replica, "unload", "old"), 200, "")
    metrics.count_adapter_loads([load(200), load(200), load(404, "no such file"), load(0, "refused"), unload])
    after = [value(name, **labels) for name, labels in names]
    assert [a - b for a, b in zip(after, before, strict=True)] == [2, 1, 1, 1, 1]


def test_serve_answers_on_metrics() -> None:
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    port = metrics.serve("127.0.0.1:0")
    with metrics.reconciling("served"):
        pass
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    names = {family.name for family in text_string_to_metric_families(text)}
    assert {"kubetune_reconcile", "kubetune_reconcile_duration_seconds", "process_cpu_seconds"} <= names
