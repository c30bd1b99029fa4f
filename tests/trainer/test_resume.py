"""SIGTERM saves a checkpoint and exits 143; a restart resumes from the newest complete checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest

from kubetune.trainer.checkpoints import MARKER, checkpoints, latest_complete

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
