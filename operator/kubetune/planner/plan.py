"""The training plan: every `auto` of spec.distributed decided from the model, the GPUs and the batch.

How it decides
--------------
1. Candidates. ZeRO stage 0 (plain PyTorch, DDP over several GPUs), 2 or 3; CPU offload of the optimizer
   (ZeRO-2/3) and of the weights too (ZeRO-3); gradient checkpointing off or on; torch.compile of each
   decoder layer (checkpointing off, SFT only: with DPO the compiled policy and reference passes
   differ in bf16 rounding: docs/gpu-baselines.md) or Liger's fused RMSNorm/SwiGLU/RoPE kernels
   (smaller activations than eager code; the loss is TRL's fused LM head either way); SDPA attention,
   which is what `auto` means for attention (the planner cannot know whether the image has flash-attn,
   and SDPA's flash kernels need no package). A setting fixed in spec.distributed leaves only that value.
2. Memory. For each candidate the micro-batch is the largest divisor of the per-GPU batch whose predicted
   peak (memory.py) fits in the GPU's memory less a safety margin (10%, 20% on cards under 32 GiB).
   CPU offload is considered only when nothing fits without it, weight offload only when optimizer
   offload does not fit either, and offload also needs the host memory of the pod (spec.resources.memory,
   else a typical server of that GPU type).
3. Speed. Among the candidates that fit, the fastest by the throughput model (throughput.py) wins; within
   1% the simpler one: a lower ZeRO stage, no offload, checkpointing off, a larger micro-batch. In
   practice: no DeepSpeed when the model fits on each GPU (LoRA's optimizer state is tiny, so ZeRO-2
   saves little and ZeRO-3 costs weight gathering); checkpointing off whenever the activations fit (the
   largest single gain, ~1.5x on an H200), never traded for a larger micro-batch (under 2%); ZeRO-3 when
   the bf16 weights leave no room for activations, or when sharding them frees the room that lets
   checkpointing go off on a fast interconnect; CPU offload last.
4. Nothing fits: PlanInfeasible, saying how many GPUs of that type would do with ZeRO-3 (and offload).

Without a known architecture (a model that is neither in models.KNOWN_ARCHITECTURES nor readable), or
without a GPU memory figure, memory is not checked and a conservative plan is returned: ZeRO-3 over
several GPUs, checkpointing on, micro-batch 1, no offload.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from typing import Literal

from kubetune.api.v1alpha1.finetunejob import Distributed, FineTuneJobSpec, MemoryEstimate, Plan, TokenLengths
from kubetune.planner import memory, throughput
from kubetune.planner.gpus import INTER_NODE_GBS, gpu_type
from kubetune.planner.models import ModelArchitecture, architecture_for_uri
from kubetune.planner.workload import DataLengths, Kernels, Offload, Setup, Workload

SAFETY_MARGIN = 0.10
"""Share of GPU memory kept free: prediction error, fragmentation spikes, a longer-than-usual batch."""
SMALL_GPU_GIB = 32.0
SMALL_GPU_MARGIN = 0.20
"""Cards under 32 GiB (the 24 GB RTX 4090 class) keep 20% free: the driver's own reservation and allocator
fragmentation are a larger share of them, and an OOM there costs a whole multi-GPU job."""


def safety_margin(capacity_gib: float) -> float:
    """Share of a GPU's memory the plan leaves free."""
    return SMALL_GPU_MARGIN if capacity_gib < SMALL_GPU_GIB else SAFETY_MARGIN


HOST_MARGIN = 0.10
HOST_GIB_PER_PROCESS = 4.0
"""Host memory of one training process besides offloaded state (Python, CUDA libraries, data loader)."""
TIE = 0.01
MAX_GPUS = 1024


class PlanInfeasible(Exception):
    """No setting fits the job on the requested GPUs; the message says why and what would."""


