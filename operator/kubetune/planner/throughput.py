"""Training throughput (tokens/s over all GPUs) from FLOPs, memory traffic and communication.

Per token, LoRA on a frozen base costs 2 N FLOPs forward and 2 N backward (input gradients only; N =
parameters of the layers and the LM head), 2 N more when checkpointing recomputes the forward, and 6 (8)
x the adapter parameters; causal attention adds 2 x seq x q_dim per layer per pass (forward, two for
backward, one more with recompute); DPO adds the reference forward (adapter disabled). Matmul FLOPs
run at a fraction of the card's matmul speed that depends on the kernels (eager < Liger < compiled
layers), attention FLOPs at a lower fraction, and each adapted linear adds memory-bound work (casts,
dropout, small matmuls) of about 48 bytes per input feature per token. Fixed costs: ~8 ms per
micro-batch, ~30 ms per optimizer step.

ZeRO-3 hooks cost 10% even on one GPU; over several GPUs it gathers the bf16 weights every pass,
overlapped with compute by prefetching. DDP all-reduces the (small) LoRA gradients once per step. CPU
offload adds the host optimizer step and PCIe copies, and with weight offload a host-to-device copy of
every weight shard per pass. A micro-batch takes at least the host's time (Python, hooks, kernel launches per
layer and pass): what short records and pairs are bound by.

The estimate counts the dataset's tokens only (what the trainer reports): packed windows are PACKING_FILL full.
Before the prepare step the planner does not see the dataset and takes every record to fill maxSeqLength (for
data of short records a lower bound under packing, whose block mask skips the blocks between records, and an upper
bound without it). Once the prepare step measured the lengths (status.dataset.tokenLengths), attention is costed
at the token-weighted length, a micro-batch without packing holds records of the mean length (a pair: two
sequences padded to its longer one), and the fixed cost per micro-batch is spread over those tokens.

Calibrated on the H200 figures of docs/gpu-baselines.md (within 1%; not its DPO recipe-style one, which ran TRL's
own ZeRO-3 path with hooks on every submodule, which the trainer no longer has) and held to seven runs of the
trainer on one H100 within 15% (tests/unit/test_planner.py); other GPUs scale by their peak matmul speed and
memory bandwidth, which is an assumption, not a measurement.
"""

from __future__ import annotations

from kubetune.planner.gpus import INTER_NODE_GBS, GpuType
from kubetune.planner.workload import Kernels, Setup, Workload

LINEAR_EFFICIENCY: dict[Kernels, float] = {"eager": 0.69, "liger": 0.74, "compile": 0.82}
"""Fraction of the matmul speed the layer matmuls reach, with the overheads of each kernel choice."""
ATTENTION_EFFICIENCY = 0.39
"""Fraction of the matmul speed SDPA's flash kernels reach on causal attention (forward + backward)."""
EAGER_ATTENTION_EFFICIENCY = 0.15
FLEX_ATTENTION_EFFICIENCY = 0.235
"""flex_attention on the blocks its block mask keeps: 0.60 of SDPA's default kernels (cuDNN's on an H100), as
bench/kernel_floor.py measured causal attention at 8,192 tokens forward and backward on one H100 (311 against 516
TFLOP/s; bench/results/kernel_floor_h100.json)."""
MASKED_SDPA_EFFICIENCY = 0.25
"""SDPA's memory-efficient kernel, which it falls back to when given a dense mask (packing with sdpa). An
assumption, not measured."""
PACKING_FILL = 0.98
"""Share of a packed window that holds record tokens (best-fit decreasing over many records of mixed lengths);
the rest is padding that is computed but not counted in tokens/s."""
LORA_BYTES_PER_FEATURE = 48.0
"""Memory traffic per token per input feature of an adapted linear (fp32 cast, dropout, bf16 cast...)."""
MICRO_BATCH_SECONDS = 0.008
STEP_SECONDS = 0.03
ZERO3_HOOK_FACTOR = 1.10
"""ZeRO-3 with CPU offload ran 11% slower than plain PyTorch on one H200 (the baselines), ~1% of it the CPU step."""
ZERO2_FACTOR = 1.03
CPU_ADAM_PARAMS_PER_SECOND = 2e8
HOST_SECONDS_PER_LAYER_PASS: dict[Kernels, float] = {"eager": 0.0085, "liger": 0.0085, "compile": 0.0015}
"""Host time (Python, PEFT's wrappers, autograd, kernel launches, ZeRO-3's per-layer fetch) per decoder layer per
pass that records or runs the backward (a no-grad forward, such as DPO's reference pass, costs the host little). A
micro-batch takes at least this times layers x passes, however few its tokens. On one H100 (December 2026) with
short records (bench/trainer_realistic.py): the recipe (ZeRO-3, eager, checkpointing: forward, recomputed forward
and backward) spent 0.74 s on a record of ~1,500 tokens whose GPU work the model puts at 0.2 s (8.8 ms per layer
and pass), the DPO plan (eager with Liger: forward and backward) 0.46 s on two short pairs (8.2 ms): 8.5 ms for
both. Compiled
layers run each layer as one graph: 1.5 ms is an assumption, not measured (their micro-batches of full windows
are GPU-bound either way)."""
COMM_OVERLAP = 0.9
"""Share of the shorter of compute and ZeRO-3 weight gathering that prefetching hides."""


