"""The operator's own configuration (a YAML file, rendered by the Helm chart into a ConfigMap).

It holds what differs between clusters and is not part of a user's FineTuneJob: images, how a GPU
type maps to node selectors and tolerations, and the memory of GPU types the planner does not know.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel


class _Config(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", use_attribute_docstrings=True
    )


class Scheduling(_Config):
    """Where pods go: a node selector and tolerations."""

    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[dict[str, Any]] = Field(default_factory=list)


class GpuTypeConfig(Scheduling):
    """Scheduling of one GPU type."""

    memory_gib: float | None = None
    """Memory per GPU, when the planner's table does not know this type."""


GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


class UnknownGpuType(ValueError):
    """A gpuType that this installation does not map to nodes: refused rather than run on any GPU."""


def _default_gpu_types() -> dict[str, GpuTypeConfig]:
    products = {
        "rtx-4090d": "NVIDIA-GeForce-RTX-4090-D",
        "rtx-4090": "NVIDIA-GeForce-RTX-4090",
        "l40s": "NVIDIA-L40S",
        "a100-40gb": "NVIDIA-A100-SXM4-40GB",
        "a100-80gb": "NVIDIA-A100-SXM4-80GB",
        "h100-80gb": "NVIDIA-H100-80GB-HBM3",
        "h200": "NVIDIA-H200",
    }
    return {
        name: GpuTypeConfig(node_selector={"nvidia.com/gpu.product": product}, tolerations=[GPU_TOLERATION])
        for name, product in products.items()
    }


class Images(_Config):
    """Container images the operator puts into the pods it creates."""

    trainer: str = "ghcr.io/kubetune/trainer:0.1.0"
    server: str = "ghcr.io/kubetune/server:0.1.0"
    ui: str = "ghcr.io/kubetune/server:0.1.0"


class SecretKeyRef(_Config):
    """A key of a Secret, looked up in each ModelServer's own namespace."""

    name: str = Field(min_length=1, max_length=253)
    key: str = Field(min_length=1, max_length=253)


class ServerNetworkPolicy(_Config):
    """A NetworkPolicy per ModelServer that lets in only its allowedClients, the operator and its chat page."""

    enabled: bool = False
    """Render the policies (the chart turns this on). They take effect where the cluster's network plugin
    enforces NetworkPolicies."""
    operator_namespace: str = ""
    """The operator's namespace, let in to both ports (the chart fills it in)."""
    operator_pod_labels: dict[str, str] = Field(default_factory=dict)
    """Labels of the operator's pods (the chart fills them in)."""
    allow_from: list[dict[str, Any]] = Field(default_factory=list)
    """NetworkPolicy peers let in to the server port of every ModelServer, e.g. the Prometheus that scrapes
    /metrics or an ingress controller."""


class ServerConfig(_Config):
    """How ModelServers are run in this installation."""

    extra_args: list[str] = Field(default_factory=list)
    """vLLM flags added to every server before spec.engineArgs (e.g. --kv-cache-memory-bytes on CPU clusters)."""
    model_cache_claim: str | None = None
    """A ReadWriteMany claim for the download cache (hf:// weights), shared by replicas; an emptyDir otherwise.
    An s3:// base model is read from cache.claimName's claim instead, when the namespace has it."""
    termination_grace_seconds: int = 60
    """Time a server pod gets after SIGTERM to finish the requests it has."""
    adapter_resync_seconds: float = 10.0
    """How often the operator looks at the replicas again while an adapter is not loaded everywhere."""
    fetcher_port: int = 8001
    """Port of the adapter fetcher beside vLLM in every server pod: the operator reaches vLLM's runtime LoRA API
    through it, and asks it to prepare pvc:// and s3:// adapters."""
    api_key_secret_ref: SecretKeyRef | None = None
    """The API key of every ModelServer that sets no auth of its own: this Secret and key in its namespace."""
    network_policy: ServerNetworkPolicy = Field(default_factory=ServerNetworkPolicy)
    """NetworkPolicies for the server pods."""
    prometheus_address: str = ""
    """The Prometheus that KEDA asks for vLLM's metrics (spec.autoscaling), e.g.
    http://prometheus-operated.monitoring.svc:9090."""
    signing_key_file: str = ""
    """PEM file of the operator's Ed25519 key (the chart mounts it from a Secret it generates). The operator signs
    its requests to the adapter fetchers with it; their pods get the public key. Unset: a key made at start-up,
    so every server rolls once when the operator restarts."""


