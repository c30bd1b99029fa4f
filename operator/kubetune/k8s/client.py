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
from typing import Any, TypeVar
from urllib.parse import quote

import urllib3
from kubernetes import client, config

log = logging.getLogger(__name__)
T = TypeVar("T")

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
    "PersistentVolumeClaim": ("/api/v1", "persistentvolumeclaims"),
    "Pod": ("/api/v1", "pods"),
    "ResourceQuota": ("/api/v1", "resourcequotas"),
    "Secret": ("/api/v1", "secrets"),
    "Service": ("/api/v1", "services"),
    "ServiceAccount": ("/api/v1", "serviceaccounts"),
    "Deployment": ("/apis/apps/v1", "deployments"),
    "NetworkPolicy": ("/apis/networking.k8s.io/v1", "networkpolicies"),
    "ScaledObject": ("/apis/keda.sh/v1alpha1", "scaledobjects"),
    "Job": ("/apis/batch/v1", "jobs"),
    "Lease": ("/apis/coordination.k8s.io/v1", "leases"),
    "Role": ("/apis/rbac.authorization.k8s.io/v1", "roles"),
    "RoleBinding": ("/apis/rbac.authorization.k8s.io/v1", "rolebindings"),
    "FineTuneJob": ("/apis/kubetune.io/v1alpha1", "finetunejobs"),
    "ModelServer": ("/apis/kubetune.io/v1alpha1", "modelservers"),
    "Workload": ("/apis/kueue.x-k8s.io/v1beta2", "workloads"),
}


