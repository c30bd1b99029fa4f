"""What every controller shares: the API client, the configuration, the status writer, the operator's view of
the cluster (the indexes), what it remembers between looks, and a way to look at an object again later.

No kopf here: kopf fills the indexes (handlers/ registers them) and they are read as plain mappings of
(namespace, name) to the objects under that key, so a test builds a Context from dicts and a recording client.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

from kubetune.adapters import Failure
from kubetune.adapters.http import HttpReplicas
from kubetune.adapters.replicas import ReplicaClient
from kubetune.config import OperatorConfig
from kubetune.k8s import events
from kubetune.k8s.children import Seen
from kubetune.k8s.client import RESOURCES, ApiError, Kube
from kubetune.k8s.status_writer import StatusWriter
from kubetune.signing import Signer

log = logging.getLogger(__name__)
Key = tuple[str, str]
"""(namespace, name) of an object."""
Index = Mapping[Any, Iterable[Any]]
"""One of kopf's indexes as the controllers read it: key -> the objects under that key."""
# Every kind of child the operator creates; each has an index `owned_<plural>` of the objects it labelled
# as its own (handlers/children.py), by (namespace, name).
CHILD_KINDS = ("ServiceAccount", "Role", "RoleBinding", "Service", "Job", "Deployment", "NetworkPolicy")


def owned_index(kind: str) -> str:
    return f"owned_{RESOURCES[kind][1]}"


# Kueue's Workloads by their Job: filled by the operator's own watch (controllers/workloads.py), not by kopf.
WORKLOADS_INDEX = "training_workloads"
INDEXES = (
    "finetunejobs",
    "finetunejobs_waiting",
    "training_jobs",
    "training_pods",
    "prepare_jobs",
    "prepare_pods",
    "modelservers",
    "server_deployments",
    "server_pods",
    *(owned_index(kind) for kind in CHILD_KINDS),
)


# Controllers wait on the API server most of the time; admissions of many jobs at once need threads.
WORKERS = 32
# Work that the API server refused or did not answer runs again after this many seconds.
RETRY_API_ERROR_S = 5.0
# Writes of children that the API server refuses for good reason (invalid, forbidden, a quota, a name taken) are
# tried again after 5, 10, 20, ... seconds, up to this.
BACKOFF_MAX_S = 300.0
Work = TypeVar("Work", bound=Callable[..., None])


@dataclass(frozen=True)
class Refusal:
    """Why an object's children could not be written, and when to try again."""

    reason: str
    message: str
    attempts: int
    retry_at: float
    """time.monotonic() from which the write is tried again"""


@dataclass
class Backoff:
    """Refused writes per object UID: each refusal in a row doubles the wait before the next try."""

    _refusals: dict[str, Refusal] = field(default_factory=dict)

    def refused(self, uid: str, reason: str, message: str, now: float) -> Refusal:
        previous = self._refusals.get(uid)
        attempts = previous.attempts + 1 if previous else 1
        delay = min(RETRY_API_ERROR_S * 2 ** (attempts - 1), BACKOFF_MAX_S)
        refusal = self._refusals[uid] = Refusal(reason, message, attempts, now + delay)
        return refusal

    def succeeded(self, uid: str) -> None:
        self._refusals.pop(uid, None)

    def refusal(self, uid: str) -> Refusal | None:
        """The refusal that still stands for this object (until a write succeeds)."""
        return self._refusals.get(uid)

    def due(self, uid: str, now: float) -> bool:
        """Whether a write may be tried now: never refused, or its wait is over."""
        refusal = self._refusals.get(uid)
        return refusal is None or now >= refusal.retry_at


