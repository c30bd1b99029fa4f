"""The FineTuneJob controller: admission (reference, plan, children) and status from the training Job and pods.

Level-based: every watch event of a FineTuneJob leads to `reconcile`, which admits the job when its current
generation has not been admitted yet and then recomputes the status from the indexes; an event of its Job
or pods leads to `sync_status_locked` when `status_would_change`. Nothing is stored on the object but its
status, so an operator restart simply reconciles again. handlers/finetunejob.py calls these functions.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

from pydantic import ValidationError

from kubetune import faults
from kubetune.api.v1alpha1 import FineTuneJob, Plan
from kubetune.config import UnknownGpuType
from kubetune.controllers import metrics, mounts, prepare
from kubetune.controllers.context import RETRY_API_ERROR_S, WORKLOADS_INDEX, Context, Key, retried
from kubetune.k8s import children
from kubetune.k8s.children import NameConflict
from kubetune.k8s.client import ApiError
from kubetune.planner import PlanInfeasible, plan_job
from kubetune.render import finetunejob as render
from kubetune.render import trainer_access
from kubetune.render.common import ANNOTATION_SPEC_HASH
from kubetune.status import finetunejob as job_status
from kubetune.status import preparation
from kubetune.status.admission import Admitted, Blocked, check_reference
from kubetune.status.conditions import get, set_condition

log = logging.getLogger(__name__)
KIND = "FineTuneJob"
CONTROLLER = "finetunejob"  # the label of its metrics
RETRY_WAITING_S = 10.0
FINISHED = ("Succeeded", "Failed")
Status = dict[str, Any]


class Retry(Exception):
    """Admission cannot finish now; look again after `delay` seconds."""

    def __init__(self, message: str, delay: float) -> None:
        super().__init__(message)
        self.delay = delay


# --- admission -----------------------------------------------------------------------------------


# Admissions that wait for something outside the operator's view (a referenced job, a name someone else holds,
# the API server's consent, the operator's configuration): a restarted operator looks again at once.
RECHECKED_AFTER_RESTART = ("WaitingForFineTuneJob", "NameConflict", "ApplyFailed", "UnknownGpuType")


def needs_admission(status: dict[str, Any], generation: int, first_look: bool) -> bool:
    """This generation was not admitted yet, or its admission waits for something and this process just started."""
    cond = get(status.get("conditions") or [], "Admitted")
    if cond is None or cond.get("observedGeneration") != generation:
        return True
    if prepare.preparing(status):
        return True  # the prepare pod reported (download progress, its result): look at its step again
    return first_look and cond.get("status") == "False" and cond.get("reason") in RECHECKED_AFTER_RESTART


def children_missing(ctx: Context, body: dict[str, Any], status: Status) -> list[str]:
    """The children of an admitted, unfinished job that the operator's view lacks (a crash between two writes,
    or a deletion by hand), e.g. ["Role kubetune-trainer"]."""
    meta = body["metadata"]
    admitted = get(status.get("conditions") or [], "Admitted") or {}
    if meta.get("deletionTimestamp") or admitted.get("status") != "True" or status.get("state") in FINISHED:
        return []
    spec = body.get("spec") or {}
    nodes = int((spec.get("resources") or {}).get("nodes") or 1)
    with_job = not render.held_without_job(spec.get("queueName"), bool(spec.get("suspend")))
    expected = render.expected_children(meta["namespace"], meta["name"], nodes, with_job)
    return [f"{m['kind']} {m['metadata']['name']}" for m in expected if ctx.owned(m) is None]


def _write_admission(
    ctx: Context,
    body: dict[str, Any],
    admitted: bool,
    reason: str,
    message: str,
    state: str | None = None,
    then: Callable[[Status], Status] | None = None,
    **fields: Any,
) -> None:
    """Set the Admitted condition (and state when given), and what `then` derives from that status, in one
    patch; post a Warning Event when a refusal changed anything."""
    meta = body["metadata"]

    def desired(current: Status) -> Status:
        conditions = set_condition(
            current.get("conditions") or [], "Admitted", admitted, reason, message, generation=meta.get("generation")
        )
        wanted = {"conditions": conditions, **({"state": state} if state else {}), **fields}
        return {**wanted, **then({**current, **wanted})} if then else wanted

    _, diff = ctx.status.update(KIND, meta, dict(body.get("status") or {}), desired)
    if diff and not admitted:  # an admission shows in the status (Admitted, plan); a refusal also as a Warning
        ctx.event(KIND, meta, True, reason, message)


def admit(ctx: Context, body: dict[str, Any], state: str | None) -> None:
    """Check the reference, plan, write the children, then the Admitted status. Raises Retry while the reference
    is not ready, NameConflict or ApiError when a child cannot be written."""
    try:
        ftj = FineTuneJob.model_validate(body)
    except ValidationError as err:
        _write_admission(ctx, body, False, "InvalidSpec", str(err), "Failed")
        return
    if state == "Succeeded":
        _write_admission(ctx, body, True, "Finished", "the run has finished; later spec changes are not applied")
        return
    planned = _plan(ctx, body, ftj)
    if planned is None:
        return
    plan, admitted = planned
    job = _write_children(ctx, body, ftj, plan, admitted.init_adapter_uri)
    if isinstance(job, preparation.PrepareStep):
        prepare.write_status(ctx, body, state, plan, job, _plan_summary(plan))
        return
    # Admitted only once every child is written: an operator that dies before this line admits the generation
    # again after its restart (every write is idempotent), one that dies after it finds its children in place.
    _write_admitted(ctx, body, ftj, state, plan, job, prepare.succeeded(ctx, body, ftj))
    faults.point("after-admitted", f"{ftj.metadata.namespace}/{ftj.metadata.name}")


def _plan(ctx: Context, body: dict[str, Any], ftj: FineTuneJob) -> tuple[Plan, Admitted] | None:
    """The plan of a job whose reference and gpuType pass; None when the job is refused (the refusal is written
    on it). Raises Retry while the reference is not ready."""
    ref = ftj.spec.from_fine_tune_job
    check = check_reference(ftj, ctx.kube.get(KIND, ftj.metadata.namespace, ref) if ref else None)
    if isinstance(check, Blocked):
        _write_admission(ctx, body, False, check.reason, check.message, "Pending" if check.retry else "Failed")
        if check.retry:
            raise Retry(check.message, RETRY_WAITING_S)
        return None
    try:
        gpu = ctx.config.gpu_type(ftj.spec.resources.gpu_type)
    except UnknownGpuType as err:
        _write_admission(ctx, body, False, "UnknownGpuType", str(err), "Failed")
        return None
    try:
        plan = plan_job(
            ftj.spec,
            gpu_memory_gib=gpu.memory_gib,
            gpu_type=ftj.spec.resources.gpu_type,
            lengths=prepare.measured_lengths(body, ftj),
        )
    except PlanInfeasible as err:
        _write_admission(ctx, body, False, "PlanInfeasible", str(err), "Failed")
        return None
    return plan, check


def _write_children(
    ctx: Context, body: dict[str, Any], ftj: FineTuneJob, plan: Plan, init_adapter_uri: str | None
) -> dict[str, Any] | preparation.PrepareStep | None:
    """Write the job's children, the training Job last; returns the Job as written, the prepare step while it
    has not succeeded (the prepare Job goes in the training Job's place until then), or None while the run has
    no Job (a queued run that its user suspended)."""
    key = (ftj.metadata.namespace, ftj.metadata.name)
    existing = ctx.latest("training_jobs", key)
    step = prepare.step(ctx, body, ftj) if ctx.config.prepare.enabled and not existing else None
    prepared, claim = prepare.prepared_inputs(ctx, body, ftj)
    rendered = render.children(ftj, plan, ctx.config, init_adapter_uri, prepared, claim)
    # A queued run suspended by its user has no Job (render.held_without_job): the one it had goes.
    job = rendered[-1] if rendered[-1]["kind"] == "Job" else None
    support = rendered[:-1] if job else rendered
    if job is not None and step is None:
        _replace_changed_job(ctx, job, existing)
    # The pods need every supporting object: the ServiceAccount to be admitted, the Role to report, the Service to
    # meet. All are written (and found to be kubetune's own) before the Job, so a pod never runs as an object that
    # someone else put under that name. They go together, in one round trip.
    own = [m for m in support if not trainer_access.is_trainer_access(m["metadata"]["labels"])]
    with _trainer_access_to_write(ctx, ftj.metadata.namespace) as access:
        children.start_writes(ctx.kube, [*access, *own], ctx.owned)()
    if job is None and existing is not None and not existing["metadata"].get("deletionTimestamp"):
        ctx.kube.delete("Job", ftj.metadata.namespace, ftj.metadata.name, propagation="Foreground")
    # A suspended run prepares all the same, queued or not (a CPU pod, no quota): it trains at once when resumed.
    if step is not None and step.state != "succeeded":
        if step.state in ("absent", "stale") and prepare.start(ctx, ftj, plan, init_adapter_uri, step):
            raise Retry("inputs changed: replacing the prepare Job", 2.0)
        return step
    if job is None:
        return None
    return children.write(ctx.kube, job, ctx.owned(job), release=render.create_only_fields(ftj))


@contextlib.contextmanager
def _trainer_access_to_write(ctx: Context, namespace: str) -> Iterator[list[dict[str, Any]]]:
    """The namespace's trainer ServiceAccount, Role and RoleBinding when this process has not written them yet
    (else nothing): the first admission in a namespace writes them while the others there wait for it, and
    they are written again after one of them was deleted (`trainer_access_deleted`)."""
    if namespace in ctx.trainer_access:
        yield []
        return
    with ctx.lock(f"trainer-access/{namespace}"):
        if namespace in ctx.trainer_access:
            yield []
            return
        yield trainer_access.namespace_objects(namespace)
        ctx.trainer_access.add(namespace)


def trainer_access_deleted(ctx: Context, namespace: str) -> None:
    """The trainer ServiceAccount, Role or RoleBinding of a namespace was deleted: every unfinished job there
    writes its children again (the first one the access)."""
    ctx.trainer_access.discard(namespace)
    for key in list(ctx.indexes.get("finetunejobs") or {}):
        if key[0] == namespace:
            ctx.later(0, recheck, ctx, key)


def _plan_summary(plan: Plan) -> str:
    return (
        f"ZeRO-{plan.zero_stage}, micro-batch {plan.micro_batch_size} x {plan.gradient_accumulation_steps} "
        f"accumulation on {plan.world_size} GPU(s)"
    )


def _write_admitted(
    ctx: Context,
    body: dict[str, Any],
    ftj: FineTuneJob,
    state: str | None,
    plan: Plan,
    job: dict[str, Any] | None,
    prepared: preparation.PrepareStep | None = None,
) -> None:
    """Admitted=True with the plan (Prepared=True after a prepare step), and the status the new Job implies while
    it waits for its pods, in one patch."""
    summary = _plan_summary(plan)
    new_state = None if state in ("Running", "Suspended") else "Pending"
    observed = _observed(ctx, (ftj.metadata.namespace, ftj.metadata.name), body, job)

    def waiting_for_pods(current: Status) -> Status:
        """The status the new Job implies while it waits for its pods, written with the admission rather than
        in a patch of its own; other states (and their Events) are left to sync_status."""
        conditions = current.get("conditions") or []
        if prepared is not None:
            gen = ftj.metadata.generation
            conditions = set_condition(conditions, "Prepared", True, prepared.reason, prepared.message, generation=gen)
        derived = job_status.derive(replace(observed, status={**current, "conditions": conditions}))
        return derived if derived.get("state") == "Pending" else {"conditions": conditions}

    _write_admission(
        ctx,
        body,
        True,
        "Planned",
        summary,
        new_state,
        then=waiting_for_pods,
        plan=plan.to_wire(),
        observedGeneration=ftj.metadata.generation,
    )


def refused(ctx: Context, body: dict[str, Any], state: str | None, err: NameConflict | ApiError) -> float:
    """Report children that the API server refused (or whose names someone else holds) on the FineTuneJob:
    Admitted=False with the API server's message and a Warning Event. Returns the seconds until the next try,
    which double with each refusal in a row."""
    reason = "NameConflict" if isinstance(err, NameConflict) else "ApplyFailed"
    message = err.message if isinstance(err, NameConflict) else f"{err.subject or 'a child'}: {err.message}"
    message += " (tried again with a growing back-off)"
    refusal = ctx.backoff.refused(body["metadata"]["uid"], reason, message, time.monotonic())
    _write_admission(ctx, body, False, reason, message, "Pending" if state in (None, "Pending") else None)
    return refusal.retry_at - time.monotonic()


def _replace_changed_job(ctx: Context, job: dict[str, Any], existing: dict[str, Any] | None) -> None:
    """A running Job cannot take a new pod template: delete it and come back; the new one resumes from the
    last checkpoint."""
    if existing is None:
        return
    meta = job["metadata"]
    old_hash = (existing["metadata"].get("annotations") or {}).get(ANNOTATION_SPEC_HASH)
    if old_hash == meta["annotations"][ANNOTATION_SPEC_HASH]:
        return
    if not existing["metadata"].get("deletionTimestamp"):
        ctx.kube.delete("Job", meta["namespace"], meta["name"], propagation="Foreground")
    raise Retry("spec changed: replacing the training Job", 2.0)


# --- reconciliation --------------------------------------------------------------------------------


@retried
def reconcile(ctx: Context, key: Key, retry: bool = False, recheck: bool = False) -> None:
    """Admit the current generation if needed (or when `retry`: it waited for something; or when children are
    missing: after a restart, or with `recheck` when one was deleted), then bring the status up to date."""
    body = ctx.latest("finetunejobs", key)
    if body is None:
        return
    meta = body["metadata"]
    uid = meta["uid"]
    if not (retry or recheck) and ctx.status.is_echo(uid, meta.get("resourceVersion")):
        return  # the watch shows the operator's own status patch back: nothing changed since it was computed
    with ctx.lock(uid), metrics.reconciling(CONTROLLER) as outcome:
        first_look = uid not in ctx.seen
        ctx.seen.add(uid)
        current = ctx.status.current(uid, dict(body.get("status") or {}))
        missing = children_missing(ctx, body, current) if first_look or recheck else []
        if missing:
            log.info("%s/%s: writing its missing children again: %s", *key, ", ".join(missing))
        if retry or missing or needs_admission(current, int(meta.get("generation") or 0), first_look):
            try:
                admit(ctx, body, current.get("state"))
                ctx.backoff.succeeded(uid)
            except Retry as again:
                outcome.result = "retry"
                ctx.later(again.delay, reconcile, ctx, key, True)
            except (NameConflict, ApiError) as err:
                outcome.failed(err)
                if isinstance(err, ApiError) and err.namespace_terminating:
                    return  # the job goes with its namespace
                if isinstance(err, ApiError) and err.transient:
                    log.warning("admission of %s/%s failed, retrying: %s", *key, err)
                    ctx.later(RETRY_API_ERROR_S, reconcile, ctx, key, True)
                else:
                    delay = refused(ctx, body, current.get("state"), err)
                    log.warning("admission of %s/%s refused, retrying in %.0fs: %s", *key, delay, err)
                    ctx.later_once(("finetunejob-refused", *key), delay, reconcile, ctx, key, True)
        sync_status(ctx, key, body)


def recheck(ctx: Context, key: Key) -> None:
    """One of the job's children was deleted: write the missing ones again (unless the job is finished)."""
    reconcile(ctx, key, False, True)


def sync_status(ctx: Context, key: Key, body: dict[str, Any]) -> None:
    """Recompute the operator's part of a FineTuneJob's status from the indexes and write changes."""
    job = ctx.latest("training_jobs", key)
    if job is None and not _held(body):
        return  # no Job yet: admission owns the status until it exists
    observed = _observed(ctx, key, body, job)
    result = job_status.outcome(observed)
    before, diff = ctx.status.update(KIND, body["metadata"], observed.status, _derived(observed))
    if result:
        _post_events(ctx, body["metadata"], before, diff, result)
        if result.state == "Succeeded" and diff.get("state") == "Succeeded" != before.get("state"):
            _after_success(ctx, key)
        if result.reason == "Restarting" and job is not None:
            _replace_failed_job(ctx, job)
    mounts.forget_started(ctx, observed.pods)


def _post_events(ctx: Context, meta: dict[str, Any], before: Status, diff: Status, result: job_status.Outcome) -> None:
    """Events for what changed: the end (Succeeded, Failed) and suspension; a reason to act while pods wait (a
    missing Secret, an image that cannot be pulled); a group of training pods that starts again. Every job
    passes through Pending and Running: those show in the status only (an Event each would cost every job two
    more requests)."""
    was = (get(before.get("conditions") or [], "Running") or {}).get("reason")
    if "lastRestart" in diff:
        ctx.event(KIND, meta, True, "TrainerRestarted", result.message)
    elif "state" in diff and diff["state"] != before.get("state") and diff["state"] not in ("Pending", "Running"):
        ctx.event(KIND, meta, result.state == "Failed", result.reason, result.message)
    elif result.reason in job_status.WHY_NOT_RUNNING and "conditions" in diff and was != result.reason:
        ctx.event(KIND, meta, True, result.reason, result.message)


def _replace_failed_job(ctx: Context, job: dict[str, Any]) -> None:
    """The group starts again: the failed Job goes (the Job controller has stopped its other pods), and its
    deletion brings the job's children back, a new Job among them (`recheck`), which resumes from the newest
    checkpoint. The restart is already recorded in the status, so doing this twice counts once."""
    meta = job["metadata"]
    if not meta.get("deletionTimestamp"):
        log.info("%s/%s: a training pod failed; starting every pod again", meta["namespace"], meta["name"])
        ctx.kube.delete("Job", meta["namespace"], meta["name"], propagation="Background")


def _derived(observed: job_status.Observed) -> Callable[[Status], Status]:
    """The operator's part of the status for what it observes, given the status as it currently is."""
    return lambda current: job_status.derive(replace(observed, status=current))


def _held(body: dict[str, Any]) -> bool:
    spec = body.get("spec") or {}
    return render.held_without_job(spec.get("queueName"), bool(spec.get("suspend")))


def workload_changed(ctx: Context, key: Key) -> None:
    """Kueue's Workload of the training Job `key` changed (controllers/workloads.py): the FineTuneJob of that name
    writes its status when it would change."""
    body = ctx.latest("finetunejobs", key)
    if body is not None and status_would_change(ctx, key, body):
        sync_status_locked(ctx, key)


def _workload(ctx: Context, key: Key, job: dict[str, Any] | None) -> dict[str, Any] | None:
    """Kueue's Workload of this very training Job (a Workload of an earlier Job of the same name may linger)."""
    uid = ((job or {}).get("metadata") or {}).get("uid")
    return next((w for w in ctx.objects(WORKLOADS_INDEX, key) if uid and w.get("jobUid") == uid), None)


def _job_named_by_uid(ctx: Context, namespace: str, uid: str | None) -> str | None:
    """The FineTuneJob of `namespace` whose training Job has `uid` (a preemptor that Kueue names by uid)."""
    if not uid:
        return None
    for (ns, name), jobs in ctx.entries("training_jobs"):
        if ns == namespace and any(j["metadata"].get("uid") == uid for j in jobs):
            return str(name)
    return None


def _observed(ctx: Context, key: Key, body: dict[str, Any], job: dict[str, Any] | None) -> job_status.Observed:
    spec = body.get("spec") or {}
    workload = _workload(ctx, key, job) if spec.get("queueName") else None
    return job_status.Observed(
        status=dict(body.get("status") or {}),
        generation=int(body["metadata"].get("generation") or 0),
        suspend=bool(spec.get("suspend")),
        output_uri=str((spec.get("output") or {}).get("uri", "")),
        job=job,
        pods=ctx.objects("training_pods", key),
        mount_failures=ctx.mount_failures,
        backoff_limit=int(spec.get("backoffLimit", 3)),
        queued=bool(spec.get("queueName")),
        held=_held(body),
        workload=workload,
        preemptor=_job_named_by_uid(ctx, key[0], job_status.preempting_job_uid(workload)),
    )


def _after_success(ctx: Context, key: Key) -> None:
    """Start the DPO jobs that wait for this one. (The servers that use its adapter learn of the success from
    the FineTuneJob's watch event: handlers/modelserver.py.)"""
    namespace, _ = key
    for other in set(ctx.objects("finetunejobs_waiting", key)):
        ctx.later(0, reconcile, ctx, (namespace, other), True)


def status_would_change(ctx: Context, key: Key, body: dict[str, Any]) -> bool:
    """Whether `sync_status` would write anything now (pure computation, no locks, no requests)."""
    job = ctx.latest("training_jobs", key)
    if job is None and not _held(body):
        return False
    observed = _observed(ctx, key, body, job)
    return ctx.status.would_change(body["metadata"]["uid"], observed.status, _derived(observed))


@retried
def sync_status_locked(ctx: Context, key: Key) -> None:
    body = ctx.latest("finetunejobs", key)
    if body is not None:
        with ctx.lock(body["metadata"]["uid"]), metrics.reconciling(CONTROLLER):
            sync_status(ctx, key, body)
