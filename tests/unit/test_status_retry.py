"""A status write that fails is tried again: the watch event that asked for it does not come back."""

from __future__ import annotations

from typing import Any

import pytest
from kubernetes import client

from kubetune.config import OperatorConfig
from kubetune.controllers import training as finetunejob
from kubetune.controllers.context import Context
from kubetune.k8s.client import ApiError, Kube
from kubetune.k8s.status_writer import StatusWriter

KEY = ("ns", "sft")


def test_no_answer_from_the_api_server_is_an_api_error() -> None:
    # Nothing listens on port 1: the connection is refused, a real transport failure.
    configuration = client.Configuration(host="https://127.0.0.1:1")
    configuration.retries = 0
    kube = Kube(client.ApiClient(configuration))
    with pytest.raises(ApiError) as refused:
        kube.get("Namespace", "", "default")
    assert refused.value.status == 0 and refused.value.reason == "Unreachable"
    assert "MaxRetryError" in refused.value.message or "Connection" in refused.value.message


class FlakyKube:
    """The first status patch gets no answer; the next ones go through."""

    def __init__(self) -> None:
        self.patches: list[dict[str, Any]] = []
        self.refusals = 1

    def patch_status(self, kind: str, namespace: str, name: str, status: dict[str, Any]) -> dict[str, Any]:
        if self.refusals:
            self.refusals -= 1
            raise ApiError(0, "Unreachable", "ReadTimeoutError: read timed out")
        self.patches.append(status)
        return {"metadata": {"resourceVersion": str(len(self.patches) + 1)}}

    def request(self, method: str, url: str, body: Any = None, **_: Any) -> dict[str, Any]:
        return {}  # the Event


def test_a_completed_job_whose_status_write_failed_is_written_on_the_retry() -> None:
    kube: Any = FlakyKube()
    ctx = Context(kube=kube, config=OperatorConfig(), status=StatusWriter(kube))
    body = {
        "metadata": {"name": "sft", "namespace": "ns", "uid": "u1", "generation": 1, "resourceVersion": "1"},
        "spec": {"output": {"uri": "s3://out/sft"}},
        "status": {"state": "Running", "observedGeneration": 1},
    }
    done = {"type": "Complete", "status": "True"}
    job = {"metadata": {"name": "sft"}, "spec": {"parallelism": 1}, "status": {"succeeded": 1, "conditions": [done]}}
    ctx.indexes = {
        "finetunejobs": {KEY: [body]},
        "training_jobs": {KEY: [job]},
        "training_pods": {KEY: []},
        "finetunejobs_waiting": {},
        "modelservers": {},
    }
    scheduled: list[tuple[Any, ...]] = []
    ctx.later_once = lambda token, delay, work, *args: scheduled.append((token, work, *args))  # type: ignore[method-assign]

    finetunejob.sync_status_locked(ctx, KEY)  # the Job's completion event arrived
    assert kube.patches == []
    token = ("kubetune.controllers.training", "sync_status_locked", *KEY)
    assert scheduled == [(token, finetunejob.sync_status_locked, ctx, KEY)]

    _, work, *args = scheduled.pop()
    work(*args)
    assert [p.get("state") for p in kube.patches] == ["Succeeded"]
    assert scheduled == []


def test_every_reconciliation_started_by_a_watch_event_is_retried() -> None:
    from kubetune.controllers import serving as modelserver

    for work in (finetunejob.reconcile, finetunejob.sync_status_locked, modelserver.reconcile):
        assert getattr(work, "__wrapped__", None) is not None, f"{work.__name__} is not @retried"
