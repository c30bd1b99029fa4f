"""ModelServer: the vLLM Deployment and Service, and status from the Deployment and adapters.

Level-based like FineTuneJobs: every event of a ModelServer, its Deployment or its pods, and every
FineTuneJob that succeeds for it, leads to `reconcile`, which applies the children when what they should
be has changed and recomputes the status.
"""

from __future__ import annotations

import logging
from typing import Any

import kopf
from pydantic import ValidationError

from kubetune.api.v1alpha1 import ModelServer
from kubetune.handlers.context import Context
from kubetune.k8s.client import ApiError
from kubetune.render import modelserver as render
from kubetune.render.common import LABEL_MODELSERVER, content_hash
from kubetune.status import adapters as adapter_status
from kubetune.status import modelserver as server_status

log = logging.getLogger(__name__)
MS = "modelservers.kubetune.io"
KIND = "ModelServer"
Key = tuple[str, str]


@kopf.index(MS)
def modelservers(namespace: str | None, name: str, body: kopf.Body, **_: Any) -> dict[Key, dict[str, Any]]:
    return {(namespace or "", name): dict(body)}


@kopf.index("apps", "v1", "deployments", labels={LABEL_MODELSERVER: kopf.PRESENT})
def server_deployments(
    namespace: str | None, labels: kopf.Labels, body: kopf.Body, **_: Any
) -> dict[Key, dict[str, Any]]:
    if labels.get("app.kubernetes.io/component") != "server":
        return {}
    return {(namespace or "", labels[LABEL_MODELSERVER]): dict(body)}


@kopf.index("pods", labels={LABEL_MODELSERVER: kopf.PRESENT})
def server_pods(namespace: str | None, labels: kopf.Labels, body: kopf.Body, **_: Any) -> dict[Key, dict[str, Any]]:
    if labels.get("app.kubernetes.io/component") != "server":
        return {}
    return {(namespace or "", labels[LABEL_MODELSERVER]): dict(body)}


def _jobs_in(ctx: Context, namespace: str) -> dict[str, dict[str, Any]]:
    return {
        name: next(iter(store))
        for (ns, name), store in ctx.indexes["finetunejobs"].items()
        if ns == namespace and store
    }


def _latest(ctx: Context, key: Key) -> dict[str, Any] | None:
    bodies = list(ctx.indexes["modelservers"].get(key, []))
    return bodies[0] if bodies else None


def reconcile(ctx: Context, key: Key) -> None:
    """Apply the Deployment and Service for the adapters known now (when that changed), then the status."""
    body = _latest(ctx, key)
    if body is None:
        return
    uid = body["metadata"]["uid"]
    with ctx.lock(uid):
        try:
            server = ModelServer.model_validate(body)
        except ValidationError as err:
            log.error("invalid ModelServer %s/%s: %s", *key, err)
            return
        resolved, views = adapter_status.resolve(server, _jobs_in(ctx, key[0]))
        children = render.children(server, resolved, ctx.config)
        wanted = content_hash(children)
        if ctx.applied.get(uid) != wanted:
            try:
                for manifest in children:
                    ctx.kube.apply(manifest)
                ctx.applied[uid] = wanted
            except ApiError as err:
                log.warning("applying %s/%s failed, retrying: %s", *key, err)
                ctx.later(5.0, reconcile, ctx, key)
        sync_status(ctx, key, body, server, views)


def sync_status(
    ctx: Context, key: Key, body: dict[str, Any], server: ModelServer, views: list[server_status.AdapterView]
) -> None:
    deployments = list(ctx.indexes["server_deployments"].get(key, []))
    deployment = deployments[0] if deployments else None
    ready = int(((deployment or {}).get("status") or {}).get("readyReplicas") or 0)
    observed = server_status.ServerObserved(
        status=dict(body.get("status") or {}),
        generation=server.metadata.generation,
        desired_replicas=server.spec.replicas,
        endpoint=render.endpoint(server, ctx.config),
        ui_endpoint=render.ui_endpoint(server, ctx.config) if server.spec.ui.enabled else "",
        deployment=deployment,
        pods=list(ctx.indexes["server_pods"].get(key, [])),
        adapters=adapter_status.with_replica_state(views, ready),
    )
    result = server_status.server_outcome(observed)
    before, diff = ctx.status.update(
        KIND,
        body["metadata"],
        observed.status,
        lambda current: server_status.derive(server_status.ServerObserved(**{**observed.__dict__, "status": current})),
    )
    if "state" in diff and diff["state"] != before.get("state"):
        ctx.event(KIND, body["metadata"], result.state in ("Failed", "Degraded"), result.reason, result.message)


def servers_using(ctx: Context, namespace: str, ftj: dict[str, Any]) -> list[dict[str, Any]]:
    """ModelServers in `namespace` that name this FineTuneJob or select it by label."""
    name = ftj["metadata"]["name"]
    labels = ftj["metadata"].get("labels") or {}
    found = []
    for (ns, _), store in ctx.indexes["modelservers"].items():
        if ns != namespace or not store:
            continue
        body = next(iter(store))
        spec = body.get("spec") or {}
        named = any(a.get("fromFineTuneJob") == name for a in spec.get("adapters") or [])
        selector = spec.get("adapterSelector")
        selected = selector is not None and adapter_status.selects(selector, labels)
        if named or selected:
            found.append(body)
    return found


@kopf.on.event(MS)
def server_changed(event: kopf.RawEvent, memo: kopf.Memo, **kwargs: Any) -> None:
    ctx: Context = memo.context
    ctx.capture_indexes(kwargs)
    meta = event["object"]["metadata"]
    if event["type"] == "DELETED":
        ctx.forget(meta["uid"])
        return
    reconcile(ctx, (meta["namespace"], meta["name"]))


@kopf.on.event("apps", "v1", "deployments", labels={LABEL_MODELSERVER: kopf.PRESENT})
@kopf.on.event("pods", labels={LABEL_MODELSERVER: kopf.PRESENT})
def server_child_changed(namespace: str | None, labels: kopf.Labels, memo: kopf.Memo, **kwargs: Any) -> None:
    ctx: Context = memo.context
    ctx.capture_indexes(kwargs)
    reconcile(ctx, (namespace or "", labels[LABEL_MODELSERVER]))
