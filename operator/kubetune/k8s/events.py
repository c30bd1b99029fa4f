"""Kubernetes Events about kubetune objects (the user sees them in `kubectl describe`)."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from kubetune.api.v1alpha1 import API_VERSION
from kubetune.k8s.client import ApiError, Kube

log = logging.getLogger(__name__)
COMPONENT = "kubetune-operator"


def event_manifest(kind: str, obj_meta: dict[str, Any], type_: str, reason: str, message: str) -> dict[str, Any]:
    """A core/v1 Event about a kubetune object (pure)."""
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    name = obj_meta["name"]
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"generateName": f"{name}.", "namespace": obj_meta["namespace"]},
        "involvedObject": {
            "apiVersion": API_VERSION,
            "kind": kind,
            "name": name,
            "namespace": obj_meta["namespace"],
            "uid": obj_meta.get("uid", ""),
        },
        "type": type_,
        "reason": reason,
        "message": message[:1024],
        "source": {"component": COMPONENT},
        "reportingComponent": COMPONENT,
        "reportingInstance": COMPONENT,
        "firstTimestamp": now,
        "lastTimestamp": now,
        "eventTime": now,
        "action": reason,
        "count": 1,
    }


def post(kube: Kube, kind: str, obj_meta: dict[str, Any], type_: str, reason: str, message: str) -> None:
    """Post an Event; failures are logged, never raised (status carries the truth)."""
    manifest = event_manifest(kind, obj_meta, type_, reason, message)
    try:
        kube.request("POST", f"/api/v1/namespaces/{obj_meta['namespace']}/events", body=manifest)
    except ApiError as err:
        log.warning("could not post event %s for %s/%s: %s", reason, kind, obj_meta.get("name"), err)


def newest_message(kube: Kube, namespace: str, uid: str, reason: str) -> str | None:
    """The message of the newest Event with `reason` about the object with `uid` (e.g. a pod's FailedMount)."""
    found = kube.list("Event", namespace, fields=f"involvedObject.uid={uid},reason={reason}")
    found.sort(key=lambda e: e.get("lastTimestamp") or e.get("eventTime") or "")
    return str(found[-1].get("message") or "") if found else None
