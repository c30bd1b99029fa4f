"""Two worker processes on CPU (gloo): the launcher starts them, they train together, rank 0 reports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .conftest import free_port, run_subprocess, trainer_config

pytestmark = [pytest.mark.trainer, pytest.mark.slow]


def test_two_process_gloo_run(pvc: Path, tiny_model: str) -> None:
    config = trainer_config(
        "ddp",
        tiny_model,
        hyperparameters={"maxSteps": 6, "globalBatchSize": 4},
        resources={"nodes": 1, "gpusPerNode": 2},
        checkpointing={"everySteps": 3, "keep": 1},
        plan={"worldSize": 2, "microBatchSize": 2, "gradientAccumulationSteps": 1},
    )
    run = run_subprocess(pvc, config, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    assert run.code == 0, run.extra["stderr"][-3000:]
    assert run.of("launch")[0]["processes"] == 2
    assert run.of("train")[0]["worldSize"] == 2
    assert len(run.of("train")) == 1  # only rank 0 reports
    assert run.of("progress")[-1]["step"] == 6
    assert [e["step"] for e in run.of("checkpoint")] == [3, 6]
    meta = json.loads((run.output / "adapter" / "kubetune.json").read_text())
    assert meta["metrics"]["global_step"] == 6
