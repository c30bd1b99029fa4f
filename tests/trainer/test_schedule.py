"""One real run with the API's default schedule (cosine after a 10% warm-up, weight decay 0.01; every other
trainer test trains with warm-up 0), a plan asking for flash_attention_2 (not usable here) and progress reports
only when forced (an interval of an hour): the TRL arguments, the learning rate per step, the attention actually
used, and progress reported with every checkpoint."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kubetune.api.v1alpha1 import Plan, TrainerConfig
from kubetune.trainer.progress import StatusReporter
from kubetune.trainer.train import load_model, report_attention, trainer_arguments

from .conftest import Run, run_in_process, trainer_config

pytestmark = pytest.mark.trainer

MAX_STEPS = 20
WARMUP_STEPS = 2  # ceil(0.1 x 20)
LEARNING_RATE = 0.005
SCHEDULE = {"lrScheduler": "cosine", "warmupRatio": 0.1, "weightDecay": 0.01, "maxSteps": MAX_STEPS}


def warmup_then_cosine(step: int) -> float:
    """The rate after `step` scheduler steps: linear from 0 to the peak over the warm-up, then half a cosine down
    to 0 after the last step."""
    if step < WARMUP_STEPS:
        return LEARNING_RATE * step / WARMUP_STEPS
    progress = (step - WARMUP_STEPS) / (MAX_STEPS - WARMUP_STEPS)
    return LEARNING_RATE * 0.5 * (1 + math.cos(math.pi * progress))


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def config(tiny_model: str) -> dict[str, Any]:
    return trainer_config(
        "schedule",
        tiny_model,
        hyperparameters=SCHEDULE,
        plan={"attention": "flash_attention_2"},
        progressIntervalSeconds=3600,
    )


@pytest.fixture(scope="module")
def scheduled_run(pvc: Path, config: dict[str, Any]) -> Iterator[Run]:
    warnings = Records()
    logger = logging.getLogger("kubetune.trainer")
    logger.addHandler(warnings)
    try:
        run = run_in_process(pvc, config)
    finally:
        logger.removeHandler(warnings)
    run.extra["warnings"] = warnings.messages
    assert run.code == 0, run.stdout
    yield run


def test_trl_arguments_carry_the_schedule(config: dict[str, Any], tmp_path: Path) -> None:
    args = trainer_arguments(TrainerConfig.model_validate(config), tmp_path, hidden_size=64, has_eval=False)
    assert args.lr_scheduler_type == "cosine" and args.learning_rate == LEARNING_RATE
    assert args.warmup_steps == 0.1 and args.get_warmup_steps(MAX_STEPS) == WARMUP_STEPS
    assert args.weight_decay == 0.01 and args.max_steps == MAX_STEPS
    assert args.ddp_timeout == 600  # spec.distributed.collectiveTimeoutSeconds: a rank never waits 30 min for a peer
    dpo = TrainerConfig.model_validate({**config, "spec": {**config["spec"], "method": "DPO"}})
    dpo_args = trainer_arguments(dpo, tmp_path, hidden_size=64, has_eval=False)
    assert (dpo_args.lr_scheduler_type, dpo_args.get_warmup_steps(MAX_STEPS), dpo_args.weight_decay) == (
        "cosine",
        WARMUP_STEPS,
        0.01,
    )


def test_learning_rate_warms_up_then_follows_a_cosine(scheduled_run: Run) -> None:
    state = json.loads(
        (scheduled_run.output / "checkpoints" / f"checkpoint-{MAX_STEPS}" / "trainer_state.json").read_text()
    )
    # The Trainer logs, for optimizer step k, the rate that step used: the schedule's value after k-1 steps.
    logged = {e["step"]: e["learning_rate"] for e in state["log_history"] if "learning_rate" in e}
    assert sorted(logged) == list(range(1, MAX_STEPS + 1))
    for step, rate in logged.items():
        assert rate == pytest.approx(warmup_then_cosine(step - 1), rel=1e-6, abs=1e-12), step
    assert logged[1] == 0.0  # schedule step 0: the warm-up starts from zero
    assert logged[2] == pytest.approx(LEARNING_RATE / 2)
    assert logged[WARMUP_STEPS + 1] == pytest.approx(LEARNING_RATE)  # the warm-up's end: the peak
    assert logged[MAX_STEPS // 2 + 2] == pytest.approx(LEARNING_RATE / 2)  # half-way down the cosine
    assert logged[MAX_STEPS] == pytest.approx(LEARNING_RATE * 0.5 * (1 + math.cos(math.pi * 17 / 18)))  # the end
    assert 0 < logged[MAX_STEPS] < LEARNING_RATE / 100
    # The progress reports (here: one per checkpoint) carry the same rates.
    reported = {e["step"]: e["learningRate"] for e in scheduled_run.of("progress")}
    assert reported == {step: pytest.approx(logged[step], abs=1e-12) for step in (5, 10, 15, 20)}


def test_every_checkpoint_is_preceded_by_progress_at_its_step(scheduled_run: Run) -> None:
    # The interval (an hour) allows no report of its own: each one here was forced by a checkpoint.
    steps = [(e["event"], e["step"]) for e in scheduled_run.events if e["event"] in ("progress", "checkpoint")]
    assert steps == [(kind, step) for step in (5, 10, 15, 20) for kind in ("progress", "checkpoint")]
    progress = scheduled_run.of("progress")
    assert progress[0]["summary"] == "25% (5/20)" and progress[0]["loss"] > 0


def test_the_attention_used_is_reported_and_warned_about(scheduled_run: Run) -> None:
    (event,) = scheduled_run.of("attention")
    assert event == {"event": "attention", "planned": "flash_attention_2", "used": "sdpa", "reason": event["reason"]}
    assert event["reason"] in ("flash_attention_2 needs a GPU", "the flash-attn package is not installed in this image")
    assert (
        f"the plan asks for flash_attention_2 attention, but the model runs with sdpa: {event['reason']}"
        in (scheduled_run.extra["warnings"])
    )


def test_status_trainer_attention_is_what_the_model_runs_with(pvc: Path, tiny_model: str) -> None:
    plan = Plan(attention="flash_attention_2")
    model = load_model(pvc / "models" / "tiny", plan)
    sent: list[dict[str, Any]] = []
    reporter = StatusReporter(sent.append, interval=3600)
    assert report_attention(plan, model, reporter, "uid-1") == "sdpa"
    reporter.close()
    assert sent == [{"status": {"trainer": {"attention": "sdpa"}}, "metadata": {"uid": "uid-1"}}]
    eager = Plan(attention="eager")
    assert report_attention(eager, load_model(pvc / "models" / "tiny", eager), StatusReporter(None, 1), "") == "eager"
