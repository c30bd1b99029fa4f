"""A real Kubernetes control plane on 127.0.0.1, with kwok standing in for kubelets.

etcd, kube-apiserver (RBAC on), kube-controller-manager, kube-scheduler and kwok run as background
processes. Everything lives in one state folder: certificates, etcd data, logs, the admin kubeconfig and
``cluster.json`` (ports, PIDs and command lines), so ``stop()``, ``status()`` and ``restart()`` work from any process.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from kubetune.dev import pki
from kubetune.dev.binaries import Binaries, ensure_binaries
from kubetune.dev.nodes import KWOK_ANNOTATION, KWOK_ANNOTATION_VALUE, create_simulated_nodes

__all__ = ["Cluster", "ComponentStatus", "ControlPlane", "create_simulated_nodes", "default_state_dir"]

# Order of start; stop goes the other way.
COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok")
COMPONENT_ALIASES = {
    "apiserver": "kube-apiserver",
    "controller-manager": "kube-controller-manager",
    "scheduler": "kube-scheduler",
}
PORT_NAMES = ("etcd", "etcd-peer", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok")
SERVICE_CIDR = "10.96.0.0/16"
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"
STOP_GRACE_S = 10.0


def repo_root() -> Path:
    """The checkout this package runs from (the folder with pyproject.toml), else the working folder."""
    for folder in Path(__file__).resolve().parents:
        if (folder / "pyproject.toml").exists():
            return folder
    return Path.cwd()


def default_state_dir() -> Path:
    """``${KUBETUNE_STATE:-<repo>/.state}/cluster``."""
    base = os.environ.get("KUBETUNE_STATE") or repo_root() / ".state"
    return Path(base).expanduser() / "cluster"


def free_ports(count: int) -> list[int]:
    """``count`` distinct free TCP ports on 127.0.0.1."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def process_alive(pid: int) -> bool:
    """Whether ``pid`` runs and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def process_runs(pid: int, binary: str) -> bool:
    """Whether ``pid`` is alive and still runs ``binary`` (guards against a reused PID)."""
    if not process_alive(pid):
        return False
    try:
        argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0", 1)[0].decode()
    except OSError:
        return False
    return argv0 == binary


class KubectlError(subprocess.CalledProcessError):
    """A failed kubectl command; its message includes what kubectl printed on stderr."""

    def __str__(self) -> str:
        return f"{super().__str__()}\n{self.stderr}"


@dataclass(frozen=True)
class ComponentStatus:
    """One component's process and health endpoint as seen now."""

    name: str
    pid: int | None
    running: bool
    healthy: bool
    detail: str


@dataclass(frozen=True)
class Cluster:
    """A handle on a running cluster: its admin kubeconfig and a kubectl bound to it.

    ``control_plane`` is set when this process knows the components (not for a reused cluster).
    """

    kubeconfig: Path
    kubectl_path: Path
    control_plane: ControlPlane | None = None

    def kubectl(
        self, *args: str, check: bool = True, input: str | None = None, timeout: float = 60.0
    ) -> subprocess.CompletedProcess[str]:
        """Run ``kubectl --kubeconfig <kubeconfig> *args`` and capture its text output."""
        cmd = [str(self.kubectl_path), "--kubeconfig", str(self.kubeconfig), *args]
        result = subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise KubectlError(result.returncode, cmd, result.stdout, result.stderr)
        return result


