"""Peak GPU memory of one training process: LoRA on a frozen bf16 base with TRL (SFTTrainer, DPOTrainer),
PEFT, PyTorch SDPA attention and optionally DeepSpeed ZeRO.

The peak is reached either at the end of the forward pass (everything saved for the backward pass plus
the loss buffers) or at the start of the backward pass of the last layer (saved tensors plus the
gradients in flight, plus with checkpointing the recomputed layer). Terms, per GPU:

weights      2 bytes x all parameters; ZeRO-3 keeps 1/world of them and gathers a working set (two decoder
             layers and the LM head) while computing; with weight offload none stay (the working set is
             then counted in the overhead, so that weights == 0 marks "weights offloaded").
lora         per trainable parameter: plain PyTorch keeps fp32 adapters (PEFT autocast_adapter_dtype),
             fp32 gradients and two fp32 AdamW moments = 16 bytes (+4 for DDP's gradient buckets);
             DeepSpeed bf16 keeps a bf16 copy and bf16 gradients plus an fp32 master, gradient and the
             moments, sharded by ZeRO-2/3 and moved to the host by optimizer offload.
activations  bytes per token and layer, with SDPA (flash/efficient kernels, no seq x seq matrix; with packing,
             SDPA gets transformers' dense block-diagonal mask, kept once per micro-batch, and its keys and values
             are repeated up to the query heads, as flex_attention does for head counts that are not a power of 2):
             RMSNorm input x2 (bf16 with Liger/compile, an fp32 copy in eager HF code), q and out (q_dim
             each), k and v (kv_dim each), SwiGLU gate and up (eager also keeps silu(gate)), and for each
             adapted linear a bf16 copy of its input plus the dropout mask (3 bytes x in_features; 2 without
             dropout, as in DPO where TRL disables dropout). With gradient checkpointing only each layer's
             input (2 x hidden) is kept and one layer is recomputed at a time. The gradients in flight at the
             start of a layer's backward pass are taken as 4 x (intermediate + hidden) bytes per token.
logits       TRL's fused LM head (SFT and DPO) never builds the logits: it projects 4096 tokens x 32768
             vocabulary entries at a time (one bf16 tile) and keeps the per-token statistics, the hidden
             states it scores and, in the backward pass, their fp32 gradient (8 bytes x hidden per token).
             DPO runs the reference pass (adapter disabled, no grad) after the policy's forward, while all
             of the policy's activations are kept: its working set (about 6 x intermediate + 8 x hidden bytes
             per token) adds to the end-of-forward peak.
overhead     CUDA context and workspaces, a share of the dynamic memory lost to allocator fragmentation,
             DeepSpeed buckets, NCCL buffers when there are several GPUs.

Calibrated on the H200 measurements of docs/gpu-baselines.md (see docs/planner.md): the predictions are within
a few percent of all seven figures.
"""

from __future__ import annotations

from dataclasses import dataclass

from kubetune.planner.workload import Setup, Workload

GIB = float(2**30)

CUDA_CONTEXT_GIB = 0.75
"""CUDA context, cuBLAS workspaces and kernels loaded by the process (not counted by torch.cuda.*):
device peak minus PyTorch's reserved memory, measured on an H200 (bench/results/planner_gpu_h200.json)."""
FRAGMENTATION = 0.02
"""Share of the dynamic memory (activations, logits) the caching allocator holds but cannot reuse."""
NCCL_GIB = 0.9
"""NCCL communicator buffers: with more than one GPU, and with DeepSpeed even on one (it always starts an
NCCL process group); measured 0.9 GiB on an H200."""
DEEPSPEED_GIB = 0.1
"""DeepSpeed engine state besides its buckets."""
LM_HEAD_TILE = (4096, 32768)
"""Tokens x vocabulary entries of the bf16 logits tile of TRL's fused LM head (trl.kernels.chunked_logprob)."""


