"""Follow the objects of a kind, with one list and one watch stream (no request per object).

kopf watches whole kinds (filtered by labels); some things the operator needs are only in objects without its
labels, of which it wants few: the FailedMount Events of its pods, say. The API server filters those by a field
selector, so the operator reads only them. And kopf serves a custom kind only when its discovery scan finds it:
a kind whose CRD comes after the operator started (Kueue's Workloads) is found by a scan that each change of a
CRD starts, which can run before the API server's discovery lists the new kind, and then nothing scans again.
A kind followed here is simply asked for again until the API server serves it.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import urllib3
from kubernetes import client

from kubetune.k8s.client import ApiError, Kube, path

log = logging.getLogger(__name__)
WATCH_SECONDS = 300  # the API server ends each watch after this; the stream is opened again from where it was
RETRY_S = 5.0
NOT_SERVED_RETRY_S = 10.0  # a kind the API server does not serve (its CRD not installed yet) is asked for again


@dataclass(frozen=True)
class Follower:
    """What to do with the objects followed: `changed` for each one listed, added or modified; `deleted` for
    each one deleted; `listed` (when given) first with every object of a new listing (the first, and the one
    after a watch expired, which may have missed deletions), instead of `changed` for each."""

    changed: Callable[[dict[str, Any]], None]
    deleted: Callable[[dict[str, Any]], None] = lambda _obj: None
    listed: Callable[[list[dict[str, Any]]], None] | None = None


class Expired(Exception):
    """The resourceVersion the watch started from is too old (410 Gone): list again."""


def stream(kube: Kube, url: str, query: dict[str, str]) -> Iterator[dict[str, Any]]:
    """The watch events of one watch request, as dicts {"type", "object"}, until the API server ends it."""
    params = [*query.items(), ("watch", "true"), ("allowWatchBookmarks", "true")]
    params.append(("timeoutSeconds", str(WATCH_SECONDS)))
    method, full_url, headers, _, _ = kube.api.param_serialize(
        "GET", url, query_params=params, header_params={"Accept": "application/json"}, auth_settings=["BearerToken"]
    )
    try:
        response = kube.api.call_api(method, full_url, header_params=headers, _request_timeout=(10, WATCH_SECONDS + 30))
    except client.ApiException as err:
        raise ApiError(err.status or 0, err.reason or "", str(err.body or "")) from None
    raw = response.response
    try:
        if not 200 <= raw.status < 300:
            raise ApiError(raw.status, raw.reason or "", raw.data.decode(errors="replace"))
        pending = b""
        for chunk in raw.stream(65536, decode_content=True):
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                if line.strip():
                    yield json.loads(line)
    finally:
        raw.release_conn()


def follow(
    kube: Kube, kind: str, namespace: str | None, query: dict[str, str], follower: Follower, stop: threading.Event
) -> None:
    """Hand every object of `kind` that `query` (fieldSelector, labelSelector) picks to `follower` (existing ones
    first, then each change) until `stop` is set. Lists again when the watch expires; waits and retries on
    errors, and while the API server does not serve the kind."""
    url = path(kind, namespace)
    waiting_for_kind = False
    while not stop.is_set():
        try:
            listing = kube.request("GET", url, query=query)
            if waiting_for_kind:
                log.info("the API server serves %s now: following them", kind)
            waiting_for_kind = False
            items = list(listing.get("items") or [])
            if follower.listed is not None:
                follower.listed(items)
            else:
                for item in items:
                    follower.changed(item)
            version = str((listing.get("metadata") or {}).get("resourceVersion") or "")
            while not stop.is_set():
                version = _watch_once(kube, url, query, version, follower)
        except Expired:
            continue
        except ApiError as err:
            if err.status == 404:
                if not waiting_for_kind:
                    log.info("%s not served (no CRD yet): asking again every %.0fs", kind, NOT_SERVED_RETRY_S)
                waiting_for_kind = True
                stop.wait(NOT_SERVED_RETRY_S)
                continue
            log.warning("watch of %s (%s) broke, starting again in %.0fs: %s", kind, query, RETRY_S, err)
            stop.wait(RETRY_S)
        except (urllib3.exceptions.HTTPError, ValueError) as err:
            log.warning("watch of %s (%s) broke, starting again in %.0fs: %s", kind, query, RETRY_S, err)
            stop.wait(RETRY_S)


def _watch_once(kube: Kube, url: str, query: dict[str, str], version: str, follower: Follower) -> str:
    """One watch request from `version`; returns the version to go on from."""
    for event in stream(kube, url, {**query, "resourceVersion": version}):
        obj = event.get("object") or {}
        if event.get("type") == "ERROR":
            if obj.get("code") == 410:
                raise Expired()
            raise ApiError(int(obj.get("code") or 0), str(obj.get("reason") or ""), str(obj.get("message") or ""))
        version = str((obj.get("metadata") or {}).get("resourceVersion") or version)
        if event.get("type") in ("ADDED", "MODIFIED"):
            follower.changed(obj)
        elif event.get("type") == "DELETED":
            follower.deleted(obj)
    return version


def start(
    kube: Kube, kind: str, namespaces: list[str], query: dict[str, str], follower: Follower
) -> threading.Event:
    """Follow in daemon threads, one per namespace (one for the whole cluster when `namespaces` is empty); set
    the returned Event to stop them."""
    stop = threading.Event()
    scopes: list[str | None] = [*namespaces] or [None]
    for namespace in scopes:
        threading.Thread(
            target=follow,
            args=(kube, kind, namespace, query, follower, stop),
            name=f"watch-{kind}-{namespace or 'all'}",
            daemon=True,
        ).start()
    return stop
