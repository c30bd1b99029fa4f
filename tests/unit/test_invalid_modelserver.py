"""A ModelServer that passes the API server's schema but not the operator's models (e.g. a CRD older than the
operator) is not ignored: it gets a Failed status with the reason, an Event, and no children."""

from __future__ import annotations

from typing import Any

from kubetune.config import OperatorConfig
from kubetune.controllers import serving as modelserver
from kubetune.controllers.context import Context
from kubetune.k8s.status_writer import StatusWriter
from kubetune.status.modelserver import invalid


class RecordingKube:
    """Records what the reconciliation writes (the unit under test is one function)."""

    def __init__(self) -> None:
        self.status_patches: list[dict[str, Any]] = []
        self.posts: list[dict[str, Any]] = []
        self.applied: list[dict[str, Any]] = []

    def patch_status(self, kind: str, namespace: str, name: str, status: dict[str, Any]) -> dict[str, Any]:
        self.status_patches.append(status)
        return {}

    def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        self.posts.append(body or {})
        return {}

    def apply(self, manifest: dict[str, Any]) -> dict[str, Any]:
        self.applied.append(manifest)
        return manifest


def test_invalid_status_is_failed_with_the_reason() -> None:
    status = invalid({}, 3, "InvalidSpec", "spec.replicas: Input should be a valid integer", now="2026-11-29T10:00:00Z")
    assert status["state"] == "Failed"
    (ready,) = status["conditions"]
    assert (ready["type"], ready["status"], ready["reason"]) == ("Ready", "False", "InvalidSpec")
    assert ready["message"] == "spec.replicas: Input should be a valid integer"
    assert ready["observedGeneration"] == 3


def test_reconcile_reports_an_invalid_spec_and_creates_nothing() -> None:
    kube: Any = RecordingKube()
    ctx = Context(kube=kube, config=OperatorConfig(), status=StatusWriter(kube))
    body = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "ModelServer",
        "metadata": {"name": "qwen", "namespace": "ns", "uid": "u-1", "generation": 2},
        "spec": {"baseModel": {"uri": "hf://Qwen/Qwen2.5-7B"}, "replicas": "two"},
    }
    ctx.indexes = {"modelservers": {("ns", "qwen"): [body]}, "server_deployments": {}, "server_pods": {}}
    modelserver.reconcile(ctx, ("ns", "qwen"))
    assert not kube.applied
    (patch,) = kube.status_patches
    assert patch["state"] == "Failed"
    assert "spec.replicas" in patch["conditions"][0]["message"]
    (event,) = kube.posts
    assert event["type"] == "Warning" and event["reason"] == "InvalidSpec"
    modelserver.reconcile(ctx, ("ns", "qwen"))  # the same again: nothing new written, no second Event
    assert len(kube.status_patches) == 1 and len(kube.posts) == 1
