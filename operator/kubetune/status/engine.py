"""Why a server pod's vLLM container exited, as a reason a person can act on (pure functions over pods).

The container's termination message holds vLLM's error lines (`kubetune engine` writes them; the kubelet's
FallbackToLogsOnError gives the log's tail when it could not), so the reason is known as soon as the kubelet
reports the exit, long before the startup probe would give up:

- InvalidEngineArgs: vLLM refused its command line or its configuration (an unknown flag, a bad value);
- MaxModelLenTooLarge: maxModelLen is above what the model supports, or above what its KV cache can hold;
- OutOfMemory: the weights or the KV cache did not fit (or the kernel killed the container for memory);
- EngineFailed: anything else.

Before vLLM, `kubetune engine` checks the model's config.json; a server it refuses ends with that refusal as the
termination message (planner/engine.py's refusal_text), named like the operator's own refusals:
TensorParallelSizeInvalid or MaxModelLenTooLarge. The kernel's OOM kill is the kubelet's termination reason
OOMKilled (exit code 137), which leaves no error line: it is OutOfMemory whatever the message says.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from kubetune.planner.engine import parsed_refusal
from kubetune.status.pods import Problem, ended

ENGINE_CONTAINER = "vllm"
ENGINE_REASONS = (
    "InvalidEngineArgs",
    "MaxModelLenTooLarge",
    "TensorParallelSizeInvalid",
    "OutOfMemory",
    "EngineFailed",
)
OOM_KILLED = "OOMKilled"
OOM_ADVICE = "the kernel killed it for using more memory than its limit: raise spec.resources.memory"
MESSAGE_CHARS = 1500

_MAX_MODEL_LEN = re.compile(
    r"greater than the derived max_model_len|estimated maximum model length is|max seq len \(\d+\).*larger than",
    re.IGNORECASE,
)
_OUT_OF_MEMORY = re.compile(
    r"out of memory|OutOfMemoryError|No available memory for the cache blocks|Cannot allocate memory", re.IGNORECASE
)
_INVALID_ARGS = re.compile(
    r"^\S+: error: |unrecognized arguments|validation error for \w*Config|^\s*Value error, ", re.MULTILINE
)


def engine_reason(message: str, exit_code: int | None, kubelet_reason: str = "") -> str:
    """The reason for a vLLM container that ended with `message` (its termination message), `exit_code` and the
    kubelet's termination reason."""
    if kubelet_reason == OOM_KILLED:
        return "OutOfMemory"
    if (refused := parsed_refusal(message)) is not None:
        return refused.reason
    if _MAX_MODEL_LEN.search(message):
        return "MaxModelLenTooLarge"
    if _OUT_OF_MEMORY.search(message):
        return "OutOfMemory"
    if exit_code == 2 or _INVALID_ARGS.search(message):
        return "InvalidEngineArgs"
    return "EngineFailed"


def _failed_run(status: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The container's failed run that still stands: it is terminated with an error now, or it ended with one
    and has not become ready since (waiting to restart, or starting again)."""
    if status.get("ready"):
        return None
    for term in ((status.get("state") or {}).get("terminated"), (status.get("lastState") or {}).get("terminated")):
        if term and term.get("exitCode") not in (0, None):
            return dict(term)
    return None


def engine_failure(pod: Mapping[str, Any]) -> Problem | None:
    """Why this pod's vLLM exited, when it did and has not served since; None otherwise."""
    meta = pod.get("metadata") or {}
    if meta.get("deletionTimestamp"):
        return None
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        if status.get("name") != ENGINE_CONTAINER or (term := _failed_run(status)) is None:
            continue
        text = str(term.get("message") or "").strip()
        reason = engine_reason(text, term.get("exitCode"), str(term.get("reason") or ""))
        restarts = int(status.get("restartCount") or 0)
        again = f", restarted {restarts} time(s)" if restarts else ""
        name = meta.get("name", "")
        if reason != "OutOfMemory" and (refused := parsed_refusal(text)) is not None:
            return Problem(reason, f"pod {name}: vLLM not started{again}: {refused.message}")
        detail = text[-MESSAGE_CHARS:] if text else "no error message (see the container's log)"
        if term.get("reason") == OOM_KILLED:  # the log's tail says nothing of it
            detail = OOM_ADVICE + (f"\n{text[-MESSAGE_CHARS:]}" if text else "")
        return Problem(reason, f"pod {name}: vLLM {ended(term)}{again}: {detail}")
    return None
