"""Certificates and keys of the local control plane, made with the openssl command line.

One CA signs the apiserver's serving certificate and the client certificates of each user; a separate
key pair signs service-account tokens. Everything is made once per state folder and kept.
"""

from __future__ import annotations

import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

DAYS = "3650"
APISERVER_NAMES = (
    "DNS:localhost",
    "DNS:kubernetes",
    "DNS:kubernetes.default",
    "DNS:kubernetes.default.svc",
    "DNS:kubernetes.default.svc.cluster.local",
    "IP:127.0.0.1",
    "IP:10.96.0.1",
)


@dataclass(frozen=True)
class ClientIdentity:
    """A user of the apiserver as its client certificate names it (CN = user, O = groups)."""

    file_stem: str
    user: str
    groups: tuple[str, ...] = ()

    def subject(self) -> str:
        """The openssl -subj string."""
        return "".join(f"/O={group}" for group in self.groups) + f"/CN={self.user}"


ADMIN = ClientIdentity("admin", "kubetune-admin", ("system:masters",))
CONTROLLER_MANAGER = ClientIdentity("kube-controller-manager", "system:kube-controller-manager")
SCHEDULER = ClientIdentity("kube-scheduler", "system:kube-scheduler")
KWOK = ClientIdentity("kwok", "kwok", ("system:masters",))
FRONT_PROXY = ClientIdentity("front-proxy-client", "front-proxy-client")
CLIENTS = (ADMIN, CONTROLLER_MANAGER, SCHEDULER, KWOK, FRONT_PROXY)


def openssl(*args: str) -> None:
    """Run openssl quietly; raise with its message when it fails."""
    result = subprocess.run(["openssl", *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"openssl {args[0]} failed: {result.stderr.strip()}")


def new_key(path: Path) -> None:
    """An EC P-256 private key (PKCS#8): fast to make, accepted everywhere in Kubernetes."""
    openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(path))
    path.chmod(0o600)


def new_ca(key: Path, cert: Path) -> None:
    """A self-signed CA with an RSA-2048 key, as kubeadm makes by default. The API server verifies the client
    certificate's signature on every request: in a 1000-job run that took 6.4% of its CPU samples with a
    P-256 CA and 3.5% with this one (docs/scale.md)."""
    openssl("genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", str(key))
    key.chmod(0o600)
    openssl("req", "-x509", "-new", "-key", str(key), "-out", str(cert), "-days", DAYS, "-subj", "/CN=kubetune-dev-ca")


def signed_cert(pki: Path, stem: str, subject: str, extensions: str) -> None:
    """``<stem>.key`` and ``<stem>.crt`` signed by the CA in ``pki``, with the given v3 extensions."""
    key, csr, cert = pki / f"{stem}.key", pki / f"{stem}.csr", pki / f"{stem}.crt"
    new_key(key)
    openssl("req", "-new", "-key", str(key), "-out", str(csr), "-subj", subject)
    with tempfile.NamedTemporaryFile("w", suffix=".ext", dir=pki, delete=False) as ext:
        ext.write(extensions)
    try:
        openssl(
            "x509",
            "-req",
            "-in",
            str(csr),
            "-CA",
            str(pki / "ca.crt"),
            "-CAkey",
            str(pki / "ca.key"),
            "-CAcreateserial",
            "-out",
            str(cert),
            "-days",
            DAYS,
            "-extfile",
            ext.name,
        )
    finally:
        Path(ext.name).unlink()
        csr.unlink()


def server_extensions(names: tuple[str, ...]) -> str:
    """v3 extensions of a TLS server certificate for ``names``."""
    return (
        "basicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\n"
        f"subjectAltName={','.join(names)}\n"
    )


CLIENT_EXTENSIONS = (
    "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n"
)


def ensure_pki(pki: Path) -> None:
    """Make whatever of the CA, serving, client and service-account keys is missing in ``pki``."""
    pki.mkdir(parents=True, exist_ok=True)
    if not (pki / "ca.crt").exists():
        new_ca(pki / "ca.key", pki / "ca.crt")
    if not (pki / "apiserver.crt").exists():
        signed_cert(pki, "apiserver", "/CN=kube-apiserver", server_extensions(APISERVER_NAMES))
    for client in CLIENTS:
        if not (pki / f"{client.file_stem}.crt").exists():
            signed_cert(pki, client.file_stem, client.subject(), CLIENT_EXTENSIONS)
    if not (pki / "sa.pub").exists():
        new_key(pki / "sa.key")
        openssl("pkey", "-in", str(pki / "sa.key"), "-pubout", "-out", str(pki / "sa.pub"))
