"""Installed as ``sitecustomize`` in every pod: Python servers that bind "all addresses" bind the pod IP.

All pods of the dev agent share the machine's network, so two pods listening on 0.0.0.0:8000 would
collide. With KUBETUNE_POD_IP set, a Python socket bound to 0.0.0.0 (or "" or "::") is bound to that
address instead (an IPv6 socket to its IPv4-mapped form).

In a real pod, localhost reaches the pod's own servers; here it is the machine's. So a connection from
this process to the loopback address on a port that this process itself bound that way goes to the pod IP
(Gradio, for one, checks its own server through localhost while it starts). Native code that binds by
itself (for example torch's TCPStore) is not covered: docs/dev-cluster.md lists this limit.
"""

from __future__ import annotations

import os
import socket
from typing import Any

_POD_IP = os.environ.get("KUBETUNE_POD_IP", "")
_LOOPBACK = ("127.0.0.1", "localhost", "::1", "::ffff:127.0.0.1")
_bind = socket.socket.bind
_connect = socket.socket.connect
_connect_ex = socket.socket.connect_ex
_own_ports: set[int] = set()
"""Ports this process bound on "all addresses", now on the pod IP."""


def _pod_bind(self: socket.socket, address: Any) -> None:
    rewritten = False
    if isinstance(address, tuple) and address and address[0] in ("", "0.0.0.0", "::"):
        if self.family == socket.AF_INET:
            address, rewritten = (_POD_IP, *address[1:]), True
        elif self.family == socket.AF_INET6:
            try:
                self.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
                address, rewritten = (f"::ffff:{_POD_IP}", *address[1:]), True
            except OSError:
                pass
    _bind(self, address)
    if rewritten:
        _own_ports.add(self.getsockname()[1])


def _to_pod(sock: socket.socket, address: Any) -> Any:
    """A loopback address of one of this process's own servers, as the pod IP."""
    if isinstance(address, tuple) and len(address) >= 2 and address[0] in _LOOPBACK and address[1] in _own_ports:
        if sock.family == socket.AF_INET:
            return (_POD_IP, *address[1:])
        if sock.family == socket.AF_INET6:
            return (f"::ffff:{_POD_IP}", *address[1:])
    return address


def _pod_connect(self: socket.socket, address: Any) -> None:
    _connect(self, _to_pod(self, address))


def _pod_connect_ex(self: socket.socket, address: Any) -> int:
    return _connect_ex(self, _to_pod(self, address))


if _POD_IP:
    socket.socket.bind = _pod_bind  # type: ignore[method-assign,assignment]
    socket.socket.connect = _pod_connect  # type: ignore[method-assign,assignment]
    socket.socket.connect_ex = _pod_connect_ex  # type: ignore[method-assign,assignment]
