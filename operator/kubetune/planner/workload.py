"""What is trained on what (`Workload`) and how (`Setup`): the inputs of the memory and speed models."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from kubetune.planner.gpus import GpuType
from kubetune.planner.models import ModelArchitecture

Kernels = Literal["eager", "liger", "compile"]
Offload = Literal["none", "optimizer", "all"]


@dataclass(frozen=True)
class DataLengths:
    """The dataset's token lengths as the prepare step measured them (status.dataset.tokenLengths), as trained."""

    mean: float
    """Mean record length (DPO: a pair's longer sequence, the length the pair is padded to)."""
    weighted: float
    """E[n^2]/E[n]: the length of the record an average token sits in; it sets attention's cost per token."""
    pair_fill: float = 1.0
    """DPO: the share of real tokens once each pair's two sequences are padded to the longer one."""


@dataclass(frozen=True)
class Workload:
    """A training job as far as memory and speed are concerned."""

    arch: ModelArchitecture
    seq: int
    """maxSeqLength: tokens of one sequence (for DPO: prompt + completion of one of the two answers)."""
    global_batch: int
    """Sequences (SFT) or preference pairs (DPO) per optimizer step."""
    method: Literal["SFT", "DPO"] = "SFT"
    lora_rank: int = 64
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    lora_dropout: float = 0.05
    nodes: int = 1
    gpus_per_node: int = 1
    gpu: GpuType | None = None
    gpu_memory_gib: float | None = None
    """Capacity of one GPU; the GPU type's when None."""
    host_memory_gib: float | None = None
    """Host memory of one pod, when the spec states it."""
    lengths: DataLengths | None = None
    """The dataset's lengths, once the prepare step measured them; None: every record taken to fill `seq`. Only
    the speed estimate reads them: memory and the plan's decisions are for records that fill `seq`."""

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def samples_per_gpu(self) -> int:
        """Sequences or pairs each GPU processes per optimizer step (0 when the batch does not divide)."""
        return self.global_batch // self.world_size if self.global_batch % self.world_size == 0 else 0

    @property
    def sequences_per_sample(self) -> int:
        """DPO runs chosen and rejected as two sequences of one batch."""
        return 2 if self.method == "DPO" else 1

    @property
    def tokens_per_sample(self) -> int:
        """Tokens of one sequence or pair that fills `seq` (what memory is planned for)."""
        return self.seq * self.sequences_per_sample

    @property
    def attention_length(self) -> float:
        """The record length at which attention is costed: the token-weighted length when measured, else `seq`."""
        return min(float(self.seq), self.lengths.weighted) if self.lengths else float(self.seq)

    @property
    def records_share_windows(self) -> bool:
        """Packing puts several records in a window: measured records of a mean length up to half the window (the
        trainer decides on the records themselves; before the prepare step every record is taken to fill it)."""
        return self.lengths is not None and self.lengths.mean <= self.seq / 2

    def computed_tokens_per_sample(self, s: Setup) -> float:
        """Tokens one sample puts through the model, padding included: a window with packing; else a record or a
        pair padded to the longest in its micro-batch. With measured lengths: pairs come grouped by length (the
        trainer's sampler), so a pair costs twice its mean longer sequence; one record per micro-batch costs its
        mean length; m unsorted records are padded to the longest of m, taken as mean + (1 - 1/m) x (weighted -
        mean), an interpolation: against the expected longest of m log-normal lengths (median 900, sigma 1, capped
        at 8192, as bench/trainer_realistic.py's) +5% at m = 2, -12% at 4, -30% at 8 (it underestimates the padding
        of larger micro-batches)."""
        if s.packing or self.lengths is None:
            return float(self.tokens_per_sample)
        mean = min(float(self.seq), self.lengths.mean)
        if self.method == "DPO":
            return self.sequences_per_sample * mean
        longest = mean + (1 - 1 / s.micro_batch) * (min(float(self.seq), self.lengths.weighted) - mean)
        return max(mean, longest)

    @property
    def capacity_gib(self) -> float | None:
        if self.gpu_memory_gib:
            return self.gpu_memory_gib
        return self.gpu.memory_gib if self.gpu else None

    @property
    def lora_params(self) -> int:
        return self.arch.lora_params(self.lora_rank, self.lora_targets)

    def with_gpus(self, nodes: int, gpus_per_node: int) -> Workload:
        return replace(self, nodes=nodes, gpus_per_node=gpus_per_node)


@dataclass(frozen=True)
class Setup:
    """One way to run a workload: the decisions a plan makes."""

    zero_stage: int = 0
    offload: Offload = "none"
    """optimizer: AdamW state and its step on the host; all: the frozen weights too (ZeRO-3 only)."""
    checkpointing: bool = True
    kernels: Kernels = "eager"
    """liger: Liger's RMSNorm/SwiGLU/RoPE kernels; compile: torch.compile of each decoder layer."""
    attention: str = "sdpa"
    micro_batch: int = 1
    """Sequences per forward pass; with packing, windows of `Workload.seq` tokens."""
    packing: bool = False
    """SFT records packed into windows of `Workload.seq` tokens, flattened into one row per micro-batch with
    per-record position ids (no padding between records; attention isolated by `attention`'s mask)."""

    @property
    def dense_packing_mask(self) -> bool:
        """Packed records isolated by a dense block-diagonal mask over the micro-batch's row (sdpa, eager):
        SDPA loses its flash kernel and attention spans the whole row, where flex_attention skips masked blocks and
        flash_attention_2 runs variable-length kernels."""
        return self.packing and self.attention in ("sdpa", "eager")
