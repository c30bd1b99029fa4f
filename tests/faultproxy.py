"""A TCP proxy that fails the first connections, for tests of transient network failures against real servers.

The first `failures` connections get `status` (an HTTP answer such as 503, with `Connection: close`) or, with
status None, are closed without a word once the request is read; later connections are forwarded to `target`
byte for byte. `answered` counts the connections that failed, `forwarded` the others.
"""

from __future__ import annotations

import contextlib
import socket
import socketserver
import threading
from collections.abc import Iterator
from http import HTTPStatus

S3_ACCESS_DENIED = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code><Message>Access Denied</Message></Error>'
)


class FaultProxy(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self,
        target: tuple[str, int] | None,
        failures: int,
        status: int | None = 503,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.target = target
        self.failures = failures
        self.status = status
        self.body = body
        self.headers = headers or {}
        self.answered = 0
        self.forwarded = 0
        self.failed_requests: list[str] = []  # the request line of each failed connection
        self.lock = threading.Lock()

    @property
    def endpoint(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def fails_next(self) -> bool:
        with self.lock:
            if self.answered < self.failures:
                self.answered += 1
                return True
            self.forwarded += 1
            return False

    def answer(self) -> bytes:
        assert self.status is not None
        reason = HTTPStatus(self.status).phrase
        head = {"Content-Length": str(len(self.body)), "Connection": "close", **self.headers}
        lines = [f"HTTP/1.1 {self.status} {reason}", *(f"{k}: {v}" for k, v in head.items()), "", ""]
        return "\r\n".join(lines).encode() + self.body


class _Handler(socketserver.BaseRequestHandler):
    server: FaultProxy

    def handle(self) -> None:
        if self.server.fails_next():
            self.server.failed_requests.append(_read_head(self.request))
            if self.server.status is not None:
                self.request.sendall(self.server.answer())
            return
        assert self.server.target is not None, "a proxy without a target fails every connection"
        with socket.create_connection(self.server.target) as upstream:
            back = threading.Thread(target=_pipe, args=(upstream, self.request), daemon=True)
            back.start()
            _pipe(self.request, upstream)
            back.join()


def _read_head(conn: socket.socket) -> str:
    """Read the request's head (a client still sending would see its connection reset); its first line."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            break
        data += chunk
    return data.split(b"\r\n", 1)[0].decode(errors="replace")


def _pipe(src: socket.socket, dst: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while chunk := src.recv(65536):
            dst.sendall(chunk)
    with contextlib.suppress(OSError):
        dst.shutdown(socket.SHUT_WR)


@contextlib.contextmanager
def running(proxy: FaultProxy) -> Iterator[FaultProxy]:
    """Serve until the block ends."""
    thread = threading.Thread(target=proxy.serve_forever, daemon=True)
    thread.start()
    try:
        yield proxy
    finally:
        proxy.shutdown()
        proxy.server_close()
        thread.join()


def target_of(endpoint: str) -> tuple[str, int]:
    """("127.0.0.1", 5000) of "http://127.0.0.1:5000"."""
    host, _, port = endpoint.removeprefix("http://").partition(":")
    return host, int(port)
