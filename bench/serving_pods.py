"""The server pods of bench/operator_scale.py's ModelServers, for kwok's simulated pods: the real adapter fetcher at
each pod's address, in front of one fake vLLM and one fake S3 (standard library only).

    kubectl get pods -l kubetune.io/modelserver --watch -o jsonpath=... | python bench/serving_pods.py

kwok gives its pods loopback addresses (the bench claims a 127.N.0.0/16 of its own for them), so the operator
reaches them as it reaches real server pods: over HTTP at the pod's IP and the fetcher port, signed with its key.
Each line on stdin names a pod, its IP and the operator's public key from its fetcher container's environment
(`POD IP KEY`); for each new one a `kubetune fetcher` server (`kubetune.server.fetcher.FetcherServer`, the code of
the sidecar) listens at IP:PORT, checks the operator's signature for that very pod and forwards vLLM's routes to
IP:VLLM_PORT, where the fake vLLM listens on every address and keeps each pod's adapters apart by the address
the request came to. The bench's FineTuneJobs write to s3://, so before each load the fetcher downloads the
adapter (`POST /prepare`) from the fake S3, which holds an adapter under every prefix.

On SIGTERM it prints one JSON line and exits: the requests it answered per route, the fetcher's warnings (a refused
signature), and per pod when its fetcher started listening and when its vLLM last loaded or unloaded an adapter
(time.monotonic(), which is the same clock in every process of the machine).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit
from xml.sax.saxutils import escape

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "operator"))

from kubetune.server.fetcher import FetcherServer, Vllm  # noqa: E402
from kubetune.signing import Verifier  # noqa: E402

BASE_MODEL = "Qwen/Qwen2.5-0.5B"
# What the fake S3 holds under every prefix: a PEFT adapter's configuration, as the trainer writes it.
ADAPTER_FILES = {
    "adapter_config.json": json.dumps(
        {
            "peft_type": "LORA",
            "r": 8,
            "lora_alpha": 16,
            "target_modules": ["q_proj", "v_proj"],
            "base_model_name_or_path": BASE_MODEL,
        }
    ).encode(),
}

requests_seen: Counter[str] = Counter()
_count_guard = threading.Lock()


def counted(what: str) -> None:
    with _count_guard:
        requests_seen[what] += 1


def models_listing(loaded: dict[str, str]) -> dict[str, Any]:
    """vLLM's GET /v1/models: the base model, then each loaded adapter as a model whose `parent` is the base and
    whose `root` is its path."""
    base = {"id": BASE_MODEL, "object": "model", "root": BASE_MODEL, "parent": None}
    adapters = [{"id": name, "object": "model", "root": path, "parent": BASE_MODEL} for name, path in loaded.items()]
    return {"object": "list", "data": [base, *adapters]}


def lora_call(loaded: dict[str, str], route: str, body: dict[str, Any]) -> tuple[int, str]:
    """vLLM's answer to a load or unload (status, text), `loaded` changed as vLLM's registry would be."""
    name = str(body.get("lora_name") or "")
    if not name:
        return 400, json.dumps({"error": {"message": "lora_name is required"}})
    if route == "/v1/load_lora_adapter":
        if name in loaded:
            return 400, json.dumps({"error": {"message": f"The lora adapter '{name}' has already been loaded."}})
        loaded[name] = str(body.get("lora_path") or "")
        return 200, f"Success: LoRA adapter '{name}' added successfully."
    if loaded.pop(name, None) is None:
        return 404, json.dumps({"error": {"message": f"The lora adapter '{name}' cannot be found."}})
    return 200, f"Success: LoRA adapter '{name}' removed successfully."


class FakeVllm(ThreadingHTTPServer):
    """vLLM's runtime LoRA API for every pod at once: each pod's adapters are keyed by the address it was asked at."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int]) -> None:
        super().__init__(address, VllmHandler)
        self.loaded: dict[str, dict[str, str]] = {}
        self.last_change: dict[str, float] = {}
        """address -> time.monotonic() of its last load or unload"""
        self.guard = threading.Lock()


class VllmHandler(BaseHTTPRequestHandler):
    server: FakeVllm

    def _send(self, status: int, text: str) -> None:
        data = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _address(self) -> str:
        return str(self.connection.getsockname()[0])

    def _pod(self) -> dict[str, str]:
        return self.server.loaded.setdefault(self._address(), {})

    def do_GET(self) -> None:
        counted(f"vLLM GET {self.path}")
        with self.server.guard:
            listing = models_listing(dict(self._pod())) if self.path == "/v1/models" else None
        self._send(200, json.dumps(listing)) if listing else self._send(404, "{}")

    def do_POST(self) -> None:
        counted(f"vLLM POST {self.path}")
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
        if self.path not in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
            self._send(404, "{}")
            return
        with self.server.guard:
            answer = lora_call(self._pod(), self.path, body)
            if answer[0] == 200:
                self.server.last_change[self._address()] = time.monotonic()
        self._send(*answer)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def listing_xml(bucket: str, prefix: str) -> str:
    """ListObjectsV2's answer for an S3 that holds ADAPTER_FILES under every prefix."""
    base = prefix.rstrip("/")
    contents = "".join(
        f'<Contents><Key>{escape(f"{base}/{name}")}</Key><Size>{len(data)}</Size><ETag>"1"</ETag>'
        "<LastModified>2026-01-01T00:00:00.000Z</LastModified><StorageClass>STANDARD</StorageClass></Contents>"
        for name, data in ADAPTER_FILES.items()
    )
    return (
        '<?xml version="1.0" encoding="UTF-8"?><ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
        f"<Name>{escape(bucket)}</Name><Prefix>{escape(prefix)}</Prefix><KeyCount>{len(ADAPTER_FILES)}</KeyCount>"
        f"<MaxKeys>1000</MaxKeys><IsTruncated>false</IsTruncated>{contents}</ListBucketResult>"
    )


