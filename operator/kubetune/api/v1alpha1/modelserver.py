"""ModelServer: a vLLM OpenAI-compatible server of a base model and the LoRA adapters trained for it."""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, Field, WithJsonSchema

from kubetune.api.v1alpha1.base import (
    Condition,
    DnsLabel,
    EnvVar,
    KubeModel,
    LabelSelector,
    ObjectMeta,
    PodMetadata,
    Quantity,
    Rule,
    S3Access,
    SecretKeyRef,
    UriLength,
    field_rules,
    s3_rules,
    uri_rules,
)

AdapterUri = Annotated[str, UriLength, uri_rules(("hf", "pvc", "s3"), "pvc://adapters/my-job/adapter")]
ModelUri = Annotated[str, UriLength, uri_rules(("hf", "pvc", "s3"), "hf://Qwen/Qwen2.5-7B-Instruct")]

# The ranks vLLM accepts for --max-lora-rank.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
TENSOR_PARALLEL_SIZES = (1, 2, 4, 8, 16, 32, 64)


class ServedBaseModel(KubeModel):
    """The base model served; adapters must have been trained on it."""

    uri: ModelUri
    """hf://ORG/NAME[@REVISION], pvc://CLAIM/PATH or s3://BUCKET/PREFIX."""
    secret_ref: SecretKeyRef | None = None
    """A Hugging Face token for hf:// (s3:// credentials go into s3)."""
    s3: S3Access | None = None
    """Credentials, endpoint and region of an s3:// model, which an init container downloads before vLLM starts."""
    served_name: str | None = Field(default=None, min_length=1, max_length=253)
    """Model name clients pass in requests for the base model (default: the ModelServer's name)."""

    rules = s3_rules()


class AdapterSource(KubeModel):
    """One LoRA adapter to serve, by FineTuneJob or by location."""

    name: DnsLabel
    """Model name clients pass in requests to use this adapter."""
    from_fine_tune_job: DnsLabel | None = None
    """A FineTuneJob in the same namespace; its adapter is served once it has succeeded."""
    uri: AdapterUri | None = None
    """An adapter directory (adapter_config.json and weights) at pvc://, s3:// or hf://. pvc:// and s3://
    adapters are checked against the server before they are loaded (base model, rank, target modules)."""
    s3: S3Access | None = None
    """Credentials, endpoint and region of an s3:// uri; the Secret is mounted into the adapter fetcher only."""

    rules = (
        Rule(
            cel="has(self.fromFineTuneJob) != has(self.uri)",
            message="set exactly one of fromFineTuneJob or uri for each adapter",
            check=lambda s: (s.from_fine_tune_job is None) != (s.uri is None),
        ),
        *s3_rules(uri_optional=True, secret_ref=False),
    )


class GenerationDefaults(KubeModel):
    """Decoding defaults applied when a request does not set them."""

    temperature: float = Field(default=0.7, ge=0, le=2)
    """Sampling temperature, 0 to 2 (0 is greedy)."""
    top_p: float = Field(default=0.9, gt=0, le=1)
    """Nucleus sampling probability mass, in (0, 1]."""
    repetition_penalty: float = Field(default=1.1, gt=0, le=2)
    """Penalty for repeated tokens (1 disables it)."""
    max_tokens: int | None = Field(default=None, ge=1)
    """Default limit of generated tokens."""


class UI(KubeModel):
    """An optional Gradio chat page in front of the server."""

    enabled: bool = False
    """Deploy the chat page (its own Deployment and Service)."""


class ModelServerResources(KubeModel):
    """Host resources per server pod (GPUs come from tensorParallelSize)."""

    cpu: Quantity | None = None
    """CPU request and limit."""
    memory: Quantity | None = None
    """Memory request and limit."""


class AutoscalingMetric(StrEnum):
    WAITING_REQUESTS = "waitingRequests"
    RUNNING_REQUESTS = "runningRequests"
    KV_CACHE_USAGE = "kvCacheUsage"


