"""Installed as ``sitecustomize`` in every pod: Python servers that bind "all addresses" bind the pod IP.

All pods of the dev agent share the machine's network, so two pods listening on 0.0.0.0:8000 would
collide. With KUBETUNE_POD_IP set, a Python socket bound to 0.0.0.0 (or "" or "::") is bound to that
address instead (an IPv6 socket to its IPv4-mapped form). Native code that binds by itself (for
example torch's TCPStore) is not covered: docs/dev-cluster.md lists this limit.
"""

from __future__ import annotations

import os
import socket
from typing import Any

_POD_IP = os.environ.get("KUBETUNE_POD_IP", "")
_bind = socket.socket.bind


def _pod_bind(self: socket.socket, address: Any) -> None:
    if isinstance(address, tuple) and address and address[0] in ("", "0.0.0.0", "::"):
        if self.family == socket.AF_INET:
            address = (_POD_IP, *address[1:])
        elif self.family == socket.AF_INET6:
            try:
                self.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
                address = (f"::ffff:{_POD_IP}", *address[1:])
            except OSError:
                pass
    _bind(self, address)


if _POD_IP:
    socket.socket.bind = _pod_bind  # type: ignore[method-assign,assignment]
