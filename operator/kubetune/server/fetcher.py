"""`kubetune fetcher`: the adapter fetcher, a sidecar beside vLLM in every server pod.

vLLM's runtime LoRA API loads from a path inside the pod. Before the operator asks vLLM to load a pvc:// or
s3:// adapter, it asks this sidecar (`POST /prepare`) to make the adapter visible at that path and to return
its adapter_config.json (and kubetune.json, when kubetune trained it), so that the operator can check it
against the server without reading any storage itself. s3:// adapters are downloaded, fresh on every request,
into the cache volume that vLLM mounts too (`storage.local_path`: the path the operator gives vLLM); pvc://
ones are on the claims both containers mount. The Secrets of s3:// adapters are mounted into this container
only: neither the operator nor vLLM sees them.

The operator also reaches vLLM's runtime LoRA API through this sidecar: the fetcher holds the server's API key
(VLLM_API_KEY, from the ModelServer's Secret) and the operator does not. It answers only requests that the
operator signed (kubetune/signing.py; the public key is KUBETUNE_OPERATOR_PUBLIC_KEY) for this very pod
(KUBETUNE_POD_NAME), and forwards them to vLLM (KUBETUNE_VLLM_ADDRESS) with the key.

    POST /prepare {"uri": "s3://BUCKET/PREFIX", "s3": {"secretName", "endpoint", "region"}}
      200 {"path", "adapterConfig", "metadata"}    404/502/400 {"reason", "message"}
    GET /v1/models, POST /v1/load_lora_adapter, POST /v1/unload_lora_adapter: vLLM's answer
    GET /health (unsigned: the kubelet's probe)

`kubetune fetcher --download s3://BUCKET/PREFIX [--secret-name NAME] [--endpoint URL] [--region R] [--cache ROOT]`
is the init container of a server whose base model is in S3: it downloads the model to the path vLLM's --model
names. With `--cache` (the namespace's cache claim, docs/cache.md) that path is the model's cache entry, the one a
FineTuneJob's prepare step fills: an entry that is there is used as it is (nothing downloaded), a missing one is
filled as the prepare step fills it (staging folder, marker, rename), and vLLM mounts the cache read-only.
`kubetune fetcher --download hf://ORG/NAME[@REV] --cache ROOT --link PATH` does the same for an hf:// model when
the namespace has the cache claim: the revision is resolved to its commit here (the operator holds no Hub token),
the commit's entry used or filled, and linked at PATH, which vLLM's --model names.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from kubetune import hf, s3, storage
from kubetune.signing import Verifier
from kubetune.trainer.cache import Cache

log = logging.getLogger("kubetune.fetcher")
ADAPTER_CONFIG = "adapter_config.json"
METADATA = "kubetune.json"
DEFAULT_PORT = 8001
# vLLM's routes the operator may call through the fetcher.
VLLM_ROUTES = {("GET", "/v1/models"), ("POST", "/v1/load_lora_adapter"), ("POST", "/v1/unload_lora_adapter")}
# Loading reads the weights from the volume (the operator waits 120 s).
VLLM_TIMEOUT_S = 115.0


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


@dataclass(frozen=True)
class Vllm:
    """Where the pod's vLLM listens and the key it wants."""

    address: str
    """host:port"""
    api_key: str = ""


def forward(vllm: Vllm, method: str, path: str, body: bytes) -> tuple[int, bytes]:
    """One request to vLLM with the server's API key: (status, body); 502 when vLLM does not answer."""
    headers = {"Content-Type": "application/json"}
    if vllm.api_key:
        headers["Authorization"] = f"Bearer {vllm.api_key}"
    request = urllib.request.Request(
        f"http://{vllm.address}{path}", data=body if method == "POST" else None, method=method, headers=headers
    )
    try:
        with urllib.request.urlopen(request, timeout=VLLM_TIMEOUT_S) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()
    except OSError as err:
        message = f"vLLM at {vllm.address} did not answer: {getattr(err, 'reason', err)}"
        return 502, json.dumps({"error": {"message": message}}).encode()


class FetcherServer(ThreadingHTTPServer):
    """The HTTP server, with what its handlers need: who may call (None: anyone; only tests build one so) and
    where vLLM is."""

    def __init__(self, address: tuple[str, int], verifier: Verifier | None, vllm: Vllm | None) -> None:
        super().__init__(address, Handler)
        self.verifier = verifier
        self.vllm = vllm


