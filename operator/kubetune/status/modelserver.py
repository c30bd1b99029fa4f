"""A ModelServer's status, derived from its Deployment, pods and adapters (pure functions)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from kubetune.status.conditions import Conditions, now_iso, set_condition
from kubetune.status.engine import ENGINE_REASONS, engine_failure
from kubetune.status.finetunejob import Outcome
from kubetune.status.pods import PROBLEM_REASONS, waiting_problem


@dataclass(frozen=True)
class AdapterView:
    """One declared or selected adapter and what is known of it."""

    name: str
    source: str
    uri: str = ""
    state: str = "Pending"
    reason: str = ""
    message: str = ""
    loaded_replicas: int = 0


@dataclass(frozen=True)
class ServerObserved:
    status: dict[str, Any]
    generation: int
    desired_replicas: int
    endpoint: str
    ui_endpoint: str
    deployment: dict[str, Any] | None
    pods: list[dict[str, Any]] = field(default_factory=list)
    adapters: list[AdapterView] = field(default_factory=list)
    refusal: tuple[str, str] | None = None
    """(reason, message) when the API server refused the server's children, or their names are taken."""
    mount_failures: Mapping[str, str] = field(default_factory=dict)
    """Pod UID -> the message of its last FailedMount Event (pods waiting in ContainerCreating)."""
    selector: str = ""
    """The server pods' label selector (status.selector, for the scale subresource)."""
    autoscaling: tuple[bool, str, str] | None = None
    """(written, reason, message) of the ScaledObject when spec.autoscaling asks for one."""


# Reasons of the Ready condition that someone must act on (posted as Warning Events).
WARNING_REASONS = (
    "NameConflict",
    "ApplyFailed",
    "Unschedulable",
    "ProgressDeadlineExceeded",
    "MaxModelLenTooLarge",
    "TensorParallelSizeInvalid",
    *ENGINE_REASONS,
    *PROBLEM_REASONS,
)


def _deployment_condition(deployment: dict[str, Any], type_: str) -> dict[str, Any] | None:
    for cond in (deployment.get("status") or {}).get("conditions") or []:
        if cond.get("type") == type_:
            return dict(cond)
    return None


def _unschedulable(pods: list[dict[str, Any]]) -> str | None:
    for pod in pods:
        for cond in (pod.get("status") or {}).get("conditions") or []:
            if cond.get("type") == "PodScheduled" and cond.get("reason") == "Unschedulable":
                return str(cond.get("message") or "no node fits the server pod")
    return None


def server_outcome(obs: ServerObserved) -> Outcome:
    desired = obs.desired_replicas
    dep = obs.deployment
    ready = int(((dep or {}).get("status") or {}).get("readyReplicas") or 0)
    if obs.refusal is not None:
        return Outcome("Degraded" if ready else "Failed", *obs.refusal)
    if dep is None:
        return Outcome("Pending", "DeploymentCreating", "creating the vLLM Deployment")
    if desired == 0:
        return Outcome("Pending", "ScaledToZero", "spec.replicas is 0")
    progressing = _deployment_condition(dep, "Progressing")
    if progressing and progressing.get("reason") == "ProgressDeadlineExceeded" and ready == 0:
        return Outcome("Failed", "ProgressDeadlineExceeded", str(progressing.get("message", "")))
    # Before the replica count: a new pod of a rollout that crashes is news even while old ones serve.
    for pod in obs.pods:
        if (crashed := engine_failure(pod)) is not None:
            return Outcome("Degraded" if ready else "Failed", crashed.reason, crashed.message)
    if ready >= desired:
        return Outcome("Ready", "ReplicasReady", f"{ready}/{desired} replicas ready")
    for pod in obs.pods:
        if (problem := waiting_problem(pod, obs.mount_failures)) is not None:
            return Outcome("Degraded" if ready else "Pending", problem.reason, problem.message)
    if (message := _unschedulable(obs.pods)) is not None:
        state = "Degraded" if ready else "Pending"
        return Outcome(state, "Unschedulable", message)
    if ready:
        return Outcome("Degraded", "ReplicasNotReady", f"{ready}/{desired} replicas ready")
    return Outcome("Progressing", "ReplicasStarting", f"0/{desired} replicas ready: loading the model")


def _adapters_condition(adapters: list[AdapterView]) -> tuple[bool, str, str]:
    failed = [a for a in adapters if a.state == "Failed"]
    pending = [a for a in adapters if a.state == "Pending"]
    if failed:
        first = failed[0]
        return False, first.reason or "AdapterFailed", f"{first.name}: {first.message}"
    if pending:
        first = pending[0]
        return (
            False,
            first.reason or "AdaptersPending",
            f"{len(pending)} adapter(s) pending; {first.name}: {first.message}",
        )
    return True, "AdaptersLoaded", f"{len(adapters)} adapter(s) loaded"


def invalid(
    status: dict[str, Any], generation: int | None, reason: str, message: str, now: str | None = None
) -> dict[str, Any]:
    """The status of a ModelServer that the operator cannot run (a spec that passed the API server's schema but
    not the operator's models, a gpuType this installation does not know): Failed, with the reason in the Ready
    condition. Nothing is created."""
    conditions = set_condition(
        list(status.get("conditions") or []), "Ready", False, reason, message, generation=generation, now=now
    )
    return {"state": "Failed", "conditions": conditions}


def derive(obs: ServerObserved, now: str | None = None) -> dict[str, Any]:
    now = now or now_iso()
    result = server_outcome(obs)
    gen = obs.generation
    conditions: Conditions = list(obs.status.get("conditions") or [])
    conditions = set_condition(
        conditions, "Ready", result.state == "Ready", result.reason, result.message, generation=gen, now=now
    )
    ok, reason, message = _adapters_condition(obs.adapters)
    conditions = set_condition(conditions, "AdaptersReady", ok, reason, message, generation=gen, now=now)
    if obs.autoscaling is None:
        conditions = [c for c in conditions if c.get("type") != "Autoscaling"]
    else:
        conditions = set_condition(conditions, "Autoscaling", *obs.autoscaling, generation=gen, now=now)
    dep_status = (obs.deployment or {}).get("status") or {}
    ready = int(dep_status.get("readyReplicas") or 0)
    loaded = sum(1 for a in obs.adapters if a.state == "Loaded")
    return {
        "state": result.state,
        "conditions": conditions,
        "endpoint": obs.endpoint,
        "uiEndpoint": obs.ui_endpoint,
        "replicas": int(dep_status.get("replicas") or 0),
        "readyReplicas": ready,
        "ready": f"{ready}/{obs.desired_replicas}",
        "selector": obs.selector,
        "adapters": [
            {
                "name": a.name,
                "uri": a.uri,
                "source": a.source,
                "state": a.state,
                "reason": a.reason,
                "message": a.message,
                "loadedReplicas": a.loaded_replicas,
            }
            for a in obs.adapters
        ],
        "loadedAdapters": f"{loaded}/{len(obs.adapters)}",
        "observedGeneration": gen,
    }
