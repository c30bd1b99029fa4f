"""FineTuneJob: admission (reference, plan, children) and status from the training Job and pods."""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

import kopf
from pydantic import ValidationError

from kubetune.api.v1alpha1 import FineTuneJob
from kubetune.handlers import modelserver
from kubetune.handlers.context import Context
from kubetune.planner import PlanInfeasible, plan_job
from kubetune.render import finetunejob as render
from kubetune.render.common import ANNOTATION_SPEC_HASH, LABEL_FINETUNEJOB
from kubetune.status import finetunejob as job_status
from kubetune.status.admission import Blocked, check_reference
from kubetune.status.conditions import set_condition

log = logging.getLogger(__name__)
FTJ = "finetunejobs.kubetune.io"
KIND = "FineTuneJob"


# --- indexes: the operator's in-memory view of the cluster, fed by the watch streams --------------


@kopf.index(FTJ)
def finetunejobs(namespace: str | None, name: str, body: kopf.Body, **_: Any) -> dict[tuple[str, str], dict[str, Any]]:
    return {(namespace or "", name): dict(body)}


@kopf.index("batch", "v1", "jobs", labels={LABEL_FINETUNEJOB: kopf.PRESENT})
def training_jobs(
    namespace: str | None, labels: kopf.Labels, body: kopf.Body, **_: Any
) -> dict[tuple[str, str], dict[str, Any]]:
    return {(namespace or "", labels[LABEL_FINETUNEJOB]): dict(body)}


@kopf.index("pods", labels={LABEL_FINETUNEJOB: kopf.PRESENT})
def training_pods(
    namespace: str | None, labels: kopf.Labels, body: kopf.Body, **_: Any
) -> dict[tuple[str, str], dict[str, Any]]:
    return {(namespace or "", labels[LABEL_FINETUNEJOB]): dict(body)}


# --- admission -----------------------------------------------------------------------------------


def _parse(body: kopf.Body) -> FineTuneJob:
    try:
        return FineTuneJob.model_validate(dict(body))
    except ValidationError as err:
        raise kopf.PermanentError(f"invalid FineTuneJob: {err}") from err


def _write_admission(
    ctx: Context, body: kopf.Body, admitted: bool, reason: str, message: str, state: str | None = None, **fields: Any
) -> None:
    """Set the Admitted condition (and state when given); post an Event when anything changed."""
    meta = dict(body["metadata"])

    def desired(current: dict[str, Any]) -> dict[str, Any]:
        conditions = set_condition(
            current.get("conditions") or [], "Admitted", admitted, reason, message, generation=meta.get("generation")
        )
        return {"conditions": conditions, **({"state": state} if state else {}), **fields}

    _, diff = ctx.status.update(KIND, meta, dict(body.get("status") or {}), desired)
    if diff:
        ctx.event(KIND, meta, not admitted, reason, message)


@kopf.on.resume(FTJ)
@kopf.on.create(FTJ)
@kopf.on.update(FTJ, field="spec")
def admit(body: kopf.Body, reason: str, memo: kopf.Memo, **_: Any) -> None:
    """Check the reference, plan, apply the children; retry while the reference is not ready."""
    ctx: Context = memo.context
    ftj = _parse(body)
    state = (body.get("status") or {}).get("state")
    if state == "Succeeded" or (state == "Failed" and reason == "resume"):
        return  # a finished run is history: an operator restart or a late edit never retrains it
    ref = ftj.spec.from_fine_tune_job
    check = check_reference(ftj, ctx.kube.get(KIND, ftj.metadata.namespace, ref) if ref else None)
    if isinstance(check, Blocked):
        _write_admission(ctx, body, False, check.reason, check.message, "Pending" if check.retry else "Failed")
        if check.retry:
            raise kopf.TemporaryError(check.message, delay=5)
        raise kopf.PermanentError(check.message)
    gpu = ctx.config.gpu_type(ftj.spec.resources.gpu_type)
    try:
        plan = plan_job(ftj.spec, gpu_memory_gib=gpu.memory_gib, gpu_type=ftj.spec.resources.gpu_type)
    except PlanInfeasible as err:
        _write_admission(ctx, body, False, "PlanInfeasible", str(err), "Failed")
        raise kopf.PermanentError(str(err)) from err
    *support, job = render.children(ftj, plan, ctx.config, check.init_adapter_uri)
    for manifest in support:
        ctx.kube.apply(manifest)
    _replace_changed_job(ctx, job)
    ctx.kube.apply(job)
    summary = (
        f"ZeRO-{plan.zero_stage}, micro-batch {plan.micro_batch_size} x {plan.gradient_accumulation_steps} "
        f"accumulation on {plan.world_size} GPU(s)"
    )
    _write_admission(
        ctx,
        body,
        True,
        "Planned",
        summary,
        None if state in ("Running", "Suspended") else "Pending",
        plan=plan.to_wire(),
    )


