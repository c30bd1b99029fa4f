"""A FineTuneJob's status, derived from its training Job and pods (pure functions).

The operator owns state, conditions, timestamps, restarts and lastRestart; the trainer owns progress,
checkpoint, adapter and trainer (it patches them itself), and admission owns plan. `derive` returns only the
operator's part.

The training pods fail and start again as one group: the first failed pod fails the Job (backoffLimit 0), and
`group_failure` decides from that pod whether the group starts again (a new Job, from the newest checkpoint)
or the run has failed. The decision is recorded in lastRestart with the failed Job's uid, so it is counted once
however often it is computed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from kubetune.status.conditions import Conditions, get, now_iso, set_condition, true_condition
from kubetune.status.pods import PROBLEM_REASONS, ended, last_line, waiting_problem
from kubetune.storage import join

TRAINER_CONTAINER = "trainer"
EXIT_PERMANENT = 3  # the trainer's exit code for a problem no retry can fix (render/finetunejob.py)
CONTROLLER_UID_LABEL = "batch.kubernetes.io/controller-uid"
# Reasons of a Pending job that someone must act on: they show in the Running condition (with a Warning Event).
WHY_NOT_RUNNING = ("Unschedulable", *PROBLEM_REASONS)
HELD_MESSAGE = "spec.suspend is true: the queued training Job is removed until it is false (docs/kueue.md)"
# States of a job that Kueue holds: the Running condition says why, the Queued or Preempted condition with
# Kueue's reason.
KUEUE_STATES = ("Queued", "Preempted")


@dataclass(frozen=True)
class Observed:
    """What the operator sees of one FineTuneJob: its status and generation, its Job and pods."""

    status: dict[str, Any]
    generation: int
    suspend: bool
    output_uri: str
    job: dict[str, Any] | None
    pods: list[dict[str, Any]]
    mount_failures: Mapping[str, str] = field(default_factory=dict)
    """Pod UID -> the message of its last FailedMount Event (pods waiting in ContainerCreating)."""
    backoff_limit: int = 3
    """spec.backoffLimit: group restarts tolerated."""
    queued: bool = False
    """spec.queueName is set: Kueue suspends and resumes the training Job."""
    held: bool = False
    """Queued and suspended by its user: the training Job is deleted on purpose (render.held_without_job)."""
    workload: dict[str, Any] | None = None
    """Kueue's Workload of the current training Job (its conditions), when there is one."""
    preemptor: str | None = None
    """The FineTuneJob whose training Job Kueue's preemption message names, when it is one."""


@dataclass(frozen=True)
class Outcome:
    state: str
    reason: str
    message: str


def _terminated(pod: dict[str, Any]) -> dict[str, Any] | None:
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        if cs.get("name") == TRAINER_CONTAINER:
            term = (cs.get("state") or {}).get("terminated") or (cs.get("lastState") or {}).get("terminated")
            if term:
                return dict(term)
    return None


def pod_failure(pod: dict[str, Any]) -> tuple[str, str] | None:
    """(reason, message) of a failed training pod: the trainer's own report when it wrote one
    (e.g. DatasetInvalid), else the kubelet's (OOMKilled, Error with the exit code)."""
    name = pod["metadata"]["name"]
    term = _terminated(pod)
    if term is None:
        status = pod.get("status") or {}
        if status.get("phase") == "Failed":
            return status.get("reason") or "PodFailed", f"pod {name} failed: {status.get('message', '')}".strip()
        return None
    code = term.get("exitCode")
    text = (term.get("message") or "").strip()
    try:
        report = json.loads(text) if text.startswith("{") else None
    except json.JSONDecodeError:
        report = None
    if isinstance(report, dict) and report.get("reason"):
        return str(report["reason"]), str(report.get("message", ""))
    if term.get("reason") == "OOMKilled":
        return "OOMKilled", f"training pod {name} was OOMKilled (exit code {code}): it needs more memory"
    if code == 0:
        return None
    detail = f": {last_line(text)}" if text else ""
    return "TrainerFailed", f"training pod {name} {ended(term)}{detail}"


def newest_failure(pods: list[dict[str, Any]]) -> tuple[str, str] | None:
    """(reason, message) of the training pod that failed last, or None."""
    failed = [p for p in pods if (p.get("status") or {}).get("phase") == "Failed"]
    failed.sort(key=lambda p: (p.get("metadata") or {}).get("creationTimestamp") or "")
    for pod in reversed(failed):
        found = pod_failure(pod)
        if found:
            return found
    return None


