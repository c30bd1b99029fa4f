"""Progress formatting, status patches and the background reporter (no torch needed)."""

from __future__ import annotations

import threading
from datetime import UTC, datetime
from typing import Any

import pytest

from kubetune.api.v1alpha1 import CheckpointStatus
from kubetune.trainer.progress import (
    StatusReporter,
    build_progress,
    checkpoint_patch,
    eta_seconds,
    format_eta,
    format_summary,
    merge,
    progress_patch,
    status_patch,
)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(None, ""), (0, "0s"), (45, "45s"), (750, "12m30s"), (4320, "1h12m"), (3600 * 26, "1d2h"), (59.6, "1m00s")],
)
def test_format_eta(seconds: float | None, text: str) -> None:
    assert format_eta(seconds) == text


def test_summary_and_eta() -> None:
    assert format_summary(450, 1000) == "45% (450/1000)"
    assert format_summary(0, 0) == "0% (0/0)"
    assert eta_seconds(450, 1000, started_step=400, elapsed=100) == 1100  # 2 s/step since the (re)start
    assert eta_seconds(400, 1000, started_step=400, elapsed=100) is None


def test_progress_wire_form() -> None:
    now = datetime(2026, 11, 29, 12, 0, 0, 123456, tzinfo=UTC)
    progress = build_progress(
        450, 1000, started_step=0, elapsed=450, epoch=0.45, loss=1.2345678, learning_rate=1e-4, now=now
    )
    wire = progress.to_wire()
    assert wire["summary"] == "45% (450/1000)"
    assert wire["totalSteps"] == 1000 and wire["percent"] == 45.0
    assert wire["eta"] == "9m10s" and wire["etaSeconds"] == 550
    assert wire["loss"] == 1.234568 and wire["learningRate"] == 1e-4
    assert wire["updatedAt"] == "2026-11-29T12:00:00Z"
    assert "evalLoss" not in wire


def test_patches_carry_the_uid_precondition() -> None:
    patch = progress_patch(build_progress(1, 2), uid="abc")
    assert patch["metadata"] == {"uid": "abc"}
    assert patch["status"]["progress"]["step"] == 1
    assert status_patch({"adapter": {"uri": "x"}}) == {"status": {"adapter": {"uri": "x"}}}


def test_a_checkpoint_is_reported_with_the_progress_at_its_step() -> None:
    # One patch: `kubectl get` never shows checkpoint 400 beside PROGRESS 35% (350/1000), whatever the
    # reporter's interval and whenever its thread sends.
    checkpoint = CheckpointStatus(step=400, uri="pvc://adapters/j/checkpoints/checkpoint-400")
    patch = checkpoint_patch(build_progress(400, 1000, loss=1.5), checkpoint, uid="abc")
    assert patch["metadata"] == {"uid": "abc"}
    assert patch["status"]["checkpoint"] == {"step": 400, "uri": "pvc://adapters/j/checkpoints/checkpoint-400"}
    assert patch["status"]["progress"]["step"] == 400 and patch["status"]["progress"]["summary"] == "40% (400/1000)"
    assert checkpoint_patch(build_progress(401, 1000), checkpoint)["status"]["progress"]["step"] == 401
    with pytest.raises(ValueError, match="progress at step 350 would trail the checkpoint at step 400"):
        checkpoint_patch(build_progress(350, 1000), checkpoint)


def test_merge_coalesces_reports() -> None:
    a = {"status": {"progress": {"step": 1}, "checkpoint": {"step": 1}}}
    b = {"status": {"progress": {"step": 2}}}
    assert merge(a, b) == {"status": {"progress": {"step": 2}, "checkpoint": {"step": 1}}}


def test_reporter_retries_failures_and_sends_on_close() -> None:
    sent: list[dict[str, Any]] = []
    calls = threading.Semaphore(0)
    failures = [RuntimeError("api server down")]

    def send(patch: dict[str, Any]) -> None:
        calls.release()
        if failures:
            raise failures.pop()
        sent.append(patch)

    reporter = StatusReporter(send, interval=3600)
    reporter.submit({"status": {"progress": {"step": 1}}})
    reporter.flush_soon()
    assert calls.acquire(timeout=5)  # first attempt fails; the patch stays pending
    reporter.submit({"status": {"checkpoint": {"step": 1}}})
    reporter.close()
    assert sent == [{"status": {"progress": {"step": 1}, "checkpoint": {"step": 1}}}]


def test_reporter_without_sender_only_logs() -> None:
    reporter = StatusReporter(None, interval=1)
    reporter.submit({"status": {}})
    reporter.close()
