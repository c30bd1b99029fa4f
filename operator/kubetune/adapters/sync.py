"""Which adapters each replica must load or unload, and the state of every adapter (pure functions).

The operator asks every ready server pod which LoRA adapters it has (vLLM's GET /v1/models lists each loaded
adapter as a model with a `parent`), compares that with the adapters the ModelServer should serve, and sends
the difference through vLLM's runtime LoRA API. A replica that starts later is compared like any other, so
it gets every current adapter; an adapter taken out of the spec is unloaded everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from kubetune.status.modelserver import AdapterView
from kubetune.storage import Access, local_path, parse

# Refused loads are tried again after RETRY_FIRST_S, then twice as long each time up to RETRY_MAX_S, so a
# transient failure (a store or volume not reachable yet, an adapter still being copied) heals by itself. A
# refusal that the adapter's own files decide comes back only every RETRY_MAX_S (the files may be replaced).
RETRY_FIRST_S = 10.0
RETRY_MAX_S = 300.0
PERMANENT_REASONS = frozenset(
    {
        "AdapterBaseMismatch",
        "AdapterRankTooLarge",
        "AdapterTargetModulesUnsupported",
        "AdapterUnsupported",
        "AdapterNameConflict",
    }
)


def lora_path(uri: str) -> str:
    """What vLLM's load_lora_adapter gets as lora_path: a path inside the pod (an s3:// adapter is fetched into
    the cache volume first), or ORG/NAME for hf://."""
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
    s3: Access = field(default_factory=Access)
    """How the fetcher reaches an s3:// adapter (the Secret's name, never its contents)."""

    @property
    def path(self) -> str:
        return lora_path(self.uri)

    @property
    def needs_fetcher(self) -> bool:
        """Whether the replica's fetcher must prepare it before the load: s3:// adapters are downloaded, and
        pvc:// adapters by uri are checked from their adapter_config.json (a job's adapter was reported)."""
        scheme = parse(self.uri).scheme
        return scheme == "s3" or (scheme == "pvc" and self.source == "uri")

    @property
    def checked_by_files(self) -> bool:
        """Whether its own files decide the checks (nothing was reported about an adapter by uri)."""
        return self.source == "uri" and self.needs_fetcher


@dataclass(frozen=True)
class Replica:
    """A running server pod and where the operator reaches it."""

    pod: str
    fetcher: str = ""
    """host:port of the pod's adapter fetcher, which forwards to vLLM in the pod (adapters/http.py)"""


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
    """A refused load (by vLLM, the fetcher or the checks). It is not retried for the same path before `retry_at`."""

    path: str
    reason: str
    message: str
    at: float
    """time.monotonic() of the refusal"""
    attempts: int = 1
    """Refusals in a row at this path."""
    retry_at: float = 0.0
    """time.monotonic() from which a load is tried again"""


def retry_delay(reason: str, attempts: int) -> float:
    """Seconds until a refused load is tried again: 10, 20, 40, ... up to 300 after `attempts` refusals in a
    row; always 300 for refusals that the adapter itself decides (PERMANENT_REASONS)."""
    if reason in PERMANENT_REASONS:
        return RETRY_MAX_S
    return min(RETRY_MAX_S, RETRY_FIRST_S * 2 ** max(0, attempts - 1))


def next_failure(previous: Failure | None, path: str, reason: str, message: str, now: float) -> Failure:
    """The record of a refusal: one more attempt when the last one at the same path was refused too."""
    attempts = previous.attempts + 1 if previous is not None and previous.path == path else 1
    return Failure(path, reason, message, now, attempts, now + retry_delay(reason, attempts))


def next_retry(failures: dict[str, Failure], now: float) -> float | None:
    """Seconds until the earliest refused load that is not due yet may be tried again; None when there is none.
    (One already due waits for a replica to try it on: the look that just ran had none.)"""
    waits = [f.retry_at - now for f in failures.values() if f.retry_at > now]
    return min(waits) if waits else None


def plan_actions(
    adapters: list[Adapter], reports: list[ReplicaReport], failures: dict[str, Failure], now: float
) -> list[Action]:
    """Per replica: unload what should not be there (or sits at another path), then load what is missing.

    Unreachable replicas get nothing; an adapter whose last load failed at the same path waits until `retry_at`.
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
            if failure and failure.path == path and now < failure.retry_at:
                continue
            actions.append(Action(report.replica, "load", name, path))
    return actions


def replicas_in_line(
    adapters: list[Adapter], reports: list[ReplicaReport], failures: dict[str, Failure]
) -> list[Replica]:
    """The replicas that have every adapter they can have: all of `adapters` but those whose load was refused at
    that path (a refused adapter must not keep a replica out of the Service). These may receive traffic."""
    refused = {name for name, f in failures.items() if any(a.name == name and a.path == f.path for a in adapters)}
    return [
        r.replica
        for r in reports
        if r.loaded is not None and all(r.loaded.get(a.name) == a.path for a in adapters if a.name not in refused)
    ]


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
