"""A container's environment and command line, resolved as a kubelet does (pure functions).

Order: the agent's base variables, then ``envFrom`` sources in order, then ``env`` entries in order; a
later definition wins, and ``$(VAR)`` in a value refers to what is defined before it. ``$(VAR)`` in
command and args refers to the final environment; ``$$`` escapes a ``$``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from kubetune.dev.agent.quantity import ceil_divide

ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
SUBSCRIPT = re.compile(r"^metadata\.(labels|annotations)\['(.+)'\]$")
ANY_ADDRESSES = ("0.0.0.0", "::", "[::]")


class ConfigError(Exception):
    """The container cannot be configured yet (missing ConfigMap, Secret or key): CreateContainerConfigError."""


class Lookup(Protocol):
    """Where ConfigMaps and Secrets come from (the API server, or a dict in tests)."""

    def config_map(self, namespace: str, name: str) -> dict[str, str] | None: ...

    def secret(self, namespace: str, name: str) -> dict[str, str] | None:
        """The Secret's data, decoded to text; None when it does not exist."""
        ...


@dataclass(frozen=True)
class PodFacts:
    """What the downward API can see of a pod on this node."""

    pod: dict[str, Any]
    pod_ip: str
    host_ip: str
    allocatable: Mapping[str, str] = field(default_factory=dict)

    @property
    def namespace(self) -> str:
        return str(self.pod["metadata"].get("namespace") or "default")


def expand(text: str, env: Mapping[str, str]) -> str:
    """Replace ``$(VAR)`` with its value when VAR is defined (else keep it); ``$$`` becomes ``$``."""
    out: list[str] = []
    i = 0
    while i < len(text):
        if text.startswith("$$", i):
            out.append("$")
            i += 2
            continue
        if text.startswith("$(", i):
            end = text.find(")", i + 2)
            if end != -1:
                name = text[i + 2 : end]
                out.append(env[name] if name in env else text[i : end + 1])
                i = end + 1
                continue
        out.append(text[i])
        i += 1
    return "".join(out)


def format_map(values: Mapping[str, str]) -> str:
    """Labels or annotations as the downward API volume writes them: ``key="value"`` lines, sorted."""
    return "\n".join(f"{key}={json.dumps(values[key])}" for key in sorted(values))


def field_value(facts: PodFacts, path: str) -> str:
    """The value of a ``fieldRef.fieldPath``; ConfigError for a path the agent does not know."""
    meta, spec = facts.pod["metadata"], facts.pod.get("spec") or {}
    simple: dict[str, Any] = {
        "metadata.name": meta.get("name"),
        "metadata.namespace": facts.namespace,
        "metadata.uid": meta.get("uid"),
        "metadata.labels": format_map(meta.get("labels") or {}),
        "metadata.annotations": format_map(meta.get("annotations") or {}),
        "spec.nodeName": spec.get("nodeName"),
        "spec.serviceAccountName": spec.get("serviceAccountName") or "default",
        "status.podIP": facts.pod_ip,
        "status.podIPs": facts.pod_ip,
        "status.hostIP": facts.host_ip,
        "status.hostIPs": facts.host_ip,
    }
    if path in simple:
        return str(simple[path] or "")
    match = SUBSCRIPT.match(path)
    if match:
        return str((meta.get(match.group(1)) or {}).get(match.group(2), ""))
    raise ConfigError(f"unsupported fieldPath {path!r}")


def resource_value(container: Mapping[str, Any], ref: Mapping[str, Any], allocatable: Mapping[str, str]) -> str:
    """A ``resourceFieldRef``: the container's limit (else request, else the node's allocatable), rounded up."""
    kind, _, name = str(ref.get("resource", "")).partition(".")
    if kind not in ("limits", "requests") or not name:
        raise ConfigError(f"unsupported resource {ref.get('resource')!r}")
    resources = container.get("resources") or {}
    other = "requests" if kind == "limits" else "limits"
    value = (resources.get(kind) or {}).get(name) or (resources.get(other) or {}).get(name) or allocatable.get(name)
    if value is None:
        return "0"
    return str(ceil_divide(value, ref.get("divisor") or "1"))


def _source_data(lookup: Lookup, namespace: str, kind: str, name: str) -> dict[str, str] | None:
    return lookup.config_map(namespace, name) if kind == "configMap" else lookup.secret(namespace, name)


