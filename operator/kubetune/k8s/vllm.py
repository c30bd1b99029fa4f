"""HTTP calls to the vLLM servers' runtime LoRA API: what each replica has loaded, load, unload.

Each replica is addressed by its pod IP, so that every one of them is asked (a Service would pick one).
The server must run with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True (the rendered Deployment sets it).
"""

from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from kubetune.adapters import Action, Failure, Replica, ReplicaReport, reason_for_load_error

log = logging.getLogger(__name__)
ASK_TIMEOUT_S = 3.0
# Loading reads the weights from the volume; large adapters on a slow volume take a while.
LOAD_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Outcome:
    """The answer to one action: the HTTP status (0 when there was none) and vLLM's message. `reason` is set
    when the load was refused before vLLM was asked (by the fetcher or the checks of the adapter's files)."""

    action: Action
    status: int
    message: str
    reason: str = ""

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


def _request(address: str, method: str, path: str, body: Any, timeout: float) -> tuple[int, str]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        f"http://{address}{path}", data=data, method=method, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode(errors="replace")
    except (OSError, ValueError) as err:
        return 0, str(getattr(err, "reason", err))


def _error_message(text: str) -> str:
    try:
        return str(json.loads(text)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return text.strip()[:1000]


def report(replica: Replica) -> ReplicaReport:
    """The LoRA adapters a replica has loaded (name -> path), from GET /v1/models."""
    status, text = _request(replica.address, "GET", "/v1/models", None, ASK_TIMEOUT_S)
    if status != 200:
        return ReplicaReport(replica, None, _error_message(text) or f"HTTP {status}")
    try:
        models = json.loads(text)["data"]
    except (ValueError, KeyError, TypeError):
        return ReplicaReport(replica, None, "GET /v1/models: not a model list")
    return ReplicaReport(replica, {m["id"]: m.get("root") or "" for m in models if m.get("parent")})


def reports(replicas: list[Replica]) -> list[ReplicaReport]:
    """report() of every replica, asked in parallel."""
    if not replicas:
        return []
    with ThreadPoolExecutor(max_workers=min(16, len(replicas))) as pool:
        return list(pool.map(report, replicas))


def perform(action: Action) -> Outcome:
    """One load or unload on one replica."""
    if action.verb == "load":
        body = {"lora_name": action.adapter, "lora_path": action.path}
        status, text = _request(action.replica.address, "POST", "/v1/load_lora_adapter", body, LOAD_TIMEOUT_S)
    else:
        body = {"lora_name": action.adapter}
        status, text = _request(action.replica.address, "POST", "/v1/unload_lora_adapter", body, ASK_TIMEOUT_S)
        if status == 404:
            status = 200  # already gone: what was wanted
    outcome = Outcome(action, status, "" if 200 <= status < 300 else _error_message(text))
    log.info(
        "%s %s on %s: %s", action.verb, action.adapter, action.replica.pod, "ok" if outcome.ok else outcome.message
    )
    return outcome


Prepare = Callable[[Action], Outcome | None]


def perform_all(actions: list[Action], prepare: Prepare | None = None) -> list[Outcome]:
    """The actions, one replica's in order, replicas in parallel. `prepare` runs before each load; when it
    returns an Outcome (a refusal), that is the load's outcome and vLLM is not asked."""
    by_replica: dict[Replica, list[Action]] = {}
    for action in actions:
        by_replica.setdefault(action.replica, []).append(action)
    if not by_replica:
        return []

    def run(action: Action) -> Outcome:
        refused = prepare(action) if prepare is not None and action.verb == "load" else None
        return refused or perform(action)

    with ThreadPoolExecutor(max_workers=min(16, len(by_replica))) as pool:
        results = pool.map(lambda items: [run(a) for a in items], by_replica.values())
        return [outcome for items in results for outcome in items]


def failures_of(outcomes: list[Outcome]) -> dict[str, Failure]:
    """Refused loads by adapter name (not unreachable replicas: those are retried on the next look)."""
    now = time.monotonic()
    return {
        o.action.adapter: Failure(o.action.path, o.reason or reason_for_load_error(o.status, o.message), o.message, now)
        for o in outcomes
        if o.action.verb == "load" and not o.ok and o.status != 0
    }