@dataclass(frozen=True)
class Overrides:
    """The settings the user fixed in spec.distributed (None where `auto`)."""

    zero_stage: int | None = None
    offload: Literal["none", "cpu"] | None = None
    checkpointing: bool | None = None
    attention: str | None = None
    micro_batch: int | None = None

    @classmethod
    def from_distributed(cls, d: Distributed) -> Overrides:
        return cls(
            zero_stage=None if d.zero_stage == "auto" else int(d.zero_stage),
            offload=None if d.offload == "auto" else d.offload,
            checkpointing=None if d.gradient_checkpointing == "auto" else d.gradient_checkpointing == "on",
            attention=None if d.attention == "auto" else d.attention,
            micro_batch=None if d.micro_batch_size == "auto" else int(d.micro_batch_size),
        )

    def constrains_memory(self) -> bool:
        return any(v is not None for v in (self.zero_stage, self.offload, self.checkpointing, self.micro_batch))

    def fixed(self) -> list[str]:
        """The fixed settings, as spec.distributed names them."""
        names = {
            "zeroStage": self.zero_stage,
            "offload": self.offload,
            "gradientCheckpointing": self.checkpointing,
            "attention": self.attention,
            "microBatchSize": self.micro_batch,
        }
        return [f"{k}={_wire(v)}" for k, v in names.items() if v is not None]


def _wire(value: object) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


@dataclass(frozen=True)
class Candidate:
    setup: Setup
    memory: memory.MemoryBreakdown
    tokens_per_second: float | None


# --- Entry points ---------------------------------------------------------------------------------


def plan_job(
    spec: FineTuneJobSpec,
    *,
    gpu_memory_gib: float | None = None,
    gpu_type: str | None = None,
    lengths: TokenLengths | None = None,
) -> Plan:
    """The plan for a FineTuneJob. `gpu_memory_gib` (operator configuration for GPU types the planner does
    not know) and `gpu_type` take precedence over spec.resources; `lengths` (status.dataset.tokenLengths of the
    current inputs) refine the speed estimate. Raises PlanInfeasible."""
    res = spec.resources
    return plan_training(
        architecture_for_uri(spec.base_model.uri),
        model_name=spec.base_model.uri,
        method=spec.method.value,
        seq=spec.hyperparameters.max_seq_length,
        global_batch=spec.hyperparameters.global_batch_size,
        lora_rank=spec.lora.r,
        lora_targets=tuple(spec.lora.target_modules),
        lora_dropout=spec.lora.dropout,
        nodes=res.nodes,
        gpus_per_node=res.gpus_per_node,
        gpu_type_name=gpu_type or res.gpu_type,
        gpu_memory_gib=gpu_memory_gib or quantity_gib(res.gpu_memory),
        host_memory_gib=quantity_gib(res.memory),
        overrides=Overrides.from_distributed(spec.distributed),
        packing=spec.hyperparameters.packing,
        lengths=data_lengths(lengths),
    )


def data_lengths(lengths: TokenLengths | None) -> DataLengths | None:
    """The figures of the prepare step's report the speed model reads (None before it reported them)."""
    if lengths is None or lengths.mean <= 0 or lengths.weighted <= 0:
        return None
    return DataLengths(mean=lengths.mean, weighted=lengths.weighted, pair_fill=lengths.pair_fill or 1.0)


def plan_training(
    arch: ModelArchitecture | None,
    *,
    model_name: str,
    seq: int,
    global_batch: int,
    method: str = "SFT",
    lora_rank: int = 64,
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj"),
    lora_dropout: float = 0.05,
    nodes: int = 1,
    gpus_per_node: int = 1,
    gpu_type_name: str | None = None,
    gpu_memory_gib: float | None = None,
    host_memory_gib: float | None = None,
    overrides: Overrides | None = None,
    packing: PackingRequest = "auto",
    lengths: DataLengths | None = None,
) -> Plan:
    """The plan for a model architecture (None: unknown) on `nodes` x `gpus_per_node` GPUs; `lengths`, the
    dataset's as the prepare step measured them, refine the speed estimate."""
    over = overrides or Overrides()
    world = nodes * gpus_per_node
    per_gpu = _samples_per_gpu(global_batch, world, over.micro_batch, method)
    gpu = gpu_type(gpu_type_name)
    packs = PackingChoice(packing_decision(method, packing, over.attention), packing)
    if arch is None:
        name = model_name.rsplit("/", 1)[-1] or model_name
        return _conservative_plan(
            world, per_gpu, over, packs, f"The architecture of {name} is unknown, so memory was not estimated.", method
        )
    w = Workload(
        arch=arch,
        seq=seq,
        global_batch=global_batch,
        method="DPO" if method.upper() == "DPO" else "SFT",
        lora_rank=lora_rank,
        lora_targets=tuple(lora_targets),
        lora_dropout=lora_dropout,
        nodes=nodes,
        gpus_per_node=gpus_per_node,
        gpu=gpu,
        gpu_memory_gib=gpu_memory_gib,
        host_memory_gib=host_memory_gib,
        lengths=lengths,
    )
    if not arch.lora_targets(w.lora_targets):
        raise PlanInfeasible(
            f"lora.targetModules {list(lora_targets)} names none of the linear layers of {arch.display_name} "
            "(q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj or all-linear)"
        )
    if w.capacity_gib is None:
        what = f"GPU type {gpu_type_name!r} is unknown" if gpu_type_name else "no GPU type is given"
        plan = _conservative_plan(
            world,
            per_gpu,
            over,
            packs,
            f"The {what} and resources.gpuMemory is not set, so memory was not checked.",
            method,
        )
        setup = _setup_of(plan)
        plan.memory = _memory_estimate(memory.estimate(w, setup), 0.0)
        return plan
    return _plan_with_memory(w, over, per_gpu, packs)


