"""A small JSON client over the Kubernetes API for the kinds the operator touches.

It speaks plain dicts (the manifests `render` builds) rather than the generated models: server-side
apply with one field manager, merge patches of the status subresource, reads and deletes.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import urllib3
from kubernetes import client, config

log = logging.getLogger(__name__)

# Kept-alive connections to the API server. The client's default (5 per CPU) is fewer than the threads that
# send requests at once (kopf's workers and the concurrent applies); urllib3 then closes the surplus
# connections after each request, and every new one costs a TLS handshake on both sides.
CONNECTIONS = 128
# Requests `start_applies` has in flight at once, for all callers together: enough that concurrent admissions
# do not queue behind one another (the threads start only when needed).
APPLY_CONCURRENCY = 64

# kind -> (API path prefix, plural)
RESOURCES: dict[str, tuple[str, str]] = {
    "ConfigMap": ("/api/v1", "configmaps"),
    "Namespace": ("/api/v1", "namespaces"),
    "Event": ("/api/v1", "events"),
    "Pod": ("/api/v1", "pods"),
    "Secret": ("/api/v1", "secrets"),
    "Service": ("/api/v1", "services"),
    "ServiceAccount": ("/api/v1", "serviceaccounts"),
    "Deployment": ("/apis/apps/v1", "deployments"),
    "Job": ("/apis/batch/v1", "jobs"),
    "Role": ("/apis/rbac.authorization.k8s.io/v1", "roles"),
    "RoleBinding": ("/apis/rbac.authorization.k8s.io/v1", "rolebindings"),
    "FineTuneJob": ("/apis/kubetune.io/v1alpha1", "finetunejobs"),
    "ModelServer": ("/apis/kubetune.io/v1alpha1", "modelservers"),
}


class ApiError(Exception):
    """An error response of the API server."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message

    @property
    def not_found(self) -> bool:
        return self.status == 404


def path(kind: str, namespace: str | None, name: str | None = None, subresource: str | None = None) -> str:
    prefix, plural = RESOURCES[kind]
    parts = [prefix]
    if namespace:
        parts.append(f"namespaces/{quote(namespace)}")
    parts.append(plural)
    if name:
        parts.append(quote(name))
    if subresource:
        parts.append(subresource)
    return "/".join(parts)


@dataclass
class Kube:
    """JSON requests against one API server, authenticated as the loaded kubeconfig/service account."""

    api: client.ApiClient
    field_manager: str = "kubetune-operator"
    _appliers: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(APPLY_CONCURRENCY, thread_name_prefix="apply"), repr=False
    )

    @classmethod
    def connect(cls, field_manager: str = "kubetune-operator") -> Kube:
        """In-cluster credentials when running in a pod, else the current kubeconfig."""
        configuration = client.Configuration()
        try:
            config.load_incluster_config(client_configuration=configuration)
        except config.ConfigException:
            config.load_kube_config(client_configuration=configuration)
        configuration.connection_pool_maxsize = CONNECTIONS
        return cls(client.ApiClient(configuration), field_manager)

    @classmethod
    def from_kubeconfig(cls, path: str, field_manager: str = "kubetune-operator") -> Kube:
        configuration = client.Configuration()
        config.load_kube_config(config_file=path, client_configuration=configuration)
        configuration.connection_pool_maxsize = CONNECTIONS
        return cls(client.ApiClient(configuration), field_manager)

    def request(
        self,
        method: str,
        url: str,
        body: Any = None,
        query: dict[str, str] | None = None,
        content_type: str = "application/json",
    ) -> dict[str, Any]:
        headers = {"Accept": "application/json", "Content-Type": content_type}
        query_params = list((query or {}).items())
        method_, full_url, header_params, body_, _ = self.api.param_serialize(
            method, url, query_params=query_params, header_params=headers, body=body, auth_settings=["BearerToken"]
        )
        try:
            response = self.api.call_api(
                method_, full_url, header_params=header_params, body=body_, _request_timeout=30
            )
            response.read()
        except client.ApiException as err:
            raise _api_error(err.status or 0, err.reason or "", err.body) from None
        except urllib3.exceptions.HTTPError as err:
            # No answer (a timeout, a dropped connection): callers retry it like a refusal.
            raise ApiError(0, "Unreachable", f"{type(err).__name__}: {err}") from err
        data = response.data or b"{}"
        if not 200 <= response.status < 300:
            raise _api_error(response.status, response.reason or "", data)
        return json.loads(data) if data else {}

    # --- verbs -------------------------------------------------------------------------------------

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        """The object, or None when it does not exist."""
        try:
            return self.request("GET", path(kind, namespace, name))
        except ApiError as err:
            if err.not_found:
                return None
            raise

    def list(self, kind: str, namespace: str | None, selector: str | None = None) -> list[dict[str, Any]]:
        query = {"labelSelector": selector} if selector else None
        return list(self.request("GET", path(kind, namespace), query=query).get("items") or [])

    def apply(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """Server-side apply under the operator's field manager (conflicts forced: the operator owns them)."""
        meta = manifest["metadata"]
        return self.request(
            "PATCH",
            path(manifest["kind"], meta.get("namespace"), meta["name"]),
            body=manifest,
            query={"fieldManager": self.field_manager, "force": "true"},
            content_type="application/apply-patch+yaml",
        )

    def start_applies(self, manifests: Iterable[dict[str, Any]]) -> Callable[[], Sequence[dict[str, Any]]]:
        """Start applying manifests that do not depend on one another, concurrently (one round trip instead of
        one per manifest), and return at once a function that waits for them: it returns the applied objects in
        order, or raises the first error after all have been tried. The caller's own requests go out meanwhile."""
        futures = [self._appliers.submit(self.apply, m) for m in manifests]

        def wait() -> Sequence[dict[str, Any]]:
            errors = [err for f in futures if (err := f.exception()) is not None]
            if errors:
                raise errors[0]
            return [f.result() for f in futures]

        return wait

    def patch_status(self, kind: str, namespace: str, name: str, status: dict[str, Any]) -> dict[str, Any]:
        """JSON merge patch of the status subresource (other writers' fields are left alone)."""
        return self.request(
            "PATCH",
            path(kind, namespace, name, "status"),
            body={"status": status},
            content_type="application/merge-patch+json",
        )

    def delete(self, kind: str, namespace: str, name: str, propagation: str = "Background") -> None:
        try:
            self.request("DELETE", path(kind, namespace, name), body={"propagationPolicy": propagation})
        except ApiError as err:
            if not err.not_found:
                raise

    def create(self, manifest: dict[str, Any]) -> dict[str, Any]:
        meta = manifest["metadata"]
        return self.request("POST", path(manifest["kind"], meta.get("namespace")), body=manifest)


def _api_error(status: int, reason: str, body: Any) -> ApiError:
    message = body.decode() if isinstance(body, bytes) else str(body or "")
    with contextlib.suppress(ValueError, AttributeError):
        message = json.loads(message).get("message", message)
    return ApiError(status, reason, message)
