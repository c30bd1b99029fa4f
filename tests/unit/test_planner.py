"""The training planner: memory and speed against the H200 measurements of docs/gpu-baselines.md, decisions at the
boundaries, user overrides, infeasible jobs, unknown models and GPUs, the `kubetune plan` CLI and the GPU benchmark's
plan list."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from kubetune.api.v1alpha1 import FineTuneJob, FineTuneJobSpec, Plan, TokenLengths
from kubetune.api.v1alpha1.finetunejob import Distributed
from kubetune.planner import Overrides, PlanInfeasible, plan_job, plan_training
from kubetune.planner import cli as planner_cli
from kubetune.planner.gpus import GPU_TYPES, gpu_type
from kubetune.planner.memory import estimate
from kubetune.planner.models import (
    KNOWN_ARCHITECTURES,
    architecture_for_uri,
    architecture_from_config,
    architecture_from_path,
    known_architecture,
)
from kubetune.planner.plan import data_lengths, quantity_gib
from kubetune.planner.throughput import tokens_per_second
from kubetune.planner.workload import DataLengths, Setup, Workload
from tests import bench as bench_modules
from tests.rejections import EXAMPLES

ROOT = Path(__file__).resolve().parents[2]
QWEN7B = KNOWN_ARCHITECTURES["qwen/qwen2.5-7b"]
H200 = GPU_TYPES["h200"]
QKVO = ("q_proj", "k_proj", "v_proj", "o_proj")

# --- Calibration: docs/gpu-baselines.md, one H200, Qwen2.5-7B, LoRA r64 --------------------------------

SFT = Workload(QWEN7B, seq=8192, global_batch=8, gpu=H200)
ALL_LINEAR = Workload(QWEN7B, seq=8192, global_batch=8, lora_targets=("all-linear",), gpu=H200)
DPO = Workload(QWEN7B, seq=2048, global_batch=64, method="DPO", gpu=H200)
CALIBRATION = [
    # name, workload, setup, measured peak GiB, measured tokens/s
    ("recipe", SFT, Setup(3, "optimizer", True, "eager", "sdpa", 1), 18.6, 8238),
    ("bf16 checkpointing", SFT, Setup(0, "none", True, "eager", "sdpa", 1), 18.9, 9291),
    ("no checkpointing + Liger", SFT, Setup(0, "none", False, "liger", "sdpa", 1), 47.4, 14212),
    ("no checkpointing + compile", SFT, Setup(0, "none", False, "compile", "sdpa", 1), 47.5, 15216),
    ("compile, all-linear", ALL_LINEAR, Setup(0, "none", False, "compile", "sdpa", 1), 66.9, 13480),
    ("DPO recipe-style", DPO, Setup(3, "optimizer", True, "eager", "sdpa", 1), 16.4, 2761),
    ("DPO compile, 4 pairs", DPO, Setup(0, "none", False, "compile", "sdpa", 4), 80.7, 13166),
]


@pytest.mark.parametrize(("name", "workload", "setup", "peak", "_tps"), CALIBRATION, ids=[c[0] for c in CALIBRATION])
def test_memory_matches_gpu_md_within_10_percent(
    name: str, workload: Workload, setup: Setup, peak: float, _tps: int
) -> None:
    # The baselines' figures are PyTorch's peak allocated memory, without the CUDA context and NCCL buffers.
    predicted = estimate(workload, setup).torch_allocated
    assert abs(predicted - peak) / peak <= 0.10, f"{name}: predicted {predicted:.1f} GiB, measured {peak}"


# The DPO recipe-style figure ran TRL's own ZeRO-3 path, whose hooks on every submodule the trainer no longer has
# (it fetches each decoder layer whole, docs/trainer.md): its speed is the trainer's measurement below.
SPEED_CALIBRATION = [c for c in CALIBRATION if c[0] != "DPO recipe-style"]


@pytest.mark.parametrize(
    ("name", "workload", "setup", "_peak", "tps"), SPEED_CALIBRATION, ids=[c[0] for c in SPEED_CALIBRATION]
)
def test_throughput_matches_gpu_md_within_10_percent(
    name: str, workload: Workload, setup: Setup, _peak: float, tps: int
) -> None:
    predicted = tokens_per_second(workload, setup, H200)
    assert abs(predicted - tps) / tps <= 0.10, f"{name}: predicted {predicted:.0f} tokens/s, measured {tps}"


H100 = gpu_type("h100")
# The trainer's own runs on one H100 (docs/gpu-baselines.md; bench/results/trainer_realistic_h100.json): full-length
# records and pairs, and the realistic lengths of bench/trainer_realistic.py as the prepare step would report them.
REALISTIC_SFT = DataLengths(mean=1522.0, weighted=3279.7)
REALISTIC_DPO = DataLengths(mean=774.9, weighted=954.1, pair_fill=0.807)
PACKED = Setup(0, "none", False, "compile", "flex_attention", 1, packing=True)
RECIPE = Setup(3, "optimizer", True, "eager", "sdpa", 1)
DPO_PLAN = Setup(0, "none", False, "liger", "sdpa", 2)
TRAINER_RUNS = [
    # name, workload, setup, measured tokens/s (real tokens)
    ("DPO recipe", Workload(QWEN7B, seq=2048, global_batch=16, method="DPO", gpu=H100), RECIPE, 65536 / 13.04),
    ("DPO plan", Workload(QWEN7B, seq=2048, global_batch=16, method="DPO", gpu=H100), DPO_PLAN, 65536 / 5.50),
    ("full-plan", Workload(QWEN7B, seq=8192, global_batch=8, gpu=H100), PACKED, 14986),
    ("full-recipe", Workload(QWEN7B, seq=8192, global_batch=8, gpu=H100), RECIPE, 8805),
    ("sft-plan", Workload(QWEN7B, seq=8192, global_batch=8, gpu=H100, lengths=REALISTIC_SFT), PACKED, 15369),
    ("sft-recipe", Workload(QWEN7B, seq=8192, global_batch=8, gpu=H100, lengths=REALISTIC_SFT), RECIPE, 2055),
    (
        "dpo-plan",
        Workload(QWEN7B, seq=2048, global_batch=16, method="DPO", gpu=H100, lengths=REALISTIC_DPO),
        DPO_PLAN,
        5392,
    ),
]


@pytest.mark.parametrize(("name", "workload", "setup", "tps"), TRAINER_RUNS, ids=[c[0] for c in TRAINER_RUNS])
def test_throughput_matches_the_trainers_runs_within_15_percent(
    name: str, workload: Workload, setup: Setup, tps: float
) -> None:
    """One host-time constant per kernel choice (throughput.HOST_SECONDS_PER_LAYER_PASS) is what short records are
    bound by: the recipe on realistic records ran at a quarter of its full-length speed."""
    assert workload.gpu is not None
    predicted = tokens_per_second(workload, setup, workload.gpu)
    assert abs(predicted - tps) / tps <= 0.15, f"{name}: predicted {predicted:.0f} tokens/s, measured {tps:.0f}"


def test_memory_breakdown_adds_up_and_moves_the_right_way() -> None:
    base = Setup(0, "none", False, "liger", "sdpa", 1)
    m = estimate(SFT, base)
    assert m.total == pytest.approx(m.weights + m.lora + m.activations + m.logits + m.overhead)
    assert m.weights == pytest.approx(2 * QWEN7B.total_params / 2**30)
    assert estimate(SFT, Setup(0, "none", False, "liger", "sdpa", 2)).total > m.total + 25
    assert estimate(SFT, Setup(0, "none", True, "liger", "sdpa", 1)).activations < m.activations / 5
    assert estimate(SFT, Setup(0, "none", False, "eager", "sdpa", 1)).activations > m.activations
    sharded = estimate(SFT.with_gpus(1, 4), Setup(3, "none", True, "liger", "sdpa", 1))
    assert sharded.weights < m.weights / 2
    offloaded = estimate(SFT.with_gpus(1, 4), Setup(3, "all", True, "liger", "sdpa", 1))
    assert offloaded.weights == 0 and offloaded.host_gib > 14


def test_qwen_7b_numbers() -> None:
    assert QWEN7B.total_params == pytest.approx(7.62e9, rel=0.01)
    assert QWEN7B.matmul_params == pytest.approx(7.07e9, rel=0.01)  # N_base of docs/gpu-baselines.md
    assert QWEN7B.lora_params(64, QKVO) == 40_370_176
    assert QWEN7B.lora_params(64, ["all-linear"]) == 161_480_704


# --- Decisions at the boundaries --------------------------------------------------------------------


def plan(model: str = "Qwen/Qwen2.5-7B", gpus: int = 1, gpu: str = "h200", **kw: Any) -> Plan:
    kw.setdefault("seq", 8192)
    kw.setdefault("global_batch", 64)
    return plan_training(known_architecture(model), model_name=model, gpus_per_node=gpus, gpu_type_name=gpu, **kw)


def assert_batch(p: Plan, global_batch: int = 64) -> None:
    assert p.micro_batch_size * p.gradient_accumulation_steps * p.world_size == global_batch


def test_one_h200_needs_no_deepspeed_and_no_checkpointing() -> None:
    p = plan()
    assert (p.zero_stage, p.offload, p.gradient_checkpointing) == (0, "none", False)
    assert p.compile and not p.liger_kernels and p.packing and p.attention == "flex_attention"
    assert p.micro_batch_size >= 1
    assert_batch(p)
    assert p.memory.total_gib <= p.memory.available_gib
    assert p.estimated_tokens_per_second and p.estimated_tokens_per_second > 1.7 * 8238  # record tokens only
    assert len(p.explanation) >= 6
    full_length = plan(packing="off")  # as the baselines ran: every record fills maxSeqLength
    assert full_length.estimated_tokens_per_second and full_length.estimated_tokens_per_second > 1.8 * 8238


def test_four_rtx_4090d_7b_at_8192_shards_the_weights_and_checkpoints() -> None:
    # Replicated bf16 weights (14.2 GiB) plus activations would fill a 24 GB card past its 20% margin.
    p = plan(gpus=4, gpu="rtx-4090d")
    assert p.zero_stage == 3 and p.gradient_checkpointing and p.offload == "none" and not p.compile
    assert p.memory.weights_gib < 14.2 / 2
    assert p.memory.total_gib <= p.memory.available_gib
    assert "20% margin" in " ".join(p.explanation)
    assert_batch(p)


@pytest.mark.parametrize(("model", "seq"), [("Qwen/Qwen2.5-7B", 16384), ("Qwen/Qwen2.5-14B", 8192)])
def test_four_rtx_4090d_shard_the_weights_when_they_leave_no_room(model: str, seq: int) -> None:
    p = plan(model, gpus=4, gpu="rtx-4090d", seq=seq)
    assert p.zero_stage == 3 and p.gradient_checkpointing and p.offload == "none"
    assert p.memory.weights_gib < 2 * known_architecture(model).total_params / 2**30 / 2  # type: ignore[union-attr]
    assert any(line.startswith("ZeRO-3") for line in p.explanation)
    assert_batch(p)


def test_72b_on_four_24gb_gpus_is_infeasible_with_a_reason() -> None:
    with pytest.raises(PlanInfeasible) as err:
        plan("Qwen/Qwen2.5-72B", gpus=4, gpu="rtx-4090d")
    assert str(err.value).startswith(
        "Qwen2.5-72B (SFT, LoRA r64) at seq 8192 does not fit any number of RTX 4090D: even with ZeRO-3, CPU offload"
    )
    assert str(err.value).endswith("lower hyperparameters.maxSeqLength")
    with pytest.raises(PlanInfeasible) as err:
        plan("Qwen/Qwen2.5-72B", gpus=4, gpu="rtx-4090d", seq=4096)
    assert str(err.value) == (
        "Qwen2.5-72B (SFT, LoRA r64) at seq 4096 needs at least 8 RTX 4090D with ZeRO-3 and CPU offload; 4 requested"
    )


def test_72b_on_four_24gb_gpus_fits_with_enough_host_memory_for_offload() -> None:
    p = plan("Qwen/Qwen2.5-72B", gpus=4, gpu="rtx-4090d", seq=4096, host_memory_gib=512)
    assert (p.zero_stage, p.offload, p.memory.weights_gib) == (3, "cpu", 0)
    assert p.gradient_checkpointing and p.memory.total_gib > 0


def test_14b_on_one_4090d_says_how_many_gpus() -> None:
    with pytest.raises(PlanInfeasible, match=r"needs at least 2 RTX 4090D with ZeRO-3 .*; 1 requested"):
        plan("Qwen/Qwen2.5-14B", gpu="rtx-4090d")


def test_weights_too_large_for_one_gpu_are_sharded_without_fused_kernels() -> None:
    p = plan("Qwen/Qwen2.5-32B", gpus=8, gpu="h100")
    assert p.zero_stage == 3 and p.offload == "none"
    # Liger's patches and compiled layers do not take effect under ZeRO-3 (measured on an H200).
    assert not p.liger_kernels and not p.compile


def test_sequence_too_long_for_any_number_of_gpus() -> None:
    with pytest.raises(
        PlanInfeasible, match=r"does not fit any number of RTX 4090.*lower hyperparameters\.maxSeqLength"
    ):
        plan(gpu="rtx-4090", seq=131072)


def test_dpo_counts_pairs_and_avoids_compile() -> None:
    p = plan(method="DPO", seq=2048)
    assert not p.compile and p.liger_kernels and not p.gradient_checkpointing
    assert_batch(p)
    assert any("DPO" in line for line in p.explanation)
    sft = estimate(Workload(QWEN7B, 2048, 64, gpu=H200), Setup(0, "none", False, "liger", "sdpa", 1))
    dpo = estimate(Workload(QWEN7B, 2048, 64, method="DPO", gpu=H200), Setup(0, "none", False, "liger", "sdpa", 1))
    assert dpo.activations > 1.5 * sft.activations  # chosen + rejected, plus the reference pass


@pytest.mark.parametrize("gpus", [1, 2, 4, 8])
@pytest.mark.parametrize("gpu", ["rtx-4090d", "l40s", "a100-80gb", "h200"])
def test_global_batch_is_micro_x_accumulation_x_gpus(gpus: int, gpu: str) -> None:
    p = plan(gpus=gpus, gpu=gpu, seq=4096)
    assert p.world_size == gpus
    assert_batch(p)
    assert p.memory.total_gib <= p.memory.available_gib


def test_global_batch_that_does_not_split_is_infeasible() -> None:
    with pytest.raises(PlanInfeasible, match="multiple of the number of GPUs"):
        plan(gpus=3, global_batch=64)
    with pytest.raises(PlanInfeasible, match="microBatchSize 3"):
        plan(gpus=4, overrides=Overrides(micro_batch=3))


# --- Packing ----------------------------------------------------------------------------------------------


def test_packing_auto_is_on_for_sft_with_flex_attention_and_off_for_dpo() -> None:
    sft = plan()
    assert sft.packing and sft.attention == "flex_attention"
    assert any(
        line.startswith("Packing on (auto for SFT)") and "globalBatchSize counts windows" in line
        for line in sft.explanation
    )
    assert any("dataset tokens: windows taken as 98% full" in line for line in sft.explanation)
    dpo = plan(method="DPO", seq=2048)
    assert not dpo.packing and dpo.micro_batch_size > 1
    assert any(line.startswith("No packing (DPO)") and "similar length" in line for line in dpo.explanation)


def test_packing_on_and_off_as_set() -> None:
    on = plan(packing="on")
    assert on.packing and any("as set in hyperparameters.packing" in line for line in on.explanation)
    off = plan(packing="off")
    assert not off.packing and off.attention == "sdpa"
    assert any(line.startswith("Packing off as set in hyperparameters.packing") for line in off.explanation)
    # Record tokens only: a packed window is not all records.
    assert on.estimated_tokens_per_second is not None and off.estimated_tokens_per_second is not None
    assert on.estimated_tokens_per_second < off.estimated_tokens_per_second


def test_packing_with_a_fixed_sdpa_keeps_it_and_pays_for_the_dense_mask() -> None:
    flex = plan(seq=4096, packing="on")
    sdpa = plan(seq=4096, packing="on", overrides=Overrides(attention="sdpa"))
    assert sdpa.packing and sdpa.attention == "sdpa"
    assert any("dense block-diagonal mask" in line for line in sdpa.explanation)
    assert sdpa.estimated_tokens_per_second and flex.estimated_tokens_per_second
    assert sdpa.estimated_tokens_per_second < flex.estimated_tokens_per_second
    # The dense mask spans the micro-batch's whole row: (2 x 8192)^2 entries of a bool and a bf16 bias.
    w = Workload(QWEN7B, seq=8192, global_batch=8, gpu=H200)
    unmasked = estimate(w, Setup(0, "none", False, "liger", "flex_attention", 2, True))
    masked = estimate(w, Setup(0, "none", False, "liger", "sdpa", 2, True))
    assert masked.activations - unmasked.activations >= 3 * (2 * 8192) ** 2 / 2**30 * 0.99


def test_packing_memory_counts_the_repeated_kv_heads() -> None:
    # Qwen2.5-7B has 28 query heads, not a power of 2: flex_attention gets keys and values repeated to 28 heads.
    w = Workload(QWEN7B, seq=8192, global_batch=8, gpu=H200)
    plain = estimate(w, Setup(0, "none", False, "compile", "sdpa", 1))
    packed = estimate(w, Setup(0, "none", False, "compile", "flex_attention", 1, True))
    extra = 4 * (QWEN7B.q_dim - QWEN7B.kv_dim) * 8192 * QWEN7B.num_layers / 2**30
    assert packed.activations - plain.activations == pytest.approx(extra, rel=0.05)


def test_plan_job_reads_hyperparameters_packing() -> None:
    assert plan_job(load_spec("finetunejob-sft.yaml")).packing
    assert not plan_job(load_spec("finetunejob-sft.yaml", **{"hyperparameters.packing": "off"})).packing
    assert not plan_job(load_spec("finetunejob-dpo.yaml")).packing
    tiny = load_spec("finetunejob-sft.yaml", **{"baseModel.uri": "pvc://models/tiny-random-llama"})
    conservative = plan_job(tiny)  # an unknown architecture packs too
    assert conservative.packing and conservative.attention == "flex_attention"
    assert any(line.startswith("Packing on") for line in conservative.explanation)


# --- User overrides -------------------------------------------------------------------------------------


def test_fixed_settings_are_kept() -> None:
    fixed = Overrides(zero_stage=3, offload="cpu", checkpointing=True, attention="flash_attention_2", micro_batch=1)
    p = plan(overrides=fixed)
    assert (p.zero_stage, p.offload, p.gradient_checkpointing, p.attention) == (3, "cpu", True, "flash_attention_2")
    assert (p.micro_batch_size, p.gradient_accumulation_steps) == (1, 64)
    assert p.memory.weights_gib > 0  # optimizer offload is enough: the weights stay on the GPU
    assert "fixed in spec.distributed" in " ".join(p.explanation)


def test_auto_attention_is_sdpa_as_the_api_says() -> None:
    # The planner cannot see the image, so auto never names flash_attention_2; the field's description (the
    # CRD's, kubectl explain's) must say the same, and a fixed flash_attention_2 is explained with its condition.
    crd = yaml.safe_load((Path(__file__).parents[2] / "crds" / "kubetune.io_finetunejobs.yaml").read_text())
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    described = spec["properties"]["distributed"]["properties"]["attention"]["description"]
    assert described.startswith("Attention kernel. auto is sdpa")
    assert "for packed SFT records (hyperparameters.packing) auto is flex_attention" in " ".join(described.split())
    assert plan(overrides=Overrides.from_distributed(Distributed()), packing="off").attention == "sdpa"
    assert plan(overrides=Overrides.from_distributed(Distributed())).attention == "flex_attention"
    assert plan(method="DPO", seq=2048).attention == "sdpa"
    flash = plan(overrides=Overrides(attention="flash_attention_2"))
    assert flash.attention == "flash_attention_2"
    assert any("needs the flash-attn package" in line for line in flash.explanation)


def test_a_fixed_setting_leaves_the_others_to_the_planner() -> None:
    p = plan(overrides=Overrides(checkpointing=True))
    assert p.gradient_checkpointing and p.zero_stage == 0 and p.liger_kernels
    p = plan(overrides=Overrides(micro_batch=2))
    assert p.micro_batch_size == 2 and p.gradient_accumulation_steps == 32 and not p.gradient_checkpointing
    p = plan(overrides=Overrides(micro_batch=4))  # four sequences of 8192 only fit with checkpointing
    assert p.micro_batch_size == 4 and p.gradient_checkpointing


def test_fixed_settings_that_do_not_fit_are_infeasible_and_say_what_would() -> None:
    with pytest.raises(PlanInfeasible) as err:
        plan(gpu="rtx-4090d", overrides=Overrides(checkpointing=False))
    assert "gradientCheckpointing=off" in str(err.value)
    assert "with them set to auto it would run as ZeRO-3, offload cpu, checkpointing on" in str(err.value)


def test_fixed_settings_may_use_the_safety_margin() -> None:
    # Micro-batch 4 at seq 4096 on a 24 GB card: over 90% of it, under its capacity.
    p = plan(gpu="rtx-4090d", seq=4096, overrides=Overrides(zero_stage=0, micro_batch=4))
    assert p.micro_batch_size == 4 and p.gradient_checkpointing and p.zero_stage == 0
    assert p.memory.available_gib < p.memory.total_gib <= GPU_TYPES["rtx-4090d"].memory_gib
    assert any("Tight" in line for line in p.explanation)
    assert plan(gpu="rtx-4090d", seq=4096).micro_batch_size < 4


# --- Unknown models and GPUs ----------------------------------------------------------------------------


def test_unknown_architecture_gets_a_conservative_plan() -> None:
    p = plan_training(None, model_name="pvc://models/tiny-test", seq=512, global_batch=8, gpus_per_node=2)
    assert (p.zero_stage, p.offload, p.gradient_checkpointing, p.micro_batch_size) == (3, "none", True, 1)
    assert p.memory.total_gib == 0 and p.memory.weights_gib == 0
    assert "unknown" in p.explanation[0] and "not estimated" in p.explanation[0]
    assert_batch(p, 8)
    one = plan_training(None, model_name="pvc://models/tiny-test", seq=512, global_batch=8, gpu_type_name="h200")
    assert one.zero_stage == 0 and one.gradient_checkpointing


def test_unknown_gpu_without_memory_plans_without_a_memory_check() -> None:
    p = plan(gpus=2, gpu="mi300x")
    assert p.zero_stage == 3 and p.gradient_checkpointing and p.micro_batch_size == 1
    assert p.memory.available_gib == 0 and p.estimated_tokens_per_second is None
    assert "not checked" in p.explanation[0]


def test_unknown_gpu_with_memory_is_planned() -> None:
    p = plan_training(QWEN7B, model_name="x", seq=8192, global_batch=64, gpu_type_name="b200", gpu_memory_gib=178)
    assert p.zero_stage == 0 and not p.gradient_checkpointing and p.estimated_tokens_per_second is None


# --- The operator's entry point ---------------------------------------------------------------------------


def load_spec(name: str, **changes: Any) -> FineTuneJobSpec:
    body = yaml.safe_load((EXAMPLES / name).read_text())
    for path, value in changes.items():
        node = body["spec"]
        *parents, leaf = path.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return FineTuneJob.model_validate(body).spec


@pytest.mark.parametrize("example", ["finetunejob-sft.yaml", "finetunejob-dpo.yaml"])
def test_plan_job_plans_the_examples(example: str) -> None:
    spec = load_spec(example)
    p = plan_job(spec)
    assert p.world_size == spec.resources.world_size
    assert_batch(p, spec.hyperparameters.global_batch_size)
    assert p.memory.total_gib > 0


def test_plan_job_respects_spec_distributed_and_gpu_arguments() -> None:
    spec = load_spec(
        "finetunejob-sft.yaml",
        **{"resources.gpusPerNode": 1, "resources.gpuType": "h200", "distributed.zeroStage": 3},
    )
    spec.resources.gpu_memory = None
    p = plan_job(spec)
    assert p.zero_stage == 3 and p.world_size == 1
    # The operator's configuration names the memory of a GPU type the planner does not know.
    p = plan_job(spec, gpu_type="b200", gpu_memory_gib=178)
    assert p.memory.available_gib == pytest.approx(178 * 0.9)


def test_plan_job_never_fails_for_an_unknown_model() -> None:
    spec = load_spec("finetunejob-sft.yaml", **{"baseModel.uri": "pvc://models/tiny-random-llama"})
    p = plan_job(spec)
    assert p.zero_stage == 3 and p.memory.total_gib == 0


def test_plan_is_a_valid_status_plan() -> None:
    p = plan()
    assert Plan.model_validate(p.to_wire()) == p


# --- Models and GPU types ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "name"),
    [
        ("hf://Qwen/Qwen2.5-7B", "Qwen/Qwen2.5-7B"),
        ("hf://qwen/qwen2.5-7b-instruct@main", "Qwen/Qwen2.5-7B"),
        ("pvc://models/base/Qwen2.5-14B-Instruct", "Qwen/Qwen2.5-14B"),
        ("s3://bucket/llama/Llama-3.1-8B/", "meta-llama/Llama-3.1-8B"),
        ("Qwen/Qwen2.5-0.5B", "Qwen/Qwen2.5-0.5B"),
        ("hf://Qwen/Qwen3-8B", "Qwen/Qwen3-8B"),
    ],
)
def test_architecture_lookup(uri: str, name: str) -> None:
    arch = architecture_for_uri(uri)
    assert arch is not None and arch.name == name


def test_unknown_uris_have_no_architecture() -> None:
    assert architecture_for_uri("pvc://models/tiny-random") is None
    assert architecture_for_uri("hf://someone/Qwen2.5-7B-but-not") is None


def test_architecture_from_a_local_config_json(tmp_path: Path) -> None:
    config = {
        "model_type": "qwen2",
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "vocab_size": 152064,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    arch = architecture_from_path(tmp_path)
    assert arch is not None and arch.total_params == QWEN7B.total_params
    assert architecture_from_config({"model_type": "mamba", "hidden_size": 8}) is None
    assert architecture_from_path(tmp_path / "missing") is None


def test_gpu_types_and_aliases() -> None:
    assert set(GPU_TYPES) == {"rtx-4090d", "rtx-4090", "l40s", "a100-40gb", "a100-80gb", "h100-80gb", "h200"}
    assert gpu_type("h100") is GPU_TYPES["h100-80gb"] and gpu_type("H200") is H200
    assert gpu_type("mi300x") is None and gpu_type(None) is None


@pytest.mark.parametrize(("q", "gib"), [("24Gi", 24.0), ("48G", 48e9 / 2**30), (2**30, 1.0), ("bogus", None)])
def test_quantity_gib(q: int | str, gib: float | None) -> None:
    assert quantity_gib(q) == (pytest.approx(gib) if gib is not None else None)


def test_the_planner_does_not_import_torch() -> None:
    code = "import sys, kubetune.planner, kubetune.planner.cli; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


# --- CLI ----------------------------------------------------------------------------------------------------


def test_cli_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert planner_cli.main(["--model", "Qwen/Qwen2.5-7B", "--gpus", "4", "--gpu-type", "rtx-4090d"]) == 0
    out = capsys.readouterr().out
    assert "4 x RTX 4090D" in out
    for text in ("ZeRO stage", "gradient checkpointing", "Memory per GPU (GiB)", "total (predicted peak)", "Why:"):
        assert text in out
    assert "tokens/s" in out
    assert re.search(r"packing\s+yes", out)
    assert planner_cli.main(["--model", "Qwen/Qwen2.5-7B", "--gpu-type", "h200", "--packing", "off"]) == 0
    assert re.search(r"packing\s+no", capsys.readouterr().out)


def test_cli_json(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--model", "hf://Qwen/Qwen2.5-7B", "--gpu-type", "h200", "--seq", "4096", "--lora-targets", "q,k,v,o"]
    assert planner_cli.main([*argv, "--output", "json"]) == 0
    p = Plan.model_validate(json.loads(capsys.readouterr().out))
    assert p.zero_stage == 0 and not p.gradient_checkpointing and p.memory.total_gib > 0


def test_cli_overrides_and_local_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                    "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256})
    )  # fmt: skip
    argv = ["--model", str(tmp_path), "--gpu-type", "a100-80gb", "--gpus", "2", "--zero-stage", "3"]
    assert planner_cli.main([*argv, "--checkpointing", "on", "--micro-batch", "2", "--output", "json"]) == 0
    p = Plan.model_validate(json.loads(capsys.readouterr().out))
    assert (p.zero_stage, p.gradient_checkpointing, p.micro_batch_size, p.world_size) == (3, True, 2, 2)


def test_cli_infeasible(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--model", "Qwen/Qwen2.5-72B", "--gpus", "4", "--gpu-type", "rtx-4090d", "--seq", "4096"]
    assert planner_cli.main(argv) == 1
    assert "needs at least 8 RTX 4090D" in capsys.readouterr().err
    assert planner_cli.main([*argv, "--output", "json"]) == 1
    assert json.loads(capsys.readouterr().out)["feasible"] is False


def test_kubetune_plan_dispatches_to_the_planner(capsys: pytest.CaptureFixture[str]) -> None:
    from kubetune.cli import main

    assert main(["plan", "--model", "Qwen/Qwen2.5-0.5B", "--gpu-type", "l40s", "--output", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["worldSize"] == 1


# --- The GPU benchmark (bench/planner_gpu.py), checked without a GPU --------------------------------------


def load_bench() -> ModuleType:
    return bench_modules.load("planner_gpu")


def test_bench_has_six_distinct_plans_that_build() -> None:
    bench = load_bench()
    plans = bench.bench_plans()
    keys = {(p.seq, p.targets, p.zero_stage, p.offload, p.checkpointing, p.kernels, p.micro_batch) for p in plans}
    assert len(plans) >= 7 and len(keys) == len(plans)  # the recipe and at least six plans
    assert {p.name for p in plans} >= {bench.PLANNER, bench.RECIPE}
    assert len({p.seq for p in plans}) >= 3 and len({p.zero_stage for p in plans}) == 3
    assert {p.checkpointing for p in plans} == {True, False} and len({p.micro_batch for p in plans}) >= 3
    for p in plans:
        config = bench.run_config(p)
        sft, ds = config["sft"], config["sft"]["deepspeed"]
        assert config["model"]["hidden_size"] == 3584 and config["model"]["vocab_size"] == 152064
        assert not config["model"]["tie_word_embeddings"] and config["model"]["rope_theta"] == 1e6
        assert sft["max_length"] == p.seq and config["tokens_per_step"] == p.sequences_per_step * p.seq
        assert sft["per_device_train_batch_size"] * sft["gradient_accumulation_steps"] == p.sequences_per_step
        assert (ds is None) == (p.zero_stage == 0)
        if ds:
            assert ds["zero_optimization"]["stage"] == p.zero_stage
            assert ds["train_batch_size"] == p.sequences_per_step
            assert ("offload_optimizer" in ds["zero_optimization"]) == (p.offload != "none")
        assert config["compile_layers"] == (p.kernels == "compile")
        assert json.loads(json.dumps(config)) == config
        predicted = bench.predicted(p)
        assert 10 < predicted["total_gib"] < 130 and predicted["tokens_per_second"] > 1000
        assert bench.smoke_config(p)["model"]["hidden_size"] == 64


def test_bench_compares_the_planners_choice_with_the_recipe() -> None:
    bench = load_bench()
    ours = next(p for p in bench.bench_plans() if p.name == bench.PLANNER)
    recipe = next(p for p in bench.bench_plans() if p.name == bench.RECIPE)
    assert (ours.zero_stage, ours.checkpointing, ours.kernels) == (0, False, "compile")
    assert (recipe.zero_stage, recipe.offload, recipe.checkpointing, recipe.micro_batch) == (3, "optimizer", True, 1)
    assert ours.tokens_per_step == recipe.tokens_per_step == 65536
    rows = [bench.Row(p, bench.predicted(p)) for p in (ours, recipe)]
    rows[0].measured = {"status": "ok", "tokens_per_second": 15400, "device_peak_gib": 80.0}
    rows[1].measured = {"status": "ok", "tokens_per_second": 8200, "device_peak_gib": 19.0}
    summary = bench.summary(rows)
    assert summary["speedup_vs_recipe"] == pytest.approx(15400 / 8200, abs=1e-3)
    assert summary["speedup_at_least_1_8"] and summary["all_within_10pct"] is (
        all(abs(v) <= 0.1 for v in summary["memory_errors"].values())
    )
    assert "| planner-h200 |" in bench.markdown(rows)


@pytest.mark.trainer
def test_bench_wiring_runs_on_cpu() -> None:
    pytest.importorskip("torch")
    pytest.importorskip("trl")
    pytest.importorskip("peft")
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "planner_gpu.py"), "--smoke", "--plans", "zero2-ckpt-seq4096"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "zero2-ckpt-seq4096: ok" in result.stdout


def test_a_multi_node_plan_states_what_it_assumes_of_the_network() -> None:
    one = plan("Qwen/Qwen2.5-7B", 4, "h100", seq=8192, global_batch=64)
    two = plan("Qwen/Qwen2.5-7B", 4, "h100", seq=8192, global_batch=64, nodes=2)
    assert two.world_size == 8 and not any("between nodes" in line for line in one.explanation)
    (network,) = [line for line in two.explanation if "between nodes" in line]
    assert "2 nodes of 4 GPU(s)" in network and "25 GB/s" in network and "the estimate uses the slower" in network


def test_measured_lengths_refine_the_speed_estimate_but_not_the_memory() -> None:
    """Once the prepare step measured the dataset, attention is costed at its token-weighted length and a
    micro-batch without packing holds records of its mean length; memory stays planned for full records."""
    short = DataLengths(mean=1500.0, weighted=3300.0)
    assumed, measured = plan(), plan(lengths=short)
    assert (measured.zero_stage, measured.micro_batch_size, measured.packing) == (
        assumed.zero_stage,
        assumed.micro_batch_size,
        assumed.packing,
    )
    assert measured.memory == assumed.memory
    assert measured.estimated_tokens_per_second and assumed.estimated_tokens_per_second
    # Packed windows of short records: less attention per token than one record filling the window.
    assert measured.estimated_tokens_per_second > assumed.estimated_tokens_per_second
    assert any("records of 1,500 tokens on average" in line and "3,300" in line for line in measured.explanation)
    assert any("until the prepare step measures" in line for line in assumed.explanation)
    # Without packing, one short record per micro-batch: compiled layers meet a new length with almost every record
    # and run eagerly, bound by the host's time per micro-batch (measured on an H100: about a third of the packed
    # plan's speed on such records, docs/gpu-baselines.md).
    one = Overrides(micro_batch=1)
    off_assumed = plan(packing="off", overrides=one)
    off_measured = plan(packing="off", overrides=one, lengths=short)
    assert off_measured.estimated_tokens_per_second and off_assumed.estimated_tokens_per_second
    assert off_measured.estimated_tokens_per_second < measured.estimated_tokens_per_second / 3
    assert off_measured.estimated_tokens_per_second < off_assumed.estimated_tokens_per_second
    # Host-bound, two records per micro-batch halve the host's share per token, padding to the longer one included.
    two = plan(packing="off", overrides=Overrides(micro_batch=2), lengths=short)
    assert (
        two.estimated_tokens_per_second and two.estimated_tokens_per_second > off_measured.estimated_tokens_per_second
    )


def test_dpo_counts_the_real_tokens_of_pairs_padded_to_their_longer_sequence() -> None:
    full = DataLengths(mean=800.0, weighted=950.0, pair_fill=1.0)
    padded = DataLengths(mean=800.0, weighted=950.0, pair_fill=0.8)
    a = plan(method="DPO", seq=2048, global_batch=16, lengths=full)
    b = plan(method="DPO", seq=2048, global_batch=16, lengths=padded)
    assert (a.micro_batch_size, b.micro_batch_size) == (a.micro_batch_size, a.micro_batch_size)
    assert a.estimated_tokens_per_second and b.estimated_tokens_per_second
    assert b.estimated_tokens_per_second == pytest.approx(0.8 * a.estimated_tokens_per_second, rel=2e-3)
    assert any("pairs padded to their longer sequence of 800 tokens" in line for line in b.explanation)


def test_a_report_without_the_lengths_the_model_reads_leaves_the_estimate_as_assumed() -> None:
    assert data_lengths(None) is None
    assert data_lengths(TokenLengths(p50=900, p95=3000, max=8192)) is None  # a report of an older trainer
    got = data_lengths(TokenLengths(p50=900, p95=3000, max=8192, mean=1500.0, weighted=3300.0))
    assert got == DataLengths(mean=1500.0, weighted=3300.0, pair_fill=1.0)
