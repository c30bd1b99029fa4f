"""The agent's Node: registration, the Ready condition and the kube-node-lease Lease, kept fresh like a kubelet.

The Node never carries kwok's annotation, so kwok leaves it (and the pods bound to it) alone.
"""

from __future__ import annotations

import datetime
import logging
import platform
import threading
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from kubetune import __version__
from kubetune.dev.agent.api import AgentApi
from kubetune.dev.agent.status import now_rfc3339
from kubetune.dev.nodes import GPU_RESOURCE, GPU_TAINT, KWOK_ANNOTATION
from kubetune.k8s.client import ApiError

log = logging.getLogger(__name__)

LEASE_DURATION_S = 40
LEASE_RENEW_S = 10.0
STATUS_EVERY_S = 60.0
AGENT_LABEL = "kubetune.io/node-agent"
RTX_4090D_LABELS = {
    "nvidia.com/gpu.product": "NVIDIA-GeForce-RTX-4090-D",
    "nvidia.com/gpu.memory": "24564",
    "kubetune.io/gpu-type": "rtx-4090d",
}


@dataclass(frozen=True)
class NodeSpec:
    """Name, capacity, labels and taints of the agent's Node."""

    name: str = "dev-gpu-0"
    cpu: str = "2"
    memory: str = "20Gi"
    gpus: int = 4
    pods: int = 110
    labels: dict[str, str] = field(default_factory=dict)
    taints: tuple[dict[str, str], ...] = ()
    address: str = "127.0.0.1"

    def resources(self) -> dict[str, str]:
        out = {"cpu": self.cpu, "memory": self.memory, "pods": str(self.pods), "ephemeral-storage": "100Gi"}
        if self.gpus:
            out[GPU_RESOURCE] = str(self.gpus)
        return out


def dev_gpu_node(name: str = "dev-gpu-0", gpus: int = 4, cpu: str = "2", memory: str = "20Gi") -> NodeSpec:
    """A node like the kwok RTX 4090 D nodes (same labels and taint) when it has GPUs, a plain one otherwise."""
    return NodeSpec(
        name=name,
        cpu=cpu,
        memory=memory,
        gpus=gpus,
        labels=dict(RTX_4090D_LABELS) if gpus else {},
        taints=(dict(GPU_TAINT),) if gpus else (),
    )


def parse_taint(text: str) -> dict[str, str]:
    """``key=value:Effect`` or ``key:Effect`` as a taint."""
    head, sep, effect = text.rpartition(":")
    if not sep or effect not in ("NoSchedule", "PreferNoSchedule", "NoExecute"):
        raise ValueError(f"bad taint {text!r}: expected key=value:NoSchedule|PreferNoSchedule|NoExecute")
    key, _, value = head.partition("=")
    return {"key": key, "value": value, "effect": effect} if value else {"key": key, "effect": effect}


def node_manifest(spec: NodeSpec) -> dict[str, Any]:
    """The Node object (metadata and spec) the agent registers."""
    labels = {
        "kubernetes.io/hostname": spec.name,
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": "amd64",
        "type": "kubetune-agent",
        AGENT_LABEL: "true",
        **spec.labels,
    }
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": spec.name, "labels": labels},
        "spec": {"taints": [dict(t) for t in spec.taints]},
    }


