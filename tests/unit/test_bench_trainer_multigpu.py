"""bench/trainer_multigpu.py without GPUs: its cases' plans, the memory cap it sets, the targets it computes, and
(with the trainer extra) its wiring on the CPU: torchrun, two gloo ranks of `kubetune train`'s worker, the tiny
model (--smoke)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from kubetune.api.v1alpha1 import TrainerConfig
from kubetune.trainer.gpu_cap import CAP_ENV, cap_fraction
from tests import bench as bench_modules

ROOT = Path(__file__).resolve().parents[2]
GIB = 2**30


def load_bench() -> ModuleType:
    return bench_modules.load("trainer_multigpu")


def test_the_cases_are_the_planners_plans_the_same_work_on_one_gpu_and_the_recipe() -> None:
    bench = load_bench()
    scale = bench.gpu_scale()
    configs = {case.name: bench.trainer_config(case, scale, bench.MODEL) for case in bench.CASES}
    for config in configs.values():
        TrainerConfig.model_validate(config)
    four, one = configs["h100-plan"], configs["h100-plan-1gpu"]
    assert four["plan"]["worldSize"] == 4 and four["spec"]["resources"]["gpusPerNode"] == 4
    assert (
        four["spec"]["hyperparameters"]["globalBatchSize"] == 32
        and four["spec"]["hyperparameters"]["maxSeqLength"] == 8192
    )
    # One GPU does one rank's work: the same settings, micro-batch and accumulation, a quarter of the batch.
    assert one["plan"]["worldSize"] == 1 and one["spec"]["hyperparameters"]["globalBatchSize"] == 8
    for key in (*bench.SETTINGS, "microBatchSize", "gradientAccumulationSteps"):
        assert one["plan"][key] == four["plan"][key], key
    # ...predicted without the NCCL buffers of a world of several.
    assert one["plan"]["memory"]["totalGib"] < four["plan"]["memory"]["totalGib"]
    recipe = configs["recipe"]["plan"]
    assert (recipe["zeroStage"], recipe["offload"], recipe["gradientCheckpointing"]) == (3, "cpu", True)
    assert (recipe["microBatchSize"], recipe["packing"], recipe["compile"], recipe["ligerKernels"]) == (
        1,
        False,
        False,
        False,
    )
    assert recipe["memory"]["totalGib"] > 0  # the planner's prediction for the recipe, checked like the plans'
    small = configs["4090d-plan"]["plan"]
    assert small["worldSize"] == 4 and small["memory"]["totalGib"] > 0


def test_the_24gb_cap_is_the_cards_memory_less_what_the_allocator_does_not_hold() -> None:
    bench = load_bench()
    from kubetune.planner import memory
    from kubetune.planner.gpus import gpu_type

    card = gpu_type("rtx-4090d")
    assert card is not None
    cap = bench.cap_gib(bench.BY_NAME["4090d-plan"])
    assert cap == pytest.approx(card.memory_gib - memory.CUDA_CONTEXT_GIB - memory.NCCL_GIB, abs=0.01)
    assert bench.cap_gib(bench.BY_NAME["h100-plan"]) is None
    # The planner's 4090D plan must fit under it, or the benchmark would only measure an OOM.
    plan = bench.plan_for(bench.BY_NAME["4090d-plan"], bench.gpu_scale())
    assert plan["memory"]["totalGib"] - memory.CUDA_CONTEXT_GIB - memory.NCCL_GIB < cap


def test_cap_fraction_of_the_trainers_hook() -> None:
    h100 = int(79.2 * GIB)
    assert cap_fraction(None, h100) is None and cap_fraction(" ", h100) is None
    assert cap_fraction("22.0", h100) == pytest.approx(22.0 / 79.2)
    assert cap_fraction("200", h100) == 1.0  # a cap above the card is no cap
    for bad in ("0", "-3", "24Gi", "nan"):
        with pytest.raises(ValueError, match=CAP_ENV):
            cap_fraction(bad, h100)


def run(tokens_per_second: float | None, device: str = "H100", errors: tuple[float | None, ...] = (0.02,), **more):
    ranks = [{"rank": i, "error": e} for i, e in enumerate(errors)]
    return {"exit_code": 0, "tokens_per_second": tokens_per_second, "device": device, "ranks": ranks, **more}


def test_targets_from_the_measured_cases() -> None:
    bench = load_bench()
    runs = {
        "h100-plan": run(50_000.0, errors=(0.03, -0.05, 0.01, 0.0)),
        "h100-plan-1gpu": run(13_000.0),
        "recipe": run(20_000.0, errors=(-0.12, 0.0, 0.0, 0.0)),
        "4090d-plan": run(18_000.0, caps_applied=4, oom=False, max_device_peak_gib=17.2),
    }
    t = bench.targets(runs, 4)
    assert (
        t["scaling_efficiency"]["value"] == pytest.approx(50_000 / 52_000, abs=1e-3) and t["scaling_efficiency"]["met"]
    )
    assert t["plan_over_recipe"]["value"] == 2.5 and t["plan_over_recipe"]["met"]
    assert t["memory_within_10_percent"]["value"] == -0.12 and not t["memory_within_10_percent"]["met"]
    assert t["fits_24gb"]["met"] and t["fits_24gb"]["value"] == 17.2
    # Timings from different cards do not compare; a cap not applied on every rank proves nothing; a missing case is
    # not a pass.
    runs["h100-plan-1gpu"]["device"] = "H200"
    runs["4090d-plan"]["caps_applied"] = 3
    del runs["recipe"]
    t = bench.targets(runs, 4)
    assert not t["scaling_efficiency"]["met"] and t["scaling_efficiency"]["same_device"] is False
    assert not t["fits_24gb"]["met"]
    assert t["plan_over_recipe"] == {**t["plan_over_recipe"], "value": None, "met": False}
    assert set(t) == set(bench.TARGET_NAMES)


def test_ranks_agree_within_rounding_only() -> None:
    bench = load_bench()
    assert bench.agree([[1.0, 0.5], [1.0, 0.5 + 1e-9]])
    assert not bench.agree([[1.0, 0.5], [1.0, 0.51]])
    assert not bench.agree([[1.0], None]) and not bench.agree([])
    assert bench.agree([{"sum": 2.0, "params": 3}, {"sum": 2.0, "params": 3}])
    assert bench.tokens_per_second(
        [{"step": 1, "seconds": 30.0, "tokens": 100}, {"step": 2, "seconds": 2.0, "tokens": 100},
         {"step": 3, "seconds": 2.0, "tokens": 100}]
    ) == 50.0  # fmt: skip


@pytest.mark.trainer
@pytest.mark.slow
def test_smoke_runs_the_cases_as_two_gloo_ranks_that_agree(tmp_path: Path) -> None:
    """The recipe is left out here: on the CPU it runs the same DDP path as 4090d-plan (the trainer uses DeepSpeed
    only on GPUs), and each case costs two processes' imports on the test machine's two cores."""
    pytest.importorskip("trl")
    cases = ["h100-plan", "h100-plan-1gpu", "4090d-plan"]
    command = [sys.executable, str(ROOT / "bench" / "trainer_multigpu.py"), "--smoke", "--work", str(tmp_path)]
    result = subprocess.run([*command, "--case", ",".join(cases)], capture_output=True, text=True, timeout=800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = json.loads((tmp_path / "smoke" / "trainer_multigpu_smoke.json").read_text())
    runs, bench = results["runs"], load_bench()
    assert list(runs) == cases and results["smoke"] and results["processes"] == 2
    for name, r in runs.items():
        world = 1 if name == "h100-plan-1gpu" else 2
        assert r["exit_code"] == 0 and r["ranks_reported"] == world == r["processes"], name
        assert r["steps"] == 3 and r["timed_steps"] == 2 and r["tokens_per_second"] > 0, name
        assert r["ranks_agree"] == {
            "losses": True,
            "lora_weights": True,
            "adapter_saved_by": [0],
            "adapter_saved": True,
        }
        assert len(r["losses"]) == 3 and all(x["losses"] == r["losses"] for x in r["ranks"])
        assert r["caps_applied"] == 0 and r["device"] == "cpu"  # no GPU: nothing to cap or measure
        assert set(bench.RUN_FIELDS) <= set(r)
    assert runs["4090d-plan"]["memory_cap_gib"] == bench.cap_gib(bench.BY_NAME["4090d-plan"])
    assert runs["h100-plan"]["attention"]["used"] == "sdpa"  # full-length records: one per window
    assert set(results["targets"]) == set(bench.TARGET_NAMES)
    assert "| h100-plan |" in result.stdout and "scaling_efficiency:" in result.stdout
