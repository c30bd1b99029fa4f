"""FineTuneJob: LoRA post-training (SFT or DPO) of a base model on GPU nodes."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, WithJsonSchema

from kubetune.api.v1alpha1.base import (
    Condition,
    DnsLabel,
    EnvVar,
    KubeModel,
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

ModelUri = Annotated[str, UriLength, uri_rules(("hf", "pvc", "s3"), "hf://Qwen/Qwen2.5-7B")]
DatasetUri = Annotated[str, UriLength, uri_rules(("hf", "pvc", "s3", "configmap"), "pvc://datasets/sft/train.jsonl")]
OutputUri = Annotated[str, UriLength, uri_rules(("pvc", "s3"), "pvc://adapters/my-job")]


class Method(StrEnum):
    SFT = "SFT"
    DPO = "DPO"


class DatasetFormat(StrEnum):
    AUTO = "auto"
    PROMPT_RESPONSE = "prompt-response"
    MESSAGES = "messages"
    PREFERENCE = "preference"


class BaseModelSource(KubeModel):
    """Where the base model's weights and tokenizer come from."""

    uri: ModelUri
    """hf://ORG/NAME[@REVISION], pvc://CLAIM/PATH or s3://BUCKET/PREFIX."""
    secret_ref: SecretKeyRef | None = None
    """A Hugging Face token for hf:// (s3:// credentials go into s3)."""
    s3: S3Access | None = None
    """Credentials, endpoint and region of an s3:// model."""

    rules = s3_rules()


class Dataset(KubeModel):
    """The training data: records in JSONL (one per line), JSON or Parquet files."""

    uri: DatasetUri
    """One file (hf://ORG/NAME/FILE, pvc://CLAIM/PATH, s3://BUCKET/KEY, configmap://NAME/KEY for small data) or a
    folder of files: a dataset repository (hf://ORG/NAME), a prefix (s3://BUCKET/PREFIX), a folder on a claim."""
    split: str | None = Field(default=None, max_length=63, pattern=r"^[A-Za-z0-9_.-]+$")
    """For a folder: the split whose files are read, by name (`train` reads train.jsonl, train/*.parquet,
    data/train-00000-of-00001.parquet, ...); unset: every .jsonl, .ndjson, .json and .parquet file."""
    format: DatasetFormat = DatasetFormat.AUTO
    """prompt-response ({"system"?, "prompt", "response"}), messages (OpenAI-style chat),
    preference ({"prompt", "chosen", "rejected"}); auto detects it from the first record."""
    validation_split: float = Field(default=0.0, ge=0.0, le=0.5)
    """Fraction of records held out for evaluation loss (0 disables evaluation)."""
    secret_ref: SecretKeyRef | None = None
    """A Hugging Face token for hf:// data (s3:// credentials go into s3)."""
    s3: S3Access | None = None
    """Credentials, endpoint and region of s3:// data."""

    rules = s3_rules()


class LoRA(KubeModel):
    """The LoRA adapter that is trained; the base model stays frozen."""

    r: int = Field(default=64, ge=1, le=1024)
    """Rank of the low-rank update matrices."""
    alpha: float = Field(default=128, gt=0)
    """Scaling numerator: updates are scaled by alpha / r."""
    dropout: float = Field(default=0.05, ge=0.0, lt=1.0)
    """Dropout on the adapter's input, in [0, 1)."""
    target_modules: list[Annotated[str, Field(min_length=1, max_length=64)]] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"], min_length=1, max_length=32
    )
    """Names of the linear layers that get adapters (e.g. q_proj, k_proj, v_proj, o_proj, gate_proj,
    up_proj, down_proj), or ["all-linear"]."""


