"""An ASGI middleware for vLLM's OpenAI server: the API key on every route but the probes and the metrics.

vLLM's own `--api-key` / VLLM_API_KEY guards the paths under /v1, /v2, /inference and /cohere only; other routes
of the same server answer without a key, among them /invocations (the same chat and completion requests) and
/tokenize. A ModelServer with an API key runs vLLM with `--middleware kubetune.server.auth.RequireApiKey`, which
asks for the same key (VLLM_API_KEY) everywhere except the kubelet's probes and Prometheus' scrape.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]

# Paths answered without the key: the probes (startup, readiness, liveness), Prometheus, and the version.
OPEN_PATHS = frozenset({"/health", "/ping", "/metrics", "/version"})


def authorized(headers: list[tuple[bytes, bytes]], digest: bytes) -> bool:
    """Whether the request's `Authorization: Bearer KEY` holds the key whose SHA-256 is `digest`."""
    value = next((v for k, v in headers if k.lower() == b"authorization"), b"").decode("latin-1")
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(hashlib.sha256(token.strip().encode()).digest(), digest)


class RequireApiKey:
    """401 for any HTTP request but those of OPEN_PATHS (and CORS preflights) without the key."""

    def __init__(self, app: App) -> None:
        self.app = app
        key = os.environ.get("VLLM_API_KEY", "")
        self.digest = hashlib.sha256(key.encode()).digest() if key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.digest is None or scope["type"] not in ("http", "websocket") or scope.get("method") == "OPTIONS":
            await self.app(scope, receive, send)
            return
        path = str(scope["path"]).removeprefix(str(scope.get("root_path", ""))) or "/"
        if path in OPEN_PATHS or authorized(list(scope.get("headers") or []), self.digest):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        body = b'{"error":"Unauthorized"}'
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})