@dataclass
class Context:
    kube: Kube
    config: OperatorConfig
    status: StatusWriter
    indexes: Mapping[str, Index] = field(default_factory=dict)
    own_indexes: dict[str, Index] = field(default_factory=dict)
    """Indexes the operator fills from its own watches (controllers/workloads.py), beside kopf's."""
    seen: set[str] = field(default_factory=set)
    """UIDs of the objects this process has reconciled at least once."""
    applied: dict[str, str] = field(default_factory=dict)
    """UID -> hash of the children last applied for it (skips identical server-side applies)."""
    adapter_failures: dict[str, dict[str, Failure]] = field(default_factory=dict)
    """ModelServer UID -> adapter name -> the load vLLM refused last (not retried at once)."""
    backoff: Backoff = field(default_factory=Backoff)
    """Children writes the API server refused, per owner UID."""
    mount_failures: dict[str, str] = field(default_factory=dict)
    """Pod UID -> its last FailedMount Event's message, while it waits in ContainerCreating (controllers/mounts.py)."""
    trainer_access: set[str] = field(default_factory=set)
    """Namespaces whose trainer access (render/trainer_access.py) this process has written."""
    signer: Signer = field(default_factory=Signer.generate)
    """The operator's key: it signs the requests to the adapter fetchers, whose pods get its public key."""
    replica_client: ReplicaClient | None = None
    """How the ModelServer controller talks to its server pods (their adapter fetchers), when a test gives its own;
    `replicas` otherwise speaks HTTP signed by `signer`."""
    autoscaling: dict[str, tuple[bool, str, str]] = field(default_factory=dict)
    """ModelServer UID -> whether its ScaledObject is written, with a reason and message (spec.autoscaling)."""
    workers: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(WORKERS, thread_name_prefix="reconcile"), repr=False
    )
    """Threads on which the handlers (coroutines) run the controllers (started when needed)."""
    _scheduled: set[tuple[str, ...]] = field(default_factory=set)
    _locks: dict[str, threading.Lock] = field(default_factory=dict)
    _guard: threading.Lock = field(default_factory=threading.Lock)

    @property
    def replicas(self) -> ReplicaClient:
        if self.replica_client is None:
            self.replica_client = HttpReplicas(self.signer)
        return self.replica_client

    @classmethod
    def create(cls, config: OperatorConfig) -> Context:
        kube = Kube.connect(config.field_manager)
        key_file = config.server.signing_key_file
        if key_file:
            signer = Signer.from_pem_file(key_file)
        else:
            log.warning(
                "no server.signingKeyFile: a new key signs the requests to the adapter fetchers, so every "
                "ModelServer's pods roll once now"
            )
            signer = Signer.generate()
        return cls(kube=kube, config=config, status=StatusWriter(kube), signer=signer)

    def capture_indexes(self, kwargs: Mapping[str, Any]) -> None:
        """Keep the indexes kopf passes to every handler (live views) so that work scheduled for later can read
        them."""
        if not self.indexes:
            self.indexes = {**{name: kwargs[name] for name in INDEXES}, **self.own_indexes}

    def latest(self, index: str, key: Key) -> dict[str, Any] | None:
        """The object under `key` in `index` as the watch last showed it; None when there is none."""
        return next(iter(self.indexes[index].get(key, [])), None)

    def objects(self, index: str, key: Key) -> list[dict[str, Any]]:
        """Every object under `key` in `index` (the pods of a Job, say)."""
        return list(self.indexes[index].get(key, []))

    def entries(self, index: str) -> list[tuple[Any, list[dict[str, Any]]]]:
        """A copy of every (key, objects) of `index`, for a worker thread to go through. kopf changes its indexes
        on the event loop while the workers run: going through the live mapping can meet a change and fail
        ("dictionary changed size during iteration"; the 1000-job benchmark met it in 8 admissions)."""
        live = self.indexes[index]
        while True:
            try:
                return [(key, list(objects)) for key, objects in list(live.items())]
            except (RuntimeError, KeyError):  # changed under the copy (a key gone between two steps): again
                continue

    def owned(self, manifest: dict[str, Any]) -> Seen | None:
        """What the operator's view holds of the object a manifest names, among the objects labelled as
        kubetune's; None when there is none."""
        meta = manifest["metadata"]
        index: Mapping[tuple[str, str], Any] = self.indexes.get(owned_index(manifest["kind"])) or {}
        store = index.get((meta.get("namespace") or "", meta["name"]))
        return next(iter(store), None) if store else None

    def lock(self, uid: str) -> threading.Lock:
        """One reconciliation of an object at a time, whichever thread asks."""
        with self._guard:
            return self._locks.setdefault(uid, threading.Lock())

    def forget(self, uid: str) -> None:
        self.status.forget(uid)
        self.seen.discard(uid)
        self.applied.pop(uid, None)
        self.adapter_failures.pop(uid, None)
        self.autoscaling.pop(uid, None)
        self.backoff.succeeded(uid)
        with self._guard:
            self._locks.pop(uid, None)

    def later(self, delay: float, work: Callable[..., None], *args: Any) -> None:
        """Run `work(*args)` on a background thread after `delay` seconds (errors are logged)."""

        def run() -> None:
            try:
                work(*args)
            except Exception:
                log.exception("deferred reconciliation failed")

        timer = threading.Timer(delay, run)
        timer.daemon = True
        timer.start()

    def later_once(self, token: tuple[str, ...], delay: float, work: Callable[..., None], *args: Any) -> None:
        """Like `later`, unless work with the same token is already waiting: periodic re-checks do not pile up."""
        key = token
        with self._guard:
            if key in self._scheduled:
                return
            self._scheduled.add(key)

        def run() -> None:
            with self._guard:
                self._scheduled.discard(key)
            work(*args)

        self.later(delay, run)

    def event(self, kind: str, meta: dict[str, Any], warning: bool, reason: str, message: str) -> None:
        events.post(self.kube, kind, meta, "Warning" if warning else "Normal", reason, message)


def retried(work: Work) -> Work:
    """Controller work `work(ctx, key, ...)` that fails on the API server (a refusal, no answer) runs again
    RETRY_API_ERROR_S later: kopf never calls a watch-event handler again, and the event that asked for the
    work (a Job completing, say) does not come back."""

    @functools.wraps(work)
    def run(ctx: Context, key: tuple[str, str], *args: Any) -> None:
        try:
            work(ctx, key, *args)
        except ApiError as err:
            log.warning("%s of %s/%s failed, retrying: %s", work.__name__, *key, err)
            ctx.later_once((work.__module__, work.__name__, *key), RETRY_API_ERROR_S, run, ctx, key, *args)

    return cast(Work, run)
