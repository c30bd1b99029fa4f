"""A pod's volumes as local folders, and the bind mounts that show them at each container's mountPath.

configMap, secret, downwardAPI and projected volumes (the service-account token comes from the TokenRequest
API, bound to the pod) are written once when the pod starts, except tokens, which are renewed at 80% of
their life. emptyDir lives with the pod; a persistentVolumeClaim is one folder per namespace and claim
that outlives pods; hostPath is the host's own path.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from kubetune.dev.agent.env import ConfigError, PodFacts, expand, field_value, resource_value

DEFAULT_MODE = 0o644
TOKEN_SECONDS = 3600
SUPPORTED = ("configMap", "secret", "downwardAPI", "projected", "emptyDir", "persistentVolumeClaim", "hostPath")


class VolumeError(Exception):
    """A volume cannot be set up yet (a missing ConfigMap or Secret, an unsupported type): FailedMount."""


class VolumeSource(Protocol):
    """What volumes are read from (the API server)."""

    def config_map_bytes(self, namespace: str, name: str) -> dict[str, bytes] | None: ...

    def secret_bytes(self, namespace: str, name: str) -> dict[str, bytes] | None: ...

    def request_token(
        self, namespace: str, service_account: str, pod: dict[str, Any], audience: str | None, seconds: int
    ) -> tuple[str, str]: ...


@dataclass(frozen=True)
class Mount:
    """One bind mount of a container: a local folder or file shown at ``target``."""

    source: str
    target: str
    read_only: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {"source": self.source, "target": self.target, "readOnly": self.read_only}


@dataclass
class TokenFile:
    """A projected service-account token and when to renew it."""

    folder: Path
    relpath: str
    audience: str | None
    seconds: int
    mode: int
    renew_at: float = 0.0


def write_file(folder: Path, relpath: str, data: bytes, mode: int) -> None:
    """Write ``folder/relpath`` atomically (readers never see half a file) with ``mode``."""
    parts = Path(relpath).parts
    if not parts or Path(relpath).is_absolute() or ".." in parts:
        raise VolumeError(f"invalid file path {relpath!r} in a volume")
    path = folder.joinpath(*parts)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.chmod(mode)
    os.replace(tmp, path)


def selected_items(
    data: Mapping[str, bytes], items: list[dict[str, Any]] | None, default_mode: int, what: str, optional: bool
) -> list[tuple[str, bytes, int]]:
    """(path, content, mode) of each file of a ConfigMap or Secret volume; all keys when no items."""
    if not items:
        return [(key, value, default_mode) for key, value in data.items()]
    out = []
    for item in items:
        if item["key"] not in data:
            if optional:
                continue
            raise VolumeError(f'{what} has no key "{item["key"]}"')
        out.append((str(item["path"]), data[item["key"]], int(item.get("mode") or default_mode)))
    return out


def hiding_nothing(mounts: list[Mount], protected: list[Path]) -> list[Mount]:
    """The mounts, plus a bind mount of each protected folder (the agent's Python environment, the
    interpreter, the project, its state) onto itself where a volume would cover it: a real image never
    shares its filesystem with its host, but here an emptyDir on /tmp would hide a project cloned under /tmp.
    The bootstrap opens every source before mounting and mounts shallow targets first, so the folder shows
    through the volume as it is on the host."""
    covered = [
        path
        for path in protected
        if any(path == Path(m.target) or Path(m.target) in path.parents for m in mounts)
    ]
    return [*mounts, *(Mount(str(path), str(path)) for path in covered)]


class PodVolumes:
    """The volumes of one pod, materialised under ``<pod dir>/volumes``."""

    def __init__(self, source: VolumeSource, facts: PodFacts, pod_dir: Path, pvc_root: Path) -> None:
        self.source, self.facts = source, facts
        self.root = pod_dir / "volumes"
        self.pvc_root = pvc_root
        self.paths: dict[str, Path] = {}
        self.read_only: set[str] = set()
        self.tokens: list[TokenFile] = []

    @property
    def pod(self) -> dict[str, Any]:
        return self.facts.pod

    @property
    def namespace(self) -> str:
        return self.facts.namespace

    def prepare(self) -> None:
        """Materialise every volume; VolumeError when one cannot be set up yet (call again later)."""
        self.tokens.clear()
        for volume in (self.pod.get("spec") or {}).get("volumes") or []:
            self.paths[volume["name"]] = self.materialise(volume)
        self.refresh_tokens(force=True)

    def materialise(self, volume: dict[str, Any]) -> Path:
        name = volume["name"]
        kind = next((k for k in SUPPORTED if k in volume), None)
        folder = self.root / name
        if kind is None:
            types = sorted(k for k in volume if k != "name")
            raise VolumeError(f"volume {name!r}: type {types} is not supported by the dev agent")
        if kind == "persistentVolumeClaim":
            claim = volume[kind]
            folder = self.pvc_root / self.namespace / str(claim["claimName"])
            if claim.get("readOnly"):
                self.read_only.add(name)
        elif kind == "hostPath":
            return self.host_path(volume[kind])
        folder.mkdir(parents=True, exist_ok=True)
        mode = int(volume[kind].get("defaultMode") or DEFAULT_MODE) if isinstance(volume[kind], dict) else DEFAULT_MODE
        if kind in ("configMap", "secret"):
            self.write_object(folder, kind, volume[kind], mode)
        elif kind == "downwardAPI":
            self.write_downward(folder, volume[kind].get("items") or [], mode)
        elif kind == "projected":
            for source in volume[kind].get("sources") or []:
                self.write_projection(folder, source, mode)
        return folder

    def host_path(self, spec: dict[str, Any]) -> Path:
        path = Path(spec["path"])
        type_ = spec.get("type") or ""
        if type_ in ("", "DirectoryOrCreate") and not path.exists():
            path.mkdir(parents=True, exist_ok=True)
        elif type_ == "FileOrCreate" and not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()
        elif type_ in ("Directory", "File") and not path.exists():
            raise VolumeError(f"hostPath {path} does not exist")
        return path

    def write_object(self, folder: Path, kind: str, spec: dict[str, Any], mode: int) -> None:
        """A ConfigMap or Secret volume (or projection): its keys (or the listed items) as files."""
        name = str(spec.get("name") or spec.get("secretName") or "")
        label = f'ConfigMap "{name}"' if kind == "configMap" else f'Secret "{name}"'
        if kind == "configMap":
            data = self.source.config_map_bytes(self.namespace, name)
        else:
            data = self.source.secret_bytes(self.namespace, name)
        if data is None:
            if spec.get("optional"):
                return
            raise VolumeError(f"{label} not found")
        optional = bool(spec.get("optional"))
        for relpath, content, file_mode in selected_items(data, spec.get("items"), mode, label, optional):
            write_file(folder, relpath, content, file_mode)

    def write_downward(self, folder: Path, items: list[dict[str, Any]], mode: int) -> None:
        containers = {c["name"]: c for c in self.pod["spec"].get("containers") or []}
        for item in items:
            try:
                if "fieldRef" in item:
                    value = field_value(self.facts, item["fieldRef"]["fieldPath"])
                else:
                    ref = item["resourceFieldRef"]
                    container = containers.get(ref.get("containerName")) or {}
                    value = resource_value(container, ref, self.facts.allocatable)
            except (ConfigError, KeyError) as error:
                raise VolumeError(f"downwardAPI item {item.get('path')!r}: {error}") from error
            write_file(folder, str(item["path"]), value.encode(), int(item.get("mode") or mode))

    def write_projection(self, folder: Path, source: dict[str, Any], mode: int) -> None:
        if "serviceAccountToken" in source:
            spec = source["serviceAccountToken"]
            seconds = int(spec.get("expirationSeconds") or TOKEN_SECONDS)
            self.tokens.append(TokenFile(folder, str(spec["path"]), spec.get("audience") or None, seconds, mode))
        elif "configMap" in source or "secret" in source:
            kind = "configMap" if "configMap" in source else "secret"
            self.write_object(folder, kind, source[kind], mode)
        elif "downwardAPI" in source:
            self.write_downward(folder, source["downwardAPI"].get("items") or [], mode)
        else:
            raise VolumeError(f"projected source {sorted(source)} is not supported by the dev agent")

    def refresh_tokens(self, force: bool = False) -> float | None:
        """Renew the tokens that are due (all with ``force``); the monotonic time the next one is due."""
        service_account = str(self.pod["spec"].get("serviceAccountName") or "default")
        now = time.monotonic()
        for token in self.tokens:
            if force or now >= token.renew_at:
                try:
                    value, _ = self.source.request_token(
                        self.namespace, service_account, self.pod, token.audience, token.seconds
                    )
                except Exception as error:
                    raise VolumeError(f"token for ServiceAccount {service_account!r}: {error}") from error
                write_file(token.folder, token.relpath, value.encode(), token.mode)
                token.renew_at = now + 0.8 * token.seconds
        return min((t.renew_at for t in self.tokens), default=None)

    def mounts(self, container: dict[str, Any], env: Mapping[str, str]) -> list[Mount]:
        """The container's volumeMounts as bind mounts (subPath and subPathExpr included)."""
        out = []
        for mount in container.get("volumeMounts") or []:
            name = mount["name"]
            if name not in self.paths:
                raise VolumeError(f"volumeMount {name!r} names no volume of the pod")
            source = self.paths[name]
            sub = mount.get("subPath") or (expand(mount["subPathExpr"], env) if mount.get("subPathExpr") else "")
            if sub:
                if ".." in Path(sub).parts or Path(sub).is_absolute():
                    raise VolumeError(f"invalid subPath {sub!r}")
                source = source / sub
                if not source.exists():
                    source.mkdir(parents=True)
            read_only = bool(mount.get("readOnly")) or name in self.read_only
            out.append(Mount(str(source), str(mount["mountPath"]), read_only))
        return out