def flops_per_token(w: Workload, s: Setup) -> tuple[float, float]:
    """(matmul FLOPs, attention FLOPs) per processed token."""
    a = w.arch
    n, n_lora = float(a.matmul_params), float(w.lora_params)
    recompute = 1 if s.checkpointing else 0
    linear = (4 + 2 * recompute) * n + (6 + 2 * recompute) * n_lora
    # Causal attention at the records' token-weighted length (seq until the prepare step measured it: an upper bound
    # for packed short records, whose block mask skips the blocks between them). A dense packing mask computes the
    # whole square of the micro-batch's row.
    attention_pass = 2.0 * w.attention_length * a.q_dim * a.num_layers
    if s.dense_packing_mask:
        attention_pass = 2.0 * w.seq * a.q_dim * a.num_layers * 2.0 * s.micro_batch
    attention = (3 + recompute) * attention_pass
    if w.method == "DPO":
        linear += 2 * n
        attention += attention_pass
    return linear, attention


def compute_seconds_per_token(w: Workload, s: Setup, gpu: GpuType) -> float:
    """GPU time per token of forward and backward on one GPU, without communication."""
    peak = gpu.bf16_tflops * 1e12 * gpu.matmul_efficiency
    linear, attention = flops_per_token(w, s)
    attention_eff = attention_efficiency(w, s)
    lora_features = w.arch.lora_input_features(w.lora_targets) * w.arch.num_layers
    lora_bytes = LORA_BYTES_PER_FEATURE * lora_features * (1.5 if s.checkpointing else 1.0)
    return (
        linear / (peak * LINEAR_EFFICIENCY[s.kernels])
        + attention / (peak * attention_eff)
        + lora_bytes / (gpu.memory_bandwidth_gbs * 1e9)
    )


def attention_efficiency(w: Workload, s: Setup) -> float:
    """Fraction of the matmul speed the attention kernel of `s` reaches. Packed records get flex_attention only when
    two of them fit in a window: records that fill it (every record, until the prepare step measured the lengths;
    else a mean length over half the window) get SDPA's kernels, as the trainer loads them (trainer/train.py)."""
    if s.attention == "eager":
        return EAGER_ATTENTION_EFFICIENCY
    if s.dense_packing_mask:
        return MASKED_SDPA_EFFICIENCY
    if s.attention == "flex_attention" and w.records_share_windows:
        return FLEX_ATTENTION_EFFICIENCY
    return ATTENTION_EFFICIENCY


def host_seconds(w: Workload, s: Setup) -> float:
    """The host's time for one micro-batch: per decoder layer and pass (forward, backward, and the recomputed
    forward with checkpointing)."""
    passes = 2 + (1 if s.checkpointing else 0)
    kernels = s.kernels
    if kernels == "compile" and not s.packing and w.lengths is not None:
        # Records of many lengths, unpacked: compiled layers recompile for new lengths until dynamo's limit, then
        # run eagerly. On one H100 such a plan trained about 4,900 real tokens/s on the realistic records
        # (docs/gpu-baselines.md), a third of its packed speed; eager's host time (3,150 here) is the closer bound.
        kernels = "eager"
    return HOST_SECONDS_PER_LAYER_PASS[kernels] * passes * w.arch.num_layers


def real_share(w: Workload, s: Setup) -> float:
    """The share of computed tokens that are the dataset's (what the trainer counts in tokens/s)."""
    if s.packing:
        return PACKING_FILL
    if w.lengths is None:
        return 1.0
    if w.method == "DPO":
        return w.lengths.pair_fill
    return min(1.0, w.lengths.mean / w.computed_tokens_per_sample(s))


def collective_gbs(w: Workload, gpu: GpuType) -> float:
    """Bus bandwidth of a collective over all GPUs of the job."""
    return gpu.collective_gbs if w.nodes == 1 else min(gpu.collective_gbs, INTER_NODE_GBS)


def tokens_per_second(w: Workload, s: Setup, gpu: GpuType) -> float:
    """Estimated training throughput over all GPUs, in tokens per second."""
    world = w.world_size
    accumulation = max(1, w.samples_per_gpu // s.micro_batch)
    tokens_micro = s.micro_batch * w.computed_tokens_per_sample(s)
    compute = tokens_micro * compute_seconds_per_token(w, s, gpu) + MICRO_BATCH_SECONDS
    weight_bytes = 2.0 * w.arch.total_params
    passes = 3 if s.checkpointing else 2
    lora = float(w.lora_params)

    micro = compute
    step_extra = STEP_SECONDS
    if s.zero_stage == 3:
        micro = compute * ZERO3_HOOK_FACTOR
        comm = 0.0
        if world > 1:
            comm += weight_bytes * (world - 1) / world * passes / (collective_gbs(w, gpu) * 1e9)
        if s.offload == "all":
            comm += weight_bytes / world * passes / (gpu.host_link_gbs * 1e9)
        micro = max(micro, comm) + (1 - COMM_OVERLAP) * min(micro, comm)
    elif s.zero_stage == 2:
        micro = compute * ZERO2_FACTOR
        if world > 1:
            micro += 2.0 * lora * (world - 1) / world / (collective_gbs(w, gpu) * 1e9)
    # The GPU waits for the host when a micro-batch holds too little work to hide the host's share.
    micro = max(micro, host_seconds(w, s))
    if world > 1 and s.zero_stage == 0:
        # DDP all-reduce of fp32 LoRA gradients at the end of the step, half hidden behind backward.
        step_extra += 0.5 * 4.0 * lora * 2 * (world - 1) / world / (collective_gbs(w, gpu) * 1e9)
    if s.offload != "none":
        shard = lora / world
        step_extra += shard / CPU_ADAM_PARAMS_PER_SECOND + shard * 6.0 / (gpu.host_link_gbs * 1e9)

    step = accumulation * micro + step_extra
    return real_share(w, s) * world * accumulation * tokens_micro / step