class Hyperparameters(KubeModel):
    """Optimisation settings. Set epochs or maxSteps; without either, one epoch is trained."""

    learning_rate: float = Field(default=2e-5, gt=0, lt=1)
    """Peak learning rate, in (0, 1)."""
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    """Learning-rate schedule after warm-up."""
    warmup_ratio: float = Field(default=0.1, ge=0, le=0.5)
    """Fraction of the steps spent warming the learning rate up."""
    weight_decay: float = Field(default=0.01, ge=0, lt=1)
    """AdamW weight decay."""
    epochs: float | None = Field(default=None, gt=0, le=1000)
    """Passes over the dataset (fractions allowed)."""
    max_steps: int | None = Field(default=None, ge=1, le=10_000_000)
    """Optimizer steps to train; overrides the dataset size."""
    global_batch_size: int = Field(default=64, ge=1, le=65536)
    """Sequences (SFT) or preference pairs (DPO) per optimizer step, over all GPUs:
    microBatchSize x gradient accumulation x number of GPUs."""
    max_seq_length: int = Field(default=8192, ge=16, le=1048576)
    """Longest tokenized sequence; longer records are truncated (and counted in the dataset report)."""
    beta: float = Field(default=0.1, gt=0, le=10)
    """DPO temperature: how far the policy may move from the reference. Ignored by SFT."""
    seed: int = Field(default=42, ge=0, le=2**31 - 1)
    """Random seed for data order and adapter initialisation."""
    packing: Literal["auto", "on", "off"] = "auto"
    """SFT: pack several records into each window of maxSeqLength tokens instead of padding them; attention and
    loss never cross a record's boundary, and globalBatchSize then counts windows. auto is on for SFT (see
    status.plan.packing). DPO never packs: pairs of similar length are batched together instead."""

    rules = (
        Rule(
            cel="!(has(self.epochs) && has(self.maxSteps))",
            message="set either hyperparameters.epochs or hyperparameters.maxSteps, not both",
            check=lambda s: s.epochs is None or s.max_steps is None,
        ),
    )


