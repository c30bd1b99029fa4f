"""`kubetune fetcher`: the adapter fetcher, a sidecar beside vLLM in every server pod.

vLLM's runtime LoRA API loads from a path inside the pod. Before the operator asks vLLM to load a pvc:// or
s3:// adapter, it asks this sidecar (`POST /prepare`) to make the adapter visible at that path and to return
its adapter_config.json (and kubetune.json, when kubetune trained it), so that the operator can check it
against the server without reading any storage itself. s3:// adapters are downloaded, fresh on every request,
into the cache volume that vLLM mounts too (`storage.local_path`: the path the operator gives vLLM); pvc://
ones are on the claims both containers mount. The Secrets of s3:// adapters are mounted into this container
only: neither the operator nor vLLM sees them.

    POST /prepare {"uri": "s3://BUCKET/PREFIX", "s3": {"secretName", "endpoint", "region"}}
      200 {"path", "adapterConfig", "metadata"}    404/502/400 {"reason", "message"}
    GET /health

`kubetune fetcher --download s3://BUCKET/PREFIX [--secret-name NAME] [--endpoint URL] [--region R]` is the init
container of a server whose base model is in S3: it downloads the model to the path vLLM's --model names.
"""

from __future__ import annotations

import argparse
import json
import logging
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from kubetune import s3, storage

log = logging.getLogger("kubetune.fetcher")
ADAPTER_CONFIG = "adapter_config.json"
METADATA = "kubetune.json"
DEFAULT_PORT = 8001


@dataclass(frozen=True)
class Prepared:
    """The answer to one request: HTTP status, and either the adapter's files or why there are none."""

    status: int
    path: str = ""
    adapter_config: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] | None = None
    reason: str = ""
    message: str = ""

    def to_wire(self) -> dict[str, Any]:
        if self.status == 200:
            return {"path": self.path, "adapterConfig": self.adapter_config, "metadata": self.metadata}
        return {"reason": self.reason, "message": self.message}


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


_locks: dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()


def _lock(path: str) -> threading.Lock:
    with _locks_guard:
        return _locks.setdefault(path, threading.Lock())


def prepare(uri: str, access: s3.Access) -> Prepared:
    """Make the adapter at `uri` readable at its local path and return its configuration."""
    scheme = uri.partition("://")[0]
    if scheme not in ("pvc", "s3"):
        return Prepared(400, reason="AdapterStorageUnsupported", message=f"{uri}: the fetcher handles pvc:// and s3://")
    path = Path(storage.local_path(uri))
    if scheme == "s3":
        with _lock(str(path)):
            try:
                s3.download(s3.client(access), uri, path)
            except s3.S3Error as err:
                if err.not_found:
                    return Prepared(404, reason="AdapterNotFound", message=f"no adapter at {uri}")
                return Prepared(502, reason="AdapterFetchFailed", message=str(err))
    config = _read_json(path / ADAPTER_CONFIG)
    if config is None:
        return Prepared(404, reason="AdapterNotFound", message=f"{uri}: no readable {ADAPTER_CONFIG} at {path}")
    return Prepared(200, path=str(path), adapter_config=config, metadata=_read_json(path / METADATA))


class Handler(BaseHTTPRequestHandler):
    server_version = "kubetune-fetcher"

    def _answer(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path == "/health":
            self._answer(200, {"status": "ok"})
        else:
            self._answer(404, {"reason": "NotFound", "message": self.path})

    def do_POST(self) -> None:
        if self.path != "/prepare":
            self._answer(404, {"reason": "NotFound", "message": self.path})
            return
        try:
            request = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
            uri = str(request["uri"])
            access = s3.Access.of(request.get("s3"))
        except (ValueError, KeyError, TypeError) as err:
            self._answer(400, {"reason": "BadRequest", "message": f"expected {{'uri', 's3'?}}: {err}"})
            return
        result = prepare(uri, access)
        log.info("prepare %s: %s", uri, result.status if result.status == 200 else f"{result.reason} {result.message}")
        self._answer(result.status, result.to_wire())

    def log_message(self, format: str, *args: Any) -> None:
        log.debug(format, *args)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="kubetune fetcher", description="Fetch LoRA adapters for vLLM (sidecar).")
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--download", metavar="URI", help="download an s3:// location to its local path and exit")
    parser.add_argument("--secret-name", default="", help="with --download: the Secret of the location")
    parser.add_argument("--endpoint", default="", help="with --download: the S3 endpoint")
    parser.add_argument("--region", default="", help="with --download: the bucket's region")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.download:
        access = s3.Access(args.secret_name, args.endpoint, args.region)
        try:
            path = s3.download(s3.client(access), args.download, Path(storage.local_path(args.download)))
        except s3.S3Error as err:
            log.error("%s", err)
            return 1
        log.info("downloaded %s to %s", args.download, path)
        return 0
    server = ThreadingHTTPServer((args.host, args.port), Handler)
    log.info("adapter fetcher on %s:%d", args.host, args.port)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