@dataclass(frozen=True)
class MemoryBreakdown:
    """Predicted peak memory of one GPU, GiB; `host_gib` is host memory per pod for offloaded state."""

    weights: float
    lora: float
    activations: float
    logits: float
    overhead: float
    host_gib: float = 0.0
    outside_torch: float = 0.0
    """The part of `overhead` PyTorch's allocator does not see (CUDA context, NCCL buffers)."""

    @property
    def total(self) -> float:
        return self.weights + self.lora + self.activations + self.logits + self.overhead

    @property
    def torch_allocated(self) -> float:
        """The peak as torch.cuda.max_memory_allocated() reports it (approximately: less fragmentation)."""
        return self.total - self.outside_torch


def tokens_per_micro_batch(w: Workload, s: Setup) -> int:
    return s.micro_batch * w.tokens_per_sample


def layer_activation_bytes(w: Workload, s: Setup) -> float:
    """Bytes per token that one decoder layer keeps for the backward pass (no checkpointing)."""
    a = w.arch
    fused = s.kernels in ("liger", "compile")
    norms = 2 * (2 if fused else 4) * a.hidden_size
    if a.qk_norm:
        norms += (2 if fused else 4) * (a.q_dim + a.kv_dim)
    attention = 2 * a.q_dim + 4 * kv_saved_width(w, s) + 2 * a.q_dim + 4 * a.num_heads
    if s.attention == "eager":
        # The softmax output in fp32 and its bf16 copy, one entry per head per key the token attends over.
        attention += 6 * a.num_heads * attended_keys(w, s)
    mlp = (4 if fused else 6) * a.intermediate_size
    dropout = w.lora_dropout > 0 and w.method != "DPO"
    lora = (3 if dropout else 2) * a.lora_input_features(w.lora_targets)
    return norms + attention + mlp + lora


def attended_keys(w: Workload, s: Setup) -> int:
    """Keys each query's attention row spans: the sequence, or with a dense packing mask the micro-batch's whole
    row of windows (the mask hides the other records but the row is still computed)."""
    return s.micro_batch * w.seq if s.dense_packing_mask else w.seq


def kv_saved_width(w: Workload, s: Setup) -> int:
    """Width of the keys and values attention keeps for the backward pass. Transformers repeats the KV heads up to
    the query heads when SDPA gets a mask (packing) and for flex_attention when the query heads are not a power of
    two (Qwen2.5-7B has 28); otherwise the GQA kernels read the KV heads as they are."""
    a = w.arch
    heads = a.num_heads
    if (s.packing and s.attention == "sdpa") or (s.attention == "flex_attention" and heads & (heads - 1)):
        return a.q_dim
    return a.kv_dim


def packing_mask_bytes(w: Workload, s: Setup) -> float:
    """The dense block-diagonal mask transformers builds from packed position ids for SDPA (bool, and the bf16
    bias SDPA turns it into) or eager (bf16), per micro-batch; flex_attention's block mask is a few KiB."""
    if not s.dense_packing_mask:
        return 0.0
    row = float(s.micro_batch * w.seq)
    return (3.0 if s.attention == "sdpa" else 2.0) * row * row


def backward_transient_bytes(w: Workload) -> float:
    """Bytes per token of gradients in flight at the start of a layer's backward pass."""
    return 4.0 * (w.arch.intermediate_size + w.arch.hidden_size)


def logits_bytes(w: Workload, s: Setup) -> float:
    """The fused LM head: one logits tile, the scored hidden states and their fp32 gradient."""
    tokens = tokens_per_micro_batch(w, s)
    tile = min(tokens, LM_HEAD_TILE[0]) * min(w.arch.vocab_size, LM_HEAD_TILE[1]) * 2.0
    return tile + 8.0 * w.arch.hidden_size * tokens


def reference_pass_bytes(w: Workload, s: Setup) -> float:
    """DPO: the reference forward's working set (one layer at a time, no grad) on top of the policy's activations."""
    if w.method != "DPO":
        return 0.0
    return (6.0 * w.arch.intermediate_size + 8.0 * w.arch.hidden_size) * tokens_per_micro_batch(w, s)


def lora_bytes_per_param(w: Workload, s: Setup) -> float:
    world = w.world_size
    if s.zero_stage == 0:
        return 16.0 + (4.0 if world > 1 else 0.0)
    optimizer = 0.0 if s.offload != "none" else 16.0  # fp32 master, fp32 gradient, two moments
    if s.zero_stage == 2:
        return 2.0 + 2.0 + optimizer / world
    return (2.0 + 2.0 + optimizer) / world