def _replace_changed_job(ctx: Context, job: dict[str, Any]) -> None:
    """A running Job cannot take a new pod template: delete it and retry; the new one resumes from the
    last checkpoint."""
    meta = job["metadata"]
    existing = ctx.kube.get("Job", meta["namespace"], meta["name"])
    if existing is None:
        return
    old_hash = (existing["metadata"].get("annotations") or {}).get(ANNOTATION_SPEC_HASH)
    if old_hash == meta["annotations"][ANNOTATION_SPEC_HASH]:
        return
    if not existing["metadata"].get("deletionTimestamp"):
        ctx.kube.delete("Job", meta["namespace"], meta["name"], propagation="Foreground")
    raise kopf.TemporaryError("spec changed: replacing the training Job", delay=2)


# --- status ---------------------------------------------------------------------------------------


def sync_status(ctx: Context, key: tuple[str, str], indexes: dict[str, kopf.Index]) -> None:
    """Recompute the operator's part of a FineTuneJob's status from the indexes and write changes."""
    bodies = list(indexes["finetunejobs"].get(key, []))
    jobs = list(indexes["training_jobs"].get(key, []))
    if not bodies or not jobs:
        return  # no Job yet: admission owns the status until it exists
    body = bodies[0]
    spec = body.get("spec") or {}
    observed = job_status.Observed(
        status=dict(body.get("status") or {}),
        generation=int(body["metadata"].get("generation") or 0),
        suspend=bool(spec.get("suspend")),
        output_uri=str((spec.get("output") or {}).get("uri", "")),
        job=jobs[0],
        pods=list(indexes["training_pods"].get(key, [])),
    )
    result = job_status.outcome(observed)
    before, diff = ctx.status.update(
        KIND, body["metadata"], observed.status, lambda current: job_status.derive(replace(observed, status=current))
    )
    if result and "state" in diff and diff["state"] != before.get("state"):
        ctx.event(KIND, body["metadata"], result.state == "Failed", result.reason, result.message)
        if result.state == "Succeeded":
            # Its adapter can now be served by every ModelServer that names or selects it.
            for server in modelserver.servers_using(key[0], body, indexes):
                modelserver.reconcile(ctx, server, indexes)


def _indexes(kwargs: dict[str, Any]) -> dict[str, kopf.Index]:
    return {name: kwargs[name] for name in ("training_jobs", "training_pods", *modelserver.INDEXES)}


@kopf.on.event(FTJ)
def finetunejob_changed(event: kopf.RawEvent, memo: kopf.Memo, **kwargs: Any) -> None:
    meta = event["object"]["metadata"]
    if event["type"] == "DELETED":
        memo.context.status.forget(meta["uid"])
        return
    sync_status(memo.context, (meta["namespace"], meta["name"]), _indexes(kwargs))


@kopf.on.event("batch", "v1", "jobs", labels={LABEL_FINETUNEJOB: kopf.PRESENT})
@kopf.on.event("pods", labels={LABEL_FINETUNEJOB: kopf.PRESENT})
def child_changed(namespace: str | None, labels: kopf.Labels, memo: kopf.Memo, **kwargs: Any) -> None:
    sync_status(memo.context, (namespace or "", labels[LABEL_FINETUNEJOB]), _indexes(kwargs))
