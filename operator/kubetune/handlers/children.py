"""The operator's view of the children it created, and their return when one is deleted.

Every child kind has an index of the objects labelled as kubetune's (the watch streams carry only those:
handlers/main.py), with their uid and controller (`Context.owned` reads it). Admission decides from it
whether to create or apply a child and whether a name is taken by someone else (k8s/children.py); after a
restart it shows what a crash left unwritten. A child that is deleted by hand makes its owner look at its
children again.
"""

from __future__ import annotations

from typing import Any

import kopf

from kubetune.controllers import serving, training
from kubetune.controllers.context import CHILD_KINDS, Key, owned_index
from kubetune.handlers.watch import context
from kubetune.k8s.children import Seen, seen
from kubetune.k8s.client import RESOURCES
from kubetune.render.common import LABEL_FINETUNEJOB, LABEL_MODELSERVER
from kubetune.render.trainer_access import is_trainer_access


def resource(kind: str) -> tuple[str, str, str]:
    """(group, version, plural) of a child kind."""
    prefix, plural = RESOURCES[kind]
    group_version = prefix.removeprefix("/apis/").removeprefix("/api/")
    group, _, version = group_version.rpartition("/")
    return group, version, plural


async def owned_child(namespace: str | None, name: str, body: kopf.Body, **_: Any) -> dict[Key, Seen]:
    return {(namespace or "", name): seen(body)}


async def child_deleted(event: kopf.RawEvent, labels: kopf.Labels, memo: kopf.Memo, **kwargs: Any) -> None:
    """A child is gone: unless its owner is going too, the owner writes its children again."""
    if event["type"] != "DELETED":
        return
    ctx = context(memo, kwargs)
    namespace = event["object"]["metadata"].get("namespace") or ""
    if is_trainer_access(labels):
        training.trainer_access_deleted(ctx, namespace)
    elif job := labels.get(LABEL_FINETUNEJOB):
        ctx.later(0, training.recheck, ctx, (namespace, job))
    elif server := labels.get(LABEL_MODELSERVER):
        ctx.later(0, serving.reconcile, ctx, (namespace, server), True)


for _kind in CHILD_KINDS:
    kopf.index(*resource(_kind), id=owned_index(_kind))(owned_child)
    kopf.on.event(*resource(_kind), id=f"{owned_index(_kind)}_deleted")(child_deleted)
