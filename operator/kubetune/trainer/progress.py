"""Progress reports: formatted for the printer columns, logged as JSON lines, patched into the FineTuneJob.

Pure formatting plus a background reporter; no torch here. Rank 0 builds a `Progress` and hands it to the
`StatusReporter`, which sends at most one merge patch per interval from its own thread, so a slow or broken
API server never stalls training.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from kubetune.api.v1alpha1 import GROUP, VERSION, CheckpointStatus, FineTuneJob, Progress
from kubetune.api.v1alpha1.trainerconfig import JobIdentity

log = logging.getLogger(__name__)

Patch = dict[str, Any]
PatchSender = Callable[[Patch], None]


def format_eta(seconds: float | None) -> str:
    """A short duration for the ETA column: 45s, 12m30s, 1h12m, 2d3h."""
    if seconds is None or seconds < 0:
        return ""
    s = round(seconds)
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    if days:
        return f"{days}d{hours}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{s:02d}s"
    return f"{s}s"


def format_summary(step: int, total_steps: int) -> str:
    """The PROGRESS column: "45% (450/1000)"."""
    return f"{percent(step, total_steps):.0f}% ({step}/{total_steps})"


def percent(step: int, total_steps: int) -> float:
    return min(100.0, 100.0 * step / total_steps) if total_steps > 0 else 0.0


def eta_seconds(step: int, total_steps: int, started_step: int, elapsed: float) -> int | None:
    """Remaining seconds at the pace of this run (steps done since it started or resumed), or None before a step."""
    done = step - started_step
    if done <= 0 or elapsed <= 0 or total_steps <= 0:
        return None
    return max(0, round((total_steps - step) * elapsed / done))


def build_progress(
    step: int,
    total_steps: int,
    *,
    started_step: int = 0,
    elapsed: float = 0.0,
    epoch: float | None = None,
    loss: float | None = None,
    eval_loss: float | None = None,
    learning_rate: float | None = None,
    tokens_per_second: float | None = None,
    resumed_from: int | None = None,
    now: datetime | None = None,
) -> Progress:
    """The status.progress object for one report."""
    eta = eta_seconds(step, total_steps, started_step, elapsed)
    return Progress(
        step=step,
        total_steps=total_steps,
        percent=round(percent(step, total_steps), 2),
        summary=format_summary(step, total_steps),
        epoch=None if epoch is None else round(epoch, 4),
        loss=None if loss is None else round(loss, 6),
        eval_loss=None if eval_loss is None else round(eval_loss, 6),
        learning_rate=learning_rate,
        tokens_per_second=None if tokens_per_second is None else round(tokens_per_second, 1),
        eta_seconds=eta,
        eta=format_eta(eta),
        updated_at=(now or datetime.now(UTC)).replace(microsecond=0),
        resumed_from=resumed_from,
    )


def status_patch(status: dict[str, Any], uid: str = "") -> Patch:
    """A JSON merge patch of the status subresource; metadata.uid makes the object's UID a precondition."""
    patch: Patch = {"status": status}
    if uid:
        patch["metadata"] = {"uid": uid}
    return patch


def progress_patch(progress: Progress, uid: str = "") -> Patch:
    return status_patch({"progress": progress.to_wire()}, uid)


def checkpoint_patch(progress: Progress, checkpoint: CheckpointStatus, uid: str = "") -> Patch:
    """The status write of a saved checkpoint: the checkpoint with the progress at (or after) its step, in one
    patch, so that PROGRESS in `kubectl get` never trails the checkpoint the status names."""
    if progress.step < checkpoint.step:
        raise ValueError(f"progress at step {progress.step} would trail the checkpoint at step {checkpoint.step}")
    return status_patch({"progress": progress.to_wire(), "checkpoint": checkpoint.to_wire()}, uid)


def log_event(event: str, **fields: Any) -> None:
    """One JSON line on stdout: {"event": ..., ...}."""
    print(json.dumps({"event": event, **fields}, default=str), file=sys.stdout, flush=True)


def in_cluster() -> bool:
    return bool(os.environ.get("KUBERNETES_SERVICE_HOST"))


def kubernetes_sender(job: JobIdentity, timeout: float = 10.0) -> PatchSender:
    """Send merge patches to the FineTuneJob's status with the pod's service account."""
    from kubernetes import client, config  # imported lazily: only rank 0 in a cluster needs it

    config.load_incluster_config()
    api = client.CustomObjectsApi()

    def send(patch: Patch) -> None:
        api.patch_namespaced_custom_object_status(
            GROUP,
            VERSION,
            job.namespace,
            FineTuneJob.plural,
            job.name,
            patch,
            _content_type="application/merge-patch+json",
            _request_timeout=timeout,
        )

    return send


def status_sender(job: JobIdentity) -> PatchSender | None:
    """The sender for this pod: the API server when in a cluster and its client starts, else None (log only)."""
    if not in_cluster():
        return None
    try:
        return kubernetes_sender(job)
    except Exception as err:  # no token, no client: train anyway, progress still goes to the log
        log.warning("cannot report progress to the FineTuneJob's status: %s", err)
        return None


def merge(base: Patch, update: Patch) -> Patch:
    """JSON merge of two patches (update wins), so queued reports coalesce into one request."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


class StatusReporter:
    """Sends the latest pending patch at most every `interval` seconds from a daemon thread.

    Failures are logged and the patch stays pending for the next attempt; `close` makes one last attempt.
    """

    def __init__(self, send: PatchSender | None, interval: float) -> None:
        self._send = send
        self._interval = interval
        self._pending: Patch | None = None
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        if send is not None:
            self._thread = threading.Thread(target=self._run, name="kubetune-status", daemon=True)
            self._thread.start()

    def submit(self, patch: Patch) -> None:
        """Queue a patch; it is merged into any patch not yet sent."""
        if self._send is None:
            return
        with self._lock:
            self._pending = patch if self._pending is None else merge(self._pending, patch)

    def flush_soon(self) -> None:
        """Send without waiting for the rest of the interval (checkpoints, the final adapter)."""
        self._wake.set()

    def close(self, timeout: float = 15.0) -> None:
        """Stop the thread after one last attempt to send what is pending."""
        if self._thread is None:
            return
        self._stopped.set()
        self._wake.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stopped.is_set():
            self._wake.wait(self._interval)
            self._wake.clear()
            self._send_pending()
        self._send_pending()  # the last attempt, for what was queued or re-queued meanwhile

    def _send_pending(self) -> None:
        with self._lock:
            patch, self._pending = self._pending, None
        if patch is None or self._send is None:
            return
        try:
            self._send(patch)
        except Exception as err:  # reporting must never stop training
            log.warning("status patch failed, retrying at the next interval: %s", err)
            with self._lock:
                self._pending = patch if self._pending is None else merge(patch, self._pending)
