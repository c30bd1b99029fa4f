"""The agent's access to the API server: JSON requests, list+watch informers, tokens, events."""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlparse

from kubernetes import client, config

from kubetune.dev.agent.status import now_rfc3339
from kubetune.k8s.client import ApiError, Kube

log = logging.getLogger(__name__)

WATCH_TIMEOUT_S = 290
RETRY_S = 1.0
FIELD_MANAGER = "kubetune-dev-agent"


class WatchExpired(Exception):
    """The watch's resourceVersion is too old (410 Gone): list again."""


@dataclass(frozen=True)
class Endpoint:
    """Where the API server listens, as in-cluster clients must be told (KUBERNETES_SERVICE_HOST/PORT)."""

    host: str
    port: int


class AgentApi:
    """JSON requests as the agent's identity (the admin kubeconfig of the local cluster)."""

    def __init__(self, kubeconfig: str) -> None:
        configuration = client.Configuration()
        config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
        configuration.connection_pool_maxsize = 64  # one connection per watch, probe-free otherwise
        self.kube = Kube(client.ApiClient(configuration), field_manager=FIELD_MANAGER)
        url = urlparse(configuration.host)
        self.endpoint = Endpoint(url.hostname or "127.0.0.1", url.port or 443)

    # --- plain requests ----------------------------------------------------------------------------

    def request(
        self, method: str, path: str, body: Any = None, query: dict[str, str] | None = None, content_type: str = ""
    ) -> dict[str, Any]:
        return self.kube.request(method, path, body=body, query=query, content_type=content_type or "application/json")

    def get(self, path: str) -> dict[str, Any] | None:
        """The object at ``path``, or None when it does not exist."""
        try:
            return self.request("GET", path)
        except ApiError as error:
            if error.not_found:
                return None
            raise

    def merge_patch(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return self.request("PATCH", path, body=body, content_type="application/merge-patch+json")

    def config_map(self, namespace: str, name: str) -> dict[str, str] | None:
        """A ConfigMap's data (binaryData decoded as text where possible); None when missing."""
        obj = self.get(f"/api/v1/namespaces/{quote(namespace)}/configmaps/{quote(name)}")
        if obj is None:
            return None
        binary = {k: base64.b64decode(v).decode(errors="replace") for k, v in (obj.get("binaryData") or {}).items()}
        return {**binary, **(obj.get("data") or {})}

    def config_map_bytes(self, namespace: str, name: str) -> dict[str, bytes] | None:
        """A ConfigMap's data and binaryData as bytes, for volumes."""
        obj = self.get(f"/api/v1/namespaces/{quote(namespace)}/configmaps/{quote(name)}")
        if obj is None:
            return None
        data = {k: v.encode() for k, v in (obj.get("data") or {}).items()}
        data.update({k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()})
        return data

    def secret_bytes(self, namespace: str, name: str) -> dict[str, bytes] | None:
        obj = self.get(f"/api/v1/namespaces/{quote(namespace)}/secrets/{quote(name)}")
        if obj is None:
            return None
        data = {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}
        data.update({k: v.encode() for k, v in (obj.get("stringData") or {}).items()})
        return data

    def secret(self, namespace: str, name: str) -> dict[str, str] | None:
        data = self.secret_bytes(namespace, name)
        return None if data is None else {k: v.decode(errors="replace") for k, v in data.items()}

    def request_token(
        self, namespace: str, service_account: str, pod: dict[str, Any], audience: str | None, seconds: int
    ) -> tuple[str, str]:
        """A service-account token bound to ``pod`` (TokenRequest API): (token, expirationTimestamp)."""
        meta = pod["metadata"]
        spec: dict[str, Any] = {
            "expirationSeconds": seconds,
            "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": meta["name"], "uid": meta["uid"]},
        }
        if audience:
            spec["audiences"] = [audience]
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec}
        path = f"/api/v1/namespaces/{quote(namespace)}/serviceaccounts/{quote(service_account)}/token"
        status = self.request("POST", path, body=body)["status"]
        return str(status["token"]), str(status["expirationTimestamp"])

    def event(self, pod: dict[str, Any], type_: str, reason: str, message: str, component: str) -> None:
        """Post a core/v1 Event about ``pod`` (best effort: events are for people, not for logic)."""
        meta = pod["metadata"]
        namespace = meta.get("namespace") or "default"
        now = now_rfc3339()
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": f"{meta['name']}.{uuid.uuid4().hex[:12]}", "namespace": namespace},
            "involvedObject": {
                "apiVersion": "v1",
                "kind": "Pod",
                "name": meta["name"],
                "namespace": namespace,
                "uid": meta.get("uid"),
            },
            "type": type_,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": "kubetune-dev-agent", "host": component},
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        try:
            self.request("POST", f"/api/v1/namespaces/{quote(namespace)}/events", body=body)
        except Exception as error:  # events never break the agent
            log.debug("event %s for %s not posted: %s", reason, meta["name"], error)

    # --- list and watch ----------------------------------------------------------------------------

    def list(self, path: str, query: dict[str, str] | None = None) -> tuple[list[dict[str, Any]], str]:
        """(items, resourceVersion of the list)."""
        body = self.request("GET", path, query=query)
        return list(body.get("items") or []), str(body.get("metadata", {}).get("resourceVersion", ""))

    def watch(self, path: str, query: dict[str, str], resource_version: str) -> Iterator[tuple[str, dict[str, Any]]]:
        """The events of one watch request, (type, object), until the server ends it."""
        params = {
            **query,
            "watch": "1",
            "resourceVersion": resource_version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(WATCH_TIMEOUT_S),
        }
        api = self.kube.api
        method, url, headers, _, _ = api.param_serialize(
            "GET",
            path,
            query_params=list(params.items()),
            header_params={"Accept": "application/json"},
            auth_settings=["BearerToken"],
        )
        try:
            response = api.call_api(method, url, header_params=headers, _request_timeout=(10, WATCH_TIMEOUT_S + 30))
        except client.ApiException as error:
            raise ApiError(error.status or 0, error.reason or "", str(error.body or "")) from None
        raw = response.response
        try:
            if response.status != 200:
                raise ApiError(response.status, response.reason or "", raw.read().decode(errors="replace"))
            pending = b""
            for chunk in raw.stream(amt=None, decode_content=False):
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    if line.strip():
                        event = json.loads(line)
                        yield str(event["type"]), event["object"]
        finally:
            raw.close()  # a watch left half-read must not go back to the connection pool
            raw.release_conn()


