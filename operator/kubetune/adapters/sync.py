"""Which adapters each replica must load or unload, and the state of every adapter (pure functions).

The operator asks every ready server pod which LoRA adapters it has (vLLM's GET /v1/models lists each loaded
adapter as a model with a `parent`), compares that with the adapters the ModelServer should serve, and sends
the difference through vLLM's runtime LoRA API. A replica that starts later is compared like any other, so
it gets every current adapter; an adapter taken out of the spec is unloaded everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from kubetune.status.modelserver import AdapterView
from kubetune.storage import local_path, parse


def lora_path(uri: str) -> str:
    """What vLLM's load_lora_adapter gets as lora_path: a path inside the pod, or ORG/NAME for hf://."""
    loc = parse(uri)
    if loc.scheme == "hf":
        return f"{loc.root}/{loc.path}"
    return local_path(uri)


@dataclass(frozen=True)
class Adapter:
    """An adapter the server should serve, with what its FineTuneJob reported about it (empty: unknown)."""

    name: str
    uri: str
    source: str
    base_model: str = ""
    rank: int = 0
    target_modules: tuple[str, ...] = ()

    @property
    def path(self) -> str:
        return lora_path(self.uri)


@dataclass(frozen=True)
class Replica:
    """A ready server pod and where its OpenAI server listens."""

    pod: str
    address: str
    """host:port"""


@dataclass(frozen=True)
class ReplicaReport:
    """What a replica said it has loaded (adapter name -> path), or why it could not be asked."""

    replica: Replica
    loaded: dict[str, str] | None
    error: str = ""


@dataclass(frozen=True)
class Action:
    """One call of vLLM's runtime LoRA API on one replica."""

    replica: Replica
    verb: Literal["load", "unload"]
    adapter: str
    path: str = ""


@dataclass(frozen=True)
class Failure:
    """A load that vLLM refused. It is not retried for the same path until `retry_after` has passed."""

    path: str
    reason: str
    message: str
    at: float
    """time.monotonic() of the refusal"""


def plan_actions(
    adapters: list[Adapter],
    reports: list[ReplicaReport],
    failures: dict[str, Failure],
    now: float,
    retry_after: float = 60.0,
) -> list[Action]:
    """Per replica: unload what should not be there (or sits at another path), then load what is missing.

    Unreachable replicas get nothing; an adapter whose last load failed at the same path waits `retry_after`.
    """
    desired = {a.name: a.path for a in adapters}
    actions: list[Action] = []
    for report in reports:
        if report.loaded is None:
            continue
        for name, path in sorted(report.loaded.items()):
            if desired.get(name) != path:
                actions.append(Action(report.replica, "unload", name))
        for name, path in desired.items():
            if report.loaded.get(name) == path:
                continue
            failure = failures.get(name)
            if failure and failure.path == path and now - failure.at < retry_after:
                continue
            actions.append(Action(report.replica, "load", name, path))
    return actions


def adapter_states(
    adapters: list[Adapter], reports: list[ReplicaReport], failures: dict[str, Failure]
) -> list[AdapterView]:
    """Loaded (on every ready replica), Failed (vLLM refused it) or Pending with the reason."""
    views = []
    for a in adapters:
        loaded = sum(1 for r in reports if r.loaded is not None and r.loaded.get(a.name) == a.path)
        unreachable = [r for r in reports if r.loaded is None]
        failure = failures.get(a.name)
        view = AdapterView(a.name, a.source, a.uri, loaded_replicas=loaded)
        if failure and failure.path == a.path and loaded < len(reports):
            view = _with(view, "Failed", failure.reason, failure.message)
        elif not reports:
            view = _with(view, "Pending", "ServerNotReady", "no ready replica yet")
        elif loaded == len(reports):
            view = _with(view, "Loaded", "", f"loaded on {loaded} ready replica(s)")
        elif unreachable:
            first = unreachable[0]
            view = _with(view, "Pending", "ReplicaUnreachable", f"pod {first.replica.pod}: {first.error}")
        else:
            view = _with(view, "Pending", "Loading", f"loaded on {loaded}/{len(reports)} ready replicas")
        views.append(view)
    return views


def _with(view: AdapterView, state: str, reason: str, message: str) -> AdapterView:
    return AdapterView(view.name, view.source, view.uri, state, reason, message, view.loaded_replicas)
