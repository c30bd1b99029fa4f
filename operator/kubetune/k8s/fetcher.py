"""HTTP calls to the adapter fetcher beside vLLM (`kubetune fetcher`, server/fetcher.py) in each server pod.

The operator names the adapter and how to reach it (the Secret's name, endpoint, region); the fetcher, which
alone mounts the Secret, makes the files visible to vLLM and answers with adapter_config.json and kubetune.json.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from kubetune.adapters import Adapter

# An s3:// download of a large adapter takes a while.
PREPARE_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class Prepared:
    """The fetcher's answer: status 200 with the adapter's files, else a reason (status 0: no answer)."""

    status: int
    adapter_config: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] | None = None
    reason: str = ""
    message: str = ""


def prepare(address: str, adapter: Adapter, timeout: float = PREPARE_TIMEOUT_S) -> Prepared:
    """POST /prepare to the fetcher at `address` (host:port) for `adapter`."""
    body = json.dumps({"uri": adapter.uri, "s3": adapter.s3.to_wire()}).encode()
    request = urllib.request.Request(
        f"http://{address}/prepare", data=body, method="POST", headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, text = response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as err:
        status, text = err.code, err.read().decode(errors="replace")
    except (OSError, ValueError) as err:
        return Prepared(0, message=f"adapter fetcher at {address}: {getattr(err, 'reason', err)}")
    try:
        answer = json.loads(text)
    except ValueError:
        answer = {"message": text.strip()[:1000]}
    if status == 200:
        return Prepared(200, answer.get("adapterConfig") or {}, answer.get("metadata"))
    reason = str(answer.get("reason") or "AdapterFetchFailed")
    return Prepared(status, reason=reason, message=str(answer.get("message") or f"HTTP {status}"))
