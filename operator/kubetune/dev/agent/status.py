"""Pod status as a kubelet reports it, derived from the agent's container records (pure functions)."""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

OWN_CONDITIONS = ("PodReadyToStartContainers", "Initialized", "ContainersReady", "Ready", "PodScheduled")
TERMINAL = ("Succeeded", "Failed")


def now_rfc3339() -> str:
    """The current time as the API writes it (seconds)."""
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class ContainerRecord:
    """What the agent knows of one container: exactly one current state, and the last termination."""

    name: str
    image: str = ""
    state: Literal["waiting", "running", "terminated"] = "waiting"
    reason: str = "ContainerCreating"
    message: str = ""
    started_at: str = ""
    exit_code: int = 0
    finished_at: str = ""
    container_id: str = ""
    restart_count: int = 0
    ready: bool = False
    started: bool = False
    last_terminated: dict[str, Any] | None = None
    ever_ran: bool = False

    def terminated_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "exitCode": self.exit_code,
            "reason": self.reason,
            "startedAt": self.started_at or None,
            "finishedAt": self.finished_at or None,
            "containerID": self.container_id or None,
        }
        if self.message:
            out["message"] = self.message
        return {k: v for k, v in out.items() if v is not None}

    @property
    def succeeded(self) -> bool:
        return self.state == "terminated" and self.exit_code == 0


def container_status(record: ContainerRecord) -> dict[str, Any]:
    """One entry of ``containerStatuses`` / ``initContainerStatuses``."""
    if record.state == "running":
        state: dict[str, Any] = {"running": {"startedAt": record.started_at}}
    elif record.state == "terminated":
        state = {"terminated": record.terminated_dict()}
    else:
        waiting = {"reason": record.reason, **({"message": record.message} if record.message else {})}
        state = {"waiting": waiting}
    out: dict[str, Any] = {
        "name": record.name,
        "image": record.image or "none",
        "imageID": "",
        "state": state,
        "lastState": {"terminated": record.last_terminated} if record.last_terminated else {},
        "ready": record.ready,
        "started": record.state == "running" and record.started,
        "restartCount": record.restart_count,
    }
    if record.container_id:
        out["containerID"] = record.container_id
    return out


def pod_phase(restart_policy: str, init: Sequence[ContainerRecord], containers: Sequence[ContainerRecord]) -> str:
    """Pending, Running, Succeeded or Failed from the containers' states and the restart policy."""
    if not all(record.succeeded for record in init):
        failed_init = any(r.state == "terminated" and r.exit_code != 0 for r in init)
        return "Failed" if restart_policy == "Never" and failed_init else "Pending"
    if not any(record.ever_ran for record in containers):
        return "Pending"
    if restart_policy != "Always" and all(record.state == "terminated" for record in containers):
        return "Succeeded" if all(record.exit_code == 0 for record in containers) else "Failed"
    return "Running"


@dataclass(frozen=True)
class PodView:
    """What the pod-level conditions depend on."""

    phase: str
    sandbox_ready: bool
    initialized: bool
    containers: Sequence[ContainerRecord] = field(default_factory=list)
    readiness_gates: Sequence[str] = ()
    """spec.readinessGates' condition types: Ready waits for each to be True (set by someone else)."""


def _condition(type_: str, ok: bool, reason: str = "", message: str = "") -> dict[str, Any]:
    out = {"type": type_, "status": "True" if ok else "False"}
    if not ok and reason:
        out["reason"] = reason
    if not ok and message:
        out["message"] = message
    return out


def _gates_closed(view: PodView, previous: Sequence[Mapping[str, Any]]) -> list[str]:
    """The readiness gates whose condition is not True."""
    true = {str(c.get("type")) for c in previous if c.get("status") == "True" and c.get("type") not in OWN_CONDITIONS}
    return [gate for gate in view.readiness_gates if gate not in true]


