"""bench/kernel_floor.py without a GPU: its list of matmuls against the planner's parameter counts, the bounds it
derives, its run on the CPU with a tiny architecture, and trainer_gpu's kernel breakdown of a profile."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kubetune.planner.models import known_architecture
from tests import bench as bench_modules

ROOT = Path(__file__).resolve().parents[2]


def test_matmuls_of_a_frozen_base_with_lora_are_4n_plus_6_lora_flops_per_token() -> None:
    bench = bench_modules.load("kernel_floor")
    arch = known_architecture("Qwen/Qwen2.5-7B")
    assert arch is not None
    # The planner's N_base less what is not a matmul (q/k/v biases, norms): the linears and the LM head.
    linears = arch.num_layers * sum(a * b for a, b in arch.linear_shapes().values()) + arch.embedding_params
    assert 0.999 * arch.matmul_params < linears < arch.matmul_params
    expected = 4 * linears + 6 * arch.lora_params(bench.RANK, bench.TARGETS)
    assert bench.flops_per_token(bench.QWEN25_7B) == pytest.approx(expected, rel=1e-9)


def test_bounds_add_the_layers_attention_and_head() -> None:
    bench = bench_modules.load("kernel_floor")
    arch, seq, rank = bench.SMOKE_ARCH, bench.SMOKE_SEQ, bench.SMOKE_RANK
    shapes = bench.gemms(arch, seq, rank)
    gemm_s = {g.name: (0.001 if g.per_layer else 0.01) for g in shapes}
    per_layer = sum(1 for g in shapes if g.per_layer)
    attention = {"a": {"forward_backward_s": 0.004}, "b": {"forward_backward_s": 0.002}, "c": {"error": "no"}}
    out = bench.summary(arch, seq, rank, gemm_s, attention, {"forward_backward_s": 0.05}, {"full-recipe": 100.0})
    layers = arch["num_hidden_layers"]
    assert out["fastest_attention"] == "b"
    floor = layers * (per_layer * 0.001 + 0.002) + 2 * 0.01
    assert out["bounds"]["floor"]["seconds_per_sequence"] == pytest.approx(floor, abs=1e-4)
    assert out["bounds"]["compiled layers"]["seconds_per_sequence"] == pytest.approx(layers * 0.05 + 0.02, abs=1e-4)
    assert out["bounds"]["floor"]["max_plan_over_recipe"] == pytest.approx(seq / floor / 100.0, rel=1e-2)


def test_smoke_run_times_every_kernel_on_the_cpu(tmp_path: Path) -> None:
    results = tmp_path / "floor.json"
    subprocess.run(
        [sys.executable, str(ROOT / "bench" / "kernel_floor.py"), "--smoke", "--results", str(results)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    data = json.loads(results.read_text())
    assert {g["name"] for g in data["gemms"]} >= {"q_proj forward", "down_proj input grad", "lm_head forward"}
    assert all(g["seconds"] > 0 for g in data["gemms"])
    assert data["attention"]["sdpa (default choice)"]["forward_backward_s"] > 0
    assert data["layer"]["forward_backward_s"] > 0
    bounds = data["summary"]["bounds"]
    assert bounds["floor"]["seconds_per_sequence"] > 0 and bounds["compiled layers"]["seconds_per_sequence"] > 0


def test_profile_breakdown_sorts_kernels_by_kind() -> None:
    bench = bench_modules.load("trainer_gpu")
    kernels = [
        ("nvjet_sm90_tst_192x192_64x4_2x1_v_bz_coopB_TNN", 0.5),
        ("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16", 0.2),
        ("triton_poi_fused_add_mul_silu_0", 0.1),
        ("Memcpy DtoD (Device -> Device)", 0.05),
        ("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>", 0.01),
        ("void at::native::reduce_kernel<512, 1>", 0.02),
    ]
    breakdown = bench.kernel_breakdown(kernels)
    assert breakdown == {
        "attention": 0.2,
        "gemm": 0.5,
        "compiled (triton)": 0.1,
        "copy/fill": 0.06,
        "other": 0.02,
    }


def test_the_recorded_h100_floor_follows_from_its_own_timings() -> None:
    """bench/results/kernel_floor_h100.json (docs/planner.md's table): its bounds recomputed from the timings it
    holds and the trainer's tokens/s of the same call."""
    bench = bench_modules.load("kernel_floor")
    recorded = json.loads((ROOT / "bench" / "results" / "kernel_floor_h100.json").read_text())
    trainer = bench.measured_trainer(ROOT / "bench" / "results" / "trainer_realistic_h100_floor.json")
    assert set(trainer) == {"full-plan", "full-recipe"} and trainer == recorded["trainer_tokens_per_second"]
    gemm_s = {g["name"]: g["seconds"] for g in recorded["gemms"]}
    again = bench.summary(
        bench.QWEN25_7B, bench.SEQ, bench.RANK, gemm_s, recorded["attention"], recorded["layer"], trainer
    )
    assert again == recorded["summary"]
    # What docs/planner.md concludes from it: the floor allows at most ~2.16x the recipe, the compiled layers ~1.92x.
    assert again["bounds"]["floor"]["max_plan_over_recipe"] < 2.2
    assert again["bounds"]["compiled layers"]["max_plan_over_recipe"] < 2.0
