"""FailedMount Events of pods that stay in ContainerCreating.

The kubelet reports a volume it cannot mount (a missing ConfigMap or Secret, a claim that does not attach)
only in an Event, never in the pod's status, and the pod then changes no more: no watch event brings the
operator back. So for such a pod the operator reads its FailedMount Events itself, five seconds after it was
scheduled (at once when it waits longer already, e.g. after an operator restart) and then every half minute
while it stays so and nothing was found, and hands the messages to the status (status/pods.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from kubetune.controllers.context import Context
from kubetune.k8s import events
from kubetune.k8s.client import ApiError
from kubetune.status.pods import creating_since

log = logging.getLogger(__name__)
FIRST_LOOK_S = 5.0
LOOK_EVERY_S = 30.0


def look_later(ctx: Context, owner: tuple[str, ...], pods: list[dict[str, Any]], then: Callable[[], None]) -> None:
    """Schedule one look at the FailedMount Events of `owner`'s pods that set up their containers and have no
    known failure; `then` runs after it (a status sync, which schedules the next look if still needed)."""
    wall, now = datetime.now(UTC), time.monotonic()
    waiting: dict[str, str] = {}
    waits: list[float] = []
    for pod in pods:
        uid = pod["metadata"]["uid"]
        since = creating_since(pod)
        if since is None:  # started (or gone): what failed before is history
            ctx.mount_failures.pop(uid, None)
            ctx.mount_looked.pop(uid, None)
            continue
        if uid in ctx.mount_failures:
            continue
        looked = ctx.mount_looked.get(uid)
        age = (wall - since).total_seconds()
        waits.append(FIRST_LOOK_S - age if looked is None else LOOK_EVERY_S - (now - looked))
        waiting[uid] = pod["metadata"]["namespace"]
    if waiting:
        ctx.later_once(("mounts", *owner), max(min(waits), 0.0), _look, ctx, waiting, then)


def look_now(ctx: Context, pods: list[dict[str, Any]]) -> None:
    """Look at once at pods that wait longer than the first look's delay and were never looked at (after an
    operator restart): the status computed next then keeps the reason it already shows."""
    wall = datetime.now(UTC)
    due = {
        p["metadata"]["uid"]: p["metadata"]["namespace"]
        for p in pods
        if (since := creating_since(p)) is not None
        and p["metadata"]["uid"] not in ctx.mount_looked
        and (wall - since).total_seconds() >= FIRST_LOOK_S
    }
    if due:
        _look(ctx, due, lambda: None)


def _look(ctx: Context, waiting: dict[str, str], then: Callable[[], None]) -> None:
    for uid, namespace in waiting.items():
        ctx.mount_looked[uid] = time.monotonic()
        try:
            message = events.newest_message(ctx.kube, namespace, uid, "FailedMount")
        except ApiError as err:
            log.warning("could not read the FailedMount events of pod %s: %s", uid, err)
            continue
        if message:
            ctx.mount_failures[uid] = message
    then()