class Autoscaling(KubeModel):
    """Replicas that follow the load: a KEDA ScaledObject scales the ModelServer (its scale subresource) on a
    metric vLLM itself exports, read from the Prometheus the installation names. Needs KEDA in the cluster."""

    min_replicas: int = Field(default=1, ge=1, le=1024)
    """Fewest replicas (at least 1: a server with no replica exports no metric to scale up on)."""
    max_replicas: int = Field(ge=1, le=1024)
    """Most replicas."""
    metric: AutoscalingMetric = AutoscalingMetric.WAITING_REQUESTS
    """waitingRequests (vllm:num_requests_waiting), runningRequests (vllm:num_requests_running) or kvCacheUsage
    (vllm:kv_cache_usage_perc, in percent)."""
    target_per_replica: int = Field(default=4, ge=1, le=100_000)
    """The metric's average per replica that the autoscaler keeps: requests, or percent for kvCacheUsage."""

    rules = (
        Rule(
            cel="self.minReplicas <= self.maxReplicas",
            message="autoscaling.minReplicas must not be above autoscaling.maxReplicas",
            check=lambda s: s.min_replicas <= s.max_replicas,
        ),
    )


class ServerAuth(KubeModel):
    """Who may call the server: every request must carry the API key (Authorization: Bearer KEY)."""

    api_key_secret_ref: SecretKeyRef
    """The key, in a Secret of this namespace. It reaches vLLM, the adapter fetcher and the chat page as an
    environment variable from the Secret; the operator never reads it."""


class ClientPeer(KubeModel):
    """Pods allowed to reach the server's port: those matching podSelector in the namespaces matching
    namespaceSelector (a NetworkPolicy peer). podSelector alone means pods of this namespace."""

    namespace_selector: LabelSelector | None = None
    """Namespaces by label; {} is every namespace."""
    pod_selector: LabelSelector | None = None
    """Pods by label; {} is every pod (of the selected namespaces)."""

    rules = (
        Rule(
            cel="has(self.namespaceSelector) || has(self.podSelector)",
            message="each allowedClients entry needs a namespaceSelector, a podSelector or both",
            check=lambda s: s.namespace_selector is not None or s.pod_selector is not None,
        ),
    )


class RopeScaling(KubeModel):
    """Longer context than the model was trained for, by YaRN rope scaling (vLLM's --hf-overrides)."""

    type: Literal["yarn"] = "yarn"
    """The scaling method; YaRN is the one Qwen2.5 and Qwen3 document."""
    factor: float = Field(gt=1, le=64)
    """How many times the original context: the longest maxModelLen is factor x originalMaxPositionEmbeddings."""
    original_max_position_embeddings: int = Field(ge=16, le=10_485_760)
    """The context the model was trained for (its config.json's max_position_embeddings, 32768 for Qwen2.5)."""
    rope_theta: float | None = Field(default=None, gt=0)
    """The model's RoPE base. vLLM's override replaces the model's whole RoPE configuration, so the operator
    passes this on; for the models it knows it fills it in (1000000 for Qwen2.5)."""


_PERCENT = re.compile(r"^[0-9]+%$")


def _check_int_or_percent(value: int | str) -> int | str:
    if (isinstance(value, int) and value < 0) or (isinstance(value, str) and not _PERCENT.match(value)):
        raise ValueError(f"{value!r} is neither a number of replicas nor a percentage such as 25%")
    return value


IntOrPercent = Annotated[
    int | str,
    WithJsonSchema({"x-kubernetes-int-or-string": True, "pattern": _PERCENT.pattern}),
    AfterValidator(_check_int_or_percent),
]
"""A number of replicas or a percentage of them, e.g. 1 or "25%"."""


def _is_zero(value: int | str) -> bool:
    return str(value) in ("0", "0%")


class Rollout(KubeModel):
    """How a change of the pods (image, engine arguments, an operator upgrade) replaces the replicas."""

    max_surge: IntOrPercent = 0
    """Replicas started above spec.replicas during a rollout. Each needs tensorParallelSize free GPUs; 0 (the
    default) needs none, so a rollout also works on a full GPU pool."""
    max_unavailable: IntOrPercent = 1
    """Replicas that may be down during a rollout. 1 (the default) replaces one replica at a time; with a single
    replica and maxSurge 0 the server is down while the new one loads the model."""

    rules = (
        Rule(
            cel="!(string(self.maxSurge) in ['0', '0%'] && string(self.maxUnavailable) in ['0', '0%'])",
            message="rollout.maxSurge and rollout.maxUnavailable may not both be 0: a rollout could not replace "
            "any replica",
            check=lambda s: not (_is_zero(s.max_surge) and _is_zero(s.max_unavailable)),
        ),
    )


def _duplicate_names(adapters: list[Any]) -> list[str]:
    names = [a.name for a in adapters]
    return sorted({n for n in names if names.count(n) > 1})


