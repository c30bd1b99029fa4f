"""`ReplicaClient` over HTTP: the adapter fetcher in each server pod, and vLLM's runtime LoRA API through it.

The only I/O of the adapter feature. Each replica is addressed by its pod IP, so that every one of them is
asked (a Service would pick one). Every request goes to the pod's fetcher (`kubetune fetcher`,
server/fetcher.py), signed with the operator's key for that very pod (kubetune/signing.py): the fetcher
forwards GET /v1/models and the load and unload calls to vLLM with the server's API key, which the operator
never holds, and answers /prepare itself. vLLM must run with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True (the
rendered Deployment sets it). The fetcher alone mounts the adapters' Secrets: it is told the adapter and how to
reach it (the Secret's name, endpoint, region), makes the files visible to vLLM and answers with
adapter_config.json and kubetune.json.
"""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
from typing import Any

from kubetune.adapters.replicas import Outcome, Prepared
from kubetune.adapters.sync import Action, Adapter, Replica, ReplicaReport
from kubetune.signing import Signer

log = logging.getLogger(__name__)
ASK_TIMEOUT_S = 3.0
# Loading reads the weights from the volume; large adapters on a slow volume take a while.
LOAD_TIMEOUT_S = 120.0
# An s3:// download of a large adapter takes a while.
PREPARE_TIMEOUT_S = 300.0


class HttpReplicas:
    """The ReplicaClient of the running operator: signs every request with `signer`."""

    def __init__(self, signer: Signer) -> None:
        self.signer = signer

    def report(self, replica: Replica) -> ReplicaReport:
        return report(replica, self.signer)

    def perform(self, action: Action) -> Outcome:
        return perform(action, self.signer)

    def prepare(self, replica: Replica, adapter: Adapter) -> Prepared:
        return prepare(replica, adapter, self.signer)


def _request(replica: Replica, signer: Signer, method: str, path: str, body: Any, timeout: float) -> tuple[int, str]:
    """(HTTP status, body text) of a signed request to the replica's fetcher; status 0 with the error when there
    was no answer."""
    data = json.dumps(body).encode() if body is not None else b""
    headers = {"Content-Type": "application/json", **signer.headers(method, path, replica.pod, data)}
    request = urllib.request.Request(
        f"http://{replica.fetcher}{path}", data=data if body is not None else None, method=method, headers=headers
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


def report(replica: Replica, signer: Signer) -> ReplicaReport:
    """The LoRA adapters a replica has loaded (name -> path), from GET /v1/models (vLLM lists each loaded adapter
    as a model with a `parent`)."""
    status, text = _request(replica, signer, "GET", "/v1/models", None, ASK_TIMEOUT_S)
    if status != 200:
        return ReplicaReport(replica, None, _error_message(text) or f"HTTP {status}")
    try:
        models = json.loads(text)["data"]
    except (ValueError, KeyError, TypeError):
        return ReplicaReport(replica, None, "GET /v1/models: not a model list")
    return ReplicaReport(replica, {m["id"]: m.get("root") or "" for m in models if m.get("parent")})


def perform(action: Action, signer: Signer) -> Outcome:
    """One load or unload on one replica."""
    replica = action.replica
    if action.verb == "load":
        body = {"lora_name": action.adapter, "lora_path": action.path}
        status, text = _request(replica, signer, "POST", "/v1/load_lora_adapter", body, LOAD_TIMEOUT_S)
    else:
        body = {"lora_name": action.adapter}
        status, text = _request(replica, signer, "POST", "/v1/unload_lora_adapter", body, ASK_TIMEOUT_S)
        if status == 404:
            status = 200  # already gone: what was wanted
    outcome = Outcome(action, status, "" if 200 <= status < 300 else _error_message(text))
    log.info(
        "%s %s on %s: %s", action.verb, action.adapter, action.replica.pod, "ok" if outcome.ok else outcome.message
    )
    return outcome


def prepare(replica: Replica, adapter: Adapter, signer: Signer, timeout: float = PREPARE_TIMEOUT_S) -> Prepared:
    """POST /prepare to the replica's fetcher for `adapter`."""
    body = {"uri": adapter.uri, "s3": adapter.s3.to_wire()}
    status, text = _request(replica, signer, "POST", "/prepare", body, timeout)
    if status == 0:
        return Prepared(0, message=f"adapter fetcher at {replica.fetcher}: {text}")
    try:
        answer = json.loads(text)
    except ValueError:
        answer = {"message": text.strip()[:1000]}
    if status == 200:
        return Prepared(200, answer.get("adapterConfig") or {}, answer.get("metadata"))
    reason = str(answer.get("reason") or "AdapterFetchFailed")
    return Prepared(status, reason=reason, message=str(answer.get("message") or f"HTTP {status}"))
