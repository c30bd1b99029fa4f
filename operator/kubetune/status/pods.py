"""What keeps a pod's containers from starting, and how a container ended (pure functions over pods).

The kubelet says most of it in a container's waiting state: an image it cannot pull, a Secret or ConfigMap
that an environment variable names and that does not exist. A volume it cannot mount (a missing ConfigMap
or Secret, a claim that cannot attach) it says only in a FailedMount Event, while the container waits in
ContainerCreating: the operator looks those Events up for such pods (controllers/mounts.py) and passes their
messages in here, by pod UID.
"""

from __future__ import annotations

import contextlib
import re
import signal
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

PULL_REASONS = ("ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull", "RegistryUnavailable")
START_REASONS = ("CreateContainerConfigError", "CreateContainerError", "RunContainerError")
CREATING_REASONS = ("ContainerCreating", "PodInitializing")
# Condition reasons for the problems above (docs/failures.md lists them).
PROBLEM_REASONS = ("ImagePullBackOff", "MissingSecret", "MissingConfigMap", "MountFailed", *START_REASONS)


@dataclass(frozen=True)
class Problem:
    """Why a pod's containers do not start: a condition reason and the kubelet's own words."""

    reason: str
    message: str


def _missing(text: str) -> str | None:
    """MissingSecret or MissingConfigMap when the kubelet's message says one (or a key of one) does not exist."""
    if re.search(r'secrets? "[^"]*" not found|key \S+ in secret', text, re.IGNORECASE):
        return "MissingSecret"
    if re.search(r'config ?maps? "[^"]*" not found|key \S+ in config ?map', text, re.IGNORECASE):
        return "MissingConfigMap"
    return None


def _statuses(pod: Mapping[str, Any]) -> list[dict[str, Any]]:
    status = pod.get("status") or {}
    return [*(status.get("initContainerStatuses") or []), *(status.get("containerStatuses") or [])]


def waiting_problem(pod: Mapping[str, Any], mount_failures: Mapping[str, str]) -> Problem | None:
    """The first reason why this pod's containers do not start, or None."""
    meta = pod.get("metadata") or {}
    name = meta.get("name", "")
    for cs in _statuses(pod):
        waiting = (cs.get("state") or {}).get("waiting") or {}
        reason, text = str(waiting.get("reason") or ""), str(waiting.get("message") or "").strip()
        where = f"pod {name}, container {cs.get('name')}"
        if reason in PULL_REASONS:
            return Problem("ImagePullBackOff", f"{where}: cannot pull image {cs.get('image', '')}: {text or reason}")
        if reason in START_REASONS:
            return Problem(_missing(text) or reason, f"{where}: {text or reason}")
    failure = mount_failures.get(str(meta.get("uid", "")))
    if failure and creating_since(pod) is not None:
        return Problem(_missing(failure) or "MountFailed", f"pod {name}: {failure}")
    return None


def creating_since(pod: Mapping[str, Any]) -> datetime | None:
    """When a pod that still sets up its containers (volumes, image) was scheduled; None for any other pod."""
    status = pod.get("status") or {}
    if status.get("phase") != "Pending" or (pod.get("metadata") or {}).get("deletionTimestamp"):
        return None
    reasons = {((cs.get("state") or {}).get("waiting") or {}).get("reason") for cs in _statuses(pod)}
    if not reasons or not reasons <= set(CREATING_REASONS):
        return None
    scheduled = next(
        (c for c in status.get("conditions") or [] if c.get("type") == "PodScheduled" and c.get("status") == "True"),
        None,
    )
    stamp = (scheduled or {}).get("lastTransitionTime") or (pod.get("metadata") or {}).get("creationTimestamp")
    return datetime.fromisoformat(str(stamp).replace("Z", "+00:00")) if stamp else None


def ended(term: Mapping[str, Any]) -> str:
    """How a container ended, e.g. "exited with code 137 (Error, killed by SIGKILL)"."""
    code = term.get("exitCode")
    details = [str(term["reason"])] if term.get("reason") else []
    if isinstance(code, int) and code > 128:
        with contextlib.suppress(ValueError):
            details.append(f"killed by {signal.Signals(code - 128).name}")
    return f"exited with code {code}" + (f" ({', '.join(details)})" if details else "")


def last_line(text: str) -> str:
    """The last non-empty line of a termination message (with FallbackToLogsOnError, the log's tail)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""