class ControlPlane:
    """The processes of one local control plane and the state folder that describes them."""

    def __init__(self, state_dir: Path | str | None = None, binaries: Binaries | None = None) -> None:
        self.state_dir = Path(state_dir) if state_dir else default_state_dir()
        self._binaries = binaries

    # --- paths ------------------------------------------------------------------------------

    @property
    def kubeconfig(self) -> Path:
        """The admin kubeconfig (user in system:masters)."""
        return self.state_dir / "kubeconfig"

    @property
    def pki_dir(self) -> Path:
        return self.state_dir / "pki"

    @property
    def log_dir(self) -> Path:
        return self.state_dir / "logs"

    @property
    def state_file(self) -> Path:
        return self.state_dir / "cluster.json"

    @property
    def binaries(self) -> Binaries:
        if self._binaries is None:
            self._binaries = ensure_binaries()
        return self._binaries

    def cluster(self) -> Cluster:
        """A :class:`Cluster` handle on this control plane."""
        return Cluster(kubeconfig=self.kubeconfig, kubectl_path=self.binaries.kubectl, control_plane=self)

    # --- recorded state ---------------------------------------------------------------------

    def read_state(self) -> dict[str, Any]:
        """``cluster.json``, or an empty state."""
        try:
            state: dict[str, Any] = json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return {"ports": {}, "processes": {}}
        return state

    def write_state(self, state: dict[str, Any]) -> None:
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2) + "\n")
        os.replace(tmp, self.state_file)

    # --- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        """Start every component (a no-op when all already run); returns once the apiserver is ready.

        Certificates and etcd data of an earlier run in the same folder are reused; ports are new.
        If a component fails to come up, the ones already started are stopped again.
        """
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with state_lock(self.state_dir):
            if all(s.running for s in self.status()):
                return
            self.stop_components()
            try:
                self.start_components()
            except BaseException:
                self.stop_components()
                raise

    def start_components(self) -> None:
        binaries = self.binaries
        for folder in (self.log_dir, self.state_dir / "kwok-home"):
            folder.mkdir(parents=True, exist_ok=True)
        (self.state_dir / "etcd").mkdir(mode=0o700, exist_ok=True)
        pki.ensure_pki(self.pki_dir)
        ports = dict(zip(PORT_NAMES, free_ports(len(PORT_NAMES)), strict=True))
        state: dict[str, Any] = {"ports": ports, "processes": {}}
        self.write_kubeconfigs(ports["kube-apiserver"])
        self.write_state(state)
        argv = self.component_argv(binaries, ports)
        for name in COMPONENTS:
            pid = self.spawn(name, argv[name])
            state["processes"][name] = {"pid": pid, "binary": argv[name][0], "argv": argv[name]}
            self.write_state(state)
            # The others retry on their own, but start them only once their server answers: fewer
            # alarming lines in their logs and a faster overall start.
            if name in ("etcd", "kube-apiserver"):
                self.wait_healthy(name, timeout=60.0)

    def restart(self, name: str, timeout: float = 60.0) -> int:
        """Stop one component (``apiserver`` names kube-apiserver) and start it again with the command line it
        had: the same port and certificates, so every kubeconfig keeps working. Returns its new PID once it is
        healthy."""
        name = COMPONENT_ALIASES.get(name, name)
        if name not in COMPONENTS:
            raise ValueError(f"no component {name!r}: expected one of {', '.join(COMPONENTS)}")
        if not self.state_file.exists():
            raise RuntimeError(f"no cluster in {self.state_dir}: run `kubetune dev up` first")
        with state_lock(self.state_dir):
            state = self.read_state()
            entry = state.get("processes", {}).get(name)
            if not entry:
                raise RuntimeError(f"{name} was not started in {self.state_dir}: run `kubetune dev up` first")
            if process_runs(entry["pid"], entry["binary"]):
                terminate(entry["pid"])
            argv = entry.get("argv") or self.component_argv(self.binaries, state["ports"])[name]
            entry["pid"] = self.spawn(name, argv)
            self.write_state(state)
        self.wait_healthy(name, timeout)
        return int(entry["pid"])

    def spawn(self, name: str, argv: list[str]) -> int:
        """Start one component in its own session, output appended to ``logs/<name>.log``."""
        env = dict(os.environ)
        if name == "kwok":
            env["HOME"] = str(self.state_dir / "kwok-home")  # kwok would read ~/.kwok/kwok.yaml
        with (self.log_dir / f"{name}.log").open("ab") as log:
            proc = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=self.state_dir,
                start_new_session=True,
            )
        return proc.pid

    def stop(self) -> None:
        """Stop every recorded component, newest first: SIGTERM, then SIGKILL after 10 s."""
        if not self.state_dir.is_dir():
            return
        with state_lock(self.state_dir):
            self.stop_components()

    def stop_components(self) -> None:
        state = self.read_state()
        processes: dict[str, Any] = state.get("processes", {})
        for name in reversed(COMPONENTS):
            entry = processes.get(name)
            if entry and process_runs(entry["pid"], entry["binary"]):
                terminate(entry["pid"])
            processes.pop(name, None)
        if self.state_file.exists():
            self.write_state(state)

    def status(self) -> list[ComponentStatus]:
        """Each component's process and health, in start order."""
        state = self.read_state()
        return [self.component_status(name, state) for name in COMPONENTS]

    def component_status(self, name: str, state: dict[str, Any]) -> ComponentStatus:
        entry = state.get("processes", {}).get(name)
        if not entry:
            return ComponentStatus(name, None, running=False, healthy=False, detail="not started")
        pid = int(entry["pid"])
        if not process_runs(pid, entry["binary"]):
            return ComponentStatus(name, pid, running=False, healthy=False, detail="exited")
        healthy, detail = self.probe(name, state["ports"])
        return ComponentStatus(name, pid, running=True, healthy=healthy, detail=detail)

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Wait until every component is healthy and the ``default`` ServiceAccount exists."""
        deadline = time.monotonic() + timeout
        for name in COMPONENTS:
            self.wait_healthy(name, timeout=max(deadline - time.monotonic(), 0.1))
        while not self.default_service_account_exists():
            if time.monotonic() > deadline:
                raise TimeoutError("the default ServiceAccount did not appear in namespace default")
            time.sleep(0.2)

    def wait_healthy(self, name: str, timeout: float) -> None:
        """Wait for one component's health endpoint; fail early with its log if it exits."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.component_status(name, self.read_state())
            if status.healthy:
                return
            if not status.running:
                # Looked at again before giving up: a cold start once saw a running etcd as exited.
                time.sleep(0.5)
                status = self.component_status(name, self.read_state())
                if not status.running:
                    raise RuntimeError(f"{name} is not running ({status.detail}); {self.log_tail(name)}")
                continue
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} not healthy after {timeout:.0f}s: {status.detail}")
            time.sleep(0.1)

    def log_tail(self, name: str, lines: int = 20) -> str:
        """The last lines of a component's log, for error messages."""
        path = self.log_dir / f"{name}.log"
        try:
            text = "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return f"no log at {path}"
        return f"end of {path}:\n{text}"

    # --- health -----------------------------------------------------------------------------

    def probe(self, name: str, ports: dict[str, int]) -> tuple[bool, str]:
        """GET the component's health endpoint: (healthy, short detail)."""
        url = {
            "etcd": f"http://127.0.0.1:{ports['etcd']}/health",
            "kube-apiserver": f"https://127.0.0.1:{ports['kube-apiserver']}/readyz",
            "kube-controller-manager": f"https://127.0.0.1:{ports['kube-controller-manager']}/healthz",
            "kube-scheduler": f"https://127.0.0.1:{ports['kube-scheduler']}/healthz",
            "kwok": f"http://127.0.0.1:{ports['kwok']}/healthz",
        }[name]
        # The apiserver is checked against our CA; controller-manager and scheduler serve a
        # certificate they made themselves, on loopback only.
        context = self.admin_ssl_context() if name == "kube-apiserver" else unverified_ssl_context()
        try:
            with urllib.request.urlopen(url, timeout=2, context=context) as response:
                body = response.read().decode(errors="replace").strip()
        except (OSError, urllib.error.URLError) as error:
            return False, f"{url}: {error}"
        healthy = '"health":"true"' in body.replace(" ", "") if name == "etcd" else body == "ok"
        return healthy, f"{url}: {body[:80]}"

    def admin_ssl_context(self) -> ssl.SSLContext:
        """TLS to the apiserver as the admin user."""
        context = ssl.create_default_context(cafile=str(self.pki_dir / "ca.crt"))
        context.load_cert_chain(str(self.pki_dir / "admin.crt"), str(self.pki_dir / "admin.key"))
        return context

    def api_get(self, path: str) -> int:
        """GET ``path`` on the apiserver as admin; the HTTP status code."""
        port = self.read_state()["ports"]["kube-apiserver"]
        request = urllib.request.Request(f"https://127.0.0.1:{port}{path}")
        try:
            with urllib.request.urlopen(request, timeout=5, context=self.admin_ssl_context()) as response:
                return int(response.status)
        except urllib.error.HTTPError as error:
            return error.code

    def default_service_account_exists(self) -> bool:
        return self.api_get("/api/v1/namespaces/default/serviceaccounts/default") == 200

    # --- configuration ----------------------------------------------------------------------

    def write_kubeconfigs(self, apiserver_port: int) -> None:
        """One kubeconfig per client identity (``<stem>.kubeconfig``); the admin one is ``kubeconfig``."""
        server = f"https://127.0.0.1:{apiserver_port}"
        for client in (pki.ADMIN, pki.CONTROLLER_MANAGER, pki.SCHEDULER, pki.KWOK):
            path = self.kubeconfig if client is pki.ADMIN else self.state_dir / f"{client.file_stem}.kubeconfig"
            text = yaml.safe_dump(kubeconfig_dict(server, self.pki_dir, client.file_stem), sort_keys=False)
            path.write_text(text)
            path.chmod(0o600)

    def component_argv(self, binaries: Binaries, ports: dict[str, int]) -> dict[str, list[str]]:
        """The command line of each component."""
        p, s = self.pki_dir, self.state_dir
        etcd_url = f"http://127.0.0.1:{ports['etcd']}"
        peer_url = f"http://127.0.0.1:{ports['etcd-peer']}"
        kcm_kubeconfig = s / "kube-controller-manager.kubeconfig"
        scheduler_kubeconfig = s / "kube-scheduler.kubeconfig"
        return {
            "etcd": [
                str(binaries.etcd),
                "--name=kubetune",
                f"--data-dir={s / 'etcd'}",
                f"--listen-client-urls={etcd_url}",
                f"--advertise-client-urls={etcd_url}",
                f"--listen-peer-urls={peer_url}",
                f"--initial-advertise-peer-urls={peer_url}",
                f"--initial-cluster=kubetune={peer_url}",
                "--unsafe-no-fsync",
                "--log-level=warn",
            ],
            "kube-apiserver": [
                str(binaries.kube_apiserver),
                f"--etcd-servers={etcd_url}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={ports['kube-apiserver']}",
                "--endpoint-reconciler-type=none",
                "--authorization-mode=Node,RBAC",
                f"--client-ca-file={p / 'ca.crt'}",
                f"--tls-cert-file={p / 'apiserver.crt'}",
                f"--tls-private-key-file={p / 'apiserver.key'}",
                f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
                f"--service-account-key-file={p / 'sa.pub'}",
                f"--service-account-signing-key-file={p / 'sa.key'}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--allow-privileged=true",
                f"--cert-dir={s / 'apiserver-certs'}",
                "--profiling=false",
                # etcd < 3.5.13 cannot back the watch-list streams that client-go 1.35+ opens first;
                # the apiserver would answer with a retriable error and informers (kwok's among them)
                # would back off for many seconds. Disabled, clients fall back to LIST at once.
                "--feature-gates=WatchList=false",
                # The front-proxy (aggregation layer) settings: APIServices work, and the other
                # components stop logging that the requestheader CA is missing.
                f"--requestheader-client-ca-file={p / 'ca.crt'}",
                f"--requestheader-allowed-names={pki.FRONT_PROXY.user}",
                "--requestheader-username-headers=X-Remote-User",
                "--requestheader-group-headers=X-Remote-Group",
                "--requestheader-extra-headers-prefix=X-Remote-Extra-",
                f"--proxy-client-cert-file={p / 'front-proxy-client.crt'}",
                f"--proxy-client-key-file={p / 'front-proxy-client.key'}",
            ],
            "kube-controller-manager": [
                str(binaries.kube_controller_manager),
                f"--kubeconfig={kcm_kubeconfig}",
                f"--authentication-kubeconfig={kcm_kubeconfig}",
                f"--authorization-kubeconfig={kcm_kubeconfig}",
                "--bind-address=127.0.0.1",
                f"--secure-port={ports['kube-controller-manager']}",
                f"--cert-dir={s / 'kube-controller-manager-certs'}",
                "--leader-elect=false",
                "--use-service-account-credentials=true",
                f"--service-account-private-key-file={p / 'sa.key'}",
                f"--root-ca-file={p / 'ca.crt'}",
                f"--cluster-signing-cert-file={p / 'ca.crt'}",
                f"--cluster-signing-key-file={p / 'ca.key'}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--profiling=false",
            ],
            "kube-scheduler": [
                str(binaries.kube_scheduler),
                f"--kubeconfig={scheduler_kubeconfig}",
                f"--authentication-kubeconfig={scheduler_kubeconfig}",
                f"--authorization-kubeconfig={scheduler_kubeconfig}",
                "--bind-address=127.0.0.1",
                f"--secure-port={ports['kube-scheduler']}",
                f"--cert-dir={s / 'kube-scheduler-certs'}",
                "--leader-elect=false",
                "--profiling=false",
            ],
            "kwok": [
                str(binaries.kwok),
                f"--kubeconfig={s / 'kwok.kubeconfig'}",
                f"--config={stages_file()}",
                "--manage-all-nodes=false",
                f"--manage-nodes-with-annotation-selector={KWOK_ANNOTATION}={KWOK_ANNOTATION_VALUE}",
                "--node-lease-duration-seconds=40",
                # Simulated pods get loopback addresses nothing listens on (the node agent hands out 127.1-250.*):
                # the operator talks to server pods at their IP, and must not send traffic off this machine.
                "--cidr=127.254.0.1/16",
                f"--server-address=127.0.0.1:{ports['kwok']}",
            ],
        }


