"""Where the locations named in the API (pvc://, s3://, hf://, configmap://) appear inside pods.

The operator mounts each PersistentVolumeClaim at PVC_ROOT/<claim> and each ConfigMap dataset at
CONFIGMAP_ROOT/<name>; s3:// and hf:// are downloaded into CACHE_ROOT. The Secret of an s3:// location
(`s3.secretName`) is mounted at S3_SECRETS_ROOT/<name>. The trainer and the server resolve URIs with the
same functions, so the two sides agree on paths. `Access` says how an s3:// location is reached (s3.py
makes the client; the operator only passes the Secret's name on).
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

PVC_ROOT = "/mnt/pvc"
CONFIGMAP_ROOT = "/mnt/configmap"
CACHE_ROOT = "/var/cache/kubetune"
# The cache claim shared by jobs and servers (docs/cache.md): read-write in prepare pods and in a server's model
# init container, read-only in training pods and in vLLM.
SHARED_CACHE_ROOT = "/var/cache/kubetune-shared"
CONFIG_DIR = "/etc/kubetune"
SECRETS_ROOT = "/var/run/secrets/kubetune"
S3_SECRETS_ROOT = f"{SECRETS_ROOT}/s3"


@dataclass(frozen=True)
class Location:
    """A parsed URI: scheme, the first part (claim, bucket, ConfigMap, org) and the rest."""

    scheme: str
    root: str
    path: str
    revision: str | None = None

    @property
    def uri(self) -> str:
        rest = f"/{self.path}" if self.path else ""
        rev = f"@{self.revision}" if self.revision else ""
        return f"{self.scheme}://{self.root}{rest}{rev}"


@dataclass(frozen=True)
class Access:
    """How to reach one s3:// location: the API's `s3` block (empty strings: unset)."""

    secret_name: str = ""
    endpoint: str = ""
    region: str = ""

    @classmethod
    def of(cls, block: Any) -> Access:
        """From an API `S3Access` model, its wire dict (camelCase), or None."""
        if block is None:
            return cls()
        if isinstance(block, dict):
            return cls(block.get("secretName") or "", block.get("endpoint") or "", block.get("region") or "")
        return cls(block.secret_name or "", block.endpoint or "", block.region or "")

    def to_wire(self) -> dict[str, str]:
        wire = {"secretName": self.secret_name, "endpoint": self.endpoint, "region": self.region}
        return {k: v for k, v in wire.items() if v}


def parse(uri: str) -> Location:
    """Split `scheme://root/path[@revision]` (a revision is only meaningful for hf://)."""
    scheme, sep, rest = uri.partition("://")
    if not sep or not rest:
        raise ValueError(f"not a URI: {uri!r}")
    revision = None
    if scheme == "hf" and "@" in rest:
        rest, revision = rest.rsplit("@", 1)
    root, _, path = rest.partition("/")
    return Location(scheme=scheme, root=root, path=path.strip("/"), revision=revision)


def pvc_root() -> str:
    """PVC_ROOT, or $KUBETUNE_PVC_ROOT when running outside a pod (tests, local runs)."""
    return os.environ.get("KUBETUNE_PVC_ROOT", PVC_ROOT)


def local_path(uri: str) -> str:
    """The path at which a pvc:// or configmap:// location is visible inside a pod.

    A plain path (no scheme) is returned unchanged, which lets tests point at local directories.
    """
    if "://" not in uri:
        return uri
    loc = parse(uri)
    if loc.scheme == "pvc":
        return str(PurePosixPath(pvc_root(), loc.root, loc.path))
    if loc.scheme == "configmap":
        root = os.environ.get("KUBETUNE_CONFIGMAP_ROOT", CONFIGMAP_ROOT)
        return str(PurePosixPath(root, loc.root, loc.path))
    cache = os.environ.get("KUBETUNE_CACHE_ROOT", CACHE_ROOT)
    return str(PurePosixPath(cache, loc.scheme, loc.root, loc.path))


def s3_secret_dir(name: str) -> str:
    """Where the Secret `name` of an s3:// location is mounted ($KUBETUNE_S3_SECRETS_ROOT overrides the root)."""
    return str(PurePosixPath(os.environ.get("KUBETUNE_S3_SECRETS_ROOT", S3_SECRETS_ROOT), name))


def join(uri: str, *parts: str) -> str:
    """Append path parts to a URI (or plain path)."""
    base = uri.rstrip("/")
    return "/".join([base, *(p.strip("/") for p in parts)])


def entry_key(uri: str, revision: str | None = None, content: str = "") -> str:
    """The cache entry (docs/cache.md) of a URI at a revision (and, for data, a tag of its content): readable
    prefix, then a hash of all three, so that two URIs never share an entry. Here, not in trainer/cache.py, so
    that the operator can name the entry a server's vLLM reads."""
    digest = hashlib.sha256(f"{uri}@{revision or ''}#{content}".encode()).hexdigest()[:16]
    return f"{entry_slug(uri)}-{digest}"


def entry_slug(uri: str) -> str:
    """The readable prefix of a URI's cache entries."""
    return re.sub(r"[^a-z0-9]+", "-", uri.lower()).strip("-")[:48]


def cache_uri(uri: str) -> str:
    """The URI a cache entry is keyed by: an hf:// one without its revision, for the key holds the commit it names."""
    loc = parse(uri)
    return f"hf://{loc.root}/{loc.path}".rstrip("/") if loc.scheme == "hf" else uri


def model_entry_key(uri: str, commit: str | None = None) -> str:
    """The cache entry of a base model, as the prepare step keys it: an s3:// URI and its revision; an hf:// one
    (without its revision) and the `commit` that revision named when it was resolved."""
    return entry_key(cache_uri(uri), commit) if parse(uri).scheme == "hf" else entry_key(uri, parse(uri).revision)


def model_entries(uri: str) -> str:
    """The cache entries a server on base model `uri` may read, as a key or (hf://: any commit of the repository,
    whose commit only the pod resolves) a glob pattern of keys. A pattern may also match a repository whose name
    extends this one's: such an entry is kept from eviction too, never read."""
    if parse(uri).scheme == "hf":
        return f"{entry_slug(cache_uri(uri))}-*"
    return model_entry_key(uri)


def cached_model_dir(uri: str) -> str:
    """Where a pod that mounts the cache claim finds the base model `uri`, once cached."""
    return str(PurePosixPath(SHARED_CACHE_ROOT, "entries", model_entry_key(uri), "model"))
