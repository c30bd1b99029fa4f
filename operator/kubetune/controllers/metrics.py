"""The operator's Prometheus metrics: reconciliations, adapter loads, and objects by state (docs/metrics.md).

Counters and the histogram are updated where the controllers reconcile; the object gauges are counted from the
operator's indexes at scrape time, so they are exact without any bookkeeping of their own.
"""

from __future__ import annotations

import logging
import time
from collections import Counter as Tally
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from kubetune.adapters import reason_for_load_error
from kubetune.adapters.replicas import Outcome
from kubetune.api.v1alpha1 import JobState, ServerState

log = logging.getLogger(__name__)

REGISTRY = CollectorRegistry()
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)
GCCollector(registry=REGISTRY)

RECONCILES = Counter(
    "kubetune_reconcile",
    "Reconciliations by controller and result (ok, retry: waits for something and looks again, error).",
    ["controller", "result"],
    registry=REGISTRY,
)
RECONCILE_ERRORS = Counter(
    "kubetune_reconcile_errors",
    "Reconciliations that failed, by controller and error type (ApiError, or the exception's class).",
    ["controller", "error"],
    registry=REGISTRY,
)
RECONCILE_SECONDS = Histogram(
    "kubetune_reconcile_duration_seconds",
    "Time one reconciliation took, by controller.",
    ["controller"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    registry=REGISTRY,
)
ADAPTER_LOADS = Counter(
    "kubetune_adapter_loads",
    "LoRA adapter loads sent to server replicas, by result (ok, failed: vLLM refused it, unreachable).",
    ["result"],
    registry=REGISTRY,
)
ADAPTER_LOAD_FAILURES = Counter(
    "kubetune_adapter_load_failures",
    "LoRA adapter loads that did not succeed, by reason (as in the ModelServer's adapter status).",
    ["reason"],
    registry=REGISTRY,
)


@dataclass
class Reconciliation:
    """The result of one reconciliation, set by the handler while it runs."""

    result: str = "ok"
    error_type: str = ""

    def failed(self, error: BaseException) -> None:
        """Handled here (logged, retried later): counts as an error."""
        self.result = "error"
        self.error_type = type(error).__name__


@contextmanager
def reconciling(controller: str) -> Iterator[Reconciliation]:
    """Time and count the reconciliation in the `with` body; an exception that escapes counts as an error."""
    started = time.perf_counter()
    outcome = Reconciliation()
    try:
        yield outcome
    except Exception as err:
        outcome.failed(err)
        raise
    finally:
        RECONCILE_SECONDS.labels(controller).observe(time.perf_counter() - started)
        RECONCILES.labels(controller, outcome.result).inc()
        if outcome.result == "error":
            RECONCILE_ERRORS.labels(controller, outcome.error_type).inc()


def count_adapter_loads(outcomes: Iterable[Outcome]) -> None:
    for outcome in outcomes:
        if outcome.action.verb != "load":
            continue
        if outcome.ok:
            ADAPTER_LOADS.labels("ok").inc()
        elif outcome.status == 0:
            ADAPTER_LOADS.labels("unreachable").inc()
            ADAPTER_LOAD_FAILURES.labels("ReplicaUnreachable").inc()
        else:
            ADAPTER_LOADS.labels("failed").inc()
            ADAPTER_LOAD_FAILURES.labels(reason_for_load_error(outcome.status, outcome.message)).inc()


Indexes = Mapping[str, Mapping[Any, Iterable[dict[str, Any]]]]


def _bodies(index: Mapping[Any, Iterable[dict[str, Any]]] | None) -> list[dict[str, Any]]:
    """The first object of every key. Watch events change the index meanwhile: copy the keys, then look up."""
    if index is None:
        return []
    bodies = []
    for key in list(index):
        store = list(index.get(key) or [])
        if store:
            bodies.append(store[0])
    return bodies


def _ready(body: dict[str, Any]) -> bool:
    conditions = (body.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


class ObjectsCollector(Collector):
    """FineTuneJobs and ModelServers by state, and served adapters by state, from the indexes at scrape time.

    Every known state is exported (0 when none), so that a panel shows zeros rather than nothing. An object
    the operator has not given a state yet counts as Pending.
    """

    def __init__(self, indexes: Callable[[], Indexes]) -> None:
        self._indexes = indexes

    def collect(self) -> Iterator[Metric]:
        indexes = self._indexes()
        jobs = _bodies(indexes.get("finetunejobs"))
        servers = _bodies(indexes.get("modelservers"))
        yield _by_state("kubetune_finetunejobs", "FineTuneJobs by status.state.", list(JobState), jobs)
        yield _by_state("kubetune_modelservers", "ModelServers by status.state.", list(ServerState), servers)
        ready = GaugeMetricFamily("kubetune_modelservers_ready", "ModelServers whose Ready condition is True.")
        ready.add_metric([], sum(1 for s in servers if _ready(s)))
        yield ready
        adapters = Tally(
            str(a.get("state") or "Pending") for s in servers for a in (s.get("status") or {}).get("adapters") or []
        )
        served = GaugeMetricFamily(
            "kubetune_modelserver_adapters", "Adapters of all ModelServers by state.", labels=["state"]
        )
        for state in ("Pending", "Loaded", "Failed", *sorted(set(adapters) - {"Pending", "Loaded", "Failed"})):
            served.add_metric([state], adapters[state])
        yield served

    def describe(self) -> Iterator[Metric]:
        return iter(())  # computed at scrape time; nothing to check at registration


def _by_state(name: str, doc: str, states: list[str], bodies: list[dict[str, Any]]) -> Metric:
    """One sample per state; the first of `states` (Pending) stands for no state yet."""
    known = [str(s) for s in states]
    tally = Tally(str((b.get("status") or {}).get("state") or known[0]) for b in bodies)
    family = GaugeMetricFamily(name, doc, labels=["state"])
    for state in known + sorted(set(tally) - set(known)):
        family.add_metric([state], tally[state])
    return family


def serve(address: str) -> int:
    """Serve REGISTRY over HTTP at `host:port` (path /metrics) from a daemon thread; returns the bound port."""
    host, _, port = address.rpartition(":")
    disable_created_metrics()  # a *_created series next to every counter is noise on the dashboards
    server, _thread = start_http_server(int(port), host.strip("[]") or "0.0.0.0", registry=REGISTRY)
    bound = int(server.server_port)
    log.info("metrics on http://%s:%d/metrics", host or "0.0.0.0", bound)
    return bound
