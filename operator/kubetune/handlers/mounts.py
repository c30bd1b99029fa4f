"""FailedMount Events of pods that stay in ContainerCreating.

The kubelet reports a volume it cannot mount (a missing ConfigMap or Secret, a claim that does not attach)
only in an Event, never in the pod's status, and the pod then changes no more: no watch event brings the
operator back. So for such a pod the operator reads its FailedMount Events itself, a few seconds after it was
scheduled and then every half minute while it stays so and nothing was found, and hands the messages to the
status (status/pods.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from kubetune.handlers.context import Context
from kubetune.k8s import events
from kubetune.k8s.client import ApiError
from kubetune.status.pods import creating_since

log = logging.getLogger(__name__)
FIRST_LOOK_S = 5.0
LOOK_EVERY_S = 30.0


def look_later(ctx: Context, owner: tuple[str, ...], pods: list[dict[str, Any]], then: Callable[[], None]) -> None:
    """Schedule one look at the FailedMount Events of `owner`'s pods that set up their containers and have no
    known failure; `then` runs after it (a status sync, which schedules the next look if still needed)."""
    now = datetime.now(UTC)
    waiting = {}
    for pod in pods:
        since = creating_since(pod)
        uid = pod["metadata"]["uid"]
        if since is None:
            ctx.mount_failures.pop(uid, None)  # started (or gone): what failed before is history
        elif uid not in ctx.mount_failures:
            waiting[uid] = pod["metadata"]["namespace"]
    if not waiting:
        return
    oldest = min(creating_since(p) or now for p in pods if p["metadata"]["uid"] in waiting)
    age = (now - oldest).total_seconds()
    delay = max(FIRST_LOOK_S - age, 0.0) if age < FIRST_LOOK_S else LOOK_EVERY_S
    ctx.later_once(("mounts", *owner), delay, _look, ctx, waiting, then)


def _look(ctx: Context, waiting: dict[str, str], then: Callable[[], None]) -> None:
    for uid, namespace in waiting.items():
        try:
            message = events.newest_message(ctx.kube, namespace, uid, "FailedMount")
        except ApiError as err:
            log.warning("could not read the FailedMount events of pod %s: %s", uid, err)
            continue
        if message:
            ctx.mount_failures[uid] = message
    then()
