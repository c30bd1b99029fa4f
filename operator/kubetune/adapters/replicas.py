"""The adapters of every ready replica brought in line with what the server should serve, through a `ReplicaClient`.

One look: ask every replica what it has loaded, decide the loads and unloads (`sync.plan_actions`), let the
replica's fetcher prepare what it must (a download, the files checked like a job's report), send the rest to
vLLM, and record the refusals. This module does no I/O of its own: the calls go through the `ReplicaClient`
it is given (`adapters/http.py` speaks HTTP to the pods; the unit tests pass a fake). Replicas are asked in
parallel; one replica's actions run in order.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

from kubetune.adapters.checks import check_adapter_files, reason_for_load_error
from kubetune.adapters.sync import Action, Adapter, Failure, Replica, ReplicaReport, next_failure, plan_actions

# Replicas asked at once.
PARALLEL_REPLICAS = 16


@dataclass(frozen=True)
class Outcome:
    """The answer to one action: the HTTP status (0 when there was none) and vLLM's message. `reason` is set
    when the load was refused before vLLM was asked (by the fetcher or the checks of the adapter's files)."""

    action: Action
    status: int
    message: str
    reason: str = ""

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


@dataclass(frozen=True)
class Prepared:
    """The fetcher's answer: status 200 with the adapter's files, else a reason (status 0: no answer)."""

    status: int
    adapter_config: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] | None = None
    reason: str = ""
    message: str = ""


class ReplicaClient(Protocol):
    """What the operator asks of a server pod: vLLM's runtime LoRA API, and the adapter fetcher beside it."""

    def report(self, replica: Replica) -> ReplicaReport:
        """The adapters the replica has loaded (name -> path), or why it could not be asked."""
        ...

    def perform(self, action: Action) -> Outcome:
        """One load or unload on one replica."""
        ...

    def prepare(self, replica: Replica, adapter: Adapter) -> Prepared:
        """The replica's fetcher makes the adapter visible to vLLM and returns its files."""
        ...


@dataclass(frozen=True)
class Synced:
    """What one look did: the replicas' reports after it, the outcome of every action, and the refused loads."""

    reports: list[ReplicaReport]
    outcomes: list[Outcome]
    failures: dict[str, Failure]


@dataclass(frozen=True)
class Server:
    """What the checks of an adapter's own files need of its server."""

    base_model_uri: str
    max_lora_rank: int


def sync(
    client: ReplicaClient,
    server: Server,
    serve: list[Adapter],
    replicas: list[Replica],
    failures: dict[str, Failure],
) -> Synced:
    """Load and unload adapters on every replica until each has exactly `serve`; `failures` are the refusals
    recorded so far (a refused load waits for its back-off)."""
    reports = ask_all(client, replicas)
    # An adapter gone from the spec is forgotten: when it comes back it starts afresh.
    failures = {name: f for name, f in failures.items() if name in {a.name for a in serve}}
    actions = plan_actions(serve, reports, failures, time.monotonic())
    if not actions:
        return Synced(reports, [], failures)
    by_name = {a.name: a for a in serve}

    def prepare(action: Action) -> Outcome | None:
        return prepare_load(client, server, by_name[action.adapter], action)

    outcomes = perform_all(client, actions, prepare)
    for name, refused in failures_of(outcomes).items():
        failures[name] = next_failure(failures.get(name), refused.path, refused.reason, refused.message, refused.at)
    for outcome in outcomes:
        if outcome.ok and outcome.action.verb == "load":
            failures.pop(outcome.action.adapter, None)
    changed = {o.action.replica for o in outcomes}
    reports = [client.report(r.replica) if r.replica in changed else r for r in reports]
    return Synced(reports, outcomes, failures)


def ask_all(client: ReplicaClient, replicas: list[Replica]) -> list[ReplicaReport]:
    """The report of every replica, asked in parallel."""
    if not replicas:
        return []
    with ThreadPoolExecutor(max_workers=min(PARALLEL_REPLICAS, len(replicas))) as pool:
        return list(pool.map(client.report, replicas))


Prepare = Callable[[Action], Outcome | None]


def perform_all(client: ReplicaClient, actions: list[Action], prepare: Prepare | None = None) -> list[Outcome]:
    """The actions, one replica's in order, replicas in parallel. `prepare` runs before each load; when it
    returns an Outcome (a refusal), that is the load's outcome and vLLM is not asked."""
    by_replica: dict[Replica, list[Action]] = {}
    for action in actions:
        by_replica.setdefault(action.replica, []).append(action)
    if not by_replica:
        return []

    def run(action: Action) -> Outcome:
        refused = prepare(action) if prepare is not None and action.verb == "load" else None
        return refused or client.perform(action)

    with ThreadPoolExecutor(max_workers=min(PARALLEL_REPLICAS, len(by_replica))) as pool:
        results = pool.map(lambda items: [run(a) for a in items], by_replica.values())
        return [outcome for items in results for outcome in items]


def prepare_load(client: ReplicaClient, server: Server, adapter: Adapter, action: Action) -> Outcome | None:
    """Before vLLM loads a pvc:// or s3:// adapter by uri, or an s3:// one of a FineTuneJob: the replica's fetcher
    makes it visible (downloads it) and returns its files, which are checked like a job's report. An Outcome
    when the load must not go ahead (not found, not fetched, refused by the checks); None when it may."""
    if not adapter.needs_fetcher:
        return None
    answer = client.prepare(action.replica, adapter)
    if answer.status != 200:
        return Outcome(action, answer.status, answer.message, answer.reason)
    if adapter.checked_by_files:
        refusal = check_adapter_files(
            adapter, answer.adapter_config, answer.metadata, server.base_model_uri, server.max_lora_rank
        )
        if refusal is not None:
            return Outcome(action, 422, refusal.message, refusal.reason)
    return None


def failures_of(outcomes: list[Outcome]) -> dict[str, Failure]:
    """Refused loads by adapter name (not unreachable replicas: those are retried on the next look)."""
    now = time.monotonic()
    return {
        o.action.adapter: Failure(o.action.path, o.reason or reason_for_load_error(o.status, o.message), o.message, now)
        for o in outcomes
        if o.action.verb == "load" and not o.ok and o.status != 0
    }
