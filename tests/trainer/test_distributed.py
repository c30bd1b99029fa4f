"""Two worker processes on CPU (gloo): the launcher starts them, they train together, rank 0 reports."""

from __future__ import annotations

import json
import threading
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

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
    metrics_port = free_port()
    steps_seen: list[float] = []
    done = threading.Event()

    def scrape() -> None:  # rank 0's metrics endpoint while the run lasts
        while not done.wait(0.1):
            try:
                text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=1).read().decode()
            except OSError:
                continue
            families = {f.name: f for f in text_string_to_metric_families(text)}
            steps_seen.append(families["kubetune_trainer_step"].samples[0].value)

    scraper = threading.Thread(target=scrape, daemon=True)
    scraper.start()
    try:
        run = run_subprocess(
            pvc, config, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), KUBETUNE_METRICS_PORT=str(metrics_port)
        )
    finally:
        done.set()
        scraper.join()
    assert run.code == 0, run.extra["stderr"][-3000:]
    assert steps_seen and max(steps_seen) >= 1, steps_seen
    assert "no metrics endpoint" not in run.extra["stderr"]  # only rank 0 listens
    assert run.of("launch")[0]["processes"] == 2
    assert run.of("train")[0]["worldSize"] == 2
    assert len(run.of("train")) == 1  # only rank 0 reports
    assert run.of("progress")[-1]["step"] == 6
    assert [e["step"] for e in run.of("checkpoint")] == [3, 6]
    meta = json.loads((run.output / "adapter" / "kubetune.json").read_text())
    assert meta["metrics"]["global_step"] == 6