class Resources(KubeModel):
    """The GPUs and host resources of the training pods."""

    nodes: int = Field(default=1, ge=1, le=1024)
    """Number of training pods (one per node)."""
    gpus_per_node: int = Field(default=4, ge=1, le=16)
    """GPUs per pod; one training process runs on each."""
    gpu_type: str | None = Field(default=None, max_length=63, pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    """GPU model, e.g. rtx-4090d, a100-80gb, h200. The operator maps it to node selectors and
    tolerations (operator configuration) and the planner to its memory and speed."""
    gpu_memory: Quantity | None = None
    """Memory per GPU (e.g. 24Gi), for GPU types the operator does not know."""
    cpu: Quantity | None = None
    """CPU request and limit per pod."""
    memory: Quantity | None = None
    """Memory request and limit per pod (host RAM; CPU offload needs plenty)."""

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node


AutoOrInt = Annotated[
    int | str,
    WithJsonSchema({"x-kubernetes-int-or-string": True}),
]


_zero_stage_rule = Rule(
    cel="type(self) == string ? self == 'auto' : self in [0, 2, 3]",
    message="zeroStage must be auto, 0, 2 or 3",
    check=lambda v: v in ("auto", 0, 2, 3),
)
_micro_batch_rule = Rule(
    cel="type(self) == string ? self == 'auto' : self >= 1 && self <= 1024",
    message="microBatchSize must be auto or a number from 1 to 1024",
    check=lambda v: v == "auto" or (isinstance(v, int) and 1 <= v <= 1024),
)


class Distributed(KubeModel):
    """How training is spread over the GPUs. Each `auto` is decided by the planner (see status.plan)."""

    zero_stage: Annotated[AutoOrInt, field_rules(_zero_stage_rule)] = "auto"
    """DeepSpeed ZeRO stage: auto, 0 (no DeepSpeed sharding), 2 (shard gradients and optimizer) or 3
    (also shard weights)."""
    offload: Literal["auto", "none", "cpu"] = "auto"
    """Offload optimizer state (and with ZeRO-3 parameters) to host memory."""
    gradient_checkpointing: Literal["auto", "on", "off"] = "auto"
    """Recompute activations in the backward pass: less memory, about 25% more compute."""
    attention: Literal["auto", "flash_attention_2", "sdpa", "eager"] = "auto"
    """Attention kernel. auto is sdpa: PyTorch's fused attention (its flash and memory-efficient kernels),
    which needs no extra package; for packed SFT records (hyperparameters.packing) auto is flex_attention,
    PyTorch's block-sparse attention, which skips the blocks between records. flash_attention_2 needs a GPU and
    the flash-attn package in the trainer image; without them the trainer uses sdpa, logs a warning and reports it
    in status.trainer.attention."""
    micro_batch_size: Annotated[AutoOrInt, field_rules(_micro_batch_rule)] = "auto"
    """Sequences per GPU per forward pass: auto or a number."""
    collective_timeout_seconds: int = Field(default=600, ge=30, le=86400)
    """How long a rank waits in a collective (all-reduce, barrier) for its peers before it gives up and exits with
    a retryable code. A failed pod stops its whole group at once anyway; this bounds a hang the operator cannot
    see."""

    rules = (
        Rule(
            cel="!has(self.offload) || !has(self.zeroStage) || !(self.offload == 'cpu' && type(self.zeroStage) == int"
            " && self.zeroStage == 0)",
            message="offload cpu needs ZeRO stage 2 or 3 (or auto)",
            check=lambda s: not (s.offload == "cpu" and s.zero_stage == 0),
        ),
    )


class Checkpointing(KubeModel):
    """Periodic checkpoints under the output location; a restarted pod resumes from the latest."""

    every_steps: int = Field(default=100, ge=1)
    """Optimizer steps between checkpoints."""
    keep: int = Field(default=2, ge=1, le=100)
    """Number of most recent checkpoints kept."""


class Output(KubeModel):
    """Where the adapter and the checkpoints are written."""

    uri: OutputUri
    """pvc://CLAIM/PATH or s3://BUCKET/PREFIX. The adapter goes to <uri>/adapter, checkpoints to
    <uri>/checkpoints (with s3://, uploaded as they are written; a restart resumes from the newest complete one)."""
    s3: S3Access | None = None
    """Credentials, endpoint and region of an s3:// output. ModelServers that serve this job's adapter mount the
    same Secret into their adapter fetcher."""

    rules = s3_rules(secret_ref=False)


class FineTuneJobSpec(KubeModel):
    """The desired post-training run."""

    method: Method = Field(
        default=Method.SFT,
        json_schema_extra={
            "x-kubernetes-validations": [
                {"rule": "self == oldSelf", "message": "method is immutable; create a new FineTuneJob"}
            ]
        },
    )
    """SFT (supervised fine-tuning on prompt/response) or DPO (preference pairs)."""
    base_model: BaseModelSource = Field(
        json_schema_extra={
            "x-kubernetes-validations": [
                {"rule": "self.uri == oldSelf.uri", "message": "baseModel.uri is immutable; create a new FineTuneJob"}
            ]
        }
    )
    """The model that is adapted."""
    dataset: Dataset
    """The training data."""
    from_fine_tune_job: DnsLabel | None = None
    """DPO only: a FineTuneJob in the same namespace whose SFT adapter DPO starts from. The job waits
    until that FineTuneJob has succeeded."""
    lora: LoRA = Field(default_factory=LoRA, json_schema_extra={"default": {}})
    """The LoRA adapter."""
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters, json_schema_extra={"default": {}})
    """Optimisation settings."""
    resources: Resources = Field(default_factory=Resources, json_schema_extra={"default": {}})
    """GPUs and host resources."""
    distributed: Distributed = Field(default_factory=Distributed, json_schema_extra={"default": {}})
    """Distribution settings; auto values are planned by the operator."""
    output: Output
    """Where the adapter and checkpoints go."""
    checkpointing: Checkpointing = Field(default_factory=Checkpointing, json_schema_extra={"default": {}})
    """Checkpoint frequency and retention."""
    suspend: bool = False
    """Suspend the run: pods are removed and recreated (resuming from the last checkpoint) when false."""
    ttl_seconds_after_finished: int | None = Field(default=None, ge=0)
    """Delete the training Job (not this FineTuneJob, not the adapter) this long after it finished."""
    backoff_limit: int = Field(default=3, ge=0, le=100)
    """Restarts tolerated before the run is Failed. When any training pod fails, every pod of the job stops and
    the whole group starts again from the newest complete checkpoint; a disruption (preemption, node drain) does
    the same without counting, a permanent error (invalid data) fails the run at once."""
    image: str | None = Field(default=None, min_length=1, max_length=512)
    """Trainer image override; the operator's configured image otherwise."""
    queue_name: DnsLabel | None = None
    """Kueue LocalQueue to submit to (the kueue.x-k8s.io/queue-name label of the training Job). The Job is created
    suspended and Kueue alone resumes and suspends it: admission, preemption (the trainer checkpoints; the job
    resumes from there when admitted again, not counted against backoffLimit). docs/kueue.md."""
    priority_class_name: DnsLabel | None = None
    """Priority of the run. With queueName: a Kueue WorkloadPriorityClass (the kueue.x-k8s.io/priority-class
    label), which orders the queue and decides preemption by Kueue. Without: a PriorityClass for the training
    pods (priorityClassName), which the scheduler uses."""
    env: list[EnvVar] = Field(default_factory=list, max_length=64)
    """Extra environment variables for the trainer (e.g. HF_ENDPOINT)."""
    pod_metadata: PodMetadata | None = None
    """Labels and annotations for the training pods."""

    rules = (
        Rule(
            cel="!has(self.fromFineTuneJob) || self.method == 'DPO'",
            message="fromFineTuneJob is only allowed with method DPO (an SFT job starts from the base model)",
            check=lambda s: s.from_fine_tune_job is None or s.method == Method.DPO,
        ),
        Rule(
            cel="!(self.method == 'SFT' && self.dataset.format == 'preference')",
            message="dataset.format preference (prompt/chosen/rejected) needs method DPO",
            check=lambda s: not (s.method == Method.SFT and s.dataset.format == DatasetFormat.PREFERENCE),
        ),
        Rule(
            cel="!(self.method == 'DPO' && self.hyperparameters.packing == 'on')",
            message="hyperparameters.packing on is for SFT; DPO batches pairs of similar length instead (use auto)",
            check=lambda s: not (s.method == Method.DPO and s.hyperparameters.packing == "on"),
        ),
        Rule(
            cel="!(self.method == 'DPO' && self.dataset.format in ['prompt-response', 'messages'])",
            message="method DPO needs preference data: dataset.format preference or auto",
            check=lambda s: (
                not (
                    s.method == Method.DPO
                    and s.dataset.format in (DatasetFormat.PROMPT_RESPONSE, DatasetFormat.MESSAGES)
                )
            ),
        ),
        Rule(
            # Guarded: with nodes or gpusPerNode 0 (refused by their minimum) the modulus would report its own error.
            cel="self.resources.nodes * self.resources.gpusPerNode < 1 || "
            "self.hyperparameters.globalBatchSize % (self.resources.nodes * self.resources.gpusPerNode) == 0",
            message="hyperparameters.globalBatchSize must be a multiple of the number of GPUs "
            "(resources.nodes x resources.gpusPerNode)",
            check=lambda s: s.hyperparameters.global_batch_size % s.resources.world_size == 0,
        ),
    )


