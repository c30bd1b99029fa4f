"""SIGTERM saves a checkpoint and exits 143; a restart resumes from the newest complete checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from transformers import TrainerControl, TrainerState, TrainingArguments

from kubetune.trainer.callbacks import CheckpointCallback, ProgressCallback
from kubetune.trainer.checkpoints import MARKER, checkpoints, latest_complete
from kubetune.trainer.progress import StatusReporter

from .conftest import (
    run_in_process,
    run_until_sigterm,
    trainer_config,
)

pytestmark = pytest.mark.trainer

MAX_STEPS = 40


def test_sigterm_checkpoint_then_resume(pvc: Path, tiny_model: str) -> None:
    config = trainer_config(
        "resume", tiny_model, hyperparameters={"maxSteps": MAX_STEPS}, checkpointing={"everySteps": 3, "keep": 2}
    )
    events = run_until_sigterm(pvc, config, 4)  # checkpoint-3 is complete by the time step 4 is reported
    (stopped,) = [e for e in events if e["event"] == "stopped"]
    stop_step = stopped["step"]
    assert 4 <= stop_step < MAX_STEPS
    root = pvc / "out" / "resume" / "checkpoints"
    last = latest_complete(root)
    assert last is not None and last.step == stop_step  # SIGTERM saved a complete checkpoint at the stop step
    assert not (pvc / "out" / "resume" / "adapter").exists()

    # A pod killed while writing: the newest checkpoint loses its marker and must be ignored.
    (last.path / MARKER).unlink()
    expected = latest_complete(root)
    assert expected is not None and 0 < expected.step < stop_step

    run = run_in_process(pvc, config)
    assert run.code == 0, run.stdout
    assert run.of("checkpoint-discarded")[0]["step"] == stop_step
    assert run.of("resume")[0]["step"] == expected.step
    assert run.of("train")[0]["step"] == expected.step
    progress = run.of("progress")
    assert progress[0]["step"] == expected.step + 1  # continued from the checkpoint, not from 0
    assert progress[-1]["step"] == MAX_STEPS
    assert run.of("adapter")[0]["metrics"]["global_step"] == MAX_STEPS
    assert all(c.complete for c in checkpoints(root))


def test_a_resumed_run_reports_the_checkpoint_it_resumed_from_before_its_first_step(tmp_path: Path) -> None:
    # The run before may have died between marking checkpoint-8 complete and reporting it: the status would name
    # an older checkpoint until this run saved its next one.
    sent: list[dict[str, Any]] = []
    reporter = StatusReporter(sent.append, interval=3600)
    progress = ProgressCallback(reporter, interval=3600, uid="u1")
    saves = CheckpointCallback(tmp_path, keep=2, output_uri="pvc://adapters/j", progress=progress, uid="u1")
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[])
    state = TrainerState(global_step=8, max_steps=16, epoch=0.5)
    for callback in (progress, saves):
        callback.on_train_begin(args, state, TrainerControl())
    reporter.close()
    (patch,) = sent
    assert patch["metadata"] == {"uid": "u1"}
    assert patch["status"]["checkpoint"] == {"step": 8, "uri": "pvc://adapters/j/checkpoints/checkpoint-8"}
    assert patch["status"]["progress"]["resumedFrom"] == 8 and patch["status"]["progress"]["step"] == 8, patch

    sent.clear()  # a run that starts at step 0 reports nothing before its first step
    reporter = StatusReporter(sent.append, interval=3600)
    fresh = CheckpointCallback(tmp_path, 2, "pvc://adapters/j", ProgressCallback(reporter, 3600), "u1")
    fresh.on_train_begin(args, TrainerState(global_step=0, max_steps=16), TrainerControl())
    reporter.close()
    assert sent == []
