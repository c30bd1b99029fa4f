"""A FineTuneJob's status, derived from its training Job and pods (pure functions).

The operator owns state, conditions, timestamps and restarts; the trainer owns progress, checkpoint, adapter
and trainer (it patches them itself), and admission owns plan. `derive` returns only the operator's part.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from kubetune.status.conditions import Conditions, get, now_iso, set_condition
from kubetune.status.pods import PROBLEM_REASONS, ended, last_line, waiting_problem
from kubetune.storage import join

TRAINER_CONTAINER = "trainer"
# Reasons of a Pending job that someone must act on: they show in the Running condition (with a Warning Event).
WHY_NOT_RUNNING = ("Unschedulable", *PROBLEM_REASONS)


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


@dataclass(frozen=True)
class Outcome:
    state: str
    reason: str
    message: str


def _job_condition(job: dict[str, Any], type_: str) -> dict[str, Any] | None:
    for cond in (job.get("status") or {}).get("conditions") or []:
        if cond.get("type") == type_ and cond.get("status") == "True":
            return dict(cond)
    return None


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


def outcome(obs: Observed) -> Outcome | None:
    """The summary state with its reason and message; None while there is no Job yet."""
    job = obs.job
    if job is None:
        return None
    pods = obs.pods
    if (cond := _job_condition(job, "Complete")) is not None:
        return Outcome("Succeeded", "Completed", "training finished; adapter at " + join(obs.output_uri, "adapter"))
    if (cond := _job_condition(job, "Failed")) is not None:
        failure = newest_failure(pods)
        if failure:
            return Outcome("Failed", *failure)
        return Outcome("Failed", cond.get("reason") or "JobFailed", cond.get("message") or "the training Job failed")
    if obs.suspend or _job_condition(job, "Suspended") is not None:
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


def _start_time(obs: Observed, state: str) -> str | None:
    if obs.status.get("startTime"):
        return str(obs.status["startTime"])
    if state not in ("Running", "Succeeded", "Failed"):
        return None
    starts = [str(t) for p in obs.pods if (t := (p.get("status") or {}).get("startTime"))]
    return min(starts) if starts else now_iso()


def derive(obs: Observed, now: str | None = None) -> dict[str, Any]:
    """The operator's part of the status for what it observes (unchanged fields included)."""
    result = outcome(obs)
    conditions: Conditions = list(obs.status.get("conditions") or [])
    patch: dict[str, Any] = {}
    if result is None:
        return patch
    gen = obs.generation
    now = now or now_iso()
    state = result.state
    # A job that simply waits for its pods needs no Running condition yet: the state says Pending.
    if state != "Pending" or result.reason in WHY_NOT_RUNNING or get(conditions, "Running") is not None:
        conditions = set_condition(
            conditions, "Running", state == "Running", result.reason, result.message, generation=gen, now=now
        )
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
        "restarts": int(job_status.get("failed") or 0),
        "observedGeneration": gen,
    }
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