# --- Packing --------------------------------------------------------------------------------------

PackingRequest = Literal["auto", "on", "off"]

ISOLATING_ATTENTION = ("flex_attention", "sdpa", "eager", "flash_attention_2")
"""Attention paths that keep packed records apart. flash_attention_2 runs its variable-length kernels on the
record boundaries TRL's collator passes; the others get a mask that transformers (>= 4.53) builds from the
per-record position ids when there is no attention_mask: flex_attention a block mask whose masked blocks are
skipped, sdpa and eager a dense block-diagonal one (tests/trainer/test_packing.py checks all of them)."""


@dataclass(frozen=True)
class PackingChoice:
    """hyperparameters.packing as asked, and resolved."""

    on: bool
    requested: PackingRequest = "auto"


def packing_decision(method: str, requested: PackingRequest, attention: str | None) -> bool:
    """Whether SFT records are packed: `on`/`off` as asked, auto on for SFT when the attention path keeps packed
    records apart. DPO never (TRL 1.16 has no padding-free DPO; the trainer batches pairs by length instead)."""
    if method.upper() == "DPO":
        return False
    if requested != "auto":
        return requested == "on"
    return (attention or "flex_attention") in ISOLATING_ATTENTION


def planned_attention(over: Overrides, packing: bool) -> str:
    """The attention the plan names: the fixed one, else flex_attention for packed records (its block mask skips
    the blocks between records; SDPA would get a dense mask that turns its flash kernel off), else sdpa."""
    return over.attention or ("flex_attention" if packing else "sdpa")


# --- Planning -------------------------------------------------------------------------------------


def _samples_per_gpu(global_batch: int, world: int, micro: int | None, method: str) -> int:
    unit = "preference pairs" if method.upper() == "DPO" else "sequences"
    if global_batch % world:
        raise PlanInfeasible(
            f"globalBatchSize {global_batch} cannot be split over {world} GPUs: it must be a multiple of the "
            "number of GPUs (microBatchSize x gradient accumulation x GPUs)"
        )
    per_gpu = global_batch // world
    if micro is not None and per_gpu % micro:
        raise PlanInfeasible(
            f"globalBatchSize {global_batch} is not microBatchSize {micro} x gradient accumulation x {world} GPUs: "
            f"each GPU gets {per_gpu} {unit} per step, which micro-batches of {micro} do not divide"
        )
    return per_gpu


def _usable_gib(w: Workload, margin: float | None = None) -> float:
    capacity = w.capacity_gib or 0.0
    return capacity * (1 - (safety_margin(capacity) if margin is None else margin))


def _host_available_gib(w: Workload) -> float | None:
    if w.host_memory_gib:
        return w.host_memory_gib * (1 - HOST_MARGIN)
    if w.gpu:
        return w.gpu.host_memory_gib_per_gpu * w.gpus_per_node * (1 - HOST_MARGIN)
    return None


def _host_needed_gib(w: Workload, m: memory.MemoryBreakdown) -> float:
    return m.host_gib + HOST_GIB_PER_PROCESS * w.gpus_per_node


def _host_fits(w: Workload, m: memory.MemoryBreakdown) -> bool:
    if m.host_gib == 0:
        return True
    available = _host_available_gib(w)
    return available is None or _host_needed_gib(w, m) <= available


def _divisors_desc(n: int) -> list[int]:
    return sorted((d for d in range(1, n + 1) if n % d == 0), reverse=True)