# The API server names a duplicate itself: adapters is a list-map keyed by name ("Duplicate value: ...").
_adapter_name_rule = Rule(
    cel="self.all(a, self.filter(b, b.name == a.name).size() == 1)",
    message="adapter names must be unique",
    check=lambda adapters: not _duplicate_names(adapters),
    explain=lambda adapters: f"adapter names must be unique: {_duplicate_names(adapters)[0]} is used more than once",
)


_tensor_parallel_rule = Rule(
    cel="self in [1, 2, 4, 8, 16, 32, 64]",
    message="tensorParallelSize must be a power of two from 1 to 64",
    check=lambda v: v in TENSOR_PARALLEL_SIZES,
)
_max_lora_rank_rule = Rule(
    cel="self in [1, 8, 16, 32, 64, 128, 256, 320, 512]",
    message="maxLoraRank must be one of 1, 8, 16, 32, 64, 128, 256, 320, 512 (the ranks vLLM supports)",
    check=lambda v: v in VLLM_LORA_RANKS,
)


class ModelServerSpec(KubeModel):
    """The desired server."""

    base_model: ServedBaseModel
    """The base model."""
    adapters: Annotated[list[AdapterSource], field_rules(_adapter_name_rule)] = Field(
        default_factory=list,
        max_length=64,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    """Adapters served by name."""
    adapter_selector: LabelSelector | None = None
    """Serve every Succeeded FineTuneJob in the namespace whose labels match, under its own name."""
    replicas: int = Field(default=1, ge=0, le=1024)
    """Server pods; each loads every adapter. The scale subresource sets it (kubectl scale, an HPA, KEDA): with
    autoscaling, leave it out of your manifests so that applying them does not reset it."""
    autoscaling: Autoscaling | None = None
    """Scale on vLLM's metrics with KEDA (a ScaledObject); replicas is then the autoscaler's."""
    # The default is spelled out: the API server checks the rollout rule against it before nested defaults apply.
    rollout: Rollout = Field(
        default_factory=Rollout, json_schema_extra={"default": {"maxSurge": 0, "maxUnavailable": 1}}
    )
    """How a change of the pods replaces the replicas."""
    auth: ServerAuth | None = None
    """Require an API key on every request (the operator's server.apiKeySecretRef when unset)."""
    allowed_clients: list[ClientPeer] = Field(default_factory=list, max_length=32)
    """Who may reach the server's port when the installation renders NetworkPolicies (server.networkPolicy):
    these peers, the operator and the chat page. Empty: the pods of this namespace."""
    tensor_parallel_size: Annotated[int, field_rules(_tensor_parallel_rule)] = 1
    """GPUs per replica the model is sharded over: a power of two up to 64."""
    gpu_type: str | None = Field(default=None, max_length=63, pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    """GPU model, mapped to node selectors and tolerations by the operator configuration."""
    max_model_len: int | None = Field(default=None, ge=16, le=10_485_760)
    """Longest context (prompt plus output) in tokens; the model's own limit when unset. Above the model's own
    limit it needs ropeScaling."""
    rope_scaling: RopeScaling | None = None
    """Serve a longer context than the model was trained for (YaRN)."""
    enable_prefix_caching: bool = True
    """Reuse the KV cache of shared prompt prefixes."""
    max_loras: int = Field(default=4, ge=1, le=256)
    """Adapters that can be used in one batch."""
    max_lora_rank: Annotated[int, field_rules(_max_lora_rank_rule)] = 64
    """Largest adapter rank accepted."""
    generation_defaults: GenerationDefaults = Field(
        default_factory=GenerationDefaults, json_schema_extra={"default": {}}
    )
    """Decoding defaults."""
    engine_args: list[Annotated[str, Field(max_length=1024)]] = Field(default_factory=list, max_length=128)
    """Extra vLLM command-line flags, e.g. ["--gpu-memory-utilization=0.85"]."""
    ui: UI = Field(default_factory=UI, json_schema_extra={"default": {}})
    """The Gradio chat page."""
    image: str | None = Field(default=None, min_length=1, max_length=512)
    """Server image override; the operator's configured image otherwise."""
    resources: ModelServerResources = Field(default_factory=ModelServerResources, json_schema_extra={"default": {}})
    """Host resources per pod."""
    env: list[EnvVar] = Field(default_factory=list, max_length=64)
    """Extra environment variables for the server."""
    pod_metadata: PodMetadata | None = None
    """Labels and annotations for the server pods."""

    rules = (
        Rule(
            cel="!has(self.ropeScaling) || !has(self.maxModelLen) || double(self.maxModelLen) <= "
            "self.ropeScaling.factor * double(self.ropeScaling.originalMaxPositionEmbeddings)",
            message="maxModelLen must not exceed ropeScaling.factor x ropeScaling.originalMaxPositionEmbeddings",
            check=lambda s: (
                s.rope_scaling is None
                or s.max_model_len is None
                or s.max_model_len <= s.rope_scaling.factor * s.rope_scaling.original_max_position_embeddings
            ),
        ),
    )


class ServerState(StrEnum):
    PENDING = "Pending"
    PROGRESSING = "Progressing"
    READY = "Ready"
    DEGRADED = "Degraded"
    FAILED = "Failed"


class AdapterState(StrEnum):
    PENDING = "Pending"
    LOADED = "Loaded"
    FAILED = "Failed"


class ServedAdapterStatus(KubeModel):
    """One adapter as the server sees it."""

    name: str
    """Model name of the adapter."""
    uri: str = ""
    """Where it is loaded from."""
    source: str = ""
    """fromFineTuneJob/<name>, adapterSelector/<name> or uri."""
    state: AdapterState = AdapterState.PENDING
    """Pending, Loaded (on every ready replica) or Failed."""
    reason: str = ""
    """CamelCase reason when not Loaded, e.g. AdapterRankTooLarge."""
    message: str = ""
    """Details."""
    loaded_replicas: int = 0
    """Ready replicas that have it loaded."""


class ModelServerStatus(KubeModel):
    """Observed state of the server."""

    state: ServerState | None = None
    """Pending, Progressing, Ready, Degraded or Failed."""
    conditions: list[Condition] = Field(
        default_factory=list,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    """Ready and AdaptersReady."""
    endpoint: str = ""
    """OpenAI-compatible base URL inside the cluster, e.g. http://NAME.NAMESPACE.svc:8000/v1."""
    ui_endpoint: str = ""
    """The chat page's URL inside the cluster, when ui.enabled."""
    replicas: int = 0
    """Server pods that exist."""
    ready_replicas: int = 0
    """Server pods that are ready."""
    ready: str = ""
    """The READY column: ready/desired replicas."""
    selector: str = ""
    """The label selector of the server pods (the scale subresource's, for HPA and KEDA)."""
    adapters: list[ServedAdapterStatus] = Field(default_factory=list)
    """Per-adapter state."""
    loaded_adapters: str = ""
    """The ADAPTERS column: loaded/declared adapters."""
    observed_generation: int | None = None
    """The metadata.generation the status was computed for."""


class ModelServer(KubeModel):
    """A vLLM OpenAI-compatible server of a base model plus LoRA adapters, loaded while it runs."""

    plural: ClassVar[str] = "modelservers"
    short_names: ClassVar[tuple[str, ...]] = ("msrv",)
    # `kubectl scale`, HPAs and KEDA set spec.replicas through this; the operator copies it to the Deployment.
    scale_subresource: ClassVar[dict[str, str]] = {
        "specReplicasPath": ".spec.replicas",
        "statusReplicasPath": ".status.replicas",
        "labelSelectorPath": ".status.selector",
    }
    printer_columns: ClassVar[tuple[dict[str, Any], ...]] = (
        {"name": "Model", "type": "string", "jsonPath": ".spec.baseModel.uri"},
        {"name": "State", "type": "string", "jsonPath": ".status.state"},
        {"name": "Ready", "type": "string", "jsonPath": ".status.ready"},
        {"name": "Adapters", "type": "string", "jsonPath": ".status.loadedAdapters"},
        {"name": "Endpoint", "type": "string", "jsonPath": ".status.endpoint"},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    )

    # Children names: <server> (Deployment, Service) and <server>-ui (the chat page); a multi-node
    # FineTuneJob's Service is <job>-trainer. Reserving the suffixes keeps the names of two objects' children apart.
    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            cel="!self.metadata.name.endsWith('-ui') && !self.metadata.name.endsWith('-trainer')",
            message="a ModelServer's name may not end in -ui or -trainer: its chat page is named <name>-ui, "
            "and a FineTuneJob names its Service <job>-trainer",
            check=lambda s: not s.metadata.name.endswith(("-ui", "-trainer")),
        ),
    )

    api_version: Literal["kubetune.io/v1alpha1"] = "kubetune.io/v1alpha1"
    kind: Literal["ModelServer"] = "ModelServer"
    metadata: ObjectMeta = Field(default_factory=ObjectMeta)
    spec: ModelServerSpec
    status: ModelServerStatus = Field(default_factory=ModelServerStatus)
