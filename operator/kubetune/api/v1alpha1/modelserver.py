"""ModelServer: a vLLM OpenAI-compatible server of a base model and the LoRA adapters trained for it."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field

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
    """Server pods; each loads every adapter."""
    tensor_parallel_size: Annotated[int, field_rules(_tensor_parallel_rule)] = 1
    """GPUs per replica the model is sharded over: a power of two up to 64."""
    gpu_type: str | None = Field(default=None, max_length=63, pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    """GPU model, mapped to node selectors and tolerations by the operator configuration."""
    max_model_len: int | None = Field(default=None, ge=16, le=10_485_760)
    """Longest context (prompt plus output) in tokens; the model's own limit when unset."""
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