class Informer(threading.Thread):
    """Lists, then watches, a collection forever; lists again after any error or an expired watch.

    ``on_list(items)`` gets every full list (so deletions missed during a gap are seen), ``on_event(type,
    object)`` every ADDED/MODIFIED/DELETED after it. Both run on this thread.
    """

    def __init__(
        self,
        api: AgentApi,
        path: str,
        query: dict[str, str],
        on_list: Callable[[list[dict[str, Any]]], None],
        on_event: Callable[[str, dict[str, Any]], None],
        stop: threading.Event,
        name: str,
    ) -> None:
        super().__init__(name=name, daemon=True)
        self.api, self.path, self.query = api, path, query
        self.on_list, self.on_event, self.stop = on_list, on_event, stop
        self.synced = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                items, version = self.api.list(self.path, self.query)
                self.on_list(items)
                self.synced.set()
                while not self.stop.is_set():
                    version = self.watch_once(version)
            except WatchExpired:
                log.debug("%s: watch expired, listing again", self.name)
            except Exception as error:  # any failure: wait, then list again
                log.warning("%s: %s; listing again in %.0fs", self.name, error, RETRY_S)
                self.stop.wait(RETRY_S)

    def watch_once(self, version: str) -> str:
        """One watch request; the resourceVersion to continue from."""
        for type_, obj in self.api.watch(self.path, self.query, version):
            if type_ == "ERROR":
                if obj.get("code") == 410:
                    raise WatchExpired()
                raise ApiError(int(obj.get("code") or 0), str(obj.get("reason", "")), str(obj.get("message", "")))
            version = str(obj.get("metadata", {}).get("resourceVersion") or version)
            if type_ != "BOOKMARK":
                self.on_event(type_, obj)
            if self.stop.is_set():
                break
        else:
            time.sleep(0.05)  # the server ended the watch normally; do not spin if it does so at once
        return version
