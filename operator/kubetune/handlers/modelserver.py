"""kopf registrations of ModelServers: the indexes of servers, their Deployments and pods, and the watch events
that hand work to the ModelServer controller (controllers/serving.py).

The same convention as handlers/finetunejob.py: coroutines that dismiss on the event loop what changes nothing
(the echo of the operator's own status patch; any FineTuneJob event but a success or a deletion) and run the
controller on a worker thread. Every event of a server's Deployment or pods goes to the controller: it may
change which replicas are ready, which only a look at the replicas settles.
"""

from __future__ import annotations

from typing import Any

import kopf

from kubetune.controllers import serving
from kubetune.controllers.context import Key
from kubetune.handlers.finetunejob import FTJ
from kubetune.handlers.watch import context, in_worker, is_echo, on_object_event, slim
from kubetune.render.common import LABEL_MODELSERVER

MS = "modelservers.kubetune.io"


@kopf.index(MS)
async def modelservers(namespace: str | None, name: str, body: kopf.Body, **_: Any) -> dict[Key, dict[str, Any]]:
    return {(namespace or "", name): slim(body, spec=True)}


@kopf.index("apps", "v1", "deployments", labels={LABEL_MODELSERVER: kopf.PRESENT})
async def server_deployments(
    namespace: str | None, labels: kopf.Labels, body: kopf.Body, **_: Any
) -> dict[Key, dict[str, Any]]:
    if labels.get("app.kubernetes.io/component") != "server":
        return {}
    return {(namespace or "", labels[LABEL_MODELSERVER]): slim(body, spec=True)}


@kopf.index("pods", labels={LABEL_MODELSERVER: kopf.PRESENT})
async def server_pods(
    namespace: str | None, labels: kopf.Labels, body: kopf.Body, **_: Any
) -> dict[Key, dict[str, Any]]:
    if labels.get("app.kubernetes.io/component") != "server":
        return {}
    return {(namespace or "", labels[LABEL_MODELSERVER]): dict(body)}


@kopf.on.event(MS)
async def server_changed(event: kopf.RawEvent, memo: kopf.Memo, **kwargs: Any) -> None:
    ctx = context(memo, kwargs)
    if not is_echo(ctx, event):
        await in_worker(ctx, on_object_event, ctx, event, serving.reconcile)


@kopf.on.event(FTJ)
async def finetunejob_for_servers(event: kopf.RawEvent, memo: kopf.Memo, **kwargs: Any) -> None:
    """A FineTuneJob that has succeeded (or is gone) may change what the servers that use it serve. This is
    the one way a success reaches the servers: the FineTuneJob controller does not call them."""
    ctx = context(memo, kwargs)
    ftj = event["object"]
    if event["type"] != "DELETED" and (ftj.get("status") or {}).get("state") != "Succeeded":
        return
    await in_worker(ctx, serving.reconcile_servers_using, ctx, dict(ftj))


@kopf.on.event("apps", "v1", "deployments", labels={LABEL_MODELSERVER: kopf.PRESENT})
@kopf.on.event("pods", labels={LABEL_MODELSERVER: kopf.PRESENT})
async def server_child_changed(namespace: str | None, labels: kopf.Labels, memo: kopf.Memo, **kwargs: Any) -> None:
    ctx = context(memo, kwargs)
    await in_worker(ctx, serving.reconcile, ctx, (namespace or "", labels[LABEL_MODELSERVER]))
