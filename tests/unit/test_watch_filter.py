"""Which watch events of a training Job or pod need a worker thread: only those that change the status."""

from __future__ import annotations

from typing import Any

from kubetune.config import OperatorConfig
from kubetune.controllers import training as finetunejob
from kubetune.controllers.context import Context
from kubetune.k8s.status_writer import StatusWriter
from kubetune.status import finetunejob as fs

KEY = ("ns", "sft")


class NoKube:
    """The decision is pure: any API request fails the test."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the API was used ({name})")


def job() -> dict[str, Any]:
    return {"metadata": {"name": "sft"}, "spec": {"parallelism": 1}, "status": {"active": 1}}


def pod(phase: str, **status: Any) -> dict[str, Any]:
    return {"metadata": {"name": "sft-0-abcde"}, "status": {"phase": phase, **status}}


def setup(pods: list[dict[str, Any]], status: dict[str, Any]) -> tuple[Context, dict[str, Any]]:
    kube: Any = NoKube()
    ctx = Context(kube=kube, config=OperatorConfig(), status=StatusWriter(kube))
    body = {"metadata": {"name": "sft", "namespace": "ns", "uid": "u1", "generation": 1}, "spec": {}, "status": status}
    ctx.indexes = {"finetunejobs": {KEY: [body]}, "training_jobs": {KEY: [job()]}, "training_pods": {KEY: pods}}
    return ctx, body


def written_for(pods: list[dict[str, Any]]) -> dict[str, Any]:
    """The status the operator writes for these pods."""
    return fs.derive(fs.Observed({}, 1, False, "pvc://out/sft", job(), pods))


def test_an_event_that_changes_nothing_stays_on_the_event_loop() -> None:
    pending = [pod("Pending")]
    ctx, body = setup(pending, written_for(pending))
    assert finetunejob.status_would_change(ctx, KEY, body) is False


def test_a_pod_that_starts_running_needs_a_status_write() -> None:
    pending = [pod("Pending")]
    ctx, body = setup([pod("Running", startTime="2026-11-29T08:00:00Z")], written_for(pending))
    assert finetunejob.status_would_change(ctx, KEY, body) is True


def test_what_the_operator_wrote_counts_before_the_watch_shows_it() -> None:
    running = [pod("Running", startTime="2026-11-29T08:00:00Z")]
    ctx, body = setup(running, written_for([pod("Pending")]))  # the watch still shows the old status
    ctx.status._written["u1"] = written_for(running)  # the operator's own patch, not yet seen
    assert finetunejob.status_would_change(ctx, KEY, body) is False


def test_no_job_yet_leaves_the_status_to_admission() -> None:
    ctx, body = setup([], {})
    ctx.indexes["training_jobs"] = {}
    assert finetunejob.status_would_change(ctx, KEY, body) is False
