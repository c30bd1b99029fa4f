"""The prepare step of a FineTuneJob, for the FineTuneJob controller (controllers/training.py): the prepare Job
written, where the step stands, its Prepared condition, and what the training Job takes from its report.

The training Job is written only after `step` says succeeded (docs/cache.md); a failed step fails the run
before any pod requests a GPU.
"""

from __future__ import annotations

from typing import Any

from kubetune.api.v1alpha1 import FineTuneJob, Plan, PreparedInputs, TokenLengths
from kubetune.controllers import mounts
from kubetune.controllers.context import Context, Key
from kubetune.k8s import children
from kubetune.render import finetunejob as render
from kubetune.render import modelserver as server_render
from kubetune.render import prepare as prepare_render
from kubetune.status import preparation
from kubetune.status.conditions import get, now_iso, set_condition
from kubetune.status.pods import PROBLEM_REASONS, Problem, waiting_problem

KIND = "FineTuneJob"
FINISHED = ("Succeeded", "Failed")
Status = dict[str, Any]


def _report(body: dict[str, Any]) -> dict[str, Any] | None:
    return (body.get("status") or {}).get("dataset")


def step(ctx: Context, body: dict[str, Any], ftj: FineTuneJob) -> preparation.PrepareStep:
    """Where the prepare step of the job's current inputs stands; while it runs, what keeps its pod from
    starting, if anything."""
    key = (ftj.metadata.namespace, ftj.metadata.name)
    digest = prepare_render.inputs_hash(ftj.spec)
    found = preparation.look(ctx.latest("prepare_jobs", key), _report(body), digest)
    if found.state != "running":
        return found
    problem = _pod_problem(ctx, key)
    return preparation.PrepareStep("running", problem.reason, problem.message) if problem else found


def _pod_problem(ctx: Context, key: Key) -> Problem | None:
    """What keeps the job's prepare pod from starting (status/pods.py), if anything."""
    pods = ctx.objects("prepare_pods", key)
    mounts.forget_started(ctx, pods)
    return next((p for pod in pods if (p := waiting_problem(pod, ctx.mount_failures))), None)


def problem_would_change(ctx: Context, key: Key, body: dict[str, Any]) -> bool:
    """Whether the job's prepare pods show a problem other than the one its Prepared condition names (or one
    that went away): the only pod events that need the controller."""
    prepared = get((body.get("status") or {}).get("conditions") or [], "Prepared") or {}
    if prepared.get("status") != "False":
        return False
    problem = _pod_problem(ctx, key)
    shown = prepared.get("reason") if prepared.get("reason") in PROBLEM_REASONS else None
    return (problem.reason if problem else None) != shown


def succeeded(ctx: Context, body: dict[str, Any], ftj: FineTuneJob) -> preparation.PrepareStep | None:
    """The prepare step that let the training Job be written; None when it is off or no longer there."""
    if not ctx.config.prepare.enabled:
        return None
    found = step(ctx, body, ftj)
    return found if found.state == "succeeded" else None


def prepared_inputs(ctx: Context, body: dict[str, Any], ftj: FineTuneJob) -> tuple[PreparedInputs | None, str | None]:
    """What the training pods read from the cache, and the claim they mount for it (None, None: they fetch the
    inputs themselves)."""
    prepared = preparation.prepared_inputs(_report(body), prepare_render.inputs_hash(ftj.spec))
    return prepared, ctx.config.cache.claim_name if prepared and prepared.dataset_dir else None


def measured_lengths(body: dict[str, Any], ftj: FineTuneJob) -> TokenLengths | None:
    """The token lengths the prepare step measured for the job's current inputs (None before it reported)."""
    report = preparation.report_for(_report(body), prepare_render.inputs_hash(ftj.spec))
    return TokenLengths.model_validate(report["tokenLengths"]) if report.get("tokenLengths") else None