class ApiError(Exception):
    """An error response of the API server."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message
        self.subject = ""
        """The object the request wrote, e.g. "ConfigMap sft-trainer", when the caller knows it."""

    @property
    def not_found(self) -> bool:
        return self.status == 404

    @property
    def already_exists(self) -> bool:
        return self.status == 409 and self.reason == "AlreadyExists"

    @property
    def namespace_terminating(self) -> bool:
        """Refused because the namespace is being deleted (its objects, the owner included, go with it)."""
        return self.status == 403 and "being terminated" in self.message

    @property
    def transient(self) -> bool:
        """No answer, too many requests, or a server error: the same request may succeed later. Anything else
        (invalid, forbidden, a quota, a webhook's refusal) needs someone to act."""
        return self.status in (0, 429) or self.status >= 500


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
        headers: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        headers = {"Accept": "application/json", "Content-Type": content_type, **(headers or {})}
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

    def list(
        self, kind: str, namespace: str | None, selector: str | None = None, fields: str | None = None
    ) -> list[dict[str, Any]]:
        query = {k: v for k, v in (("labelSelector", selector), ("fieldSelector", fields)) if v}
        return list(self.request("GET", path(kind, namespace), query=query or None).get("items") or [])

    def apply(self, manifest: dict[str, Any], uid: str | None = None) -> dict[str, Any]:
        """Server-side apply under the operator's field manager (conflicts forced: the operator owns them).

        With `uid`, only onto that very object: the API server refuses (409) when the object now there is
        another one, or none."""
        meta = manifest["metadata"]
        body = {**manifest, "metadata": {**meta, "uid": uid}} if uid else manifest
        return self.request(
            "PATCH",
            path(manifest["kind"], meta.get("namespace"), meta["name"]),
            body=body,
            query={"fieldManager": self.field_manager, "force": "true"},
            content_type="application/apply-patch+yaml",
        )

    def start_all(self, calls: Iterable[Callable[[], T]]) -> Callable[[], tuple[Sequence[T], Sequence[Exception]]]:
        """Start requests that do not depend on one another concurrently (one round trip instead of one each) and
        return at once a function that waits for all of them: (results in order, errors). The caller's own
        requests go out meanwhile."""
        futures = [self._appliers.submit(call) for call in calls]

        def wait() -> tuple[Sequence[T], Sequence[Exception]]:
            errors = [err for f in futures if isinstance(err := f.exception(), Exception)]
            return ([] if errors else [f.result() for f in futures]), errors

        return wait

    def rename_created_entry(
        self,
        kind: str,
        namespace: str,
        name: str,
        uid: str,
        entry: int,
        fields: tuple[dict[str, Any], dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        """Turn this field manager's Update entry (number `entry` of managedFields; an object it created by POST)
        into an Apply entry, so that server-side apply owns, and can remove, every field the POST set. With
        `fields` (the entry's fieldsV1 as read, and what it becomes) the entry also gives up fields that apply
        must not own. The patch tests the object's uid and the entry first (422 when either changed)."""
        at = f"/metadata/managedFields/{entry}"
        ops: list[dict[str, Any]] = [
            {"op": "test", "path": "/metadata/uid", "value": uid},
            {"op": "test", "path": f"{at}/manager", "value": self.field_manager},
            {"op": "test", "path": f"{at}/operation", "value": "Update"},
            {"op": "replace", "path": f"{at}/operation", "value": "Apply"},
        ]
        if fields is not None and fields[0] != fields[1]:
            ops[3:3] = [{"op": "test", "path": f"{at}/fieldsV1", "value": fields[0]}]
            ops.append({"op": "replace", "path": f"{at}/fieldsV1", "value": fields[1]})
        return self.request("PATCH", path(kind, namespace, name), body=ops, content_type="application/json-patch+json")

    def patch_status(self, kind: str, namespace: str, name: str, status: dict[str, Any]) -> dict[str, Any]:
        """JSON merge patch of the status subresource (other writers' fields are left alone)."""
        return self.request(
            "PATCH",
            path(kind, namespace, name, "status"),
            body={"status": status},
            content_type="application/merge-patch+json",
        )

    def delete(
        self, kind: str, namespace: str, name: str, propagation: str = "Background", uid: str | None = None
    ) -> None:
        """Delete the object (with `uid`: only that very object); gone already is fine."""
        body: dict[str, Any] = {"propagationPolicy": propagation}
        if uid:
            body["preconditions"] = {"uid": uid}
        try:
            self.request("DELETE", path(kind, namespace, name), body=body)
        except ApiError as err:
            if not err.not_found:
                raise

    def replace(self, obj: dict[str, Any]) -> dict[str, Any]:
        """PUT the whole object; 409 Conflict when its metadata.resourceVersion is no longer the stored one."""
        meta = obj["metadata"]
        return self.request("PUT", path(obj["kind"], meta.get("namespace"), meta["name"]), body=obj)

    def set_pod_condition(self, namespace: str, name: str, uid: str, condition: dict[str, Any]) -> dict[str, Any]:
        """Add or replace one condition of a pod's status (a strategic merge by type: the kubelet's stay), on that
        very pod (its uid in the patch: another pod of the same name is refused)."""
        body = {"metadata": {"uid": uid}, "status": {"conditions": [condition]}}
        return self.request(
            "PATCH",
            path("Pod", namespace, name, "status"),
            body=body,
            content_type="application/strategic-merge-patch+json",
        )

    def create(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """Create the object; ApiError 409 AlreadyExists when the name is taken (nothing is overwritten)."""
        meta = manifest["metadata"]
        query = {"fieldManager": self.field_manager}
        return self.request("POST", path(manifest["kind"], meta.get("namespace")), body=manifest, query=query)


def _api_error(status: int, reason: str, body: Any) -> ApiError:
    """The error of a response: the Status object's machine-readable reason (AlreadyExists, Conflict, Invalid,
    Forbidden...) and message when the body is one."""
    message = body.decode() if isinstance(body, bytes) else str(body or "")
    with contextlib.suppress(ValueError, AttributeError):
        parsed = json.loads(message)
        reason = parsed.get("reason") or reason
        message = parsed.get("message", message)
    return ApiError(status, reason, message)