class FakeS3Handler(BaseHTTPRequestHandler):
    """Path-style S3: list a prefix, HEAD and GET an object (what the fetcher's download asks)."""

    def _object(self) -> bytes | None:
        key = urlsplit(self.path).path.lstrip("/").partition("/")[2]
        return ADAPTER_FILES.get(key.rsplit("/", 1)[-1])

    def _headers(self, status: int, length: int, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(length))
        self.send_header("ETag", '"1"')
        self.send_header("Last-Modified", "Thu, 01 Jan 2026 00:00:00 GMT")
        self.end_headers()

    def do_HEAD(self) -> None:
        counted("S3 HEAD")
        data = self._object()
        self._headers(200 if data is not None else 404, len(data or b""), "application/octet-stream")

    def do_GET(self) -> None:
        parts = urlsplit(self.path)
        query = parse_qs(parts.query)
        if "list-type" in query:
            counted("S3 list")
            text = listing_xml(parts.path.strip("/"), query.get("prefix", [""])[0]).encode()
            self._headers(200, len(text), "application/xml")
            self.wfile.write(text)
            return
        counted("S3 GET")
        data = self._object()
        if data is None:
            self._headers(404, 0, "application/xml")
            return
        self._headers(200, len(data), "application/octet-stream")
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def pod_line(line: str) -> tuple[str, str, str] | None:
    """(pod, IP, the operator's public key) from one watch line, None until the pod has its IP."""
    parts = line.split()
    return (parts[0], parts[1], parts[2]) if len(parts) >= 3 else None


class CountingFetcher(FetcherServer):
    """The fetcher as the sidecar runs it, counting the requests it gets."""

    daemon_threads = True

    def finish_request(self, request: Any, client_address: Any) -> None:
        counted("fetcher request")
        super().finish_request(request, client_address)


class CountWarnings(logging.Handler):
    """Counts the fetcher's warnings and errors (a refused signature) by what they say after the request."""

    def emit(self, record: logging.LogRecord) -> None:
        counted(f"fetcher {record.levelname}: {record.getMessage().split(': ', 1)[-1][:80]}")


def serve(server: ThreadingHTTPServer) -> None:
    threading.Thread(target=server.serve_forever, daemon=True).start()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fetcher-port", type=int, default=8001)
    args = parser.parse_args()
    # The fetcher downloads s3:// adapters into its cache folder; boto3 finds the fake S3 through the environment
    # (a server pod's Secret or identity would say where the store is).
    cache = tempfile.mkdtemp(prefix="kubetune-bench-fetcher-")
    s3 = ThreadingHTTPServer(("127.0.0.1", 0), FakeS3Handler)
    s3.daemon_threads = True
    os.environ.update(
        KUBETUNE_CACHE_ROOT=cache,
        AWS_ENDPOINT_URL=f"http://127.0.0.1:{s3.server_address[1]}",
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_EC2_METADATA_DISABLED="true",
    )
    vllm = FakeVllm(("0.0.0.0", 0))
    serve(s3)
    serve(vllm)
    pods: dict[str, str] = {}
    up: dict[str, float] = {}
    unbound: list[str] = []
    logging.getLogger("kubetune.fetcher").addHandler(CountWarnings(logging.WARNING))

    def report(*_: Any) -> None:
        with vllm.guard:
            last_change = {pod: vllm.last_change[ip] for pod, ip in pods.items() if ip in vllm.last_change}
        answer = {
            "pods": len(pods),
            "unbound": unbound[:10],
            "requests": dict(requests_seen),
            "fetcher_up_at": up,
            "last_load_at": last_change,
        }
        print(json.dumps(answer), flush=True)
        shutil.rmtree(cache, ignore_errors=True)
        os._exit(0)

    signal.signal(signal.SIGTERM, report)
    for line in sys.stdin:
        found = pod_line(line)
        if found is None or found[0] in pods:
            continue
        pod, ip, key = found
        try:
            verifier = Verifier.from_text(key, pod)
            fetcher = CountingFetcher((ip, args.fetcher_port), verifier, Vllm(f"{ip}:{vllm.server_address[1]}"))
        except OSError as err:
            unbound.append(f"{pod} at {ip}: {err}")
            continue
        pods[pod] = ip
        serve(fetcher)
        up[pod] = time.monotonic()
    signal.pause()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
