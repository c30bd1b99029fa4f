"""FailedMount Events reach the pod's owner only for the operator's pods that still wait for volumes."""

from __future__ import annotations

from typing import Any

from kubetune.config import OperatorConfig
from kubetune.controllers import mounts
from kubetune.controllers.context import Context
from kubetune.k8s.status_writer import StatusWriter

MESSAGE = 'MountVolume.SetUp failed for volume "creds" : secret "s3" not found'


def pod(uid: str, *states: dict[str, Any], phase: str = "Pending") -> dict[str, Any]:
    statuses = [{"name": f"c{i}", "state": s} for i, s in enumerate(states)]
    return {"metadata": {"uid": uid, "name": f"sft-0-{uid}"}, "status": {"phase": phase, "containerStatuses": statuses}}


def context(*pods: dict[str, Any]) -> Context:
    ctx = Context(kube=None, config=OperatorConfig(), status=StatusWriter(None))  # type: ignore[arg-type]
    ctx.indexes = {"training_pods": {("ns", "sft"): list(pods)}, "server_pods": {}}
    return ctx


def event(uid: str) -> dict[str, Any]:
    return {"involvedObject": {"kind": "Pod", "uid": uid}, "reason": "FailedMount", "message": MESSAGE}


def test_a_waiting_pod_of_a_job_is_recorded_for_its_job() -> None:
    creating = {"waiting": {"reason": "ContainerCreating"}}
    ctx = context(pod("a", creating), pod("b"))  # b shows no container yet: it waits too
    assert mounts.record(ctx, event("a")) == ("training_pods", ("ns", "sft"))
    assert mounts.record(ctx, event("b")) == ("training_pods", ("ns", "sft"))
    assert ctx.mount_failures == {"a": MESSAGE, "b": MESSAGE}


def test_other_pods_and_pods_past_their_volumes_are_ignored_and_forgotten() -> None:
    running = pod("r", {"running": {}}, phase="Running")
    pulling = pod("p", {"waiting": {"reason": "ImagePullBackOff"}})  # volumes are mounted before the image pull
    ctx = context(running, pulling)
    assert mounts.record(ctx, event("someone-elses")) is None
    assert mounts.record(ctx, event("r")) is None and mounts.record(ctx, event("p")) is None
    assert ctx.mount_failures == {}
    ctx.mount_failures["r"] = MESSAGE
    mounts.forget_started(ctx, [running])
    assert ctx.mount_failures == {}
