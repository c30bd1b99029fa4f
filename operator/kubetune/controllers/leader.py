"""Leader election: of several operator replicas, exactly one reconciles; another takes over when it goes.

The replicas share a coordination.k8s.io Lease. A standby runs nothing of kopf: it reads the Lease every
second and takes it once its holder has not renewed it for `duration` seconds, counted on the standby's own
clock from when it last saw the Lease change (so clocks of different nodes never matter). It then starts the
operator exactly as after a restart: the indexes are listed afresh, and admissions and children are checked
again (docs/failures.md), so nothing a standby remembers can be stale.

The leader renews every `renew_every` seconds. When it cannot renew for `duration - renew_every` seconds it
exits at once, before a standby may take over: two replicas never write at the same time. Stopping (SIGTERM,
`helm upgrade`) gives the Lease up, so a standby takes over within a second instead of waiting for it to
expire. Every update names the Lease's resourceVersion: of two replicas that try at once, one wins.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from kubetune.k8s.client import ApiError, Kube

log = logging.getLogger(__name__)


def micro_time(at: datetime | None = None) -> str:
    """A Lease's MicroTime, e.g. 2026-12-07T10:00:00.123456Z."""
    return (at or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class Observed:
    """The Lease as this replica last saw it, and when (time.monotonic()) it last changed."""

    record: tuple[str, str] = ("", "")
    """(holderIdentity, renewTime)"""
    changed_at: float = 0.0


def claim(
    lease: dict[str, Any] | None, identity: str, duration: int, seen: Observed, now: float
) -> dict[str, Any] | None:
    """The Lease this replica writes to hold it (a new one, a renewal or a takeover), or None while another
    replica holds it. `seen` is updated with what the Lease shows now."""
    spec = (lease or {}).get("spec") or {}
    holder, renewed = str(spec.get("holderIdentity") or ""), str(spec.get("renewTime") or "")
    if (holder, renewed) != seen.record:
        seen.record, seen.changed_at = (holder, renewed), now
    expired = now - seen.changed_at >= int(spec.get("leaseDurationSeconds") or duration)
    if holder and holder != identity and not expired:
        return None
    stamp = micro_time()
    new_spec = {**spec, "holderIdentity": identity, "leaseDurationSeconds": duration, "renewTime": stamp}
    if holder != identity:
        new_spec |= {"acquireTime": stamp, "leaseTransitions": int(spec.get("leaseTransitions") or 0) + 1}
    return {**(lease or {}), "spec": new_spec}


@dataclass
class LeaderElection:
    """One replica's part in the election over the Lease `namespace/name`."""

    kube: Kube
    namespace: str
    name: str
    identity: str
    duration: int = 10
    renew_every: float = 2.0
    poll_every: float = 1.0
    on_lost: Callable[[], None] = field(default=lambda: os._exit(1))
    """What happens when the leader cannot renew in time (the default ends the process at once)."""
    _seen: Observed = field(default_factory=Observed)
    _stop: threading.Event = field(default_factory=threading.Event)

    def try_hold(self) -> bool:
        """One attempt to acquire or renew the Lease; True when this replica holds it afterwards."""
        try:
            lease = self.kube.get("Lease", self.namespace, self.name)
            wanted = claim(lease, self.identity, self.duration, self._seen, time.monotonic())
            if wanted is None:
                return False
            if lease is None:
                meta = {"name": self.name, "namespace": self.namespace}
                self.kube.create({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": meta, **wanted})
            else:
                self.kube.replace(wanted)  # refused (409) when another replica wrote it since the read
            return True
        except ApiError as err:
            if err.status not in (409, 404):
                log.warning("lease %s/%s: %s", self.namespace, self.name, err)
            return False

    def wait_until_leader(self) -> None:
        """Block until this replica holds the Lease."""
        while not self.try_hold():
            time.sleep(self.poll_every)
        log.info("leader election: %s holds lease %s/%s", self.identity, self.namespace, self.name)

    def keep_renewing(self) -> threading.Thread:
        """Renew in the background; call `on_lost` when the Lease was not renewed for duration - renew_every."""

        def loop() -> None:
            renewed = time.monotonic()
            while not self._stop.wait(self.renew_every):
                if self.try_hold():
                    renewed = time.monotonic()
                elif time.monotonic() - renewed >= self.duration - self.renew_every:
                    log.error("leader election: lease %s/%s lost; stopping", self.namespace, self.name)
                    self.on_lost()
                    return

        thread = threading.Thread(target=loop, name="leader-election", daemon=True)
        thread.start()
        return thread

    def release(self) -> None:
        """Stop renewing and give the Lease up (a standby takes it at its next look)."""
        self._stop.set()
        try:
            lease = self.kube.get("Lease", self.namespace, self.name)
            spec = (lease or {}).get("spec") or {}
            if lease is not None and spec.get("holderIdentity") == self.identity:
                self.kube.replace({**lease, "spec": {**spec, "holderIdentity": "", "renewTime": micro_time()}})
                log.info("leader election: %s gave lease %s/%s up", self.identity, self.namespace, self.name)
        except ApiError as err:
            log.warning("leader election: could not give lease %s/%s up: %s", self.namespace, self.name, err)
