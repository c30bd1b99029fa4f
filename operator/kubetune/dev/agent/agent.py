"""The agent process: registers the Node, watches the pods bound to it and the Services, runs a worker per
pod and keeps every pod's /etc/hosts current."""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import signal
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import quote

from kubetune.dev.agent import bindshim
from kubetune.dev.agent.api import AgentApi, Informer
from kubetune.dev.agent.network import IpAllocator, ServiceRecord, render_hosts, service_addresses
from kubetune.dev.agent.node import NodeHeartbeat, NodeSpec
from kubetune.dev.agent.pods import SHUTDOWN_GRACE_S, AgentContext, PodWorker
from kubetune.dev.agent.runner import leftover_pid
from kubetune.dev.agent.status import TERMINAL, now_rfc3339, restarted_agent_status
from kubetune.k8s.client import ApiError

log = logging.getLogger(__name__)


@dataclass
class AgentConfig:
    """How the agent runs: which cluster, which node, where its state lives."""

    kubeconfig: str
    state_dir: Path
    pod_cidr: str
    """The loopback range of pod addresses (kubetune.dev.podranges claims one per state folder)."""
    node: NodeSpec = field(default_factory=NodeSpec)
    venv: Path = field(default_factory=lambda: Path(sys.prefix))
    backoff_initial_s: float = 10.0
    pass_env: dict[str, str] = field(default_factory=dict)


def write_in_place(path: Path, text: str) -> None:
    """Rewrite a file keeping its inode: it is bind-mounted into running pods (a rename would not show)."""
    data = text.encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, data, 0)
        os.ftruncate(fd, len(data))
    finally:
        os.close(fd)


def kill_leftovers(pod_dir: Path, uid: str) -> int:
    """SIGKILL the process groups a previous agent run left for a pod; how many there were."""
    killed = 0
    for folder in (pod_dir / "containers").glob("*"):
        pid = leftover_pid(folder, uid)
        if pid is not None:
            try:
                os.killpg(pid, signal.SIGKILL)
                killed += 1
            except ProcessLookupError:
                pass
    return killed