def zero3_working_set_bytes(w: Workload, s: Setup) -> float:
    """Weights ZeRO-3 gathers while computing: the current and the prefetched layer, and the LM head
    (gathered whole for the loss). Nothing is gathered on one GPU unless the weights are offloaded."""
    if s.zero_stage != 3 or (w.world_size == 1 and s.offload != "all"):
        return 0.0
    a = w.arch
    return 2.0 * (2 * a.layer_params + a.embedding_params)


ZERO3_REUSE_SHARE = 0.39
"""Share of the (full) bf16 weights ZeRO-3 keeps gathered between the forward and the backward pass when
activations are not recomputed (stage3_max_reuse_distance): measured on an H200 at seq 2048, micro-batch 2,
with both eager and Liger kernels (5.5-5.9 GiB for Qwen2.5-7B)."""


def zero3_reuse_bytes(w: Workload, s: Setup) -> float:
    if s.zero_stage != 3 or s.checkpointing or s.offload == "all":
        return 0.0
    return ZERO3_REUSE_SHARE * 2.0 * w.arch.total_params


def deepspeed_bucket_bytes(w: Workload, s: Setup) -> float:
    """Reduce buckets (hidden^2 elements, double-buffered with overlap_comm) and the ZeRO-3 prefetch bucket."""
    if s.zero_stage == 0:
        return 0.0
    h2 = float(w.arch.hidden_size) ** 2
    buckets = 2 * 2 * h2
    if s.zero_stage == 3:
        buckets += 2 * 0.9 * h2
    return buckets + DEEPSPEED_GIB * GIB


def estimate(w: Workload, s: Setup) -> MemoryBreakdown:
    """Peak memory per GPU (GiB) of `w` run as `s`."""
    a = w.arch
    world = w.world_size
    tokens = tokens_per_micro_batch(w, s)

    all_weights = 2.0 * a.total_params
    if s.zero_stage == 3 and s.offload == "all":
        weights = 0.0
    elif s.zero_stage == 3:
        weights = all_weights / world
    else:
        weights = all_weights
    working_set = zero3_working_set_bytes(w, s)
    if s.offload != "all":
        weights += working_set + zero3_reuse_bytes(w, s)

    lora = w.lora_params * lora_bytes_per_param(w, s)

    layer = layer_activation_bytes(w, s) * tokens
    transient = backward_transient_bytes(w) * tokens
    head = 4.0 * a.hidden_size * tokens  # final norm input and output, kept for the LM head
    if s.checkpointing:
        kept = a.num_layers * 2.0 * a.hidden_size * tokens + head
        in_backward = layer + transient
    else:
        kept = a.num_layers * layer + head
        in_backward = transient
    kept += packing_mask_bytes(w, s)
    logits = logits_bytes(w, s)
    # Peak: end of forward (kept + logits, + DPO's reference pass) or start of backward (kept + in_backward).
    activations = kept + max(reference_pass_bytes(w, s), in_backward - logits, 0.0)

    outside_torch = CUDA_CONTEXT_GIB * GIB
    if world > 1 or s.zero_stage > 0:
        outside_torch += NCCL_GIB * GIB
    overhead = outside_torch + FRAGMENTATION * (activations + logits) + deepspeed_bucket_bytes(w, s)
    if s.offload == "all":
        overhead += working_set

    host = 0.0
    if s.offload != "none":
        per_pod = w.gpus_per_node / world
        host += w.lora_params * 16.0 * per_pod  # fp32 master, gradient and moments, sharded over ranks
        if s.offload == "all":
            host += all_weights * per_pod
        host *= 1.1  # pinned staging buffers

    return MemoryBreakdown(
        weights=weights / GIB,
        lora=lora / GIB,
        activations=activations / GIB,
        logits=logits / GIB,
        overhead=overhead / GIB,
        host_gib=host / GIB,
        outside_torch=outside_torch / GIB,
    )
