"""Names, labels, owner references and storage volumes shared by every child the operator creates."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from kubetune.api.v1alpha1 import API_VERSION, KubeModel
from kubetune.storage import CACHE_ROOT, CONFIGMAP_ROOT, PVC_ROOT, S3_SECRETS_ROOT, SHARED_CACHE_ROOT, parse

MANAGED_BY = "kubetune-operator"
LABEL_FINETUNEJOB = "kubetune.io/finetunejob"
LABEL_MODELSERVER = "kubetune.io/modelserver"
LABEL_COMPONENT = "app.kubernetes.io/component"
ANNOTATION_SPEC_HASH = "kubetune.io/spec-hash"

Manifest = dict[str, Any]


def labels(kind_label: str, name: str, component: str) -> dict[str, str]:
    """The app.kubernetes.io/* labels plus the owner's name label (used to find children)."""
    return {
        "app.kubernetes.io/name": f"kubetune-{component}",
        "app.kubernetes.io/instance": name,
        LABEL_COMPONENT: component,
        "app.kubernetes.io/part-of": "kubetune",
        "app.kubernetes.io/managed-by": MANAGED_BY,
        kind_label: name,
    }


def owner_reference(owner: KubeModel) -> dict[str, Any]:
    """A controller ownerReference to a FineTuneJob or ModelServer: garbage collection cleans up."""
    meta = owner.metadata  # type: ignore[attr-defined]
    return {
        "apiVersion": API_VERSION,
        "kind": owner.kind,  # type: ignore[attr-defined]
        "name": meta.name,
        "uid": meta.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def metadata(name: str, namespace: str, owner: KubeModel, child_labels: dict[str, str]) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": namespace,
        "labels": child_labels,
        "ownerReferences": [owner_reference(owner)],
    }


def content_hash(value: Any) -> str:
    """A short stable hash of a JSON-serialisable value (to detect spec changes of children)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def volume_name(prefix: str, name: str) -> str:
    """A DNS-label volume name derived from a claim or ConfigMap name."""
    cleaned = re.sub(r"[^a-z0-9-]", "-", name.lower())
    full = f"{prefix}-{cleaned}"
    if len(full) <= 63:
        return full
    return f"{full[:54]}-{content_hash(name)[:8]}"


def secured(pod_spec: Manifest, pod_context: dict[str, Any], container_context: dict[str, Any]) -> Manifest:
    """The pod spec with the installation's security contexts on the pod and on every (init) container."""
    for container in [*pod_spec.get("initContainers", []), *pod_spec["containers"]]:
        if container_context:
            container["securityContext"] = dict(container_context)
    if pod_context:
        pod_spec["securityContext"] = dict(pod_context)
    return pod_spec


@dataclass
class PodParts:
    """Pieces of a pod spec that several concerns contribute to, combined with `+`."""

    env: list[Manifest] = field(default_factory=list)
    volumes: list[Manifest] = field(default_factory=list)
    mounts: list[Manifest] = field(default_factory=list)

    def __add__(self, other: PodParts) -> PodParts:
        return PodParts(self.env + other.env, self.volumes + other.volumes, self.mounts + other.mounts)


def storage_parts(uris: list[tuple[str, bool]]) -> PodParts:
    """Volumes and mounts for the pvc:// and configmap:// locations among `uris`.

    Each entry is (uri, writable). A claim used by several URIs is mounted once, writable if any use
    needs it. hf:// and s3:// need no volume (they are downloaded into the cache volume).
    """
    claims: dict[str, bool] = {}
    configmaps: set[str] = set()
    for uri, writable in uris:
        loc = parse(uri)
        if loc.scheme == "pvc":
            claims[loc.root] = claims.get(loc.root, False) or writable
        elif loc.scheme == "configmap":
            configmaps.add(loc.root)
    parts = PodParts()
    for claim, writable in sorted(claims.items()):
        vname = volume_name("pvc", claim)
        parts.volumes.append({"name": vname, "persistentVolumeClaim": {"claimName": claim, "readOnly": not writable}})
        parts.mounts.append({"name": vname, "mountPath": f"{PVC_ROOT}/{claim}", "readOnly": not writable})
    for cm in sorted(configmaps):
        vname = volume_name("cm", cm)
        parts.volumes.append({"name": vname, "configMap": {"name": cm}})
        parts.mounts.append({"name": vname, "mountPath": f"{CONFIGMAP_ROOT}/{cm}", "readOnly": True})
    return parts


def cache_and_shm_parts() -> PodParts:
    """/dev/shm (NCCL and dataloaders need more than the container default) and the download cache."""
    return PodParts(
        env=[{"name": "HF_HOME", "value": f"{CACHE_ROOT}/hf"}],
        volumes=[{"name": "dshm", "emptyDir": {"medium": "Memory"}}, {"name": "cache", "emptyDir": {}}],
        mounts=[{"name": "dshm", "mountPath": "/dev/shm"}, {"name": "cache", "mountPath": CACHE_ROOT}],
    )


def cache_parts(claim: str | None, writable: bool) -> PodParts:
    """The shared model and dataset cache (docs/cache.md): the claim at SHARED_CACHE_ROOT, writable only for the
    prepare step; nothing without a claim."""
    if not claim:
        return PodParts()
    volume = {"name": "shared-cache", "persistentVolumeClaim": {"claimName": claim, "readOnly": not writable}}
    mount = {"name": "shared-cache", "mountPath": SHARED_CACHE_ROOT, "readOnly": not writable}
    return PodParts(
        env=[{"name": "KUBETUNE_SHARED_CACHE", "value": SHARED_CACHE_ROOT}], volumes=[volume], mounts=[mount]
    )


def credential_parts(uri: str, secret: Any | None) -> PodParts:
    """HF_TOKEN from the secret of an hf:// location (s3:// credentials come from `s3_secret_parts`)."""
    if secret is None or parse(uri).scheme != "hf":
        return PodParts()
    return PodParts(env=[{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": secret.name, "key": secret.key}}}])


def s3_secret_parts(secret_names: Iterable[str | None], optional: bool = False) -> PodParts:
    """The Secrets of s3:// locations, each mounted whole at S3_SECRETS_ROOT/<name> (kubetune.s3 reads the
    files). `optional` lets the pod start without them (adapters that may arrive later)."""
    parts = PodParts()
    for name in sorted({n for n in secret_names if n}):
        vname = volume_name("s3", name)
        secret: Manifest = {"secretName": name, **({"optional": True} if optional else {})}
        parts.volumes.append({"name": vname, "secret": secret})
        parts.mounts.append({"name": vname, "mountPath": f"{S3_SECRETS_ROOT}/{name}", "readOnly": True})
    return parts


def merge_parts(parts: list[PodParts]) -> PodParts:
    """Sum of parts, with each volume and mount path kept once and the last definition of each variable."""
    total = sum(parts, PodParts())
    return PodParts(
        _unique_by(reversed(total.env), "name")[::-1],
        _unique_by(total.volumes, "name"),
        _unique_by(total.mounts, "mountPath"),
    )


def _unique_by(items: Iterable[Manifest], key: str) -> list[Manifest]:
    seen: set[str] = set()
    out = []
    for item in items:
        if item[key] not in seen:
            seen.add(item[key])
            out.append(item)
    return out


def user_env(env: list[Any]) -> list[Manifest]:
    """spec.env in container form."""
    out: list[Manifest] = []
    for var in env:
        if var.secret_key_ref is not None:
            ref = var.secret_key_ref
            out.append({"name": var.name, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}})
        else:
            out.append({"name": var.name, "value": var.value})
    return out


def resource_limits(gpus: int, cpu: int | str | None, memory: int | str | None) -> Manifest:
    """Requests = limits (Guaranteed QoS for GPU pods, so they are not the first to be evicted)."""
    limits: dict[str, Any] = {"nvidia.com/gpu": gpus}
    if cpu is not None:
        limits["cpu"] = cpu
    if memory is not None:
        limits["memory"] = memory
    return {"limits": limits, "requests": dict(limits)}
