"""Requests from the operator to the adapter fetchers, signed with the operator's Ed25519 key.

The fetcher beside vLLM holds the server's API key and loads adapters into vLLM on the operator's behalf, so
it must answer the operator and nobody else. The operator signs each request; the fetcher verifies it with
the operator's public key, which the rendered Deployment carries (a public key is no secret). So no Secret
holds a credential of the operator, and the operator needs no RBAC on Secrets (docs/serving.md,
"Authentication").

What is signed: the method, the path, the pod the request is meant for, a timestamp, a nonce and the body's
SHA-256. A signature is good for one pod, within MAX_SKEW_S of its timestamp, once (the fetcher remembers
the nonces it saw).
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

TIMESTAMP = "X-Kubetune-Timestamp"
NONCE = "X-Kubetune-Nonce"
SIGNATURE = "X-Kubetune-Signature"
# Clocks of the operator's node and the server's node may differ by this much.
MAX_SKEW_S = 120.0


def payload(method: str, path: str, pod: str, timestamp: str, nonce: str, body: bytes) -> bytes:
    """The bytes that are signed."""
    digest = hashlib.sha256(body).hexdigest()
    return "\n".join((method.upper(), path, pod, timestamp, nonce, digest)).encode()


@dataclass(frozen=True)
class Signer:
    """The operator's side: a private key."""

    key: Ed25519PrivateKey

    @classmethod
    def from_pem_file(cls, path: str | Path) -> Signer:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"{path}: not an Ed25519 private key")
        return cls(key)

    @classmethod
    def generate(cls) -> Signer:
        return cls(Ed25519PrivateKey.generate())

    def pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    @property
    def public_key(self) -> str:
        """The public key as the fetcher gets it: the raw 32 bytes, base64."""
        raw = self.key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return base64.b64encode(raw).decode()

    def headers(self, method: str, path: str, pod: str, body: bytes, now: float | None = None) -> dict[str, str]:
        """The headers that sign one request to `pod`."""
        timestamp = f"{time.time() if now is None else now:.3f}"
        nonce = secrets.token_hex(16)
        signature = self.key.sign(payload(method, path, pod, timestamp, nonce, body))
        return {TIMESTAMP: timestamp, NONCE: nonce, SIGNATURE: base64.b64encode(signature).decode()}


def key_file(path: Path) -> Path:
    """A PEM key at `path`, made the first time (for operators run outside the chart: the tests, `kubetune dev`),
    so that a restarted operator keeps its key and the servers keep their pods."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(Signer.generate().pem())
        path.chmod(0o600)
    return path


@dataclass
class Verifier:
    """The fetcher's side: the operator's public key, the pod's own name, and the nonces seen lately."""

    public_key: Ed25519PublicKey
    pod: str
    _seen: dict[str, float] = field(default_factory=dict)
    _guard: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def from_text(cls, public_key: str, pod: str) -> Verifier:
        return cls(Ed25519PublicKey.from_public_bytes(base64.b64decode(public_key)), pod)

    def refusal(self, method: str, path: str, headers: dict[str, str], body: bytes, now: float | None = None) -> str:
        """Why the request is not the operator's (a sentence), or "" when it is."""
        now = time.time() if now is None else now
        timestamp, nonce, signature = (headers.get(h, "") for h in (TIMESTAMP, NONCE, SIGNATURE))
        if not (timestamp and nonce and signature):
            return "the request is not signed by the kubetune operator"
        try:
            when = float(timestamp)
            self.public_key.verify(base64.b64decode(signature), payload(method, path, self.pod, timestamp, nonce, body))
        except (ValueError, InvalidSignature):
            return "the request's signature is not the kubetune operator's (or it is meant for another pod)"
        if abs(now - when) > MAX_SKEW_S:
            return f"the request's timestamp is more than {MAX_SKEW_S:.0f} s away from this pod's clock"
        with self._guard:
            self._seen = {n: t for n, t in self._seen.items() if now - t <= 2 * MAX_SKEW_S}
            if nonce in self._seen:
                return "the request was already answered once (a replay)"
            self._seen[nonce] = now
        return ""