class Agent:
    """One node agent. ``run()`` blocks until ``stop`` is set (SIGTERM/SIGINT in the CLI)."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.api = AgentApi(config.kubeconfig)
        self.ips = IpAllocator(config.pod_cidr)
        self.stop = threading.Event()
        self.lock = threading.RLock()
        self.workers: dict[str, PodWorker] = {}
        self.others: dict[str, dict[str, Any]] = {}  # pods on the node this run does not execute
        self.deleted: set[str] = set()
        self.services: dict[tuple[str, str], ServiceRecord] = {}
        self.hosts_written: dict[str, str] = {}
        self._lock_handle: TextIO | None = None
        venv = config.venv.resolve()
        self.ctx = AgentContext(
            api=self.api,
            node_name=config.node.name,
            host_ip=config.node.address,
            allocatable=config.node.resources(),
            state_dir=config.state_dir.resolve(),
            venv=venv,
            python=str(venv / "bin" / "python"),
            backoff_initial_s=config.backoff_initial_s,
            pass_env=dict(config.pass_env),
            on_pod_changed=self.update_hosts,
        )
        self.pod_selector = {"fieldSelector": f"spec.nodeName={config.node.name}"}

    # --- lifecycle ---------------------------------------------------------------------------------

    def run(self) -> None:
        if os.geteuid() != 0:
            raise RuntimeError("the node agent needs root (mount namespaces and bind mounts)")
        for folder in (self.ctx.pods_dir, self.ctx.logs_dir, self.ctx.pvc_dir, self.ctx.shim_dir):
            folder.mkdir(parents=True, exist_ok=True)
        self.lock_state_dir()
        shutil.copyfile(bindshim.__file__, self.ctx.shim_dir / "sitecustomize.py")
        heartbeat = NodeHeartbeat(self.api, self.config.node, self.stop)
        heartbeat.register()
        heartbeat.start()
        self.clean_up_previous_run()
        informers = [
            Informer(
                self.api, "/api/v1/services", {}, self.on_service_list, self.on_service_event, self.stop, "services"
            ),
            Informer(
                self.api, "/api/v1/pods", self.pod_selector, self.on_pod_list, self.on_pod_event, self.stop, "pods"
            ),
        ]
        for informer in informers:
            informer.start()
        for informer in informers:
            informer.synced.wait(30)
        self.ready_file.write_text(str(os.getpid()))
        log.info("node %s ready; pods get addresses from %s", self.config.node.name, self.config.pod_cidr)
        while not self.stop.wait(1.0):
            pass
        self.ready_file.unlink(missing_ok=True)
        self.shutdown()

    def lock_state_dir(self) -> None:
        """Hold a lock on the state folder for the agent's life: a second agent there would kill our pods."""
        self._lock_handle = (self.ctx.state_dir / "agent.lock").open("w")
        try:
            fcntl.flock(self._lock_handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(f"another node agent uses {self.ctx.state_dir}") from None

    @property
    def ready_file(self) -> Path:
        """Holds the agent's PID while it serves its node (``kubetune dev up`` waits for it)."""
        return self.ctx.state_dir / "ready"

    def shutdown(self) -> None:
        """Stop every pod's processes (SIGTERM, then SIGKILL after a few seconds); statuses are left as they are."""
        with self.lock:
            workers = list(self.workers.values())
        for worker in workers:
            worker.shutdown()
        for worker in workers:
            worker.join(SHUTDOWN_GRACE_S + 5)
        log.info("node agent stopped")

    def clean_up_previous_run(self) -> None:
        """Adopt nothing: kill what an earlier run left, mark its pods Failed, forget unknown folders."""
        items, _ = self.api.list("/api/v1/pods", self.pod_selector)
        listed = set()
        for pod in items:
            uid = pod["metadata"]["uid"]
            listed.add(uid)
            pod_dir = self.ctx.pods_dir / uid
            status = pod.get("status") or {}
            started_before = bool(status.get("podIP")) or pod_dir.exists()
            if not started_before:
                continue  # bound while no agent ran: it starts normally
            kill_leftovers(pod_dir, uid)
            if status.get("podIP"):
                self.ips.reserve(uid, status["podIP"])
            self.others[uid] = pod
            if pod["metadata"].get("deletionTimestamp"):
                self.delete_pod(pod)
            elif status.get("phase") not in TERMINAL:
                self.mark_restarted(pod)
            shutil.rmtree(pod_dir, ignore_errors=True)
        for folder in self.ctx.pods_dir.iterdir():
            if folder.name not in listed:
                kill_leftovers(folder, folder.name)
                shutil.rmtree(folder, ignore_errors=True)

    def mark_restarted(self, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        path = f"/api/v1/namespaces/{quote(meta['namespace'])}/pods/{quote(meta['name'])}/status"
        try:
            self.api.merge_patch(path, {"status": restarted_agent_status(pod, now_rfc3339())})
            log.info("pod %s/%s: Failed (NodeAgentRestarted)", meta["namespace"], meta["name"])
        except ApiError as error:
            log.warning("pod %s/%s: could not mark it Failed: %s", meta["namespace"], meta["name"], error)

    def delete_pod(self, pod: dict[str, Any]) -> None:
        """Remove a pod this run does not execute, once (grace 0: nothing of it runs)."""
        meta = pod["metadata"]
        if meta["uid"] in self.deleted:
            return
        self.deleted.add(meta["uid"])
        path = f"/api/v1/namespaces/{quote(meta['namespace'])}/pods/{quote(meta['name'])}"
        body = {"gracePeriodSeconds": 0, "preconditions": {"uid": meta["uid"]}}
        try:
            self.api.request("DELETE", path, body=body)
        except ApiError as error:
            if not error.not_found and error.status != 409:
                log.warning("pod %s/%s: delete failed: %s", meta["namespace"], meta["name"], error)

    # --- pods --------------------------------------------------------------------------------------

    def on_pod_list(self, items: list[dict[str, Any]]) -> None:
        seen = set()
        for pod in items:
            seen.add(pod["metadata"]["uid"])
            self.on_pod_event("MODIFIED", pod)
        with self.lock:
            missing = [uid for uid in [*self.workers, *self.others] if uid not in seen]
        for uid in missing:
            self.pod_gone(uid)

    def on_pod_event(self, type_: str, pod: dict[str, Any]) -> None:
        uid = pod["metadata"]["uid"]
        if type_ == "DELETED":
            self.pod_gone(uid)
            return
        with self.lock:
            worker = self.workers.get(uid)
            if worker is not None:
                worker.update(pod)
                return
            phase = (pod.get("status") or {}).get("phase")
            if uid in self.others or phase in TERMINAL or pod["metadata"].get("deletionTimestamp"):
                self.others[uid] = pod
                ip = (pod.get("status") or {}).get("podIP")
                if ip and self.ips.address_of(uid) is None:
                    self.ips.reserve(uid, ip)
                if pod["metadata"].get("deletionTimestamp"):
                    self.delete_pod(pod)
                return
            host_network = bool(pod["spec"].get("hostNetwork"))
            worker = PodWorker(self.ctx, pod, self.ctx.host_ip if host_network else self.ips.allocate(uid))
            self.workers[uid] = worker
        log.info("pod %s/%s: starting with IP %s", worker.namespace, worker.pod_name, worker.pod_ip)
        worker.start()

    def pod_gone(self, uid: str) -> None:
        """The pod left the API server: its worker stops; its address is freed once its processes ended."""
        with self.lock:
            worker = self.workers.pop(uid, None)
            self.others.pop(uid, None)
            self.hosts_written.pop(uid, None)
        if worker is None:
            self.ips.release(uid)
            return
        worker.mark_gone()

        def release() -> None:
            worker.join()
            self.ips.release(uid)

        threading.Thread(target=release, name=f"release-{uid[:8]}", daemon=True).start()
        self.update_hosts()

    # --- services and /etc/hosts -------------------------------------------------------------------

    def on_service_list(self, items: list[dict[str, Any]]) -> None:
        with self.lock:
            self.services = {key: record for key, record in map(service_record, items) if record}
        self.update_hosts()

    def on_service_event(self, type_: str, service: dict[str, Any]) -> None:
        key, record = service_record(service)
        with self.lock:
            if type_ == "DELETED" or record is None:
                self.services.pop(key, None)
            else:
                self.services[key] = record
        self.update_hosts()

    def update_hosts(self) -> None:
        """Render every running pod's /etc/hosts; write those that changed."""
        with self.lock:
            workers = list(self.workers.values())
            records = [record for worker in workers if (record := worker.record())]
            addresses = service_addresses(self.services.values(), records)
            api_host = self.api.endpoint.host
            for worker in workers:
                if not worker.sandbox_ready or worker.gone:
                    continue
                aliases = worker.pod["spec"].get("hostAliases") or []
                text = render_hosts(worker.own_record(), records, addresses, aliases, api_host)
                if self.hosts_written.get(worker.uid) != text:
                    try:
                        write_in_place(worker.hosts_file, text)
                    except OSError as error:  # the pod's folder may be going away
                        log.debug("hosts of %s not written: %s", worker.pod_name, error)
                        continue
                    self.hosts_written[worker.uid] = text


def service_record(service: dict[str, Any]) -> tuple[tuple[str, str], ServiceRecord | None]:
    """((namespace, name), the Service as name resolution needs it, or None if it selects no pods)."""
    meta, spec = service["metadata"], service.get("spec") or {}
    key = (str(meta.get("namespace") or "default"), str(meta["name"]))
    if spec.get("type") == "ExternalName" or not spec.get("selector"):
        return key, None
    return key, ServiceRecord(key[0], key[1], dict(spec["selector"]), bool(spec.get("publishNotReadyAddresses")))
