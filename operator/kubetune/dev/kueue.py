"""Kueue's real manager beside the local control plane (``kubetune dev up --kueue`` and the Kueue tests).

Kueue is built from its Go module (dev/binaries.py ``ensure_kueue``) and runs as a process on this machine, as
the node agent and the operator do. In a cluster it runs as a pod behind a Service; here nothing routes a
Service address, so its pieces are put together by hand:

- **CRDs** from the module's ``config/components/crd/bases`` (served as they are: only the storage version
  v1beta2 is used, so the conversion webhook is left out);
- **webhooks** from ``config/components/webhook/manifests.yaml``, only those of the batch/Job integration and of
  Kueue's own kinds (the others would catch every pod, Deployment and StatefulSet of the cluster and fail them
  while no handler is registered), each pointing at ``https://127.0.0.1:<port><path>`` with the cluster's CA;
- **certificates**: a serving certificate for 127.0.0.1 signed by the cluster's CA, in a folder of the state
  (Kueue's own certificate management would name the Service, which the API server cannot reach); Kueue also
  insists on a metrics certificate at the fixed path ``/etc/kueue/metrics/certs``, where a copy is written once
  (its metrics server stays off);
- **configuration**: the batch/Job integration only, no leader election, the visibility server off, probes and
  webhooks on free ports of 127.0.0.1.

The webhook configurations go when Kueue stops: with ``failurePolicy: Fail`` they would refuse every Job of a
cluster whose Kueue is gone.
"""

from __future__ import annotations

import base64
import contextlib
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

from kubetune.dev import pki
from kubetune.dev.agent import daemons
from kubetune.dev.binaries import Kueue, ensure_kueue
from kubetune.dev.controlplane import Cluster, KubectlError, free_ports

NAME = "kueue"
NAMESPACE = "kueue-system"
START_TIMEOUT_S = 90.0
METRICS_CERT_DIR = Path("/etc/kueue/metrics/certs")
WEBHOOK_NAMES = ("kueue-mutating-webhook-configuration", "kueue-validating-webhook-configuration")
# The webhooks kept: the batch/Job integration and Kueue's own kinds.
WEBHOOK_GROUPS = frozenset({"batch", "kueue.x-k8s.io"})
CERT_STEM = "kueue-webhook"


def state(state_dir: Path) -> Path:
    """Kueue's folder in the cluster's state: configuration, certificates."""
    return state_dir / NAME


def crd_files(kueue: Kueue) -> list[Path]:
    """Kueue's CRD manifests in its module source."""
    return sorted((kueue.source / "config" / "components" / "crd" / "bases").glob("*.yaml"))


def configuration(webhook_port: int, health_port: int, cert_dir: Path) -> dict[str, Any]:
    """Kueue's Configuration (config.kueue.x-k8s.io/v1beta2) for a manager on this machine."""
    return {
        "apiVersion": "config.kueue.x-k8s.io/v1beta2",
        "kind": "Configuration",
        "namespace": NAMESPACE,
        "health": {"healthProbeBindAddress": f"127.0.0.1:{health_port}"},
        "metrics": {"bindAddress": "0"},
        "webhook": {"host": "127.0.0.1", "port": webhook_port, "certDir": str(cert_dir)},
        "leaderElection": {"leaderElect": False},
        "internalCertManagement": {"enable": False},
        "manageJobsWithoutQueueName": False,
        "integrations": {"frameworks": ["batch/job"]},
        "featureGates": {"VisibilityOnDemand": False},
    }


def webhook_configurations(manifests_text: str, port: int, ca_bundle: bytes) -> list[dict[str, Any]]:
    """Kueue's webhook configurations (the module's manifests.yaml) reduced to the kept webhooks, each calling
    ``https://127.0.0.1:<port><its path>`` and trusting ``ca_bundle`` (PEM)."""
    configurations = []
    for doc in yaml.safe_load_all(manifests_text):
        if not doc:
            continue
        kept = []
        for webhook in doc.get("webhooks") or []:
            groups = {g for rule in webhook.get("rules") or [] for g in rule.get("apiGroups") or []}
            if not groups or not groups <= WEBHOOK_GROUPS:
                continue
            path = webhook["clientConfig"]["service"]["path"]
            client = {"url": f"https://127.0.0.1:{port}{path}", "caBundle": base64.b64encode(ca_bundle).decode()}
            kept.append({**webhook, "clientConfig": client})
        name = f"kueue-{doc['metadata']['name']}"
        configurations.append({**doc, "metadata": {"name": name}, "webhooks": kept})
    return configurations


