"""One pod's life on the agent: sandbox (address, volumes, hosts), init containers, containers, probes,
restarts, status, and the stop when the pod is deleted. One thread per pod, woken by events."""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from kubetune.dev.agent.api import AgentApi
from kubetune.dev.agent.env import (
    ConfigError,
    PodFacts,
    bind_any_rewritten,
    container_argv,
    container_env,
    pull_failure,
)
from kubetune.dev.agent.logs import pod_log_dir
from kubetune.dev.agent.network import PodRecord, pod_hostname
from kubetune.dev.agent.probes import ProbeTarget, ProbeTracker, container_ports, run_probe
from kubetune.dev.agent.runner import POD_UID_VARIABLE, ContainerProcess, Launch
from kubetune.dev.agent.status import (
    OWN_CONDITIONS,
    TERMINAL,
    ContainerRecord,
    PodView,
    exit_reason,
    now_rfc3339,
    pod_phase,
    pod_status,
)
from kubetune.dev.agent.volumes import Mount, PodVolumes, VolumeError, hiding_nothing
from kubetune.k8s.client import ApiError

log = logging.getLogger(__name__)

RETRY_S = 3.0
MAX_BACKOFF_S = 300.0
BACKOFF_RESET_S = 600.0
SHUTDOWN_GRACE_S = 5.0
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass
class AgentContext:
    """What every pod worker shares: the API, the node, the agent's folders and its settings."""

    api: AgentApi
    node_name: str
    host_ip: str
    allocatable: dict[str, str]
    state_dir: Path
    venv: Path
    python: str
    backoff_initial_s: float = 10.0
    pass_env: dict[str, str] = field(default_factory=dict)
    on_pod_changed: Callable[[], None] = lambda: None

    @property
    def pods_dir(self) -> Path:
        return self.state_dir / "pods"

    @property
    def protected_paths(self) -> list[Path]:
        """What containers run from and the agent keeps its pods in: volumes must not hide them."""
        project = Path(__file__).resolve().parents[4]
        return [self.venv, Path(sys.base_prefix).resolve(), project, self.state_dir]

    @property
    def logs_dir(self) -> Path:
        return self.state_dir / "logs"

    @property
    def pvc_dir(self) -> Path:
        return self.state_dir / "pvc"

    @property
    def shim_dir(self) -> Path:
        return self.state_dir / "pyshim"


@dataclass
class Container:
    """A container of the pod: its spec, its record for status, its current process and timers."""

    spec: dict[str, Any]
    record: ContainerRecord
    init: bool = False
    process: ContainerProcess | None = None
    env: dict[str, str] = field(default_factory=dict)
    probes: dict[str, ProbeTracker] = field(default_factory=dict)
    start_at: float | None = 0.0
    backoff_s: float = 0.0
    kill_at: float | None = None
    run_started: float = 0.0

    @property
    def name(self) -> str:
        return str(self.spec["name"])

    def exited_unhandled(self) -> bool:
        return self.process is not None and self.process.exited.is_set() and self.record.state == "running"


def foreign_conditions(pod: dict[str, Any]) -> set[tuple[str, str]]:
    """(type, status) of the conditions others set on the pod (readiness gates)."""
    conditions = (pod.get("status") or {}).get("conditions") or []
    return {(str(c.get("type")), str(c.get("status"))) for c in conditions if c.get("type") not in OWN_CONDITIONS}