class Handler(BaseHTTPRequestHandler):
    server_version = "kubetune-fetcher"
    server: FetcherServer

    def _send(self, status: int, data: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _answer(self, status: int, body: dict[str, Any]) -> None:
        self._send(status, json.dumps(body).encode())

    def _authorized(self, body: bytes) -> bool:
        """Whether the operator signed this request; answers 401 when not."""
        verifier = self.server.verifier
        if verifier is None:
            return True
        refusal = verifier.refusal(self.command, self.path, dict(self.headers.items()), body)
        if refusal:
            log.warning("%s %s from %s refused: %s", self.command, self.path, self.client_address[0], refusal)
            self._answer(401, {"reason": "Unauthorized", "message": refusal})
        return not refusal

    def do_GET(self) -> None:
        if self.path == "/health":
            self._answer(200, {"status": "ok"})
        elif self._authorized(b""):
            self._route(b"")

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self._authorized(body):
            self._route(body)

    def _route(self, body: bytes) -> None:
        if (self.command, self.path) in VLLM_ROUTES and self.server.vllm is not None:
            self._send(*forward(self.server.vllm, self.command, self.path, body))
        elif (self.command, self.path) == ("POST", "/prepare"):
            self._prepare(body)
        else:
            self._answer(404, {"reason": "NotFound", "message": f"{self.command} {self.path}"})

    def _prepare(self, body: bytes) -> None:
        try:
            request = json.loads(body)
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


def from_environment() -> tuple[Verifier | None, Vllm | None]:
    """Who may call and where vLLM is, from the variables the rendered Deployment sets."""
    public_key, pod = os.environ.get("KUBETUNE_OPERATOR_PUBLIC_KEY", ""), os.environ.get("KUBETUNE_POD_NAME", "")
    verifier = Verifier.from_text(public_key, pod) if public_key else None
    address = os.environ.get("KUBETUNE_VLLM_ADDRESS", "")
    vllm = Vllm(address, os.environ.get("VLLM_API_KEY", "")) if address else None
    return verifier, vllm


def download_model(uri: str, access: s3.Access, cache_root: Path | None, link: Path | None = None) -> Path:
    """The base model at `uri` where vLLM's --model names it: an s3:// one downloaded to its local path, or (with a
    cache root) its cache entry, used when complete and filled atomically when not. An hf:// one (with a cache root
    and a `link` only): the entry of the commit its revision names now, linked at `link`."""
    if storage.parse(uri).scheme == "hf":
        if cache_root is None or link is None:
            raise ValueError(f"{uri}: an hf:// model is downloaded here only into the cache, with --link")
        commit = hf.commit(uri, "model")
        log.info("%s: the revision names commit %s", uri, commit)
        meta = {"uri": storage.cache_uri(uri), "revision": commit}
        key = storage.model_entry_key(uri, commit)
        path = cached(Cache(cache_root), key, uri, meta, lambda to: hf.download_model(uri, commit, to))
        link_to(path, link)
        return path

    def from_s3(to: Path) -> Path:
        return s3.download(s3.client(access), uri, to)

    if cache_root is None:
        return from_s3(Path(storage.local_path(uri)))
    return cached(Cache(cache_root), storage.model_entry_key(uri), uri, {"uri": uri}, from_s3)


def cached(cache: Cache, key: str, uri: str, meta: dict[str, Any], download: Callable[[Path], Path]) -> Path:
    """The model folder of cache entry `key`: used as it is when complete, else filled by `download(folder)`
    atomically (the way a prepare step fills it: staging folder, marker, rename)."""
    entry = cache.lookup(key)
    if entry is not None:
        log.info("%s: the cache has it (%s)", uri, key)
    else:
        log.info("%s: not in the cache, downloading into %s", uri, key)
        entry = cache.fill(key, lambda folder: download(folder / "model"), meta)
    return entry / "model"


def link_to(target: Path, link: Path) -> None:
    """`link` made a symbolic link to `target`, replacing one a restarted container left, in one rename."""
    link.parent.mkdir(parents=True, exist_ok=True)
    made = link.with_name(f".{link.name}.{os.getpid()}")
    made.unlink(missing_ok=True)
    made.symlink_to(target)
    made.replace(link)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="kubetune fetcher", description="Fetch LoRA adapters for vLLM (sidecar).")
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--download", metavar="URI", help="download a base model (docs/cache.md) and exit")
    parser.add_argument("--secret-name", default="", help="with --download: the Secret of the location")
    parser.add_argument("--endpoint", default="", help="with --download: the S3 endpoint")
    parser.add_argument("--region", default="", help="with --download: the bucket's region")
    parser.add_argument("--cache", type=Path, help="with --download: the model cache's root (docs/cache.md)")
    parser.add_argument("--link", type=Path, help="with --download of hf:// and --cache: link the entry here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.download:
        access = s3.Access(args.secret_name, args.endpoint, args.region)
        try:
            path = download_model(args.download, access, args.cache, args.link)
        except Exception as err:  # the pod's log says why; the init container's exit fails the pod
            log.error("cannot download %s: %s", args.download, err)
            return 1
        log.info("downloaded %s to %s", args.download, path)
        return 0
    verifier, vllm = from_environment()
    if verifier is None:
        log.error("KUBETUNE_OPERATOR_PUBLIC_KEY is not set: the fetcher answers only the operator, and cannot tell it")
        return 2
    server = FetcherServer((args.host, args.port), verifier, vllm)
    log.info("adapter fetcher on %s:%d, vLLM at %s", args.host, args.port, vllm.address if vllm else "(none)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