class JobState(StrEnum):
    PENDING = "Pending"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    SUSPENDED = "Suspended"
    QUEUED = "Queued"
    PREEMPTED = "Preempted"


class Progress(KubeModel):
    """Live training progress, reported by the trainer's rank 0 every few seconds."""

    step: int = Field(default=0, ge=0)
    """Optimizer steps done."""
    total_steps: int = Field(default=0, ge=0)
    """Optimizer steps planned."""
    percent: float = Field(default=0.0, ge=0, le=100)
    """step / totalSteps, in percent."""
    summary: str = ""
    """The PROGRESS column, e.g. "45% (450/1000)"."""
    epoch: float | None = None
    """Epochs done (fractional)."""
    loss: float | None = None
    """Training loss, averaged since the previous report."""
    eval_loss: float | None = None
    """Latest evaluation loss on the validation split."""
    learning_rate: float | None = None
    """Current learning rate."""
    tokens_per_second: float | None = None
    """Training throughput over all GPUs."""
    eta_seconds: int | None = Field(default=None, ge=0)
    """Estimated seconds until the last step."""
    eta: str = ""
    """The ETA column, e.g. "1h12m"."""
    updated_at: datetime | None = None
    """When the trainer last reported."""
    resumed_from: int | None = Field(default=None, ge=0)
    """The checkpoint step this run of the trainer resumed from (none: it started at step 0)."""


class MemoryEstimate(KubeModel):
    """Planner's estimate of peak memory per GPU, in GiB."""

    weights_gib: float = 0.0
    """Base model weights held on this GPU (after ZeRO-3 sharding)."""
    lora_gib: float = 0.0
    """LoRA parameters, their gradients and AdamW state (after sharding and offload)."""
    activations_gib: float = 0.0
    """Activations kept for the backward pass."""
    logits_gib: float = 0.0
    """Logits and loss buffers."""
    overhead_gib: float = 0.0
    """CUDA context, allocator fragmentation, communication buffers."""
    total_gib: float = 0.0
    """Sum of the above: the predicted peak."""
    available_gib: float = 0.0
    """Usable memory of one GPU."""