class PodWorker(threading.Thread):
    """Runs one pod until it is deleted (or the agent stops)."""

    def __init__(self, ctx: AgentContext, pod: dict[str, Any], pod_ip: str) -> None:
        meta = pod["metadata"]
        super().__init__(name=f"pod-{meta.get('namespace')}/{meta['name']}", daemon=True)
        self.ctx, self.pod, self.pod_ip = ctx, pod, pod_ip
        self.uid = str(meta["uid"])
        self.namespace = str(meta.get("namespace") or "default")
        self.pod_name = str(meta["name"])
        self.hostname, self.subdomain = pod_hostname(pod)
        self.dir = ctx.pods_dir / self.uid
        self.log_dir = pod_log_dir(ctx.logs_dir, self.namespace, self.pod_name, self.uid)
        spec = pod["spec"]
        self.restart_policy = str(spec.get("restartPolicy") or "Always")
        self.host_network = bool(spec.get("hostNetwork"))
        self.init = [self._container(c, init=True) for c in spec.get("initContainers") or []]
        self.containers = [self._container(c) for c in spec.get("containers") or []]
        self.facts = PodFacts(pod, pod_ip, ctx.host_ip, ctx.allocatable)
        self.volumes = PodVolumes(ctx.api, self.facts, self.dir, ctx.pvc_dir)
        self.start_time = now_rfc3339()
        self.sandbox_ready = False
        self.phase = "Pending"
        self.token_renew_at: float | None = None
        self.last_status: dict[str, Any] | None = None
        self.last_conditions: list[dict[str, Any]] = []
        self.events_sent: set[str] = set()
        self._cond = threading.Condition()
        self._dirty = False
        self.deleting = bool(meta.get("deletionTimestamp"))
        self.gone = False
        self.shutting_down = False

    def _container(self, spec: dict[str, Any], init: bool = False) -> Container:
        return Container(spec, ContainerRecord(spec["name"], image=str(spec.get("image") or "")), init=init)

    # --- signals from the agent ----------------------------------------------------------------------

    def update(self, pod: dict[str, Any]) -> None:
        """A newer version of the pod from the watch."""
        with self._cond:
            before = foreign_conditions(self.pod)
            self.pod = pod
            if pod["metadata"].get("deletionTimestamp") and not self.deleting:
                self.deleting = True
                self._notify()
            elif foreign_conditions(pod) != before:
                self._notify()  # a readiness gate may have opened: Ready is published again

    def mark_gone(self) -> None:
        """The pod no longer exists in the API server."""
        with self._cond:
            self.gone = True
            self._notify()

    def shutdown(self) -> None:
        """The agent stops: end the processes quickly, write nothing to the API."""
        with self._cond:
            self.shutting_down = True
            self._notify()

    def wake(self) -> None:
        with self._cond:
            self._notify()

    def _notify(self) -> None:
        self._dirty = True
        self._cond.notify_all()

    @property
    def interrupted(self) -> bool:
        return self.deleting or self.gone or self.shutting_down

    def wait(self, seconds: float | None) -> None:
        """Sleep until woken or ``seconds`` have passed (forever when None)."""
        with self._cond:
            if not self._dirty:
                self._cond.wait(timeout=None if seconds is None else max(seconds, 0.0))
            self._dirty = False

    # --- what the agent reads ------------------------------------------------------------------------

    def own_record(self) -> PodRecord:
        """This pod for name resolution, whatever its state."""
        meta = self.pod["metadata"]
        return PodRecord(
            namespace=self.namespace,
            name=self.pod_name,
            ip=self.pod_ip,
            hostname=self.hostname,
            subdomain=self.subdomain,
            labels=dict(meta.get("labels") or {}),
            ready=bool(self.containers) and all(c.record.ready for c in self.containers),
            created=str(meta.get("creationTimestamp") or ""),
        )

    def record(self) -> PodRecord | None:
        """This pod as others resolve it; None once it ended or is being deleted."""
        if self.phase in TERMINAL or self.interrupted:
            return None
        return self.own_record()

    @property
    def hosts_file(self) -> Path:
        return self.dir / "etc" / "hosts"

    # --- the life of the pod -------------------------------------------------------------------------

    def run(self) -> None:
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            meta = {"namespace": self.namespace, "name": self.pod_name, "uid": self.uid}
            (self.dir / "pod.json").write_text(json.dumps(meta))
            self.publish()
            if self.prepare_sandbox():
                self.supervise()
        except Exception:
            log.exception("pod %s/%s: agent error", self.namespace, self.pod_name)
            with contextlib.suppress(Exception):
                self.fail_for_agent_error()
        finally:
            self.finish()

    def prepare_sandbox(self) -> bool:
        """Volumes, /etc/hosts and /etc/hostname; retried while a source is missing. False if interrupted."""
        delay = 1.0
        while not self.interrupted:
            try:
                self.volumes.prepare()
                self.token_renew_at = min((t.renew_at for t in self.volumes.tokens), default=None)
            except VolumeError as error:
                self.event("Warning", "FailedMount", f"MountVolume.SetUp failed: {error}", once=str(error))
                self.publish()
                self.wait(delay)
                delay = min(delay * 2, 10.0)
                continue
            (self.dir / "etc").mkdir(exist_ok=True)
            (self.dir / "etc" / "hostname").write_text(self.hostname + "\n")
            self.hosts_file.touch()
            self.sandbox_ready = True
            for record in (c.record for c in [*self.init, *self.containers]):
                record.reason = "PodInitializing" if self.init else "ContainerCreating"
            self.ctx.on_pod_changed()  # writes this pod's hosts file too
            return True
        return False

    def supervise(self) -> None:
        """React to exits, timers and probes until the pod is deleted; after a terminal phase, only wait."""
        while not self.interrupted:
            now = time.monotonic()
            was_ready = self.record()
            due = self.step(now)
            self.publish()
            if self.record() != was_ready:
                self.ctx.on_pod_changed()
            if self.phase in TERMINAL:
                due = []  # nothing runs any more: only deletion wakes the pod
            self.wait(min(due) - time.monotonic() if due else None)

    def step(self, now: float) -> list[float]:
        """One pass over containers and timers; the times at which something is due next."""
        due: list[float] = []
        if self.phase in TERMINAL:
            return due
        if self.token_renew_at is not None and now >= self.token_renew_at:
            try:
                self.token_renew_at = self.volumes.refresh_tokens()
            except VolumeError as error:
                log.warning("pod %s/%s: %s", self.namespace, self.pod_name, error)
                self.token_renew_at = now + RETRY_S
        if self.token_renew_at is not None:
            due.append(self.token_renew_at)
        pending_init = next((c for c in self.init if not c.record.succeeded), None)
        active = [pending_init] if pending_init else self.containers
        for container in active:
            due += self.step_container(container, now)
        if pending_init and pending_init.record.succeeded:
            return [now]  # the next init container, or the containers, start at once
        self.phase = pod_phase(self.restart_policy, [c.record for c in self.init], [c.record for c in self.containers])
        return due

    def step_container(self, c: Container, now: float) -> list[float]:
        if c.exited_unhandled():
            self.handle_exit(c, now)
        if c.start_at is not None and now >= c.start_at:
            self.start_container(c, now)
        due = [t for t in (c.start_at, c.kill_at) if t is not None]
        if c.kill_at is not None and now >= c.kill_at and c.process is not None:
            c.process.kill_group(signal.SIGKILL)
            c.kill_at = None
        if c.process is not None and c.process.running() and c.kill_at is None:
            due += self.run_probes(c, now)
        return due

    def start_container(self, c: Container, now: float) -> None:
        """Start one run of a container (after a config error or an image that cannot be pulled, try again later)."""
        c.start_at = None
        image = str(c.spec.get("image") or "")
        if (failure := pull_failure(image)) is not None:
            # As a kubelet: ErrImagePull at the first try, ImagePullBackOff while it waits to try again.
            if c.record.reason in ("ErrImagePull", "ImagePullBackOff"):
                reason, message = "ImagePullBackOff", f'Back-off pulling image "{image}"'
            else:
                reason, message = "ErrImagePull", failure
            c.record.state, c.record.reason, c.record.message = "waiting", reason, message
            self.event("Warning", "Failed", f"Failed to pull image {image!r}: {failure}", once=f"{c.name}:pull")
            c.start_at = now + RETRY_S
            return
        try:
            env = self.environment(c.spec)
            argv = container_argv(c.spec, env)
            if not self.host_network:
                argv = bind_any_rewritten(argv, self.pod_ip)
            mounts = hiding_nothing(self.volumes.mounts(c.spec, env), self.ctx.protected_paths)
            mounts += [
                Mount(str(self.hosts_file), "/etc/hosts"),
                Mount(str(self.dir / "etc" / "hostname"), "/etc/hostname"),
            ]
        except (ConfigError, VolumeError) as error:
            c.record.state, c.record.reason, c.record.message = "waiting", "CreateContainerConfigError", str(error)
            self.event("Warning", "Failed", f"Error: {error}", once=f"{c.name}:{error}")
            c.start_at = now + RETRY_S
            return
        if c.record.ever_ran:
            c.record.restart_count += 1
        c.env = env
        c.process = ContainerProcess(
            self.dir / "containers" / c.name, self.log_dir / f"{c.name}.log", self.ctx.python, self.wake
        )
        launch = Launch(argv, env, self.hostname, c.spec.get("workingDir"), mounts)
        pid = c.process.start(launch, str(c.spec.get("terminationMessagePath") or "/dev/termination-log"))
        c.run_started = now
        record = c.record
        record.state, record.reason, record.message = "running", "", ""
        record.started_at, record.ever_ran = now_rfc3339(), True
        record.container_id = f"kubetune-dev://{self.uid[:8]}-{c.name}-{record.restart_count}-{pid}"
        record.started = "startupProbe" not in c.spec
        c.probes = {}
        for kind in ("startup", "readiness", "liveness"):
            if f"{kind}Probe" in c.spec and not c.init:
                c.probes[kind] = ProbeTracker.start(kind, c.spec[f"{kind}Probe"], now)
        record.ready = record.started and "readiness" not in c.probes and not c.init
        self.event("Normal", "Started", f"Started container {c.name} (pid {pid})")

    def environment(self, container: dict[str, Any]) -> dict[str, str]:
        """The container's variables on top of the agent's base set; the bind shim always on PYTHONPATH."""
        api = self.ctx.api.endpoint
        base = {
            "PATH": f"{self.ctx.venv / 'bin'}:{SYSTEM_PATH}",
            "HOME": "/root",
            "HOSTNAME": self.hostname,
            "VIRTUAL_ENV": str(self.ctx.venv),
            "PYTHONUNBUFFERED": "1",
            "KUBERNETES_SERVICE_HOST": api.host,
            "KUBERNETES_SERVICE_PORT": str(api.port),
            "KUBERNETES_SERVICE_PORT_HTTPS": str(api.port),
            "KUBERNETES_PORT": f"tcp://{api.host}:{api.port}",
            "POD_IP": self.pod_ip,
            "HOST": self.pod_ip,
            # The node's pods share its cores (no CPU manager gives each a cpuset): vLLM's CPU build would pin
            # every engine to the same core by itself, where one replica's busy-polling worker starves the
            # next one's start (seen: a second replica at 1% CPU for 10 minutes). A pod's own value wins.
            "VLLM_CPU_OMP_THREADS_BIND": "nobind",
            **self.ctx.pass_env,
        }
        env = container_env(container, self.facts, self.ctx.api, base)
        shim = str(self.ctx.shim_dir)
        paths = [p for p in env.get("PYTHONPATH", "").split(":") if p and p != shim]
        env["PYTHONPATH"] = ":".join([shim, *paths])
        env["KUBETUNE_POD_IP"] = "" if self.host_network else self.pod_ip  # the bind shim stays off
        env[POD_UID_VARIABLE] = self.uid
        return env

    def handle_exit(self, c: Container, now: float) -> None:
        """Record a run's end; schedule a restart when the policy asks for one."""
        assert c.process is not None
        record = c.record
        start_error = c.process.start_error()
        record.exit_code = 128 if start_error and c.process.exit_code == 0 else c.process.exit_code
        record.reason = "StartError" if start_error else exit_reason(record.exit_code)
        record.message = start_error or c.process.termination_message(
            str(c.spec.get("terminationMessagePolicy") or "File")
        )
        record.state, record.finished_at = "terminated", now_rfc3339()
        record.ready = record.started = False
        c.kill_at, c.probes = None, {}
        policy = self.restart_policy
        restart = (policy == "Always" and not c.init) or (policy != "Never" and record.exit_code != 0)
        if not restart or self.interrupted:
            return
        if now - c.run_started > BACKOFF_RESET_S:
            c.backoff_s = 0.0
        delay = c.backoff_s
        c.backoff_s = min(max(delay * 2, self.ctx.backoff_initial_s), MAX_BACKOFF_S)
        record.last_terminated = record.terminated_dict()
        record.state, record.reason = "waiting", "CrashLoopBackOff"
        record.message = f"back-off {delay:g}s restarting failed container={c.name} pod={self.pod_name}"
        c.start_at = now + delay
        if delay:
            self.event("Warning", "BackOff", f"Back-off restarting failed container {c.name}")

    @staticmethod
    def active_probes(c: Container) -> list[str]:
        """The startup probe until it succeeds, then readiness and liveness."""
        if "startup" in c.probes and not c.record.started:
            return ["startup"]
        return [kind for kind in ("readiness", "liveness") if kind in c.probes]

    def run_probes(self, c: Container, now: float) -> list[float]:
        """Run the probes that are due; a failed liveness or startup probe kills the container."""
        assert c.process is not None
        target = ProbeTarget(self.pod_ip, container_ports(c.spec), c.env, c.process.pid)
        for kind in self.active_probes(c):
            tracker = c.probes[kind]
            if now < tracker.next_at:
                continue
            ok, message = run_probe(tracker.spec, target)
            if tracker.record(ok, time.monotonic(), message) and not tracker.result:
                self.event("Warning", "Unhealthy", f"{kind.capitalize()} probe failed: {message}")
            if kind == "startup" and tracker.result:
                c.record.started = True
                c.record.ready = "readiness" not in c.probes
                for later in ("readiness", "liveness"):
                    if later in c.probes:  # their initial delay counts from the end of the startup probe
                        c.probes[later] = ProbeTracker.start(later, c.probes[later].spec, now)
            elif kind == "readiness":
                c.record.ready = bool(tracker.result)
            if kind in ("startup", "liveness") and tracker.result is False:
                self.kill_for_probe(c, kind, now)
                return []
        return [c.probes[kind].next_at for kind in self.active_probes(c)]

    def kill_for_probe(self, c: Container, kind: str, now: float) -> None:
        assert c.process is not None
        self.event("Normal", "Killing", f"Container {c.name} failed {kind} probe, will be restarted")
        spec = c.spec.get(f"{kind}Probe") or {}
        grace = spec.get("terminationGracePeriodSeconds") or self.grace_seconds(deleting=False)
        c.process.kill_group(signal.SIGTERM)
        c.kill_at = now + float(grace)
        c.record.ready = False

    # --- status ------------------------------------------------------------------------------------

    def publish(self) -> None:
        """Write the pod's status when it changed (a merge patch; the lists are replaced)."""
        if self.gone or self.shutting_down:
            return
        now = now_rfc3339()
        theirs = [c for c in (self.pod.get("status") or {}).get("conditions") or [] if c.get("type")]
        others = [c for c in theirs if c["type"] not in OWN_CONDITIONS]
        previous = [*others, *(self.last_conditions or [c for c in theirs if c["type"] in OWN_CONDITIONS])]
        gates = [str(g.get("conditionType")) for g in (self.pod.get("spec") or {}).get("readinessGates") or []]
        view = PodView(
            phase=self.phase,
            sandbox_ready=self.sandbox_ready,
            initialized=all(c.record.succeeded for c in self.init),
            containers=[c.record for c in self.containers],
            readiness_gates=gates,
        )
        init = [c.record for c in self.init]
        status = pod_status(view, init, previous, self.pod_ip, self.ctx.host_ip, self.start_time, now)
        if status == self.last_status:
            return
        try:
            self.ctx.api.merge_patch(self.pod_path("status"), {"status": status})
        except ApiError as error:
            if error.not_found:
                self.gone = True
                return
            log.warning("pod %s/%s: status not written: %s", self.namespace, self.pod_name, error)
            return
        self.last_status = status
        self.last_conditions = [c for c in status["conditions"] if c["type"] in OWN_CONDITIONS]

    def pod_path(self, subresource: str = "") -> str:
        path = f"/api/v1/namespaces/{quote(self.namespace)}/pods/{quote(self.pod_name)}"
        return f"{path}/{subresource}" if subresource else path

    def event(self, type_: str, reason: str, message: str, once: str | None = None) -> None:
        """Post an Event; with ``once`` (a key) only the first time for that reason and key."""
        if once is not None:
            key = f"{reason}:{once}"
            if key in self.events_sent:
                return
            self.events_sent.add(key)
        self.ctx.api.event(self.pod, type_, reason, message, self.ctx.node_name)

    def fail_for_agent_error(self) -> None:
        self.phase = "Failed"
        self.publish()

    # --- the end -----------------------------------------------------------------------------------

    def grace_seconds(self, deleting: bool = True) -> float:
        meta, spec = self.pod["metadata"], self.pod["spec"]
        value = meta.get("deletionGracePeriodSeconds") if deleting else None
        if value is None:
            value = spec.get("terminationGracePeriodSeconds")
        return float(30 if value is None else value)

    def all_containers(self) -> Iterable[Container]:
        return [*self.init, *self.containers]

    def finish(self) -> None:
        """Wait for deletion if not yet asked; stop the processes; write the final status; delete the pod."""
        while not self.interrupted:
            self.wait(None)
        running = [c for c in self.all_containers() if c.process is not None and c.process.running()]
        if self.shutting_down:
            self.stop_processes(running, SHUTDOWN_GRACE_S, hooks=False)
            return
        if running:
            self.event("Normal", "Killing", f"Stopping containers {', '.join(c.name for c in running)}")
        self.stop_processes(running, self.grace_seconds(), hooks=True)
        for c in running:
            if c.exited_unhandled():
                c.start_at = None
                self.handle_exit(c, time.monotonic())
        if self.phase not in TERMINAL:
            records = [c.record for c in self.containers]
            self.phase = "Succeeded" if all(r.succeeded for r in records) else "Failed"
        self.publish()
        if not self.gone:
            body = {"gracePeriodSeconds": 0, "preconditions": {"uid": self.uid}}
            with contextlib.suppress(ApiError):
                self.ctx.api.request("DELETE", self.pod_path(), body=body)
        shutil.rmtree(self.dir, ignore_errors=True)

    def stop_processes(self, running: list[Container], grace: float, hooks: bool) -> None:
        """preStop hooks, then SIGTERM to each process group, SIGKILL to what is left after ``grace``."""
        deadline = time.monotonic() + grace
        if hooks:
            threads = [threading.Thread(target=self.pre_stop, args=(c, deadline), daemon=True) for c in running]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(max(deadline - time.monotonic(), 0))
        for c in running:
            assert c.process is not None
            c.process.kill_group(signal.SIGTERM)
        for c in running:
            assert c.process is not None
            if not c.process.exited.wait(max(deadline - time.monotonic(), 0)):
                c.process.kill_group(signal.SIGKILL)
                c.process.exited.wait(5)

    def pre_stop(self, c: Container, deadline: float) -> None:
        """Run a container's preStop hook (sleep, exec or httpGet) within the grace period."""
        hook = (c.spec.get("lifecycle") or {}).get("preStop") or {}
        left = max(deadline - time.monotonic(), 0)
        assert c.process is not None
        if "sleep" in hook:
            time.sleep(min(float(hook["sleep"].get("seconds") or 0), left))
            return
        target = ProbeTarget(self.pod_ip, container_ports(c.spec), c.env, c.process.pid)
        if "httpGet" in hook:
            ok, message = run_probe({"httpGet": hook["httpGet"], "timeoutSeconds": max(left, 1)}, target)
        elif "exec" in hook:
            ok, message = run_probe({"exec": hook["exec"], "timeoutSeconds": max(left, 1)}, target)
        else:
            return
        if not ok:
            self.event("Warning", "FailedPreStopHook", f"PreStopHook failed: {message}")
