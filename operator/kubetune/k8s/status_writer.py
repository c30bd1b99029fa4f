"""Status patches of the fields the operator owns, written once per change, one writer per object.

The operator is the only writer of state, conditions, timestamps and plan, so what it wrote last is the
truth even before the watch stream shows it back. Remembering it (per object UID) keeps concurrent
handlers from recomputing transitions from a stale copy and from posting the same Event twice. The
resourceVersion each write produced is remembered too: the watch event that merely shows a write back
(`is_echo`) needs no reconciliation.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kubetune.k8s.client import ApiError, Kube

Status = dict[str, Any]


def changed(status: Status, patch: Status) -> Status:
    """The entries of `patch` that differ from `status` (an empty dict means nothing to write)."""
    return {k: v for k, v in patch.items() if status.get(k) != v}


@dataclass
class StatusWriter:
    kube: Kube
    _written: dict[str, Status] = field(default_factory=dict)
    _versions: dict[str, str] = field(default_factory=dict)
    _locks: defaultdict[str, threading.Lock] = field(default_factory=lambda: defaultdict(threading.Lock))
    _guard: threading.Lock = field(default_factory=threading.Lock)

    def _lock(self, uid: str) -> threading.Lock:
        with self._guard:
            return self._locks[uid]

    def current(self, uid: str, observed: Status) -> Status:
        """The status as the API server will have it once it has seen everything written."""
        return {**observed, **self._written.get(uid, {})}

    def is_echo(self, uid: str, resource_version: str | None) -> bool:
        """The object is exactly as this writer's last status patch left it."""
        return resource_version is not None and self._versions.get(uid) == resource_version

    def would_change(self, uid: str, observed: Status, desired: Callable[[Status], Status]) -> bool:
        """Whether `update` would write anything now (no lock, no request: a cheap look before the real one)."""
        current = self.current(uid, observed)
        return bool(changed(current, desired(current)))

    def update(
        self, kind: str, meta: dict[str, Any], observed: Status, desired: Callable[[Status], Status]
    ) -> tuple[Status, Status]:
        """Compute the owned fields from the current status and write those that changed.

        Returns (status before, the changed fields). Nothing is written when nothing changed.
        """
        uid = meta["uid"]
        with self._lock(uid):
            current = self.current(uid, observed)
            diff = changed(current, desired(current))
            if diff:
                try:
                    patched = self.kube.patch_status(kind, meta["namespace"], meta["name"], diff)
                except ApiError as err:
                    if err.not_found:
                        self.forget(uid)
                        return current, {}
                    raise
                self._written[uid] = {**self._written.get(uid, {}), **diff}
                if version := (patched.get("metadata") or {}).get("resourceVersion"):
                    self._versions[uid] = version
            return current, diff

    def forget(self, uid: str) -> None:
        """Drop what is remembered of a deleted object."""
        self._written.pop(uid, None)
        self._versions.pop(uid, None)
        with self._guard:
            self._locks.pop(uid, None)
