"""Pod networking of the dev agent: one loopback address per pod, and each pod's /etc/hosts.

There is no network isolation and no kube-proxy. Every pod gets its own 127.x.y.z (all of 127/8 is
loopback on Linux), and names resolve through a per-pod /etc/hosts: the pod's own hostname, the
``<hostname>.<subdomain>.<namespace>.svc`` names of the pods on this node, and ``<service>.<namespace>.svc``
mapped to ONE ready pod that the Service selects (ports are the pod's own, so targetPort must equal port).
"""

from __future__ import annotations

import ipaddress
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

LOOPBACK = ipaddress.ip_network("127.0.0.0/8")
CLUSTER_DOMAIN = "cluster.local"


class IpAllocator:
    """Hands out the addresses of a loopback network, one per key (a pod UID).

    Allocation goes round the range from the last address given, so an address freed by a pod that is
    gone comes back only after all others were used. Thread-safe.
    """

    def __init__(self, cidr: str) -> None:
        network = ipaddress.ip_network(cidr)
        if not network.subnet_of(LOOPBACK):  # type: ignore[arg-type]
            raise ValueError(f"{cidr} is not inside 127.0.0.0/8")
        self._first = int(network.network_address) + 1
        self._size = max(network.num_addresses - 2, 1)
        self._cursor = 0
        self._by_key: dict[str, str] = {}
        self._used: set[str] = set()
        self._lock = threading.Lock()

    def allocate(self, key: str) -> str:
        """The address of ``key``, newly allocated unless it has one."""
        with self._lock:
            if key in self._by_key:
                return self._by_key[key]
            for step in range(self._size):
                offset = (self._cursor + step) % self._size
                address = str(ipaddress.ip_address(self._first + offset))
                if address in self._used or address.endswith((".0", ".255")) or address == "127.0.0.1":
                    continue
                self._cursor = offset + 1
                self._by_key[key] = address
                self._used.add(address)
                return address
        raise RuntimeError("no free pod address left")

    def reserve(self, key: str, address: str) -> None:
        """Mark ``address`` as taken by ``key`` (a pod left from an earlier agent run)."""
        with self._lock:
            self._by_key[key] = address
            self._used.add(address)

    def release(self, key: str) -> None:
        """Free the address of ``key`` (its pod is gone)."""
        with self._lock:
            address = self._by_key.pop(key, None)
            if address is not None:
                self._used.discard(address)

    def address_of(self, key: str) -> str | None:
        with self._lock:
            return self._by_key.get(key)


@dataclass(frozen=True)
class PodRecord:
    """A pod on this node as name resolution sees it."""

    namespace: str
    name: str
    ip: str
    hostname: str
    subdomain: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    ready: bool = False
    created: str = ""


@dataclass(frozen=True)
class ServiceRecord:
    """A Service that selects pods by label."""

    namespace: str
    name: str
    selector: Mapping[str, str]
    publish_not_ready: bool = False


def pod_hostname(pod: Mapping[str, object]) -> tuple[str, str]:
    """(hostname, subdomain) of a pod: spec.hostname or the name (at most 63 characters)."""
    spec = pod.get("spec") or {}
    meta = pod.get("metadata") or {}
    assert isinstance(spec, Mapping) and isinstance(meta, Mapping)
    hostname = str(spec.get("hostname") or meta.get("name") or "")[:63].rstrip("-.")
    return hostname, str(spec.get("subdomain") or "")


def service_addresses(services: Iterable[ServiceRecord], pods: Sequence[PodRecord]) -> dict[tuple[str, str], str]:
    """(namespace, service) -> the IP of one pod it selects: a ready one first, then the oldest."""
    out: dict[tuple[str, str], str] = {}
    for service in services:
        if not service.selector:
            continue
        chosen = [
            pod
            for pod in pods
            if pod.namespace == service.namespace
            and (pod.ready or service.publish_not_ready)
            and all(pod.labels.get(key) == value for key, value in service.selector.items())
        ]
        if chosen:
            best = min(chosen, key=lambda pod: (not pod.ready, pod.created, pod.name))
            out[(service.namespace, service.name)] = best.ip
    return out


def _names(namespace: str, parts: Sequence[str], own_namespace: str) -> list[str]:
    """``a.b.<ns>.svc.cluster.local``, ``a.b.<ns>.svc``, ``a.b.<ns>`` and, inside the namespace, ``a.b``."""
    short = ".".join(parts)
    names = [f"{short}.{namespace}.svc.{CLUSTER_DOMAIN}", f"{short}.{namespace}.svc", f"{short}.{namespace}"]
    if namespace == own_namespace:
        names.append(short)
    return names


def render_hosts(
    pod: PodRecord,
    pods: Sequence[PodRecord],
    services: Mapping[tuple[str, str], str],
    host_aliases: Sequence[Mapping[str, object]] = (),
    api_host: str | None = None,
) -> str:
    """The /etc/hosts of ``pod``: localhost, itself, its aliases, peer pod names, then Service names."""
    lines = [
        "# /etc/hosts of a pod, written by the kubetune dev agent (docs/dev-cluster.md)",
        "127.0.0.1\tlocalhost",
        "::1\tlocalhost ip6-localhost ip6-loopback",
    ]
    seen: set[str] = {"localhost"}

    def add(ip: str, names: Iterable[str]) -> None:
        fresh = [name for name in dict.fromkeys(names) if name and name not in seen]
        seen.update(fresh)
        if fresh:
            lines.append(f"{ip}\t{' '.join(fresh)}")

    own = [pod.hostname]
    if pod.subdomain:
        names = _names(pod.namespace, [pod.hostname, pod.subdomain], pod.namespace)
        own = [names[0], pod.hostname, *names[1:]]
    add(pod.ip, own)
    for alias in host_aliases:
        hostnames = alias.get("hostnames")
        add(str(alias.get("ip", "")), [str(h) for h in hostnames] if isinstance(hostnames, list) else [])
    for peer in sorted(pods, key=lambda p: (p.namespace, p.hostname)):
        if peer.subdomain:
            add(peer.ip, _names(peer.namespace, [peer.hostname, peer.subdomain], pod.namespace))
    if api_host:
        add(api_host, _names("default", ["kubernetes"], pod.namespace))
    for (namespace, name), ip in sorted(services.items()):
        add(ip, _names(namespace, [name], pod.namespace))
    return "\n".join(lines) + "\n"