def _families(w: Workload, over: Overrides) -> list[tuple[int, Offload, bool, Kernels]]:
    """(zero stage, offload, checkpointing, kernels) combinations allowed by the overrides, least offload
    first."""
    stages = [over.zero_stage] if over.zero_stage is not None else [0, 2, 3]
    checkpointing = [over.checkpointing] if over.checkpointing is not None else [False, True]
    families: list[tuple[int, Offload, bool, Kernels]] = []
    for stage in stages:
        offloads: list[Offload] = ["none", "optimizer", "all"]
        if over.offload == "none":
            offloads = ["none"]
        elif over.offload == "cpu":
            offloads = ["optimizer", "all"]
        for offload in offloads:
            if (stage == 0 and offload != "none") or (stage == 2 and offload == "all"):
                continue
            for ckpt in checkpointing:
                kernels: list[Kernels] = ["liger"] if ckpt or w.method == "DPO" else ["compile", "liger"]
                if stage == 3:
                    # Under ZeRO-3 neither takes effect: the partitioned weights keep Liger's patches and
                    # compiled layers from running (measured: activations as large as unfused ones).
                    kernels = ["eager"]
                families.extend((stage, offload, ckpt, k) for k in kernels)
    return families


def _fitting(w: Workload, over: Overrides, per_gpu: int, usable: float, packing: PackingChoice) -> list[Candidate]:
    """For each family, the largest micro-batch that fits; offload families only when needed."""
    attention = planned_attention(over, packing.on)
    micros = [over.micro_batch] if over.micro_batch is not None else _divisors_desc(per_gpu)
    by_offload: dict[Offload, list[Candidate]] = {"none": [], "optimizer": [], "all": []}
    for stage, offload, ckpt, kernels in _families(w, over):
        for micro in micros:
            setup = Setup(stage, offload, ckpt, kernels, attention, micro, packing.on)
            m = memory.estimate(w, setup)
            if m.total <= usable and _host_fits(w, m):
                tps = throughput.tokens_per_second(w, setup, w.gpu) if w.gpu else None
                by_offload[offload].append(Candidate(setup, m, tps))
                break
    for level in ("none", "optimizer", "all"):
        if by_offload[level]:
            return by_offload[level]
    return []


def _preference(c: Candidate) -> tuple[int, int, int, int, int]:
    s = c.setup
    offload = {"none": 0, "optimizer": 1, "all": 2}[s.offload]
    kernels = {"compile": 0, "liger": 1, "eager": 2}[s.kernels]
    return (s.zero_stage, offload, int(s.checkpointing), -s.micro_batch, kernels)


def _best(candidates: list[Candidate]) -> Candidate:
    speeds = [c.tokens_per_second for c in candidates if c.tokens_per_second is not None]
    if speeds:
        fastest = max(speeds)
        candidates = [c for c in candidates if (c.tokens_per_second or 0) >= fastest * (1 - TIE)]
    return min(candidates, key=_preference)


def _plan_with_memory(w: Workload, over: Overrides, per_gpu: int, packing: PackingChoice) -> Plan:
    # Decisions are made for records that fill maxSeqLength, measured lengths or not: the speed model's terms for
    # short records (host time, padding) are fitted on few runs, and one choice they made (DPO pairs in one large
    # micro-batch with checkpointing) ran slower than predicted (docs/planner.md). The lengths refine the estimate.
    decide = replace(w, lengths=None)
    candidates = _fitting(decide, over, per_gpu, _usable_gib(w), packing)
    tight = False
    if not candidates and over.constrains_memory():
        # What the user fixed is kept as long as the prediction stays under the card's capacity.
        candidates = _fitting(decide, over, per_gpu, _usable_gib(w, margin=0.0), packing)
        tight = bool(candidates)
    if not candidates:
        raise PlanInfeasible(_infeasible_reason(w, over, packing))
    best = _best(candidates)
    if w.lengths is not None and w.gpu is not None:
        gpu = w.gpu
        estimated = [replace(c, tokens_per_second=throughput.tokens_per_second(w, c.setup, gpu)) for c in candidates]
        best = estimated[candidates.index(best)]
        candidates = estimated
    return _to_plan(w, over, per_gpu, best, candidates, tight, packing)


# --- Infeasible -----------------------------------------------------------------------------------


def _gpu_name(w: Workload) -> str:
    return w.gpu.display_name if w.gpu else f"{w.capacity_gib:g} GiB GPU"


