"""Startup, readiness and liveness probes: httpGet, tcpSocket and exec (inside the container's namespaces)."""

from __future__ import annotations

import http.client
import socket
import ssl
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ProbeTracker:
    """One probe of one container run: when it is due, and its result after the thresholds.

    ``result`` is None until enough probes agree: successThreshold successes make it True,
    failureThreshold failures make it False.
    """

    kind: str
    spec: Mapping[str, Any]
    next_at: float = 0.0
    result: bool | None = None
    successes: int = 0
    failures: int = 0
    last_message: str = ""

    @classmethod
    def start(cls, kind: str, spec: Mapping[str, Any], now: float) -> ProbeTracker:
        return cls(kind, spec, next_at=now + float(spec.get("initialDelaySeconds") or 0))

    @property
    def period(self) -> float:
        return float(self.spec.get("periodSeconds") or 10)

    @property
    def timeout(self) -> float:
        return float(self.spec.get("timeoutSeconds") or 1)

    def record(self, ok: bool, now: float, message: str = "") -> bool:
        """Count one probe; True when the result changed."""
        self.next_at = now + self.period
        self.last_message = message
        new: bool | None = None
        if ok:
            self.successes, self.failures = self.successes + 1, 0
            if self.successes >= int(self.spec.get("successThreshold") or 1):
                new = True
        else:
            self.failures, self.successes = self.failures + 1, 0
            if self.failures >= int(self.spec.get("failureThreshold") or 3):
                new = False
        changed = new is not None and new != self.result
        if new is not None:
            self.result = new
        return changed


@dataclass(frozen=True)
class ProbeTarget:
    """Where a container can be probed."""

    pod_ip: str
    ports: Mapping[str, int] = field(default_factory=dict)
    env: Mapping[str, str] = field(default_factory=dict)
    pid: int | None = None


def resolve_port(port: Any, ports: Mapping[str, int]) -> int:
    """A probe's port: a number, or the name of one of the container's ports."""
    if isinstance(port, int) or str(port).isdigit():
        return int(port)
    if str(port) in ports:
        return ports[str(port)]
    raise ValueError(f"unknown port name {port!r}")


def container_ports(container: Mapping[str, Any]) -> dict[str, int]:
    """Named container ports."""
    return {str(p["name"]): int(p["containerPort"]) for p in container.get("ports") or [] if p.get("name")}


def http_get(action: Mapping[str, Any], target: ProbeTarget, timeout: float) -> tuple[bool, str]:
    host = str(action.get("host") or target.pod_ip)
    port = resolve_port(action.get("port"), target.ports)
    path = str(action.get("path") or "/")
    headers = {str(h["name"]): str(h["value"]) for h in action.get("httpHeaders") or []}
    conn: http.client.HTTPConnection
    if str(action.get("scheme", "HTTP")).upper() == "HTTPS":
        context = ssl._create_unverified_context()  # kubelet does not verify probe certificates either
        conn = http.client.HTTPSConnection(host, port, timeout=timeout, context=context)
    else:
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"User-Agent": "kube-probe/kubetune-dev", **headers})
        response = conn.getresponse()
        response.read(4096)
    finally:
        conn.close()
    ok = 200 <= response.status < 400
    return ok, f"HTTP probe failed with statuscode: {response.status}" if not ok else ""


def tcp_socket(action: Mapping[str, Any], target: ProbeTarget, timeout: float) -> tuple[bool, str]:
    host = str(action.get("host") or target.pod_ip)
    port = resolve_port(action.get("port"), target.ports)
    with socket.create_connection((host, port), timeout=timeout):
        return True, ""


def exec_in_container(command: Sequence[str], target: ProbeTarget, timeout: float) -> tuple[bool, str]:
    """Run ``command`` in the container's mount and UTS namespaces, in its working folder."""
    if target.pid is None:
        return False, "container is not running"
    argv = ["nsenter", "--target", str(target.pid), "--mount", "--uts", "--wd", "--", *command]
    try:
        result = subprocess.run(argv, env=dict(target.env), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, f"command timed out after {timeout:g}s"
    output = (result.stdout + result.stderr).strip()[-1024:]
    return result.returncode == 0, output or f"exit code {result.returncode}"


def run_probe(spec: Mapping[str, Any], target: ProbeTarget) -> tuple[bool, str]:
    """Run a probe once: (success, message on failure)."""
    timeout = float(spec.get("timeoutSeconds") or 1)
    try:
        if "httpGet" in spec:
            return http_get(spec["httpGet"], target, timeout)
        if "tcpSocket" in spec:
            return tcp_socket(spec["tcpSocket"], target, timeout)
        if "exec" in spec:
            return exec_in_container(spec["exec"].get("command") or [], target, timeout)
    except (OSError, ValueError, http.client.HTTPException) as error:
        return False, str(error) or type(error).__name__
    return False, f"unsupported probe handler {sorted(k for k in spec if k[0].islower())}"