@contextlib.contextmanager
def state_lock(state_dir: Path) -> Iterator[None]:
    """An exclusive lock over a state folder, so two processes never start or stop it at once."""
    with (state_dir / ".lock").open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def stages_file() -> Path:
    """The kwok Stage definitions shipped with this package."""
    return Path(str(resources.files("kubetune.dev").joinpath("kwok-stages.yaml")))


def kubeconfig_dict(server: str, pki_dir: Path, stem: str) -> dict[str, Any]:
    """A kubeconfig for the client certificate ``<stem>.crt`` (paths, not embedded data)."""
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": "kubetune", "cluster": {"server": server, "certificate-authority": str(pki_dir / "ca.crt")}}
        ],
        "users": [
            {
                "name": stem,
                "user": {
                    "client-certificate": str(pki_dir / f"{stem}.crt"),
                    "client-key": str(pki_dir / f"{stem}.key"),
                },
            }
        ],
        "contexts": [{"name": "kubetune", "context": {"cluster": "kubetune", "user": stem}}],
        "current-context": "kubetune",
    }


def unverified_ssl_context() -> ssl.SSLContext:
    """TLS without verification, for self-signed loopback health endpoints."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def terminate(pid: int) -> None:
    """SIGTERM ``pid``, then SIGKILL if it is still alive after the grace period."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    while process_alive(pid):
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    # Reap it when we are its parent, so it does not linger as a zombie.
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)