def _smallest_setup(offload: Offload) -> Setup:
    return Setup(3, offload, True, "eager", "sdpa", 1)


def _fits_minimally(w: Workload, offload: Offload) -> bool:
    m = memory.estimate(w, _smallest_setup(offload))
    return m.total <= _usable_gib(w) and _host_fits(w, m)


def _world_sizes_beyond(w: Workload) -> list[tuple[int, int]]:
    """(nodes, gpus per node) of ever larger jobs that can split the global batch: more GPUs in the node first
    (up to 8), then more nodes."""
    shapes = []
    if w.nodes == 1:
        shapes += [(1, g) for g in range(w.gpus_per_node + 1, max(8, w.gpus_per_node) + 1)]
    per_node = max(w.gpus_per_node, 8) if w.nodes == 1 else w.gpus_per_node
    shapes += [(n, per_node) for n in range(2, MAX_GPUS // per_node + 1)]
    return [s for s in shapes if s[0] * s[1] > w.world_size and w.global_batch % (s[0] * s[1]) == 0]


def _infeasible_reason(w: Workload, over: Overrides, packing: PackingChoice) -> str:
    name, gpu = w.arch.display_name, _gpu_name(w)
    what = f"{name} ({w.method}, LoRA r{w.lora_rank}) at seq {w.seq}"
    usable = _usable_gib(w)
    if over.fixed():
        try:
            auto = _plan_with_memory(w, Overrides(), w.samples_per_gpu, packing)
        except PlanInfeasible:
            auto = None
        if auto is not None:
            return (
                f"{what} does not fit {w.world_size} {gpu} with the settings fixed in spec.distributed "
                f"({', '.join(over.fixed())}); with them set to auto it would run as ZeRO-{auto.zero_stage}, "
                f"offload {auto.offload}, checkpointing {'on' if auto.gradient_checkpointing else 'off'}, "
                f"micro-batch {auto.micro_batch_size} ({auto.memory.total_gib:.1f} GiB per GPU)"
            )
    options: tuple[tuple[Offload, str], ...] = (("none", "ZeRO-3"), ("all", "ZeRO-3 and CPU offload"))
    for nodes, per_node in _world_sizes_beyond(w):
        bigger = w.with_gpus(nodes, per_node)
        for offload, how in options:
            if _fits_minimally(bigger, offload):
                return f"{what} needs at least {nodes * per_node} {gpu} with {how}; {w.world_size} requested"
    smallest = memory.estimate(w, _smallest_setup("all"))
    if smallest.total > usable:
        return (
            f"{what} does not fit any number of {gpu}: even with ZeRO-3, CPU offload, checkpointing and "
            f"micro-batch 1 one GPU needs {smallest.total:.1f} GiB ({smallest.activations:.1f} GiB of "
            f"activations) of {usable:.1f} GiB usable; lower hyperparameters.maxSeqLength"
        )
    return (
        f"{what} needs {_host_needed_gib(w, smallest):.0f} GiB of host memory per pod to offload its weights "
        f"to the CPU; set resources.memory to a larger value or use more or larger GPUs"
    )


# --- The Plan ----------------------------------------------------------------------------------------


def _conservative_plan(
    world: int, per_gpu: int, over: Overrides, packing: PackingChoice, why: str, method: str = "SFT"
) -> Plan:
    stage = over.zero_stage if over.zero_stage is not None else (3 if world > 1 or over.offload == "cpu" else 0)
    offload = over.offload if over.offload is not None else "none"
    ckpt = over.checkpointing if over.checkpointing is not None else True
    micro = over.micro_batch or 1
    if over.zero_stage is not None:
        zero_line = f"ZeRO-{stage} as fixed in spec.distributed.zeroStage."
    elif stage == 3:
        zero_line = "ZeRO-3: shards the weights over the GPUs (and offloads), the safe choice when memory is unknown."
    else:
        zero_line = "No DeepSpeed: one GPU, nothing to shard."
    ckpt_line = f"Gradient checkpointing {'on' if ckpt else 'off'}" + (
        ": the safe choice when memory is unknown." if over.checkpointing is None else ", as fixed."
    )
    attention = planned_attention(over, packing.on)
    explanation = [
        why,
        zero_line,
        ckpt_line,
        _packing_line(packing, micro, attention, method),
        f"Micro-batch {micro} x accumulation {per_gpu // micro} x {world} GPU(s) = global batch {per_gpu * world}.",
    ]
    return Plan(
        zero_stage=stage,
        offload="cpu" if offload == "cpu" and stage else "none",
        micro_batch_size=micro,
        gradient_accumulation_steps=per_gpu // micro,
        gradient_checkpointing=ckpt,
        attention=attention,
        liger_kernels=False,
        compile=False,
        packing=packing.on,
        world_size=world,
        explanation=explanation,
    )


def _packing_line(packing: PackingChoice, micro: int, attention: str, method: str = "SFT") -> str:
    """The sentence for the packing decision."""
    if method.upper() == "DPO":
        if micro == 1:
            return "No packing (DPO): TRL 1.16 has no padding-free DPO; one pair per micro-batch pads nothing."
        return (
            f"No packing (DPO): TRL 1.16 has no padding-free DPO; pairs of similar length are batched together, so "
            f"micro-batches of {micro} pairs carry little padding."
        )
    if not packing.on:
        why = "as set in hyperparameters.packing" if packing.requested == "off" else f"({attention} mixes records)"
        return f"Packing off {why}: each micro-batch of {micro} record(s) is padded to its longest record."
    how = {
        "flex_attention": "flex_attention's block mask skips the blocks between records",
        "flash_attention_2": "flash_attention_2 runs variable-length kernels on the record boundaries",
    }.get(attention, f"{attention} gets a dense block-diagonal mask over each micro-batch (slower than flex_attention)")
    asked = "as set in hyperparameters.packing" if packing.requested == "on" else "(auto for SFT)"
    return (
        f"Packing on {asked}: records share windows of maxSeqLength tokens with their own position ids, so no "
        f"padding is computed between them; attention and loss never cross a record ({how}); globalBatchSize counts "
        "windows."
    )


def _setup_of(plan: Plan) -> Setup:
    return Setup(
        zero_stage=plan.zero_stage,
        offload="optimizer" if plan.offload == "cpu" else "none",
        checkpointing=plan.gradient_checkpointing,
        kernels="compile" if plan.compile else "liger" if plan.liger_kernels else "eager",
        attention=plan.attention,
        micro_batch=plan.micro_batch_size,
        packing=plan.packing,
    )


def _memory_estimate(m: memory.MemoryBreakdown, available: float) -> MemoryEstimate:
    return MemoryEstimate(
        weights_gib=round(m.weights, 2),
        lora_gib=round(m.lora, 2),
        activations_gib=round(m.activations, 2),
        logits_gib=round(m.logits, 2),
        overhead_gib=round(m.overhead, 2),
        total_gib=round(m.total, 2),
        available_gib=round(available, 2),
    )


def _faster_by(best: Candidate, other: Candidate | None) -> str:
    if other is None or not best.tokens_per_second or not other.tokens_per_second:
        return ""
    return f" (~{best.tokens_per_second / other.tokens_per_second - 1:.0%} faster than the alternative)"


def _sharding_reason(w: Workload, best: Candidate, candidates: list[Candidate], gpu: str, weights_gib: float) -> str:
    """Why ZeRO-2 or ZeRO-3 rather than plain data parallelism."""
    s = best.setup
    if s.zero_stage == 3 and s.offload == "all":
        return "ZeRO-3 with the weights in host memory: even sharded, the bf16 weights leave no room on the GPUs."
    if w.world_size == 1:
        return f"ZeRO-{s.zero_stage} with CPU offload of the optimizer: the only setting that fits one {gpu}."
    what = "the LoRA gradients and optimizer state" if s.zero_stage == 2 else "the weights"
    lower = [c for c in candidates if c.setup.zero_stage < s.zero_stage]
    if not lower:
        if s.zero_stage == 3:
            return (
                f"ZeRO-3: the bf16 weights ({weights_gib:.1f} GiB) leave no room for the activations on one {gpu}, "
                f"so each GPU keeps 1/{w.world_size} of them."
            )
        return f"ZeRO-2: sharding {what} over the {w.world_size} GPUs makes the job fit."
    other = _best(lower)
    if other.setup.checkpointing and not s.checkpointing:
        gain = "lets checkpointing go off"
    else:
        gain = "allows a larger micro-batch"
    return (
        f"ZeRO-{s.zero_stage}: sharding {what} over {w.world_size} GPUs frees the memory that {gain}"
        f"{_faster_by(best, other)}."
    )


def _across_nodes(w: Workload, s: Setup) -> str:
    """What a multi-node plan assumes of the network between its nodes."""
    traffic = "the weight gathers and gradient reduces of ZeRO-3" if s.zero_stage == 3 else "the gradient all-reduce"
    line = (
        f"{w.nodes} nodes of {w.gpus_per_node} GPU(s): collectives ({traffic}) cross the network at an assumed "
        f"{INTER_NODE_GBS:g} GB/s "
        "between nodes (a 200 Gb/s NIC per node shared by its GPUs)"
    )
    if not w.gpu:
        return line + "."
    slower = min(w.gpu.collective_gbs, INTER_NODE_GBS)
    return line + f"; {w.gpu.collective_gbs:g} GB/s inside a node: the estimate uses the slower, {slower:g} GB/s."


def _to_plan(
    w: Workload,
    over: Overrides,
    per_gpu: int,
    best: Candidate,
    candidates: list[Candidate],
    tight: bool,
    packing: PackingChoice,
) -> Plan:
    s, m = best.setup, best.memory
    usable = _usable_gib(w)
    capacity = w.capacity_gib or 0.0
    gpu = _gpu_name(w)
    weights_gib = 2.0 * w.arch.total_params / memory.GIB
    lines: list[str] = []

    # ZeRO stage.
    if over.zero_stage is not None:
        lines.append(f"ZeRO-{s.zero_stage} as fixed in spec.distributed.zeroStage.")
    elif s.zero_stage == 0:
        where = "one GPU" if w.world_size == 1 else f"each of the {w.world_size} GPUs (plain data parallelism)"
        lines.append(
            f"No DeepSpeed: the bf16 weights ({weights_gib:.1f} GiB), the LoRA state and the activations fit on "
            f"{where}, so sharding would only add communication."
        )
    else:
        lines.append(_sharding_reason(w, best, candidates, gpu, weights_gib))

    # Offload.
    if over.offload is not None:
        moved = {"none": "", "optimizer": " (the optimizer state)", "all": " (the optimizer state and the weights)"}
        lines.append(f"Offload {over.offload}{moved[s.offload]} as fixed in spec.distributed.offload.")
    elif s.offload == "none":
        lines.append("No CPU offload: everything fits in GPU memory, which is much faster than host memory.")
    elif s.offload == "optimizer":
        lines.append("CPU offload of the optimizer state: without it the job does not fit in GPU memory.")
    else:
        lines.append(
            f"CPU offload of the optimizer and the weights: even sharded, the weights do not fit; "
            f"it needs ~{_host_needed_gib(w, m):.0f} GiB of host memory per pod and is PCIe-bound."
        )

    # Checkpointing and kernels.
    if over.checkpointing is not None:
        lines.append(f"Gradient checkpointing {'on' if s.checkpointing else 'off'} as fixed in spec.distributed.")
    elif not s.checkpointing:
        lines.append(
            f"Gradient checkpointing off: the activations ({m.activations:.1f} GiB) fit, which saves recomputing "
            "the forward pass (the largest single speed-up)."
        )
    else:
        micro = s.micro_batch if over.micro_batch is not None else 1
        off = memory.estimate(w, replace(s, checkpointing=False, kernels="liger", micro_batch=micro))
        what = "one sequence" if micro == 1 else f"micro-batch {micro}"
        lines.append(
            f"Gradient checkpointing on: without it {what} needs {off.total:.1f} GiB per GPU "
            f"of {usable:.1f} GiB usable."
        )
    if s.kernels == "compile":
        lines.append("torch.compile of each decoder layer: the fastest measured setting; the first step takes ~20 s.")
    elif s.kernels == "liger":
        reason = (
            "compiled layers are not used for DPO (policy and reference passes would differ in bf16 rounding)"
            if w.method == "DPO" and not s.checkpointing
            else "compile is not combined with checkpointing"
            if s.checkpointing
            else "they keep the activations small enough to fit"
        )
        lines.append(f"Liger kernels (fused RMSNorm, SwiGLU, RoPE): {reason}.")

    # Packing and attention.
    lines.append(_packing_line(packing, s.micro_batch, s.attention, w.method))
    if over.attention == "flash_attention_2":
        lines.append(
            "Attention flash_attention_2 as fixed in spec.distributed.attention: it needs the flash-attn package"
            " in the trainer image, else the trainer uses sdpa (status.trainer.attention says which ran)."
        )
    elif over.attention is not None:
        lines.append(f"Attention {s.attention} as fixed in spec.distributed.attention.")
    elif s.attention == "flex_attention":
        lines.append(
            "flex_attention: PyTorch's compiled block-sparse attention, no dependency on the flash-attn package "
            "(a trainer without a GPU uses sdpa, which keeps packed records apart too: status.trainer.attention)."
        )
    else:
        lines.append("SDPA attention: PyTorch's flash kernels, no dependency on the flash-attn package.")

    # Batch.
    accumulation = per_gpu // s.micro_batch
    batch = f"micro-batch {s.micro_batch} x accumulation {accumulation} x {w.world_size} GPU(s) = {w.global_batch}"
    if over.micro_batch is not None:
        lines.append(f"{batch[0].upper()}{batch[1:]}, micro-batch as fixed in spec.distributed.")
    elif s.micro_batch == per_gpu:
        lines.append(f"{batch[0].upper()}{batch[1:]}: the whole per-GPU batch fits in one micro-batch.")
    else:
        lines.append(f"{batch[0].upper()}{batch[1:]}: the largest micro-batch that fits (larger ones gain under 2%).")

    # Memory and speed.
    margin = round(100 * safety_margin(capacity))
    note = (
        f" Tight: over the {margin}% safety margin, kept because spec.distributed fixes the settings." if tight else ""
    )
    lines.append(
        f"Predicted peak {m.total:.1f} GiB per GPU of {capacity:.1f} GiB ({usable:.1f} usable with a {margin}% margin)."
        + note
    )
    if w.nodes > 1:
        lines.append(_across_nodes(w, s))
    if best.tokens_per_second:
        lines.append(f"Estimated {best.tokens_per_second:,.0f} tokens/s over {w.world_size} {gpu}{_counted(w, s)}.")
    if m.host_gib:
        available = _host_available_gib(w)
        assumed = "" if w.host_memory_gib else " (resources.memory unset: a typical server of this GPU type assumed)"
        if available is not None:
            lines.append(
                f"Host memory per pod: ~{_host_needed_gib(w, m):.0f} GiB needed of {available:.0f} GiB{assumed}."
            )
    return Plan(
        zero_stage=s.zero_stage,
        offload="none" if s.offload == "none" else "cpu",
        micro_batch_size=s.micro_batch,
        gradient_accumulation_steps=accumulation,
        gradient_checkpointing=s.checkpointing,
        attention=s.attention,
        liger_kernels=s.kernels == "liger",
        compile=s.kernels == "compile",
        packing=s.packing,
        world_size=w.world_size,
        memory=_memory_estimate(m, capacity * (1 - safety_margin(capacity))),
        estimated_tokens_per_second=round(best.tokens_per_second) if best.tokens_per_second else None,
        explanation=lines,
    )


# --- Helpers --------------------------------------------------------------------------------------


def _counted(w: Workload, s: Setup) -> str:
    """What the speed estimate counts and on which lengths."""
    filled = f"windows taken as {throughput.PACKING_FILL:.0%} full" if s.packing else ""
    if w.lengths is None:
        assumed = "each record taken to fill maxSeqLength until the prepare step measures the dataset"
        return f" (dataset tokens: {filled}, {assumed})" if filled else f" ({assumed})"
    unit = "pairs padded to their longer sequence of" if w.method == "DPO" else "records of"
    measured = (
        f"{unit} {w.lengths.mean:,.0f} tokens on average, attention at the token-weighted length "
        f"{w.attention_length:,.0f}, as the prepare step measured"
    )
    return f" (dataset tokens: {filled + ', ' if filled else ''}{measured})"


_UNITS = {
    "": 1,
    "k": 1e3,
    "M": 1e6,
    "G": 1e9,
    "T": 1e12,
    "P": 1e15,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "Pi": 2**50,
}


def quantity_gib(q: int | str | None) -> float | None:
    """A Kubernetes quantity (24Gi, 25G, 25769803776) in GiB; None when unset or not a byte quantity."""
    if q is None:
        return None
    if isinstance(q, int):
        return q / 2**30
    m = re.fullmatch(r"\s*([0-9.]+)([kMGTP]i?|)\s*", q)
    if not m:
        return None
    value = float(m.group(1)) * _UNITS[m.group(2)]
    return value / 2**30 if math.isfinite(value) else None
