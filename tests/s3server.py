"""A real S3 API for the tests: moto's standalone server as a subprocess on a free local port.

`running()` yields a `S3Server`; `secret_dir` writes a Secret's keys as files, the way Kubernetes mounts them,
so kubetune.s3 reads its credentials as it does in a pod; `holding_proxy()` stands in front of it and holds a
download halfway, for tests that kill a reader in the middle of one.
"""

from __future__ import annotations

import contextlib
import http.client
import http.server
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ACCESS_KEY = "kubetune-test"
SECRET_KEY = "kubetune-test-secret"


@dataclass(frozen=True)
class S3Server:
    endpoint: str

    def client(self) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name="us-east-1",
            config=Config(s3={"addressing_style": "path"}),
        )

    def upload_folder(self, bucket: str, folder: Path, prefix: str) -> str:
        """Every file under `folder` as an object under `prefix`; the prefix's s3:// URI."""
        client = self.client()
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(folder).as_posix()}")
        return f"s3://{bucket}/{prefix}"

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def secret_dir(root: Path, name: str, endpoint: str = "") -> Path:
    """A mounted Secret `name` under `root` (KUBETUNE_S3_SECRETS_ROOT) with the test credentials."""
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    values = {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_REGION": "us-east-1"}
    if endpoint:
        values["AWS_ENDPOINT_URL"] = endpoint
    for key, value in values.items():
        (folder / key).write_text(value)
    return folder


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def running(log: Path, host: str = "127.0.0.1") -> Iterator[S3Server]:
    """moto's server until the block ends (its process group is stopped then)."""
    port = _free_port(host)
    env = {**os.environ, "MOTO_ALLOW_NONEXISTENT_REGION": "true"}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", host, "-p", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    endpoint = f"http://{host}:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto's server did not start: {log.read_text()[-2000:]}") from None
                time.sleep(0.2)
        yield S3Server(endpoint)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


class HoldingProxy:
    """An HTTP proxy in front of an S3 server that can hold one download in the middle: the next GET of a held
    key gets its headers and the first half of its body, then nothing until `release()` (or the client is
    killed). So a test can kill a reader mid-download without racing it. Every request reaches the S3 server,
    whose request log still counts it."""

    def __init__(self, upstream: str, host: str = "127.0.0.1") -> None:
        self.upstream = urllib.parse.urlsplit(upstream)
        self.held: set[str] = set()
        self.holding = threading.Event()
        """Set once a held download is half sent."""
        self.released = threading.Event()
        proxy = self

        class Forward(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=60)
                conn.request(self.command, self.path, body=body or None, headers=dict(self.headers.items()))
                answer = conn.getresponse()
                data = answer.read()
                conn.close()
                self.send_response(answer.status)
                dropped = ("connection", "transfer-encoding", "server", "date", "content-length")
                for name, value in answer.getheaders():
                    if name.lower() not in dropped:
                        self.send_header(name, value)
                # The body as read (moto may have sent it in chunks); a HEAD tells the size of the object.
                length = answer.getheader("Content-Length", "0") if self.command == "HEAD" else str(len(data))
                self.send_header("Content-Length", length)
                self.end_headers()
                if self.command == "HEAD":
                    return
                path = urllib.parse.urlsplit(self.path).path
                if self.command == "GET" and path in proxy.held:
                    proxy.held.discard(path)
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    proxy.holding.set()
                    proxy.released.wait(300)
                    data = data[len(data) // 2 :]
                with contextlib.suppress(OSError):  # a killed reader is gone
                    self.wfile.write(data)

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = forward

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer((host, 0), Forward)
        self.server.daemon_threads = True
        self.endpoint = f"http://{host}:{self.server.server_address[1]}"

    def hold(self, bucket: str, key: str) -> None:
        """Hold the next download of s3://BUCKET/KEY halfway."""
        self.held.add(f"/{bucket}/{key}")

    def release(self) -> None:
        self.released.set()


@contextlib.contextmanager
def holding_proxy(server: S3Server) -> Iterator[HoldingProxy]:
    proxy = HoldingProxy(server.endpoint)
    thread = threading.Thread(target=proxy.server.serve_forever, daemon=True)
    thread.start()
    try:
        yield proxy
    finally:
        proxy.release()
        proxy.server.shutdown()
        proxy.server.server_close()
