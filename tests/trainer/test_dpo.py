"""DPO from the SFT adapter: the preference margin and accuracy rise."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .conftest import Run, run_in_process, trainer_config

pytestmark = pytest.mark.trainer


@pytest.fixture(scope="module")
def dpo_run(pvc: Path, tiny_model: str, sft_run: Run) -> Run:
    assert sft_run.code == 0
    config = trainer_config(
        "dpo",
        tiny_model,
        method="DPO",
        fromFineTuneJob="sft",
        initAdapterUri="pvc://out/sft/adapter",
        dataset={"uri": "pvc://data/dpo.jsonl", "validationSplit": 0.25},
        hyperparameters={"maxSteps": 12, "beta": 0.1, "learningRate": 0.005},
        checkpointing={"everySteps": 6, "keep": 1},
        plan={"microBatchSize": 2, "gradientAccumulationSteps": 2},
    )
    return run_in_process(pvc, config)


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def test_dpo_margin_and_accuracy_rise(dpo_run: Run) -> None:
    assert dpo_run.code == 0, dpo_run.stdout
    metrics = [e["metrics"] for e in dpo_run.of("progress") if "rewards/margins" in e.get("metrics", {})]
    assert len(metrics) >= 8
    margins = [m["rewards/margins"] for m in metrics]
    accuracies = [m["rewards/accuracies"] for m in metrics]
    assert margins[0] == pytest.approx(0.0, abs=1e-6)  # policy == reference (the SFT adapter) at step 1
    assert mean(margins[-4:]) > mean(margins[:4]) and mean(margins[-4:]) > 0
    assert mean(accuracies[-4:]) > mean(accuracies[:4])
    assert dpo_run.of("progress")[-1].get("evalLoss") is not None


def test_dpo_adapter_keeps_the_sft_shape(dpo_run: Run) -> None:
    adapter = dpo_run.output / "adapter"
    meta = json.loads((adapter / "kubetune.json").read_text())
    assert meta["method"] == "DPO" and meta["initAdapter"] == "pvc://out/sft/adapter"
    assert meta["rank"] == 8
    assert not (adapter / "ref").exists()  # TRL's frozen reference copy is not part of the adapter
    assert meta["metrics"]["global_step"] == 12 and "eval_loss" in meta["metrics"]