def daemon(kueue: Kueue, kubeconfig: Path, config: Path, health_port: int) -> daemons.Daemon:
    argv = [str(kueue.binary), f"--config={config}", "--zap-log-level=info"]
    health_url = f"http://127.0.0.1:{health_port}/readyz"
    return daemons.Daemon(NAME, argv, str(kueue.binary), {"KUBECONFIG": str(kubeconfig)}, health_url)


def serving_certificate(pki_dir: Path, cert_dir: Path) -> None:
    """A certificate for 127.0.0.1 signed by the cluster's CA, as tls.crt/tls.key in ``cert_dir``; the same pair
    at Kueue's fixed metrics path when none is there."""
    if not (pki_dir / f"{CERT_STEM}.crt").exists():
        names = ("IP:127.0.0.1", "DNS:localhost")
        pki.signed_cert(pki_dir, CERT_STEM, f"/CN={CERT_STEM}", pki.server_extensions(names))
    cert_dir.mkdir(parents=True, exist_ok=True)
    for folder in (cert_dir, METRICS_CERT_DIR):
        if (folder / "tls.crt").exists() and folder != cert_dir:
            continue
        try:
            folder.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(pki_dir / f"{CERT_STEM}.crt", folder / "tls.crt")
            shutil.copyfile(pki_dir / f"{CERT_STEM}.key", folder / "tls.key")
            (folder / "tls.key").chmod(0o600)
        except OSError as error:
            raise RuntimeError(f"Kueue needs a certificate in {folder} (its metrics path is fixed): {error}") from error


def start(cluster: Cluster, state_dir: Path, kueue: Kueue | None = None) -> int:
    """Install Kueue's CRDs, start its manager (unless it runs) and register its webhooks; its PID once ready."""
    kueue = kueue or ensure_kueue()
    folder = state(state_dir)
    folder.mkdir(parents=True, exist_ok=True)
    pki_dir = state_dir / "pki"
    serving_certificate(pki_dir, folder / "certs")
    files = [f"--filename={path}" for path in crd_files(kueue)]
    try:
        cluster.kubectl("apply", "--server-side", "--force-conflicts", *files, timeout=120)
        cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", *files)
        namespace = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}
        cluster.kubectl("apply", "--server-side", "-f", "-", input=yaml.safe_dump(namespace))
    except KubectlError as error:
        raise RuntimeError(f"installing Kueue's CRDs failed:\n{error.stderr.strip()}") from error
    running = daemons.recorded(state_dir, NAME)
    pid = daemons.running_pid(state_dir, NAME, running.marker) if running else None
    if running is None or pid is None:
        webhook_port, health_port = free_ports(2)
        config = folder / "config.yaml"
        config.write_text(yaml.safe_dump(configuration(webhook_port, health_port, folder / "certs"), sort_keys=False))
        running = daemon(kueue, cluster.kubeconfig, config, health_port)
    pid, running = daemons.start_ready(state_dir, running, START_TIMEOUT_S)
    register_webhooks(cluster, kueue, folder / "config.yaml", pki_dir / "ca.crt")
    return pid


def register_webhooks(cluster: Cluster, kueue: Kueue, config: Path, ca: Path) -> None:
    """Apply the webhook configurations for the port in Kueue's configuration file."""
    port = int(yaml.safe_load(config.read_text())["webhook"]["port"])
    manifests = (kueue.source / "config" / "components" / "webhook" / "manifests.yaml").read_text()
    text = yaml.safe_dump_all(webhook_configurations(manifests, port, ca.read_bytes()))
    try:
        cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-", input=text)
    except KubectlError as error:
        raise RuntimeError(f"registering Kueue's webhooks failed:\n{error.stderr.strip()}") from error


def stop(cluster: Cluster | None, state_dir: Path) -> bool:
    """Remove Kueue's webhook configurations (when the API server answers) and stop its manager; True if it ran."""
    if cluster is not None and cluster.kubeconfig.exists():
        names = [f"mutatingwebhookconfiguration/{WEBHOOK_NAMES[0]}"]
        names += [f"validatingwebhookconfiguration/{WEBHOOK_NAMES[1]}"]
        # An API server that does not answer (TimeoutExpired) has nothing to call the webhooks either.
        with contextlib.suppress(subprocess.TimeoutExpired):
            cluster.kubectl("delete", "--ignore-not-found", "--wait=false", *names, check=False, timeout=20)
    running = daemons.recorded(state_dir, NAME)
    return daemons.stop(state_dir, NAME, running.marker) if running else False