class Plan(KubeModel):
    """The resolved distributed settings: every `auto` of spec.distributed decided."""

    zero_stage: int = 0
    """DeepSpeed ZeRO stage (0 = plain data parallel)."""
    offload: Literal["none", "cpu"] = "none"
    """Optimizer (and ZeRO-3 parameter) offload."""
    micro_batch_size: int = 1
    """Sequences per GPU per forward pass."""
    gradient_accumulation_steps: int = 1
    """Micro-batches accumulated per optimizer step."""
    gradient_checkpointing: bool = False
    """Activation recomputation."""
    attention: str = "sdpa"
    """Attention implementation the plan asks for (status.trainer.attention: the one the trainer used)."""
    liger_kernels: bool = False
    """Liger fused RMSNorm/SwiGLU/RoPE/cross-entropy kernels."""
    compile: bool = False
    """torch.compile of each decoder layer."""
    packing: bool = False
    """SFT records packed into windows of maxSeqLength tokens (hyperparameters.packing resolved)."""
    world_size: int = 1
    """Training processes (GPUs) in all."""
    memory: MemoryEstimate = Field(default_factory=MemoryEstimate)
    """Estimated peak memory per GPU."""
    estimated_tokens_per_second: float | None = None
    """Estimated training throughput over all GPUs."""
    explanation: list[str] = Field(default_factory=list)
    """One sentence per decision."""


class AdapterStatus(KubeModel):
    """The trained adapter."""

    uri: str
    """Where the adapter is (pvc:// or s3://)."""
    base_model: str = ""
    """The base model URI it was trained on."""
    rank: int = 0
    """LoRA rank."""
    target_modules: list[str] = Field(default_factory=list)
    """Adapted modules."""
    sha256: str = ""
    """SHA-256 of the adapter weights file."""


class TrainerRuntime(KubeModel):
    """What the trainer actually runs with, reported by its rank 0 once the model is loaded (status.plan is
    what was asked for: the image may lack a kernel the plan names)."""

    attention: str = ""
    """Attention implementation the model runs with: sdpa, flash_attention_2 or eager."""


class CheckpointStatus(KubeModel):
    """The latest complete checkpoint."""

    step: int = 0
    """Optimizer step of the checkpoint."""
    uri: str = ""
    """Where it is."""


class RestartStatus(KubeModel):
    """One restart of every training pod of a job."""

    failed_job_uid: str
    """The training Job whose pod failed (it was replaced by a new one)."""
    pod: str = ""
    """The pod that failed first."""
    reason: str
    """Why: the trainer's reason, OOMKilled, TrainerFailed, or Disruption."""
    message: str = ""
    """The exit code or signal and the last log line, or the disruption's message."""
    disruption: bool = False
    """A preemption or node drain: not counted against backoffLimit."""
    resume_step: int | None = None
    """The newest checkpoint step reported when the group restarted (none: no checkpoint reported). The new pods
    resume from it, or from a newer one whose report the failure cut off: progress.resumedFrom says which."""
    time: datetime | None = None
    """When the operator restarted the group."""


class PrepareError(KubeModel):
    """Why the prepare step failed, as it reported it."""

    reason: str
    """DatasetInvalid, DatasetNotFound, ModelNotFound, AccessDenied, ..."""
    message: str = ""
    """For DatasetInvalid: the first bad lines with their numbers and reasons, then the count."""


class TokenLengths(KubeModel):
    """Token lengths of the records through the tokenizer and chat template: p50, p95 and max before truncation,
    mean and weighted as trained. A DPO record's length is its longer sequence (prompt and answer)."""

    p50: int = Field(default=0, ge=0)
    """Median record length."""
    p95: int = Field(default=0, ge=0)
    """95th percentile: compare with hyperparameters.maxSeqLength."""
    max: int = Field(default=0, ge=0)
    """The longest record."""
    mean: float = Field(default=0.0, ge=0)
    """Mean length as trained (each record cut at maxSeqLength)."""
    weighted: float = Field(default=0.0, ge=0)
    """Token-weighted mean length as trained, E[n^2]/E[n]: the length of the record an average token sits in (it
    sets attention's cost per token; the plan's speed estimate uses it). For DPO a pair counts as its longer
    sequence, the length the pair is padded to."""
    pair_fill: float = Field(default=0.0, ge=0, le=1)
    """DPO: the share of real tokens when each pair's two sequences are padded to the longer one (0 for SFT)."""


