"""Trainer callbacks: progress reports, checkpoint markers and rotation, and the SIGTERM stop."""

from __future__ import annotations

import logging
import math
import os
import signal
import time
from pathlib import Path
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from kubetune import faults, storage
from kubetune.api.v1alpha1 import CheckpointStatus, Progress
from kubetune.trainer import checkpoints
from kubetune.trainer.metrics import TrainerMetrics
from kubetune.trainer.progress import StatusReporter, build_progress, checkpoint_patch, log_event, progress_patch
from kubetune.trainer.remote import RemoteOutput

log = logging.getLogger(__name__)


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class ProgressCallback(TrainerCallback):
    """On rank 0, every `interval` seconds: log a progress JSON line, queue the status patch, set the gauges."""

    def __init__(
        self, reporter: StatusReporter, interval: float, uid: str = "", metrics: TrainerMetrics | None = None
    ) -> None:
        self.reporter = reporter
        self.metrics = metrics
        self.interval = interval
        self.uid = uid
        self.started = self.last_report = 0.0
        self.start_step = self.reported_step = 0
        self.last_tokens = 0
        self.losses: list[float] = []
        self.extra: dict[str, list[float]] = {}
        self.learning_rate: float | None = None
        self.eval_loss: float | None = None
        self.last: Progress | None = None

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **_: Any) -> None:
        self.started = self.last_report = time.monotonic()
        self.start_step = self.reported_step = state.global_step
        self.last_tokens = state.num_input_tokens_seen
        if state.is_world_process_zero:
            log_event("train", step=state.global_step, totalSteps=state.max_steps, worldSize=args.world_size)

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        **_: Any,
    ) -> None:
        if not state.is_world_process_zero or not logs:
            return
        for key, value in logs.items():
            if not isinstance(value, int | float) or not math.isfinite(value):
                continue
            if key == "loss":
                self.losses.append(float(value))
            elif key == "learning_rate":
                self.learning_rate = float(value)
            elif key == "eval_loss":
                self.eval_loss = float(value)
            elif key.startswith(("rewards/", "eval_rewards/", "grad_norm")):
                self.extra.setdefault(key, []).append(float(value))
        # Evaluation logs only update eval_loss; reports follow training steps.
        if "loss" in logs and time.monotonic() - self.last_report >= self.interval:
            self.report(state)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **_: Any) -> None:
        if state.is_world_process_zero:
            if state.global_step != self.reported_step:
                self.report(state)
            self.reporter.flush_soon()

    def progress_at(self, state: TrainerState) -> Progress:
        """The progress at the current step: the last report when it was at this step, else a new report."""
        if self.last is None or self.last.step != state.global_step:
            self.report(state)
        assert self.last is not None
        return self.last

    def at_resume(self, state: TrainerState) -> Progress:
        """The progress of a resumed run before its first step: where it resumed from, no loss or speed yet."""
        return build_progress(state.global_step, state.max_steps, epoch=state.epoch, resumed_from=self.start_step)

    def report(self, state: TrainerState) -> None:
        now = time.monotonic()
        tokens = state.num_input_tokens_seen
        progress = build_progress(
            state.global_step,
            state.max_steps,
            started_step=self.start_step,
            elapsed=now - self.started,
            epoch=state.epoch,
            loss=sum(self.losses) / len(self.losses) if self.losses else None,
            eval_loss=self.eval_loss,
            learning_rate=self.learning_rate,
            tokens_per_second=(tokens - self.last_tokens) / (now - self.last_report) if tokens else None,
            resumed_from=self.start_step or None,
        )
        extra = {k: round(sum(v) / len(v), 6) for k, v in self.extra.items() if v}
        if torch.cuda.is_available():
            extra["gpu_max_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            extra["gpu_max_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
        log_event("progress", **progress.to_wire(), metrics=extra)
        self.reporter.submit(progress_patch(progress, self.uid))
        if self.metrics is not None:
            self.metrics.update(progress)
        self.losses, self.extra = [], {}
        self.last_report, self.last_tokens, self.reported_step = now, tokens, state.global_step
        self.last = progress


class CheckpointCallback(TrainerCallback):
    """After every save: wait for all ranks, mark the checkpoint complete, drop old ones, report it together
    with the progress at its step (from `progress`, which reports first when its last report is older).

    With an s3:// output (`remote`) the first process of every node uploads what its node wrote, all ranks
    meet again, and only then rank 0 uploads the marker and rotates the bucket's checkpoints."""

    def __init__(
        self,
        root: Path,
        keep: int,
        output_uri: str,
        progress: ProgressCallback,
        uid: str = "",
        remote: RemoteOutput | None = None,
    ) -> None:
        self.root = root
        self.keep = keep
        self.output_uri = output_uri
        self.progress = progress
        self.reporter = progress.reporter
        self.uid = uid
        self.remote = remote

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **_: Any) -> None:
        """A resumed run reports the checkpoint it resumed from at once: the failure that ended the run before
        may have cut off that checkpoint's report, and then the status would name an older one."""
        if state.is_world_process_zero and state.global_step > 0:
            self._report(self.progress.at_resume(state), state.global_step)

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **_: Any) -> None:
        if distributed():
            dist.barrier()  # every rank has written its part (ZeRO shards, RNG state)
        step = state.global_step
        path = self.root / f"checkpoint-{step}"
        if self.remote is not None:
            if int(os.environ.get("LOCAL_RANK", "0")) == 0:
                self.remote.upload_checkpoint(path)
            if distributed():
                dist.barrier()  # every node's files are in the bucket
        if state.is_world_process_zero:
            checkpoints.mark_complete(path, step)
            removed = [c.path.name for c in checkpoints.rotate(self.root, self.keep)]
            if self.remote is not None:
                self.remote.mark_complete(path)
                removed = [f"checkpoint-{s}" for s in self.remote.rotate(self.keep)]
            faults.point("after-checkpoint", str(step))  # complete, but not reported yet
            uri = self._report(self.progress.progress_at(state), step)
            log_event("checkpoint", step=step, uri=uri, removed=removed)

    def _report(self, progress: Progress, step: int) -> str:
        """Send checkpoint-STEP with the progress at its step to the status now; returns its URI."""
        uri = storage.join(self.output_uri, "checkpoints", f"checkpoint-{step}")
        self.reporter.submit(checkpoint_patch(progress, CheckpointStatus(step=step, uri=uri), self.uid))
        self.reporter.flush_soon()
        return uri


class StopOnSignal(TrainerCallback):
    """SIGTERM: finish the current step, save a checkpoint, stop. All ranks agree on the step to stop at."""

    def __init__(self) -> None:
        self.requested = False
        self.stopped_early = False

    def install(self) -> Any:
        """Handle SIGTERM from now on; returns the previous handler (for `signal.signal` to restore)."""
        return signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        log_event("sigterm", message="finishing the current step, then saving a checkpoint")
        self.requested = True

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **_: Any) -> None:
        requested = self.requested
        if distributed():
            flag = torch.tensor([1.0 if requested else 0.0], device=args.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            requested = bool(flag.item())
        if requested:
            self.stopped_early = state.global_step < state.max_steps
            control.should_save = True
            control.should_training_stop = True
