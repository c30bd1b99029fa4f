"""ModelServer: the vLLM Deployment and Service, and status from the Deployment and adapters."""

from __future__ import annotations

from typing import Any

import kopf
from pydantic import ValidationError

from kubetune.api.v1alpha1 import ModelServer
from kubetune.handlers.context import Context
from kubetune.render import modelserver as render
from kubetune.render.common import LABEL_MODELSERVER
from kubetune.status import adapters as adapter_status
from kubetune.status import modelserver as server_status

MS = "modelservers.kubetune.io"
KIND = "ModelServer"


@kopf.index(MS)
def modelservers(namespace: str | None, name: str, body: kopf.Body, **_: Any) -> dict[tuple[str, str], dict[str, Any]]:
    return {(namespace or "", name): dict(body)}


@kopf.index("apps", "v1", "deployments", labels={LABEL_MODELSERVER: kopf.PRESENT})
def server_deployments(
    namespace: str | None, name: str, labels: kopf.Labels, body: kopf.Body, **_: Any
) -> dict[tuple[str, str], dict[str, Any]]:
    if labels.get("app.kubernetes.io/component") != "server":
        return {}
    return {(namespace or "", labels[LABEL_MODELSERVER]): dict(body)}


@kopf.index("pods", labels={LABEL_MODELSERVER: kopf.PRESENT})
def server_pods(
    namespace: str | None, labels: kopf.Labels, body: kopf.Body, **_: Any
) -> dict[tuple[str, str], dict[str, Any]]:
    if labels.get("app.kubernetes.io/component") != "server":
        return {}
    return {(namespace or "", labels[LABEL_MODELSERVER]): dict(body)}


def _jobs_in(namespace: str, finetunejobs: kopf.Index) -> dict[str, dict[str, Any]]:
    return {name: next(iter(store)) for (ns, name), store in finetunejobs.items() if ns == namespace and store}


def reconcile(ctx: Context, body: dict[str, Any], indexes: dict[str, kopf.Index]) -> None:
    """Apply the Deployment and Service for the adapters known now, then refresh the status."""
    try:
        server = ModelServer.model_validate(body)
    except ValidationError as err:
        raise kopf.PermanentError(f"invalid ModelServer: {err}") from err
    resolved, _ = adapter_status.resolve(server, _jobs_in(server.metadata.namespace, indexes["finetunejobs"]))
    for manifest in render.children(server, resolved, ctx.config):
        ctx.kube.apply(manifest)
    sync_status(ctx, (server.metadata.namespace, server.metadata.name), indexes)


def sync_status(ctx: Context, key: tuple[str, str], indexes: dict[str, kopf.Index]) -> None:
    bodies = list(indexes["modelservers"].get(key, []))
    if not bodies:
        return
    server = ModelServer.model_validate(bodies[0])
    deployments = list(indexes["server_deployments"].get(key, []))
    deployment = deployments[0] if deployments else None
    ready = int(((deployment or {}).get("status") or {}).get("readyReplicas") or 0)
    _, views = adapter_status.resolve(server, _jobs_in(key[0], indexes["finetunejobs"]))
    observed = server_status.ServerObserved(
        status=dict(bodies[0].get("status") or {}),
        generation=server.metadata.generation,
        desired_replicas=server.spec.replicas,
        endpoint=render.endpoint(server, ctx.config),
        ui_endpoint=render.ui_endpoint(server, ctx.config) if server.spec.ui.enabled else "",
        deployment=deployment,
        pods=list(indexes["server_pods"].get(key, [])),
        adapters=adapter_status.with_replica_state(views, ready),
    )
    result = server_status.server_outcome(observed)
    before, diff = ctx.status.update(
        KIND,
        bodies[0]["metadata"],
        observed.status,
        lambda current: server_status.derive(server_status.ServerObserved(**{**observed.__dict__, "status": current})),
    )
    if "state" in diff and diff["state"] != before.get("state"):
        ctx.event(KIND, bodies[0]["metadata"], result.state in ("Failed", "Degraded"), result.reason, result.message)


def servers_using(namespace: str, ftj: dict[str, Any], indexes: dict[str, kopf.Index]) -> list[dict[str, Any]]:
    """ModelServers in `namespace` that name this FineTuneJob or select it by label."""
    name = ftj["metadata"]["name"]
    labels = ftj["metadata"].get("labels") or {}
    found = []
    for (ns, _), store in indexes["modelservers"].items():
        if ns != namespace or not store:
            continue
        body = next(iter(store))
        server = ModelServer.model_validate(body)
        named = any(a.from_fine_tune_job == name for a in server.spec.adapters)
        selected = server.spec.adapter_selector is not None and server.spec.adapter_selector.matches(labels)
        if named or selected:
            found.append(body)
    return found


INDEXES = ("modelservers", "server_deployments", "server_pods", "finetunejobs")


def _indexes(kwargs: dict[str, Any]) -> dict[str, kopf.Index]:
    return {name: kwargs[name] for name in INDEXES}


@kopf.on.resume(MS)
@kopf.on.create(MS)
@kopf.on.update(MS, field="spec")
def apply_server(body: kopf.Body, memo: kopf.Memo, **kwargs: Any) -> None:
    reconcile(memo.context, dict(body), _indexes(kwargs))


@kopf.on.event(MS)
def server_changed(event: kopf.RawEvent, memo: kopf.Memo, **kwargs: Any) -> None:
    meta = event["object"]["metadata"]
    if event["type"] == "DELETED":
        memo.context.status.forget(meta["uid"])
        return
    sync_status(memo.context, (meta["namespace"], meta["name"]), _indexes(kwargs))


@kopf.on.event("apps", "v1", "deployments", labels={LABEL_MODELSERVER: kopf.PRESENT})
@kopf.on.event("pods", labels={LABEL_MODELSERVER: kopf.PRESENT})
def server_child_changed(namespace: str | None, labels: kopf.Labels, memo: kopf.Memo, **kwargs: Any) -> None:
    sync_status(memo.context, (namespace or "", labels[LABEL_MODELSERVER]), _indexes(kwargs))