class DatasetStatus(KubeModel):
    """What the prepare step (`kubetune prepare`, a CPU pod before the training pods) found, reported by it."""

    inputs_hash: str = ""
    """Hash of the spec fields the check depends on: a report of an older spec is not used."""
    records: int = Field(default=0, ge=0)
    """Valid records."""
    tokens: int = Field(default=0, ge=0)
    """Tokens of all records through the model's tokenizer and chat template (before truncation)."""
    token_lengths: TokenLengths | None = None
    """Median, 95th percentile and longest record in tokens."""
    truncated: int = Field(default=0, ge=0)
    """Records longer than hyperparameters.maxSeqLength (cut at the end)."""
    dropped: int = Field(default=0, ge=0)
    """Records whose prompt alone fills maxSeqLength (not trained on)."""
    checked_at: datetime | None = None
    """When the check finished."""
    cache: str = ""
    """Where the prepared (tokenized, Arrow) dataset is in the cache claim; empty without a cache claim."""
    model_cache: str = ""
    """Where the base model is in the cache claim (hf:// and s3:// models); empty otherwise."""
    model_revision: str = ""
    """The commit sha the revision of an hf:// base model named when the step ran (its cache key); empty for
    other schemes."""
    dataset_revision: str = ""
    """The commit sha the revision of an hf:// dataset named when the step ran (its cache key); empty for other
    schemes."""
    downloaded: str = ""
    """Download progress while the prepare step runs, e.g. "base model 1.2 GB of 15.0 GB"."""
    error: PrepareError | None = None
    """Set when the prepare step failed."""


class FineTuneJobStatus(KubeModel):
    """Observed state of the run. Conditions carry the details; `state` is the summary."""

    state: JobState | None = None
    """Pending, Queued (waiting for Kueue), Running, Preempted (evicted by Kueue, waiting to resume),
    Succeeded, Failed or Suspended."""
    conditions: list[Condition] = Field(
        default_factory=list,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    """Succeeded, Failed, Running, Suspended, Queued, Preempted and admission conditions with reasons."""
    progress: Progress | None = None
    """Live progress from the trainer."""
    plan: Plan | None = None
    """The resolved training plan."""
    dataset: DatasetStatus | None = None
    """The prepare step's report: the dataset checked, tokenized and cached before any GPU is requested."""
    adapter: AdapterStatus | None = None
    """The adapter, once the run succeeded."""
    checkpoint: CheckpointStatus | None = None
    """The latest checkpoint."""
    trainer: TrainerRuntime | None = None
    """What the trainer actually runs with, reported by the trainer (status.plan is what was asked for)."""
    start_time: datetime | None = None
    """When the training pods first started running."""
    completion_time: datetime | None = None
    """When the run succeeded or failed."""
    restarts: int = Field(default=0, ge=0)
    """Group restarts after a training pod failed (disruptions not counted); each resumes from the newest
    complete checkpoint."""
    last_restart: RestartStatus | None = None
    """Why the training pods last started again."""
    observed_generation: int | None = None
    """The metadata.generation the status was computed for."""


class FineTuneJob(KubeModel):
    """LoRA post-training (SFT or DPO) of a base model, distributed with DeepSpeed over GPU nodes."""

    plural: ClassVar[str] = "finetunejobs"
    short_names: ClassVar[tuple[str, ...]] = ("ftj",)
    printer_columns: ClassVar[tuple[dict[str, Any], ...]] = (
        {"name": "Method", "type": "string", "jsonPath": ".spec.method"},
        {"name": "Model", "type": "string", "jsonPath": ".spec.baseModel.uri"},
        {"name": "State", "type": "string", "jsonPath": ".status.state"},
        {"name": "Prepared", "type": "string", "jsonPath": '.status.conditions[?(@.type=="Prepared")].reason'},
        {"name": "Progress", "type": "string", "jsonPath": ".status.progress.summary"},
        {"name": "Loss", "type": "number", "jsonPath": ".status.progress.loss"},
        {"name": "ETA", "type": "string", "jsonPath": ".status.progress.eta"},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    )

    # Its training pods are named <name>-<index>-<suffix>, and a pod's token names its pod: that is how a
    # pod may report the status of its own job only (render/trainer_access.py). Kubernetes cuts the pod names'
    # prefix <name>-<index>- at 58 characters; with an index below 1024, 52 keep it whole.
    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            cel="size(self.metadata.name) <= 52",
            message="a FineTuneJob's name may have at most 52 characters: its training pods are named "
            "<name>-<index>-<suffix>, and Kubernetes shortens longer pod names",
            check=lambda s: len(s.metadata.name) <= 52,
        ),
    )

    api_version: Literal["kubetune.io/v1alpha1"] = "kubetune.io/v1alpha1"
    kind: Literal["FineTuneJob"] = "FineTuneJob"
    metadata: ObjectMeta = Field(default_factory=ObjectMeta)
    spec: FineTuneJobSpec
    status: FineTuneJobStatus = Field(default_factory=FineTuneJobStatus)
