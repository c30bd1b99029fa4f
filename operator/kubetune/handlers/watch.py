"""What the watch-event handlers share: the copy of an object kept in an index, the hand-off of work to a
worker thread, and the common body of an event of one of kubetune's own kinds."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import kopf

from kubetune.controllers.context import Context, Key

_KEPT_METADATA = (
    "name",
    "namespace",
    "uid",
    "resourceVersion",
    "generation",
    "labels",
    "annotations",
    "creationTimestamp",
    "deletionTimestamp",
)


def slim(body: kopf.Body, spec: bool | tuple[str, ...]) -> dict[str, Any]:
    """What the operator keeps of an object in its indexes: no managedFields, no kopf wrappers, and of the
    spec all (True), nothing (False) or only the named fields (a Job's pod template is most of its size)."""
    meta = body.get("metadata") or {}
    kept: dict[str, Any] = {"metadata": {k: meta[k] for k in _KEPT_METADATA if k in meta}}
    if spec is True:
        kept["spec"] = dict(body.get("spec") or {})
    elif spec:
        full = body.get("spec") or {}
        kept["spec"] = {k: full[k] for k in spec if k in full}
    kept["status"] = dict(body.get("status") or {})
    return kept


def context(memo: kopf.Memo, kwargs: dict[str, Any]) -> Context:
    """The operator's Context, holding the indexes kopf passed to this handler."""
    ctx: Context = memo.context
    ctx.capture_indexes(kwargs)
    return ctx


def is_echo(ctx: Context, event: kopf.RawEvent) -> bool:
    """The event shows back the operator's own status patch: nothing changed since the status was computed."""
    meta = event["object"]["metadata"]
    return event["type"] != "DELETED" and ctx.status.is_echo(meta["uid"], meta.get("resourceVersion"))


async def in_worker(ctx: Context, work: Callable[..., None], *args: Any) -> None:
    """Run blocking work (API requests, locks) on a worker thread and wait for it."""
    await asyncio.get_running_loop().run_in_executor(ctx.workers, work, *args)


def on_object_event(ctx: Context, event: kopf.RawEvent, reconcile: Callable[[Context, Key], None]) -> None:
    """The common body of a watch event of one of kubetune's kinds: forget a deleted object, reconcile others."""
    meta = event["object"]["metadata"]
    if event["type"] == "DELETED":
        ctx.forget(meta["uid"])
        return
    reconcile(ctx, (meta["namespace"], meta["name"]))