def node_status(spec: NodeSpec, now: str, since: str) -> dict[str, Any]:
    """The Node's status: capacity, Ready, no pressure, addresses and what runs it."""

    def condition(type_: str, status: str, reason: str, message: str) -> dict[str, str]:
        return {
            "type": type_,
            "status": status,
            "reason": reason,
            "message": message,
            "lastHeartbeatTime": now,
            "lastTransitionTime": since,
        }

    version = f"v{__version__}-kubetune-dev"
    return {
        "capacity": spec.resources(),
        "allocatable": spec.resources(),
        "conditions": [
            condition("MemoryPressure", "False", "KubeletHasSufficientMemory", "not measured by the dev agent"),
            condition("DiskPressure", "False", "KubeletHasNoDiskPressure", "not measured by the dev agent"),
            condition("PIDPressure", "False", "KubeletHasSufficientPID", "not measured by the dev agent"),
            condition("Ready", "True", "KubeletReady", "kubetune dev agent is posting ready status"),
        ],
        "addresses": [{"type": "InternalIP", "address": spec.address}, {"type": "Hostname", "address": spec.name}],
        "daemonEndpoints": {"kubeletEndpoint": {"Port": 0}},
        "nodeInfo": {
            "machineID": "",
            "systemUUID": "",
            "bootID": "",
            "kernelVersion": platform.release(),
            "osImage": "kubetune dev agent (local processes)",
            "containerRuntimeVersion": f"kubetune-dev://{__version__}",
            "kubeletVersion": version,
            "kubeProxyVersion": version,
            "operatingSystem": "linux",
            "architecture": "amd64",
        },
    }


def micro_time() -> str:
    """A Lease's MicroTime."""
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class NodeHeartbeat(threading.Thread):
    """Registers the Node, then renews its Lease every 10 s and posts its status every minute."""

    def __init__(self, api: AgentApi, spec: NodeSpec, stop: threading.Event) -> None:
        super().__init__(name="node-heartbeat", daemon=True)
        self.api, self.spec, self.stop = api, spec, stop
        self.since = now_rfc3339()
        self.path = f"/api/v1/nodes/{quote(spec.name)}"
        self.lease_path = f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{quote(spec.name)}"

    def register(self) -> dict[str, Any]:
        """Create the Node, or take over one of the same name that is not kwok's; then post its status."""
        manifest = node_manifest(self.spec)
        existing = self.api.get(self.path)
        if existing is None:
            existing = self.api.request("POST", "/api/v1/nodes", body=manifest)
        elif KWOK_ANNOTATION in (existing["metadata"].get("annotations") or {}):
            raise RuntimeError(f"node {self.spec.name} is a kwok node; pick another --node-name")
        else:
            patch = {"metadata": {"labels": manifest["metadata"]["labels"]}, "spec": manifest["spec"]}
            existing = self.api.merge_patch(self.path, patch)
        self.post_status()
        self.renew_lease(existing)
        return existing

    def post_status(self) -> None:
        self.api.merge_patch(f"{self.path}/status", {"status": node_status(self.spec, now_rfc3339(), self.since)})

    def renew_lease(self, node: dict[str, Any] | None = None) -> None:
        spec = {"holderIdentity": self.spec.name, "leaseDurationSeconds": LEASE_DURATION_S, "renewTime": micro_time()}
        try:
            self.api.merge_patch(self.lease_path, {"spec": spec})
        except ApiError as error:
            if not error.not_found:
                raise
            node = node or self.api.get(self.path)
            owner = (
                [{"apiVersion": "v1", "kind": "Node", "name": self.spec.name, "uid": node["metadata"]["uid"]}]
                if node
                else []
            )
            lease = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": self.spec.name, "namespace": "kube-node-lease", "ownerReferences": owner},
                "spec": spec,
            }
            self.api.request("POST", self.lease_path.rsplit("/", 1)[0], body=lease)

    def run(self) -> None:
        last_status = 0.0
        ticks = 0
        while not self.stop.wait(LEASE_RENEW_S):
            ticks += 1
            try:
                if self.api.get(self.path) is None:
                    log.warning("node %s was deleted; registering it again", self.spec.name)
                    self.register()
                    continue
                self.renew_lease()
                if ticks * LEASE_RENEW_S - last_status >= STATUS_EVERY_S:
                    last_status = ticks * LEASE_RENEW_S
                    self.post_status()
            except Exception as error:  # keep beating; the API server may be restarting
                log.warning("node heartbeat failed: %s", error)
