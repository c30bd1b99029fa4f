"""The ModelServer controller: the vLLM Deployment and Service, adapters loaded into every replica, status.

Level-based like FineTuneJobs: every event of a ModelServer, its Deployment or its pods, and every
FineTuneJob that succeeds for it (`servers_using`), leads to `reconcile`, which writes the children when
what they should be has changed, brings each running replica's adapters in line with the spec (adapters/),
lets a replica that has them all into the Service (its readiness gate), and recomputes the status. While an
adapter is not loaded everywhere it looks again every few seconds. handlers/modelserver.py calls these
functions.

A spec that vLLM would refuse for a known model (planner/engine.py) is refused before any pod is written.
spec.autoscaling adds a KEDA ScaledObject, written after the other children; a cluster without KEDA gets the
Autoscaling condition KedaNotInstalled, and the write is tried again every KEDA_RECHECK_S.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from pydantic import ValidationError

from kubetune.adapters import Replica, ReplicaReport, next_retry, replicas, replicas_in_line
from kubetune.adapters.resolution import Resolution, resolve, selects
from kubetune.api.v1alpha1 import ModelServer
from kubetune.config import UnknownGpuType
from kubetune.controllers import metrics, mounts
from kubetune.controllers.context import CHILD_KINDS, RETRY_API_ERROR_S, Context, Key, retried
from kubetune.controllers.prepare import cache_claim
from kubetune.k8s.children import NameConflict, delete_owned, write
from kubetune.k8s.client import ApiError
from kubetune.planner.engine import check_engine
from kubetune.render import modelserver as render
from kubetune.render import traffic
from kubetune.render.common import Manifest, content_hash
from kubetune.status import modelserver as server_status
from kubetune.status.conditions import get, now_iso

log = logging.getLogger(__name__)
KIND = "ModelServer"
CONTROLLER = "modelserver"  # the label of its metrics
# A ScaledObject that could not be written (KEDA not installed, a refusal) is tried again this often.
KEDA_RECHECK_S = 60.0
# Children a server has only with some settings, by kind and the suffix of their name; removed when the setting
# goes (NetworkPolicy: the installation's; ScaledObject: spec.autoscaling; the chat page's Service and Deployment:
# spec.ui.enabled).
OPTIONAL_CHILDREN = (("NetworkPolicy", ""), ("ScaledObject", ""), ("Service", "-ui"), ("Deployment", "-ui"))


def _jobs_in(ctx: Context, namespace: str) -> dict[str, dict[str, Any]]:
    return {
        name: next(iter(store))
        for (ns, name), store in ctx.entries("finetunejobs")
        if ns == namespace and store
    }


@retried
def reconcile(ctx: Context, key: Key, recheck: bool = False) -> None:
    """Write the children (when they changed, or with `recheck` when one is missing), sync the replicas' adapters,
    then write the status."""
    body = ctx.latest("modelservers", key)
    if body is None:
        return
    uid = body["metadata"]["uid"]
    with ctx.lock(uid), metrics.reconciling(CONTROLLER) as outcome:
        try:
            server = ModelServer.model_validate(body)
            ctx.config.gpu_type(server.spec.gpu_type)
        except (ValidationError, UnknownGpuType) as err:
            outcome.failed(err)
            _refuse(ctx, key, body, *_refusal(err))
            return
        if (engine := check_engine(server.spec)) is not None:
            outcome.failed(ValueError(engine.message))
            _refuse(ctx, key, body, engine.reason, engine.message)
            return
        adapters = resolve(server, _jobs_in(ctx, key[0]))
        # The model cache's claim is looked up only for a model its pods would read from it.
        claim = cache_claim(ctx, key[0]) if render.cache_entry(server.spec.base_model.uri) else None
        children = render.children(
            server, adapters.locations, ctx.config, adapters.secrets, ctx.signer.public_key, claim
        )
        scaled = traffic.scaled_object(server, ctx.config, render.served_name(server))
        write_children(ctx, key, uid, children, recheck, scaled)
        reports = sync_adapters(ctx, key, server, adapters)
        views = adapters.views(reports, ctx.adapter_failures.get(uid, {}))
        open_gates(ctx, key, server, adapters, reports)
        sync_status(ctx, key, body, server, views)
        _look_again(ctx, key, uid, views, reports)


def _refusal(err: ValidationError | UnknownGpuType) -> tuple[str, str]:
    if isinstance(err, UnknownGpuType):
        return "UnknownGpuType", str(err)
    return "InvalidSpec", spec_errors(err)


def _refuse(ctx: Context, key: Key, body: dict[str, Any], reason: str, message: str) -> None:
    """A server the operator cannot run: Failed with the reason, an Event once; nothing is created (or changed)."""
    log.error("ModelServer %s/%s refused (%s): %s", *key, reason, message)
    generation = body["metadata"].get("generation")
    current = dict(body.get("status") or {})
    _, diff = ctx.status.update(
        KIND, body["metadata"], current, lambda now: server_status.invalid(now, generation, reason, message)
    )
    if diff:
        ctx.event(KIND, body["metadata"], True, reason, message)


def _look_again(
    ctx: Context, key: Key, uid: str, views: list[server_status.AdapterView], reports: list[ReplicaReport]
) -> None:
    """Timers for what no event will bring: adapters pending for a reason other than their FineTuneJob, replicas
    that did not answer, refused loads whose back-off ends."""
    if any(v.state == "Pending" and v.reason != "WaitingForFineTuneJob" for v in views) or any(
        r.loaded is None for r in reports
    ):
        ctx.later_once(("modelserver", *key), ctx.config.server.adapter_resync_seconds, reconcile, ctx, key)
    # A refused load is tried again by itself when its back-off ends, without waiting for an event. One
    # timer per due time (a later, shorter back-off is not hidden behind a longer one already waiting).
    delay = next_retry(ctx.adapter_failures.get(uid, {}), time.monotonic())
    if delay is not None:
        due = f"{time.monotonic() + delay:.0f}"
        ctx.later_once(("modelserver-retry", *key, due), delay + 0.5, reconcile, ctx, key)


def write_children(
    ctx: Context, key: Key, uid: str, children: list[Manifest], recheck: bool, scaled: Manifest | None = None
) -> None:
    """Write the server's children when they differ from what was last written (or one is missing), remove the
    optional ones it no longer has, then write its ScaledObject (`scaled`). A refusal stays on the server (its
    status shows it) and is tried again with a growing back-off."""
    wanted = content_hash([children, scaled])
    if recheck and any(ctx.owned(m) is None for m in children):
        ctx.applied.pop(uid, None)
    if ctx.applied.get(uid) == wanted or not ctx.backoff.due(uid, time.monotonic()):
        return
    try:
        for manifest in children:
            write(ctx.kube, manifest, ctx.owned(manifest))
        _remove_unwanted(ctx, key, uid, [*children, *([scaled] if scaled else [])])
    except (NameConflict, ApiError) as err:
        if isinstance(err, ApiError) and (err.transient or err.namespace_terminating):
            log.warning("writing the children of %s/%s failed, retrying: %s", *key, err)
            ctx.later(RETRY_API_ERROR_S, reconcile, ctx, key)
            return
        reason = "NameConflict" if isinstance(err, NameConflict) else "ApplyFailed"
        message = err.message if isinstance(err, NameConflict) else f"{err.subject or 'a child'}: {err.message}"
        refusal = ctx.backoff.refused(uid, reason, message + " (tried again with a growing back-off)", time.monotonic())
        delay = refusal.retry_at - time.monotonic()
        log.warning("writing the children of %s/%s refused, retrying in %.0fs: %s", *key, delay, err)
        ctx.later_once(("modelserver-refused", *key), delay + 0.1, reconcile, ctx, key)
        return
    ctx.backoff.succeeded(uid)
    written = _write_scaled_object(ctx, key, uid, scaled)
    if written is not None and not written[0] and written[1] != "PrometheusNotConfigured":
        ctx.later_once(("modelserver-keda", *key), KEDA_RECHECK_S, reconcile, ctx, key)
        return  # not recorded as applied: the next look writes it once KEDA is there
    ctx.applied[uid] = wanted


def _remove_unwanted(ctx: Context, key: Key, uid: str, wanted: list[Manifest]) -> None:
    """Delete the server's optional children that it no longer has (a NetworkPolicy when the installation stops
    rendering them, the ScaledObject when spec.autoscaling goes, the chat page when spec.ui.enabled goes), if the
    server controls them."""
    kept = {(m["kind"], m["metadata"]["name"]) for m in wanted}
    for kind, suffix in OPTIONAL_CHILDREN:
        name = key[1] + suffix
        if (kind, name) in kept:
            continue
        probe = {"kind": kind, "metadata": {"namespace": key[0], "name": name}}
        # Watched kinds are deleted only when the view shows one; the ScaledObject (not watched) is read.
        watched = kind in CHILD_KINDS
        known = ctx.owned(probe) if watched else None
        if watched and known is None:
            continue
        try:
            delete_owned(ctx.kube, kind, key[0], name, uid, known)
        except ApiError as err:
            if not err.not_found:  # 404 on a kind the cluster does not serve (no KEDA): nothing to remove
                raise


NO_PROMETHEUS = (
    "the operator's server.prometheusAddress is not set, so KEDA cannot read vLLM's metrics: ask the administrator "
    "to set it (chart value config.server.prometheusAddress)"
)
NO_KEDA = (
    "spec.autoscaling needs KEDA, whose ScaledObject API (keda.sh/v1alpha1) this cluster does not serve: install "
    "KEDA, or scale the server with kubectl scale or an HPA on its scale subresource"
)


def _write_scaled_object(ctx: Context, key: Key, uid: str, scaled: Manifest | None) -> tuple[bool, str, str] | None:
    """Write the ScaledObject; what the Autoscaling condition says about it (None: the spec asks for none)."""
    if scaled is None:
        ctx.autoscaling.pop(uid, None)
        return None
    result = _scaled_object_written(ctx, scaled) if ctx.config.server.prometheus_address else None
    result = result or (False, "PrometheusNotConfigured", NO_PROMETHEUS)
    ctx.autoscaling[uid] = result
    if not result[0]:
        log.warning("autoscaling of %s/%s: %s: %s", *key, result[1], result[2])
    return result


def _scaled_object_written(ctx: Context, scaled: Manifest) -> tuple[bool, str, str]:
    name, spec = scaled["metadata"]["name"], scaled["spec"]
    try:
        write(ctx.kube, scaled, None)
    except NameConflict as err:
        return False, "NameConflict", err.message
    except ApiError as err:
        if err.transient:
            raise
        if err.not_found:
            return False, "KedaNotInstalled", NO_KEDA
        return False, "ApplyFailed", f"ScaledObject {name}: {err.message}"
    trigger = spec["triggers"][0]["metadata"]
    return (
        True,
        "ScaledObjectWritten",
        f"KEDA ScaledObject {name} scales this server between {spec['minReplicaCount']} and "
        f"{spec['maxReplicaCount']} replicas on {trigger['query']} (target {trigger['threshold']} per replica)",
    )


def spec_errors(err: ValidationError) -> str:
    """A validation error as one line per problem: `spec.field: what is wrong`."""
    return "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors())


def _condition_true(pod: dict[str, Any], type_: str) -> bool:
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(c.get("type") == type_ and c.get("status") == "True" for c in conditions)


def ready_replicas(ctx: Context, key: Key) -> list[Replica]:
    """The server pods whose containers are ready (vLLM and the fetcher answer) and that are not going away, at
    their pod IP and the fetcher's port. Not the pods' Ready: that waits for their adapters
    (render.ADAPTERS_GATE), which only these calls bring."""
    ready = []
    for pod in ctx.objects("server_pods", key):
        status = pod.get("status") or {}
        is_ready = _condition_true(pod, "ContainersReady")
        if is_ready and status.get("podIP") and not pod["metadata"].get("deletionTimestamp"):
            ready.append(Replica(pod["metadata"]["name"], f"{status['podIP']}:{ctx.config.server.fetcher_port}"))
    return sorted(ready, key=lambda r: r.pod)


def sync_adapters(ctx: Context, key: Key, server: ModelServer, adapters: Resolution) -> list[ReplicaReport]:
    """Load and unload adapters on every ready replica until each has exactly the ones to serve."""
    uid = server.metadata.uid
    spec = replicas.Server(server.spec.base_model.uri, server.spec.max_lora_rank)
    failures = ctx.adapter_failures.get(uid, {})
    synced = replicas.sync(ctx.replicas, spec, adapters.serve, ready_replicas(ctx, key), failures)
    ctx.adapter_failures[uid] = synced.failures
    metrics.count_adapter_loads(synced.outcomes)
    return synced.reports


def open_gates(ctx: Context, key: Key, server: ModelServer, adapters: Resolution, reports: list[ReplicaReport]) -> None:
    """Let into the Service the replicas that have every adapter they can have: their pods' readiness gate goes
    True. A gate once open stays open (a new adapter reaches every replica within seconds; closing the gates
    would take the whole server out of the Service meanwhile)."""
    failures = ctx.adapter_failures.get(server.metadata.uid, {})
    in_line = {r.pod for r in replicas_in_line(adapters.serve, reports, failures)}
    for pod in ctx.objects("server_pods", key):
        meta = pod["metadata"]
        if meta["name"] not in in_line or _condition_true(pod, render.ADAPTERS_GATE):
            continue
        condition = {
            "type": render.ADAPTERS_GATE,
            "status": "True",
            "reason": "AdaptersLoaded",
            "message": f"{len(adapters.serve)} adapter(s) loaded",
            "lastTransitionTime": now_iso(),
        }
        try:
            ctx.kube.set_pod_condition(key[0], meta["name"], meta["uid"], condition)
        except ApiError as err:
            if not (err.not_found or err.status in (409, 422)):  # gone, or another pod of that name now
                raise
            continue
        log.info("pod %s/%s has its adapters: in the Service", key[0], meta["name"])


def sync_status(
    ctx: Context,
    key: Key,
    body: dict[str, Any],
    server: ModelServer,
    views: list[server_status.AdapterView],
) -> None:
    deployment = ctx.latest("server_deployments", key)
    observed = server_status.ServerObserved(
        status=dict(body.get("status") or {}),
        generation=server.metadata.generation,
        desired_replicas=server.spec.replicas,
        endpoint=render.endpoint(server, ctx.config),
        ui_endpoint=render.ui_endpoint(server, ctx.config) if server.spec.ui.enabled else "",
        deployment=deployment,
        pods=ctx.objects("server_pods", key),
        adapters=views,
        refusal=(r.reason, r.message) if (r := ctx.backoff.refusal(server.metadata.uid)) else None,
        mount_failures=ctx.mount_failures,
        selector=traffic.selector_text(server),
        autoscaling=ctx.autoscaling.get(server.metadata.uid) if server.spec.autoscaling else None,
    )
    result = server_status.server_outcome(observed)
    before, diff = ctx.status.update(
        KIND,
        body["metadata"],
        observed.status,
        lambda current: server_status.derive(server_status.ServerObserved(**{**observed.__dict__, "status": current})),
    )
    warning = result.state in ("Failed", "Degraded") or result.reason in server_status.WARNING_REASONS
    was = (get(before.get("conditions") or [], "Ready") or {}).get("reason")
    if ("state" in diff and diff["state"] != before.get("state")) or (warning and was != result.reason):
        ctx.event(KIND, body["metadata"], warning, result.reason, result.message)
    _post_adapter_events(ctx, body["metadata"], before.get("adapters") or [], views)
    mounts.forget_started(ctx, observed.pods)


def _post_adapter_events(
    ctx: Context, meta: dict[str, Any], before: list[dict[str, Any]], views: list[server_status.AdapterView]
) -> None:
    """An Event for every adapter whose state changed to Loaded or Failed."""
    old = {a.get("name"): (a.get("state"), a.get("reason")) for a in before}
    for view in views:
        if view.state in ("Loaded", "Failed") and old.get(view.name) != (view.state, view.reason):
            reason = "AdapterLoaded" if view.state == "Loaded" else view.reason
            ctx.event(KIND, meta, view.state == "Failed", reason, f"{view.name}: {view.message}")


def servers_using(ctx: Context, namespace: str, ftj: dict[str, Any]) -> list[dict[str, Any]]:
    """ModelServers in `namespace` that name this FineTuneJob, select it by label, or serve it still (a job
    whose labels no longer match must be unloaded)."""
    name = ftj["metadata"]["name"]
    labels = ftj["metadata"].get("labels") or {}
    sources = {f"fromFineTuneJob/{name}", f"adapterSelector/{name}"}
    found = []
    for (ns, _), store in ctx.entries("modelservers"):
        if ns != namespace or not store:
            continue
        body = next(iter(store))
        spec = body.get("spec") or {}
        named = any(a.get("fromFineTuneJob") == name for a in spec.get("adapters") or [])
        selector = spec.get("adapterSelector")
        selected = selector is not None and selects(selector, labels)
        serving = any(a.get("source") in sources for a in (body.get("status") or {}).get("adapters") or [])
        if named or selected or serving:
            found.append(body)
    return found


def reconcile_servers_using(ctx: Context, ftj: dict[str, Any]) -> None:
    for server in servers_using(ctx, ftj["metadata"]["namespace"], ftj):
        reconcile(ctx, (server["metadata"]["namespace"], server["metadata"]["name"]))