class PrepareConfig(_Config):
    """The prepare step: a CPU pod per FineTuneJob that fetches and checks the inputs before the GPU pods."""

    enabled: bool = True
    """Off: the training pods fetch and check the inputs themselves, as before (no status.dataset)."""
    scheduling: Scheduling | None = None
    """Where prepare pods run; by default on the job's GPU type's nodes (its selector and tolerations), where
    the job's claims are reachable, but without requesting a GPU."""
    cpu: str = "1"
    """CPU request and limit of a prepare pod."""
    memory: str = "4Gi"
    """Memory request and limit of a prepare pod (the tokenizer and one dataset file at a time)."""
    backoff_limit: int = Field(default=2, ge=0)
    """Retries of a prepare pod that crashed (a definite answer, e.g. DatasetInvalid, is never retried)."""


class CacheConfig(_Config):
    """The model and dataset cache shared by FineTuneJobs and ModelServers (docs/cache.md)."""

    claim_name: str | None = None
    """A claim of this name in a FineTuneJob's or ModelServer's namespace holds the cache (ReadWriteMany across
    nodes); prepare pods and a server's model init container write it, training pods and vLLM mount it read-only
    (servers: s3:// base models). A namespace without it: per-pod downloads."""
    size_limit_gib: float | None = None
    """Least recently used entries are evicted beyond this size (never one an unfinished job or a ModelServer
    uses), before a prepare step's download and after it."""
    evict_idle_seconds: float = 3600.0
    """Only entries unused this long may be evicted (covers a job whose prepare step ran moments ago)."""


def _restricted_pod() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": 65532,
        "runAsGroup": 65532,
        "fsGroup": 65532,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _restricted_container() -> dict[str, Any]:
    return {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}


class OperatorConfig(_Config):
    """Settings of one operator installation."""

    images: Images = Field(default_factory=Images)
    gpu_types: dict[str, GpuTypeConfig] = Field(default_factory=_default_gpu_types)
    """GPU type name (spec.resources.gpuType) -> scheduling."""
    default_gpu_type: str | None = None
    """GPU type used when a FineTuneJob or ModelServer names none."""
    field_manager: str = "kubetune-operator"
    """Server-side apply field manager of everything the operator writes."""
    rendezvous_port: int = 29500
    server_port: int = 8000
    ui_port: int = 7860
    ui_scheduling: Scheduling = Field(default_factory=Scheduling)
    """Where the chat pages (ui.enabled) run; they need no GPU. Anywhere by default."""
    trainer_termination_grace_seconds: int = 120
    """Time the trainer gets after SIGTERM to write its final checkpoint."""
    server: ServerConfig = Field(default_factory=ServerConfig)
    """ModelServer settings."""
    prepare: PrepareConfig = Field(default_factory=PrepareConfig)
    """The prepare step of FineTuneJobs."""
    cache: CacheConfig = Field(default_factory=CacheConfig)
    """The model and dataset cache."""
    pod_security_context: dict[str, Any] = Field(default_factory=_restricted_pod)
    """securityContext of every pod the operator creates. The default meets the "restricted" Pod Security
    Standard with kubetune's images (UID 65532; fsGroup makes claims and caches writable); set {} for images
    that must run as root."""
    container_security_context: dict[str, Any] = Field(default_factory=_restricted_container)
    """securityContext of every container in those pods."""

    def gpu_type(self, name: str | None) -> GpuTypeConfig:
        """Scheduling for a GPU type (or defaultGpuType); any GPU node when neither names one.

        Raises UnknownGpuType for a name that gpuTypes does not map: a pod planned for a GPU it may not get
        must not land on whatever GPU node is free."""
        name = name or self.default_gpu_type
        if not name:
            return GpuTypeConfig(tolerations=[GPU_TOLERATION])
        if name not in self.gpu_types:
            known = ", ".join(sorted(self.gpu_types)) or "none"
            raise UnknownGpuType(
                f"gpuType {name} is not configured in this installation (configured: {known}); "
                "ask the administrator to add it to the operator's gpuTypes, or use one of these"
            )
        return self.gpu_types[name]


def load(path: str | os.PathLike[str] | None = None) -> OperatorConfig:
    """Read the configuration from `path` or $KUBETUNE_OPERATOR_CONFIG; defaults when neither is set."""
    path = path or os.environ.get("KUBETUNE_OPERATOR_CONFIG")
    if not path:
        return OperatorConfig()
    return OperatorConfig.model_validate(yaml.safe_load(Path(path).read_text()) or {})