def pod_conditions(view: PodView, previous: Sequence[Mapping[str, Any]], now: str) -> list[dict[str, Any]]:
    """The kubelet-owned conditions, plus any others already on the pod; transition times kept when unchanged.
    As a kubelet, Ready also waits for the pod's readiness gates."""
    unready = [record.name for record in view.containers if not record.ready]
    terminal = view.phase in TERMINAL
    ready = not unready and not terminal
    reason = "PodCompleted" if terminal else "ContainersNotReady"
    message = "" if terminal else f"containers with unready status: [{' '.join(unready)}]"
    closed = _gates_closed(view, previous)
    pod_reason, pod_message = reason, message
    if ready and closed:
        pod_reason = "ReadinessGatesNotReady"
        pod_message = f'corresponding condition of pod readiness gate "{closed[0]}" does not exist.'
    mine = [
        _condition("PodReadyToStartContainers", view.sandbox_ready and not terminal),
        _condition("Initialized", view.initialized, "ContainersNotInitialized", "containers not initialized"),
        _condition("ContainersReady", ready, reason, message),
        _condition("Ready", ready and not closed, pod_reason, pod_message),
        _condition("PodScheduled", True),
    ]
    before = {str(c.get("type")): c for c in previous}
    for condition in mine:
        old = before.get(condition["type"])
        same = old is not None and old.get("status") == condition["status"] and old.get("lastTransitionTime")
        condition["lastTransitionTime"] = old["lastTransitionTime"] if same and old else now
    others = [dict(c) for c in previous if c.get("type") not in OWN_CONDITIONS]
    return [*others, *mine]


def pod_status(
    view: PodView,
    init: Sequence[ContainerRecord],
    previous_conditions: Sequence[Mapping[str, Any]],
    pod_ip: str,
    host_ip: str,
    start_time: str,
    now: str,
) -> dict[str, Any]:
    """The whole ``status`` the agent writes (sent as a merge patch: lists are replaced)."""
    return {
        "phase": view.phase,
        "conditions": pod_conditions(view, previous_conditions, now),
        "hostIP": host_ip,
        "hostIPs": [{"ip": host_ip}],
        "podIP": pod_ip or None,
        "podIPs": [{"ip": pod_ip}] if pod_ip else None,
        "startTime": start_time,
        "initContainerStatuses": [container_status(r) for r in init] or None,
        "containerStatuses": [container_status(r) for r in view.containers],
    }


def exit_reason(exit_code: int) -> str:
    """The termination reason of an exit code. A kill for memory cannot be told apart, so never OOMKilled."""
    return "Completed" if exit_code == 0 else "Error"


LOST_MESSAGE = "The container could not be located when the pod was terminated"


def _lost(entries: Sequence[Mapping[str, Any]] | None, specs: Sequence[Mapping[str, Any]], now: str) -> list[Any]:
    """Container statuses with every not-yet-terminated container terminated as ContainerStatusUnknown."""
    by_name = {str(entry.get("name")): dict(entry) for entry in entries or []}
    out = []
    for spec in specs:
        entry = by_name.get(str(spec["name"])) or {
            "name": spec["name"],
            "image": spec.get("image") or "none",
            "imageID": "",
            "restartCount": 0,
        }
        state = entry.get("state") or {}
        if "terminated" not in state:
            terminated = {"exitCode": 137, "reason": "ContainerStatusUnknown", "message": LOST_MESSAGE}
            terminated["finishedAt"] = now
            started = (state.get("running") or {}).get("startedAt")
            if started:
                terminated["startedAt"] = started
            entry["state"] = {"terminated": terminated}
        out.append({**entry, "ready": False, "started": False})
    return out


def restarted_agent_status(pod: Mapping[str, Any], now: str) -> dict[str, Any]:
    """The status of a pod whose processes a previous agent run started: Failed, NodeAgentRestarted."""
    status, spec = pod.get("status") or {}, pod.get("spec") or {}
    previous = status.get("conditions") or []
    initialized = any(c.get("type") == "Initialized" and c.get("status") == "True" for c in previous)
    view = PodView(phase="Failed", sandbox_ready=False, initialized=initialized)
    return {
        "phase": "Failed",
        "reason": "NodeAgentRestarted",
        "message": "the node agent restarted; it does not adopt the processes of its previous run",
        "conditions": pod_conditions(view, previous, now),
        "initContainerStatuses": _lost(status.get("initContainerStatuses"), spec.get("initContainers") or [], now)
        or None,
        "containerStatuses": _lost(status.get("containerStatuses"), spec.get("containers") or [], now),
    }