def start(
    ctx: Context, ftj: FineTuneJob, plan: Plan, init_adapter_uri: str | None, found: preparation.PrepareStep
) -> bool:
    """Write the prepare Job (after the supporting children, which the training controller wrote); True when a
    stale one (of other inputs) was deleted instead, to be written again once it is gone."""
    namespace, name = ftj.metadata.namespace, ftj.metadata.name
    if found.state == "stale":
        ctx.kube.delete("Job", namespace, prepare_render.prepare_name(name), propagation="Foreground")
        return True
    claim = cache_claim(ctx, namespace)
    trainer = render.trainer_config(ftj, plan, init_adapter_uri)
    job = prepare_render.prepare_job(ftj, trainer, ctx.config, claim, entries_in_use(ctx, namespace))
    children.write(ctx.kube, job, ctx.owned(job))
    return False


def cache_claim(ctx: Context, namespace: str) -> str | None:
    """The configured cache claim when the namespace has it (a namespace without it downloads per pod)."""
    claim = ctx.config.cache.claim_name
    return claim if claim and ctx.kube.get("PersistentVolumeClaim", namespace, claim) is not None else None


def entries_in_use(ctx: Context, namespace: str) -> list[str]:
    """Cache entries of the namespace's unfinished jobs and of its ModelServers' base models (the claim is the
    namespace's own): never evicted."""
    jobs = [ftj for (ns, _), ftjs in ctx.entries("finetunejobs") if ns == namespace for ftj in ftjs]
    unfinished = [(j.get("status") or {}) for j in jobs if (j.get("status") or {}).get("state") not in FINISHED]
    servers = [ms for (ns, _), store in ctx.entries("modelservers") if ns == namespace for ms in store]
    models = [str(((ms.get("spec") or {}).get("baseModel") or {}).get("uri") or "") for ms in servers]
    served = [key for uri in models if "://" in uri and (key := server_render.cache_entry(uri))]
    return sorted({*preparation.entries_in_use([s.get("dataset") for s in unfinished]), *served})


def write_status(
    ctx: Context, body: dict[str, Any], state: str | None, plan: Plan, found: preparation.PrepareStep, summary: str
) -> None:
    """Admitted with the plan and the Prepared condition of a step that runs or failed, in one patch; a failed
    step fails the run (no training Job, no GPU) with the step's reason, and a Warning Event."""
    meta = body["metadata"]
    gen = meta.get("generation")
    failed = found.state == "failed"

    def desired(current: Status) -> Status:
        conditions = current.get("conditions") or []
        conditions = set_condition(conditions, "Admitted", True, "Planned", summary, generation=gen)
        conditions = set_condition(conditions, "Prepared", False, found.reason, found.message, generation=gen)
        wanted: Status = {"plan": plan.to_wire(), "observedGeneration": gen}
        if failed:
            conditions = set_condition(conditions, "Failed", True, found.reason, found.message, generation=gen)
            wanted.update(state="Failed", completionTime=current.get("completionTime") or now_iso())
        elif body.get("spec", {}).get("suspend"):
            wanted["state"] = "Suspended"  # it prepares all the same; its training pods wait for spec.suspend false
        elif state not in ("Running", "Suspended"):
            wanted["state"] = "Pending"
        return {**wanted, "conditions": conditions}

    before, diff = ctx.status.update(KIND, meta, dict(body.get("status") or {}), desired)
    if failed and diff.get("state") == "Failed" != before.get("state"):
        ctx.event(KIND, meta, True, found.reason, found.message)
    was = (get(before.get("conditions") or [], "Prepared") or {}).get("reason")
    if found.reason in PROBLEM_REASONS and was != found.reason:  # a reason to act: the pod cannot start
        ctx.event(KIND, meta, True, found.reason, found.message)


def preparing(status: Status) -> bool:
    """The prepare step runs: its report is mirrored into the Prepared condition, its end writes the training Job."""
    prepared = get(status.get("conditions") or [], "Prepared") or {}
    return prepared.get("status") == "False" and status.get("state") not in FINISHED