def _unschedulable(pods: list[dict[str, Any]]) -> str | None:
    for pod in pods:
        for cond in (pod.get("status") or {}).get("conditions") or []:
            if (
                cond.get("type") == "PodScheduled"
                and cond.get("status") == "False"
                and cond.get("reason") == "Unschedulable"
            ):
                return str(cond.get("message") or "no node fits the training pod")
    return None


@dataclass(frozen=True)
class GroupFailure:
    """The pod that failed a training Job, and what follows from it."""

    pod: str
    reason: str
    message: str
    permanent: bool
    """The trainer's permanent exit code: no restart can help."""
    disruption: bool
    """A preemption, eviction or node drain (DisruptionTarget): restarted without counting."""


def _failed_at(pod: dict[str, Any]) -> str:
    term = _terminated(pod) or {}
    disrupted = next((c for c in _conditions(pod) if c.get("type") == "DisruptionTarget"), {})
    meta = pod.get("metadata") or {}
    return str(
        term.get("finishedAt")
        or disrupted.get("lastTransitionTime")
        or meta.get("deletionTimestamp")
        or meta.get("creationTimestamp")
        or ""
    )


def _conditions(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return list((pod.get("status") or {}).get("conditions") or [])


def group_failure(pods: list[dict[str, Any]]) -> GroupFailure | None:
    """The first pod that failed (the Job controller stops the others after it), or None when none did."""
    failed = [p for p in pods if (p.get("status") or {}).get("phase") == "Failed"]
    if not failed:
        return None
    first = min(failed, key=_failed_at)
    name = first["metadata"]["name"]
    disrupted = next(
        (c for c in _conditions(first) if c.get("type") == "DisruptionTarget" and c.get("status") == "True"), None
    )
    if disrupted is not None:
        why = disrupted.get("message") or disrupted.get("reason") or "disrupted"
        return GroupFailure(name, "Disruption", f"training pod {name} was disrupted: {why}", False, True)
    reason, message = pod_failure(first) or ("TrainerFailed", f"training pod {name} failed")
    permanent = (_terminated(first) or {}).get("exitCode") == EXIT_PERMANENT
    return GroupFailure(name, reason, message, permanent, False)


def restart_record(obs: Observed, now: str) -> dict[str, Any] | None:
    """status.lastRestart when the Job failed and its group starts again; None when it does not (no failure, a
    permanent one, or backoffLimit used up). The record of a failure already counted is returned as it is."""
    job = obs.job or {}
    if true_condition(job, "Failed") is None:
        return None
    uid = (job.get("metadata") or {}).get("uid", "")
    last = obs.status.get("lastRestart") or {}
    if uid and last.get("failedJobUid") == uid:
        return dict(last)
    failure = group_failure(obs.pods)
    if failure is None:  # its pods are gone already: what the Job says
        message = f"the training Job failed: {(true_condition(job, 'Failed') or {}).get('message', '')}"
        failure = GroupFailure("", "TrainerFailed", message, permanent=False, disruption=False)
    restarts = int(obs.status.get("restarts") or 0)
    if failure.permanent or (not failure.disruption and restarts >= obs.backoff_limit):
        return None
    step = (obs.status.get("checkpoint") or {}).get("step")
    return {
        "failedJobUid": uid,
        "pod": failure.pod,
        "reason": failure.reason,
        "message": failure.message,
        "disruption": failure.disruption,
        "resumeStep": int(step) if step is not None else None,
        "time": now,
    }


def restart_message(record: dict[str, Any], restarts: int, backoff_limit: int, pods: int) -> str:
    """E.g. "training pod sft-1-x exited with code 137 (...); all 2 training pods start again from the newest
    checkpoint, step 40 as last reported (restart 1 of at most 3)". A checkpoint saved just before the failure
    may not have been reported: the pods resume from that one (status.progress.resumedFrom)."""
    step = record.get("resumeStep")
    start = (
        f"the newest checkpoint, step {step} as last reported"
        if step is not None
        else "the newest checkpoint (none reported yet)"
    )
    count = f"restart {restarts} of at most {backoff_limit}"
    if record.get("disruption"):
        count = "a disruption, not counted"
    group = f"all {pods} training pods start" if pods > 1 else "the training pod starts"
    return f"{record.get('message', '')}; {group} again from {start} ({count})"


def _current_pods(obs: Observed) -> list[dict[str, Any]]:
    """The pods of the current Job (those of a Job replaced by a restart may still be terminating)."""
    uid = ((obs.job or {}).get("metadata") or {}).get("uid")
    if not uid:
        return obs.pods
    return [p for p in obs.pods if (p["metadata"].get("labels") or {}).get(CONTROLLER_UID_LABEL, uid) == uid]


def outcome(obs: Observed, now: str | None = None) -> Outcome | None:
    """The summary state with its reason and message; None while there is no Job yet."""
    job = obs.job
    if job is None:
        return Outcome("Suspended", "Suspended", HELD_MESSAGE) if obs.held else None
    pods = _current_pods(obs)
    if (cond := true_condition(job, "Complete")) is not None:
        return Outcome("Succeeded", "Completed", "training finished; adapter at " + join(obs.output_uri, "adapter"))
    if (cond := true_condition(job, "Failed")) is not None:
        record = restart_record(replace(obs, pods=pods), now or now_iso())
        if record is not None:
            restarts = _restarts_after(obs.status, record)
            wanted = int(((job.get("spec") or {}).get("parallelism")) or 1)
            return Outcome("Pending", "Restarting", restart_message(record, restarts, obs.backoff_limit, wanted))
        failure = group_failure(pods)
        if failure:
            return Outcome("Failed", failure.reason, failure.message)
        return Outcome("Failed", cond.get("reason") or "JobFailed", cond.get("message") or "the training Job failed")
    if obs.queued and (job.get("spec") or {}).get("suspend"):
        return queue_outcome(obs.workload, obs.status, obs.preemptor)
    # A queued Job's Suspended condition lags behind Kueue's resume: only its spec.suspend (above) counts.
    if obs.suspend or (not obs.queued and true_condition(job, "Suspended") is not None):
        return Outcome("Suspended", "Suspended", "spec.suspend is true: training pods are stopped")
    active = [p for p in pods if (p.get("status") or {}).get("phase") in ("Pending", "Running")]
    # A pod that has finished counts as running until the Job controller marks the Job Complete, moments
    # later: the job does not fall back to Pending (with a status write and an Event) in between.
    running = [p for p in pods if (p.get("status") or {}).get("phase") in ("Running", "Succeeded")]
    wanted = int(((job.get("spec") or {}).get("parallelism")) or 1)
    if running and len(running) >= wanted:
        return Outcome("Running", "PodsRunning", f"{len(running)}/{wanted} training pods running")
    for pod in active:
        if (problem := waiting_problem(pod, obs.mount_failures)) is not None:
            return Outcome("Pending", problem.reason, problem.message)
    if (message := _unschedulable(active)) is not None:
        return Outcome("Pending", "Unschedulable", message)
    if running:
        return Outcome("Pending", "PodsStarting", f"{len(running)}/{wanted} training pods running")
    return Outcome("Pending", "PodsPending", f"waiting for {wanted} training pod(s) to start")


def _workload_condition(workload: dict[str, Any], type_: str) -> dict[str, Any]:
    conditions = (workload.get("status") or {}).get("conditions") or []
    return next((dict(c) for c in conditions if c.get("type") == type_), {})


def preempting_job_uid(workload: dict[str, Any] | None) -> str | None:
    """The uid of the Job that Kueue's Preempted condition says its Workload made room for ("JobUID: ...")."""
    message = _workload_condition(workload or {}, "Preempted").get("message") or ""
    found = re.search(r"JobUID: ([0-9a-f-]+)", str(message))
    return found.group(1) if found else None


def queue_outcome(workload: dict[str, Any] | None, status: dict[str, Any], preemptor: str | None = None) -> Outcome:
    """The state of a queued training Job that Kueue holds suspended, in Kueue's own words: Queued while its
    Workload waits (the reason and message of QuotaReserved or Admitted), Preempted once Kueue evicted it (with
    the FineTuneJob it made room for, when `preemptor` names one)."""
    if workload is None:
        return Outcome("Queued", "WaitingForWorkload", "waiting for Kueue to create the training Job's Workload")
    evicted = _workload_condition(workload, "Evicted")
    reserved = _workload_condition(workload, "QuotaReserved")
    admitted = _workload_condition(workload, "Admitted")
    waiting = reserved if reserved.get("status") != "True" else admitted
    why = f"{waiting.get('reason', 'Pending')}: {waiting.get('message', 'waiting for quota')}"
    if evicted.get("status") == "True":
        preempted = _workload_condition(workload, "Preempted")
        cause = preempted if preempted.get("status") == "True" else evicted
        step = (status.get("checkpoint") or {}).get("step")
        resume = f"checkpoint step {step}" if step is not None else "its newest checkpoint"
        by = f" (FineTuneJob {preemptor})" if preemptor else ""
        message = f"{cause.get('message', 'evicted by Kueue')}{by}; resumes from {resume} when admitted again ({why})"
        return Outcome("Preempted", str(cause.get("reason") or "Evicted"), message)
    if admitted.get("status") == "True":
        return Outcome("Pending", "PodsPending", "admitted by Kueue: the training pods start")
    reason, message = str(waiting.get("reason") or "Pending"), str(waiting.get("message") or "waiting for quota")
    return Outcome("Queued", reason, message)


def _restarts_after(status: dict[str, Any], record: dict[str, Any]) -> int:
    """status.restarts once `record` is counted (a disruption, or a record already written, adds nothing)."""
    restarts = int(status.get("restarts") or 0)
    counted = (status.get("lastRestart") or {}).get("failedJobUid") == record.get("failedJobUid")
    return restarts if counted or record.get("disruption") else restarts + 1


def _start_time(obs: Observed, state: str) -> str | None:
    if obs.status.get("startTime"):
        return str(obs.status["startTime"])
    if state not in ("Running", "Succeeded", "Failed"):
        return None
    starts = [str(t) for p in obs.pods if (t := (p.get("status") or {}).get("startTime"))]
    return min(starts) if starts else now_iso()


def derive(obs: Observed, now: str | None = None) -> dict[str, Any]:
    """The operator's part of the status for what it observes (unchanged fields included)."""
    now = now or now_iso()
    result = outcome(obs, now)
    conditions: Conditions = list(obs.status.get("conditions") or [])
    patch: dict[str, Any] = {}
    if result is None:
        return patch
    gen = obs.generation
    state = result.state
    # A job that simply waits for its pods needs no Running condition yet: the state says Pending.
    if state != "Pending" or result.reason in (*WHY_NOT_RUNNING, "Restarting") or get(conditions, "Running"):
        conditions = set_condition(
            conditions, "Running", state == "Running", result.reason, result.message, generation=gen, now=now
        )
    for kueue_state in KUEUE_STATES:
        if state == kueue_state or get(conditions, kueue_state) is not None:
            held = state == kueue_state
            reason, message = (result.reason, result.message) if held else ("Admitted", "admitted by Kueue")
            conditions = set_condition(conditions, kueue_state, held, reason, message, generation=gen, now=now)
    if state == "Suspended" or get(conditions, "Suspended") is not None:
        suspended = state == "Suspended"
        reason = "Suspended" if suspended else "Resumed"
        message = result.message if suspended else "spec.suspend is false"
        conditions = set_condition(conditions, "Suspended", suspended, reason, message, generation=gen, now=now)
    if state == "Succeeded":
        conditions = set_condition(
            conditions, "Succeeded", True, result.reason, result.message, generation=gen, now=now
        )
    if state == "Failed":
        conditions = set_condition(conditions, "Failed", True, result.reason, result.message, generation=gen, now=now)
    elif (failed := get(conditions, "Failed")) is not None and failed.get("status") == "True":
        # A failed run whose spec was changed runs again in a new Job: the old failure is history.
        message = f"running again after the spec changed; the previous run failed: {failed.get('message', '')}"
        conditions = set_condition(conditions, "Failed", False, "Retrying", message, generation=gen, now=now)
    job_status = (obs.job or {}).get("status") or {}
    patch = {
        "state": state,
        "conditions": conditions,
        "restarts": int(obs.status.get("restarts") or 0),
        "observedGeneration": gen,
    }
    if result.reason == "Restarting" and (record := restart_record(replace(obs, pods=_current_pods(obs)), now)):
        patch["restarts"] = _restarts_after(obs.status, record)
        patch["lastRestart"] = record
    if start := _start_time(obs, state):
        patch["startTime"] = start
    if state in ("Succeeded", "Failed"):
        patch["completionTime"] = obs.status.get("completionTime") or job_status.get("completionTime") or now
    elif obs.status.get("completionTime"):
        patch["completionTime"] = None  # merge patch: removed, the run is not complete any more
    if state == "Succeeded" and not (obs.status.get("adapter") or {}).get("uri"):
        # The trainer reports sha256 and metrics itself; the location follows from the output layout.
        patch["adapter"] = {"uri": join(obs.output_uri, "adapter")}
    return patch
