"""kopf registrations of FineTuneJobs: the indexes of jobs, their training Jobs and pods, and the watch events
that hand work to the FineTuneJob controller (controllers/training.py).

Indexes and handlers are coroutines: most watch events change nothing (the echo of the operator's own status
patch, a pod's finalizer removed, a Job's `active` count), and those are dismissed on the event loop. Only an
event that needs work goes to a worker thread, where the API requests block.
"""

from __future__ import annotations

from typing import Any

import kopf

from kubetune.controllers import training
from kubetune.controllers.context import Key
from kubetune.handlers.watch import context, in_worker, is_echo, on_object_event, slim
from kubetune.render.common import LABEL_FINETUNEJOB

FTJ = "finetunejobs.kubetune.io"
# What the status needs of a training Job's spec; the pod template is not kept in memory.
JOB_SPEC_KEPT = ("parallelism", "completions", "suspend", "backoffLimit")


@kopf.index(FTJ)
async def finetunejobs(namespace: str | None, name: str, body: kopf.Body, **_: Any) -> dict[Key, dict[str, Any]]:
    return {(namespace or "", name): slim(body, spec=True)}


@kopf.index("batch", "v1", "jobs", labels={LABEL_FINETUNEJOB: kopf.PRESENT})
async def training_jobs(
    namespace: str | None, labels: kopf.Labels, body: kopf.Body, **_: Any
) -> dict[Key, dict[str, Any]]:
    return {(namespace or "", labels[LABEL_FINETUNEJOB]): slim(body, spec=JOB_SPEC_KEPT)}


@kopf.index("pods", labels={LABEL_FINETUNEJOB: kopf.PRESENT})
async def training_pods(
    namespace: str | None, labels: kopf.Labels, body: kopf.Body, **_: Any
) -> dict[Key, dict[str, Any]]:
    return {(namespace or "", labels[LABEL_FINETUNEJOB]): slim(body, spec=False)}


@kopf.index(FTJ)
async def finetunejobs_waiting(namespace: str | None, name: str, spec: kopf.Spec, **_: Any) -> dict[Key, str]:
    """DPO jobs by the job they start from (a success looks up only its own dependents)."""
    ref = spec.get("fromFineTuneJob")
    return {(namespace or "", ref): name} if ref else {}


@kopf.on.event(FTJ)
async def finetunejob_changed(event: kopf.RawEvent, memo: kopf.Memo, **kwargs: Any) -> None:
    ctx = context(memo, kwargs)
    if not is_echo(ctx, event):
        await in_worker(ctx, on_object_event, ctx, event, training.reconcile)


@kopf.on.event("batch", "v1", "jobs", labels={LABEL_FINETUNEJOB: kopf.PRESENT})
@kopf.on.event("pods", labels={LABEL_FINETUNEJOB: kopf.PRESENT})
async def child_changed(namespace: str | None, labels: kopf.Labels, memo: kopf.Memo, **kwargs: Any) -> None:
    ctx = context(memo, kwargs)
    key = (namespace or "", labels[LABEL_FINETUNEJOB])
    body = ctx.latest("finetunejobs", key)
    if body is None:
        return
    if training.status_would_change(ctx, key, body):
        await in_worker(ctx, training.sync_status_locked, ctx, key)
