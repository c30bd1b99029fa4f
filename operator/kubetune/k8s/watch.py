"""Follow the objects that a field selector picks, with one list and one watch stream (no request per object).

kopf watches whole kinds (filtered by labels); some things the operator needs are only in objects without its
labels, of which it wants few: the FailedMount Events of its pods, say. The API server filters those by a field
selector, so the operator reads only them.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

import urllib3
from kubernetes import client

from kubetune.k8s.client import ApiError, Kube, path

log = logging.getLogger(__name__)
WATCH_SECONDS = 300  # the API server ends each watch after this; the stream is opened again from where it was
RETRY_S = 5.0


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
    kube: Kube, kind: str, namespace: str | None, fields: str, handle: Callable[[dict[str, Any]], None],
    stop: threading.Event,
) -> None:
    """Call `handle` with every object of `kind` that matches `fields` (existing ones first, then each one added
    or changed) until `stop` is set. Lists again when the watch expires; waits and retries on errors."""
    url = path(kind, namespace)
    while not stop.is_set():
        try:
            listing = kube.request("GET", url, query={"fieldSelector": fields})
            for item in listing.get("items") or []:
                handle(item)
            version = str((listing.get("metadata") or {}).get("resourceVersion") or "")
            while not stop.is_set():
                version = _watch_once(kube, url, fields, version, handle)
        except Expired:
            continue
        except (ApiError, urllib3.exceptions.HTTPError, ValueError) as err:
            log.warning("watch of %s (%s) broke, starting again in %.0fs: %s", kind, fields, RETRY_S, err)
            stop.wait(RETRY_S)


def _watch_once(
    kube: Kube, url: str, fields: str, version: str, handle: Callable[[dict[str, Any]], None]
) -> str:
    """One watch request from `version`; returns the version to go on from."""
    for event in stream(kube, url, {"fieldSelector": fields, "resourceVersion": version}):
        obj = event.get("object") or {}
        if event.get("type") == "ERROR":
            if obj.get("code") == 410:
                raise Expired()
            raise ApiError(int(obj.get("code") or 0), str(obj.get("reason") or ""), str(obj.get("message") or ""))
        version = str((obj.get("metadata") or {}).get("resourceVersion") or version)
        if event.get("type") in ("ADDED", "MODIFIED"):
            handle(obj)
    return version


def start(
    kube: Kube, kind: str, namespaces: list[str], fields: str, handle: Callable[[dict[str, Any]], None]
) -> threading.Event:
    """Follow in daemon threads, one per namespace (one for the whole cluster when `namespaces` is empty); set
    the returned Event to stop them."""
    stop = threading.Event()
    scopes: list[str | None] = [*namespaces] or [None]
    for namespace in scopes:
        threading.Thread(
            target=follow,
            args=(kube, kind, namespace, fields, handle, stop),
            name=f"watch-{kind}-{namespace or 'all'}",
            daemon=True,
        ).start()
    return stop
