"""Rank 0's metrics endpoint: gauges from progress reports, scraped over HTTP (no torch needed)."""

from __future__ import annotations

import math
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kubetune.api.v1alpha1.trainerconfig import METRICS_PORT
from kubetune.trainer.metrics import TrainerMetrics, metrics_port
from kubetune.trainer.progress import build_progress


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            assert sample.labels == {"finetunejob": "qwen-sft"}
            samples[sample.name] = sample.value
    return samples


@pytest.fixture
def exporter() -> Iterator[TrainerMetrics]:
    exporter = TrainerMetrics("qwen-sft")
    yield exporter
    exporter.close()


def test_gauges_follow_the_progress_reports(exporter: TrainerMetrics) -> None:
    port = exporter.serve(0, "127.0.0.1")
    assert port
    before = scrape(port)
    assert before["kubetune_trainer_step"] == 0
    assert math.isnan(before["kubetune_trainer_loss"])  # not reported yet: no value, not 0

    exporter.update(
        build_progress(450, 1000, epoch=0.45, loss=1.234, learning_rate=2e-5, tokens_per_second=1234.5, elapsed=90)
    )
    after = scrape(port)
    assert after["kubetune_trainer_step"] == 450
    assert after["kubetune_trainer_total_steps"] == 1000
    assert after["kubetune_trainer_loss"] == pytest.approx(1.234)
    assert after["kubetune_trainer_learning_rate"] == pytest.approx(2e-5)
    assert after["kubetune_trainer_tokens_per_second"] == pytest.approx(1234.5)
    assert after["kubetune_trainer_epoch"] == pytest.approx(0.45)
    assert after["kubetune_trainer_eta_seconds"] == 110
    assert math.isnan(after["kubetune_trainer_eval_loss"])

    exporter.update(build_progress(500, 1000, eval_loss=1.5))  # a report without a loss keeps the last one
    latest = scrape(port)
    assert latest["kubetune_trainer_eval_loss"] == 1.5
    assert latest["kubetune_trainer_loss"] == pytest.approx(1.234)


def test_a_taken_port_does_not_stop_training(exporter: TrainerMetrics) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert exporter.serve(taken.getsockname()[1], "127.0.0.1") is None


def test_port_from_the_environment() -> None:
    assert metrics_port({}) == METRICS_PORT == 9400
    assert metrics_port({"KUBETUNE_METRICS_PORT": "9500"}) == 9500
    assert metrics_port({"KUBETUNE_METRICS_PORT": "0"}) == 0  # off


def test_no_torch_on_import() -> None:
    code = "import sys, kubetune.trainer.metrics; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"
