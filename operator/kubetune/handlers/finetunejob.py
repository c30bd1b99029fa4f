"""kopf registrations of FineTuneJobs: the indexes of jobs, their training Jobs and pods, and the watch events
that hand work to the FineTuneJob controller (controllers/training.py).

Indexes and handlers are coroutines: most watch events change nothing (the echo of the operator's own status
patch, a pod's finalizer removed, a Job's `active` count), and those are dismissed on the event loop. Only an
event that needs work goes to a worker thread, where the API requests block.
"""

from __future__ import annotations

from typing import Any

import kopf

from kubetune.controllers import prepare, training
from kubetune.controllers.context import Context, Key
from kubetune.handlers.watch import context, in_worker, is_echo, on_object_event, slim
from kubetune.render.common import LABEL_FINETUNEJOB
from kubetune.render.prepare import LABEL_PREPARE

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


@kopf.index("batch", "v1", "jobs", labels={LABEL_PREPARE: kopf.PRESENT})
async def prepare_jobs(
    namespace: str | None, labels: kopf.Labels, body: kopf.Body, **_: Any
) -> dict[Key, dict[str, Any]]:
    return {(namespace or "", labels[LABEL_PREPARE]): slim(body, spec=False)}


@kopf.on.event("batch", "v1", "jobs", labels={LABEL_PREPARE: kopf.PRESENT})
async def prepare_job_changed(namespace: str | None, labels: kopf.Labels, memo: kopf.Memo, **kwargs: Any) -> None:
    """The prepare step ended (or changed): admission looks at it again and writes the training Job after a
    success, the failure otherwise."""
    ctx = context(memo, kwargs)
    key = (namespace or "", labels[LABEL_PREPARE])
    if ctx.latest("finetunejobs", key) is not None:
        await in_worker(ctx, training.reconcile, ctx, key, True)


@kopf.index("pods", labels={LABEL_PREPARE: kopf.PRESENT})
async def prepare_pods(
    namespace: str | None, labels: kopf.Labels, body: kopf.Body, **_: Any
) -> dict[Key, dict[str, Any]]:
    return {(namespace or "", labels[LABEL_PREPARE]): slim(body, spec=False)}


@kopf.on.event("pods", labels={LABEL_PREPARE: kopf.PRESENT})
async def prepare_pod_changed(namespace: str | None, labels: kopf.Labels, memo: kopf.Memo, **kwargs: Any) -> None:
    """A prepare pod that cannot start (an image it cannot pull, a Secret or ConfigMap that does not exist), or
    that starts after such a problem: the Prepared condition says so. Other pod events change nothing."""
    ctx = context(memo, kwargs)
    key = (namespace or "", labels[LABEL_PREPARE])
    body = ctx.latest("finetunejobs", key)
    if body is not None and prepare.problem_would_change(ctx, key, body):
        await in_worker(ctx, training.reconcile, ctx, key, True)


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
    await _job_changed(context(memo, kwargs), (namespace or "", labels[LABEL_FINETUNEJOB]))


async def _job_changed(ctx: Context, key: Key) -> None:
    body = ctx.latest("finetunejobs", key)
    if body is None:
        return
    if training.status_would_change(ctx, key, body):
        await in_worker(ctx, training.sync_status_locked, ctx, key)
