"""SFT on CPU: the loss falls, only responses are learned, progress is reported, the adapter is described."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from kubetune.trainer.adapter import sha256_file

from .conftest import Run

pytestmark = pytest.mark.trainer


def test_sft_loss_is_finite_and_falls(sft_run: Run) -> None:
    assert sft_run.code == 0, sft_run.stdout
    losses = [e["loss"] for e in sft_run.of("progress") if "loss" in e]
    assert len(losses) >= 10
    assert all(math.isfinite(x) for x in losses)
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.8 * first, losses


def test_progress_lines_carry_step_total_loss_eta(sft_run: Run) -> None:
    progress = sft_run.of("progress")
    assert progress[-1]["step"] == 20
    for line in progress:
        assert line["totalSteps"] == 20
        assert line["summary"] == f"{line['percent']:.0f}% ({line['step']}/20)"
        assert "eta" in line and "etaSeconds" in line
        assert line["learningRate"] > 0
    assert progress[-1]["eta"] == "0s"
    assert any(line.get("tokensPerSecond", 0) > 0 for line in progress)
    steps = [line["step"] for line in progress]
    assert steps == sorted(steps)


def test_checkpoints_are_complete_and_rotated(sft_run: Run) -> None:
    root = sft_run.output / "checkpoints"
    kept = sorted(p for p in root.iterdir() if p.name.startswith("checkpoint-"))
    assert [p.name for p in kept] == ["checkpoint-15", "checkpoint-20"]
    for path in kept:
        assert (path / "kubetune-complete.json").is_file()
    assert [e["step"] for e in sft_run.of("checkpoint")] == [5, 10, 15, 20]


def test_adapter_metadata_and_sha256(sft_run: Run) -> None:
    adapter = sft_run.output / "adapter"
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "kubetune.json"):
        assert (adapter / name).is_file(), name
    assert not (adapter / "training_args.bin").exists()
    meta = json.loads((adapter / "kubetune.json").read_text())
    assert meta["sha256"] == sha256_file(adapter / "adapter_model.safetensors")
    assert meta["baseModel"] == {"uri": "pvc://models/tiny", "revision": None}
    assert meta["rank"] == 8 and meta["alpha"] == 16
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} <= set(meta["targetModules"])
    assert meta["trainerConfig"]["job"]["name"] == "sft"
    assert meta["trainerConfig"]["spec"]["lora"]["r"] == 8
    assert meta["metrics"]["global_step"] == 20 and math.isfinite(meta["metrics"]["train_loss"])
    assert meta["dataset"]["records"] == 8
    (event,) = sft_run.of("adapter")
    assert event["uri"] == "pvc://out/sft/adapter" and event["sha256"] == meta["sha256"]


def test_adapter_loads_with_peft(sft_run: Run, pvc: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(pvc / "models" / "tiny"))
    model = PeftModel.from_pretrained(base, str(sft_run.output / "adapter"))
    assert model.peft_config["default"].r == 8