def _key_ref(lookup: Lookup, namespace: str, kind: str, ref: Mapping[str, Any]) -> str | None:
    """The value of a configMapKeyRef/secretKeyRef; None when optional and missing."""
    data = _source_data(lookup, namespace, kind, str(ref.get("name", "")))
    label = "ConfigMap" if kind == "configMap" else "Secret"
    if data is None or ref.get("key") not in data:
        if ref.get("optional"):
            return None
        what = f'{label} "{ref.get("name")}"' + ("" if data is None else f' has no key "{ref.get("key")}"')
        raise ConfigError(f"{what} not found" if data is None else what)
    return data[str(ref["key"])]


def var_value(
    var: Mapping[str, Any], container: Mapping[str, Any], facts: PodFacts, lookup: Lookup, env: Mapping[str, str]
) -> str | None:
    """One ``env`` entry's value (None: an optional source is missing, so the variable stays unset)."""
    if "valueFrom" not in var:
        return expand(str(var.get("value") or ""), env)
    source = var["valueFrom"]
    if "fieldRef" in source:
        return field_value(facts, source["fieldRef"]["fieldPath"])
    if "resourceFieldRef" in source:
        return resource_value(container, source["resourceFieldRef"], facts.allocatable)
    if "configMapKeyRef" in source:
        return _key_ref(lookup, facts.namespace, "configMap", source["configMapKeyRef"])
    if "secretKeyRef" in source:
        return _key_ref(lookup, facts.namespace, "secret", source["secretKeyRef"])
    raise ConfigError(f"unsupported valueFrom in {var.get('name')!r}: {sorted(source)}")


def container_env(
    container: Mapping[str, Any], facts: PodFacts, lookup: Lookup, base: Mapping[str, str]
) -> dict[str, str]:
    """The full environment of a container; ConfigError when a required source is missing."""
    env = dict(base)
    for source in container.get("envFrom") or []:
        kind = "configMap" if "configMapRef" in source else "secret"
        ref = source.get(f"{kind}Ref") or {}
        data = _source_data(lookup, facts.namespace, kind, str(ref.get("name", "")))
        if data is None:
            if ref.get("optional"):
                continue
            raise ConfigError(f'{"ConfigMap" if kind == "configMap" else "Secret"} "{ref.get("name")}" not found')
        prefix = str(source.get("prefix") or "")
        env.update({prefix + key: value for key, value in data.items() if ENV_NAME.match(prefix + key)})
    for var in container.get("env") or []:
        value = var_value(var, container, facts, lookup, env)
        if value is not None:
            env[str(var["name"])] = value
    return env


def container_argv(container: Mapping[str, Any], env: Mapping[str, str]) -> list[str]:
    """command + args with ``$(VAR)`` expanded. Images are ignored, so a container must name its command."""
    argv = [expand(str(part), env) for part in [*(container.get("command") or []), *(container.get("args") or [])]]
    if not argv:
        raise ConfigError("no command: the dev agent ignores images, so the container must set command or args")
    return argv


def bind_any_rewritten(argv: list[str], pod_ip: str) -> list[str]:
    """``--host 0.0.0.0`` (or ``::``, or ``--host=...``) rewritten to the pod IP, so that two pods on one
    machine can listen on the same port (a limitation of the dev agent: all pods share one network)."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg == "--host" and i + 1 < len(out) and out[i + 1] in ANY_ADDRESSES:
            out[i + 1] = pod_ip
        elif arg.startswith("--host=") and arg.partition("=")[2] in ANY_ADDRESSES:
            out[i] = f"--host={pod_ip}"
    return out


def pull_failure(image: str) -> str | None:
    """Why a kubelet could not pull `image`, for the one kind of reference that fails everywhere: a registry under
    the reserved .invalid domain (RFC 2606), which no resolver answers. None for any other image: the agent runs
    local processes and pulls nothing."""
    first, _, rest = image.partition("/")
    host = first.split(":", 1)[0] if rest and ("." in first or ":" in first) else ""
    if not host.endswith(".invalid"):
        return None
    return (
        f'failed to pull and unpack image "{image}": failed to resolve reference "{image}": '
        f'failed to do request: Head "https://{first}/v2/": dial tcp: lookup {host}: no such host'
    )
