"""Helpers of the operator's integration tests: the operator as a process, waiting, manifests."""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

from kubetune.config import GPU_TOLERATION, GpuTypeConfig, OperatorConfig
from kubetune.dev.binaries import ensure_binaries
from kubetune.dev.controlplane import Cluster, ControlPlane, free_ports
from kubetune.dev.demo import storage_manifests
from kubetune.dev.nodes import create_simulated_nodes, wait_nodes_ready
from kubetune.dev.podranges import claim_pod_range
from kubetune.k8s.client import Kube
from kubetune.signing import key_file

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
T = TypeVar("T")


@contextlib.contextmanager
def started_cluster(state_dir: Path) -> Iterator[Cluster]:
    """A control plane of its own with the simulated nodes Ready, stopped on exit."""
    plane = ControlPlane(state_dir, ensure_binaries())
    try:
        plane.start()
        names = create_simulated_nodes(plane.kubeconfig)
        plane.wait_ready()
        wait_nodes_ready(plane.kubeconfig, names)
        yield plane.cluster()
    finally:
        plane.stop()


def wait_for(
    check: Callable[[], T | None], timeout: float = 60, message: str = "condition", interval: float = 0.3
) -> T:
    """Poll `check` until it returns something truthy; fail with `message` and the last value."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {message}; last value: {last!r}")


class OperatorProcess:
    """`kubetune operator` running against the test cluster, restartable (kill -9 included)."""

    def __init__(self, kubeconfig: Path, log_dir: Path, config: Path | None = None, metrics_port: int = 0) -> None:
        self.kubeconfig = kubeconfig
        self.log_dir = log_dir
        self.config = config
        self.metrics_port = metrics_port
        """On 127.0.0.1; 0: no metrics endpoint."""
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self, *extra_args: str, **extra_env: str) -> None:
        """Start the operator; `extra_args` add options (e.g. --leader-election), `extra_env` variables (e.g.
        KUBETUNE_CRASH_AT, kubetune/faults.py)."""
        self.starts += 1
        log = open(self.log_dir / f"operator-{self.starts}.log", "wb")  # noqa: SIM115 (owned by the process)
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig), "PYTHONUNBUFFERED": "1", **extra_env}
        if self.config:
            env["KUBETUNE_OPERATOR_CONFIG"] = str(self.config)
        metrics = f"127.0.0.1:{self.metrics_port}" if self.metrics_port else ""
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kubetune", "operator", "--liveness", "", "--metrics-address", metrics, *extra_args],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def kill(self) -> None:
        """SIGKILL: the operator gets no chance to clean up, as in a node crash."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.log_dir.glob("operator-*.log")))


def example(name: str, metadata_name: str, namespace: str, **spec_changes: Any) -> dict[str, Any]:
    """An example manifest renamed into `namespace`, with top-level spec fields replaced."""
    body = copy.deepcopy(yaml.safe_load((EXAMPLES / name).read_text()))
    body["metadata"] = {"name": metadata_name, "namespace": namespace, "labels": body["metadata"].get("labels", {})}
    body["spec"].update(spec_changes)
    return body


def simulated_ftj(name: str, namespace: str, *, run_seconds: float = 2, **spec_changes: Any) -> dict[str, Any]:
    """A one-GPU SFT FineTuneJob whose kwok pods run for `run_seconds` and complete. No PVCs are needed."""
    annotations = {"pod-complete.stage.kwok.x-k8s.io/delay": f"{run_seconds}s"}
    spec = {
        "baseModel": {"uri": "hf://Qwen/Qwen2.5-7B"},
        "resources": {"nodes": 1, "gpusPerNode": 1, "gpuType": "rtx-4090d"},
        "hyperparameters": {"globalBatchSize": 16, "maxSeqLength": 2048, "maxSteps": 100},
        "dataset": {"uri": "s3://datasets/sft.jsonl", "format": "prompt-response"},
        "output": {"uri": f"s3://adapters/{name}"},
        "podMetadata": {"annotations": annotations},
        **spec_changes,
    }
    return example("finetunejob-sft.yaml", name, namespace, **spec)


class Api:
    """Test-side access to the cluster: kubectl for what users type, the JSON client for the rest."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.kube = Kube.from_kubeconfig(str(cluster.kubeconfig), field_manager="kubetune-tests")

    def kubectl(self, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.cluster.kubectl(*args, input=input, check=check)

    def apply(
        self, body: dict[str, Any], check: bool = True, dry_run: bool = False
    ) -> subprocess.CompletedProcess[str]:
        args = ["apply", "-f", "-"] + (["--dry-run=server"] if dry_run else [])
        return self.kubectl(*args, input=yaml.safe_dump(body), check=check)

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        return self.kube.get(kind, namespace, name)

    def status(self, kind: str, namespace: str, name: str) -> dict[str, Any]:
        obj = self.get(kind, namespace, name)
        return dict((obj or {}).get("status") or {})

    def wait_state(self, kind: str, namespace: str, name: str, state: str, timeout: float = 60) -> dict[str, Any]:
        return wait_for(
            lambda: (s := self.status(kind, namespace, name)).get("state") == state and s,
            timeout,
            f"{kind} {namespace}/{name} to be {state}",
        )

    def condition(self, kind: str, namespace: str, name: str, type_: str) -> dict[str, Any] | None:
        return next((c for c in self.status(kind, namespace, name).get("conditions", []) if c["type"] == type_), None)

    def events(self, namespace: str, name: str) -> list[dict[str, Any]]:
        items = self.kube.list("Event", namespace)
        return [e for e in items if e["involvedObject"].get("name") == name]

    def wait_event(
        self, namespace: str, name: str, reason: str, type_: str = "", timeout: float = 30
    ) -> dict[str, Any]:
        """The first Event of `name` with this reason (and type): the operator posts an Event after the status
        write a test waits for, so right after that write it may not be there yet."""

        def found() -> dict[str, Any] | None:
            events = self.events(namespace, name)
            return next((e for e in events if e["reason"] == reason and (not type_ or e["type"] == type_)), None)

        return wait_for(found, timeout, f"{type_} Event {reason} of {namespace}/{name}".strip())

    def children(self, kind: str, namespace: str, label: str, name: str) -> list[dict[str, Any]]:
        return self.kube.list(kind, namespace, f"{label}={name}")

    def create_namespace(self) -> str:
        """A new namespace, once its default ServiceAccount (which pods run as) exists."""
        name = f"t-{uuid.uuid4().hex[:8]}"
        self.kube.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
        wait_for(lambda: self.get("ServiceAccount", name, "default"), 30, f"ServiceAccount default in {name}")
        return name

    def remove_namespace(self, namespace: str, kinds: str, timeout: float = 90) -> None:
        """Delete every object of `kinds` (kubectl's comma list) and wait for the namespace's pods to go (while the
        node agent runs, so that it stops their processes), then delete the namespace."""
        self.kubectl("delete", kinds, "--all", "-n", namespace, "--wait=false", check=False)
        wait_for(lambda: not self.kube.list("Pod", namespace) or None, timeout, f"pods of {namespace} to go")
        self.kube.delete("Namespace", "", namespace)

    def create_bound_pvc(self, namespace: str, claim: str) -> None:
        """A PersistentVolume and a claim bound to it, so pods that mount the claim can schedule."""
        self.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(storage_manifests(namespace, claim)))


@dataclass
class AgentProcess:
    """``python -m kubetune.dev.agent`` serving one Node for the tests."""

    cluster: Cluster
    state_dir: Path
    node: str
    gpus: int = 0
    taint: str = "kubetune.io/agent-test=true:NoSchedule"
    labels: tuple[str, ...] = ()
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0
    pod_cidr: str = ""
    """Claimed for the state folder when it starts: a range no other agent of the machine uses."""

    def start(self) -> None:
        self.starts += 1
        self.pod_cidr = claim_pod_range(self.state_dir)
        log = (self.state_dir / f"agent-{self.starts}.log").open("wb")
        argv = [sys.executable, "-m", "kubetune.dev.agent", "--kubeconfig", str(self.cluster.kubeconfig)]
        argv += ["--state-dir", str(self.state_dir), "--node-name", self.node, "--gpus", str(self.gpus)]
        argv += ["--taint", self.taint, "--pod-cidr", self.pod_cidr, "--backoff", "1"]
        for label in self.labels:
            argv += ["--label", label]
        self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        wait_nodes_ready(self.cluster.kubeconfig, [self.node], timeout=60)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.state_dir.glob("agent-*.log")))


def running_agent(cluster: Cluster, state_dir: Path, **options: Any) -> Iterator[AgentProcess]:
    """An agent for a test module: started, then stopped with its Node deleted and no process left behind."""
    process = AgentProcess(cluster, state_dir, **options)
    process.start()
    try:
        yield process
    finally:
        process.stop()
        cluster.kubectl("delete", "node", process.node, "--wait=false", check=False)
        pods = process.state_dir / "pods"
        for pid_file in pods.glob("*/containers/*/pid") if pods.is_dir() else []:
            with contextlib.suppress(OSError, ValueError):
                os.killpg(int(pid_file.read_text()), signal.SIGKILL)


def dump(obj: Any) -> str:
    return json.dumps(obj, indent=1, default=str)[:4000]


# The node agent's Node for real servers: pods reach it through gpuType "cpu-agent" (see operator_config_for_tests).
AGENT_GPU_TYPE = "cpu-agent"

# What a test module needs of this machine: the node agent runs pods as root; trainer and server pods need the
# packages of their extra.
NEEDS_ROOT = pytest.mark.skipif(os.geteuid() != 0, reason="the node agent needs root")
NEEDS_TRAINER = pytest.mark.skipif(
    not importlib.util.find_spec("trl"), reason="needs the trainer extra: hack/setup.sh trainer"
)
NEEDS_SERVER = pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("vllm", "trl")),
    reason="needs the server environment: hack/setup.sh server",
)
AGENT_LABEL = ("kubetune.io/test-node", "serving")
AGENT_TAINT = "kubetune.io/serving-test=true:NoSchedule"


def cpu_agent(cluster: Cluster, state_dir: Path, name: str) -> Iterator[AgentProcess]:
    """A node agent with two "GPUs" (everything runs on CPU) that takes only pods of gpuType cpu-agent."""
    yield from running_agent(
        cluster,
        state_dir,
        node=f"{name}-{uuid.uuid4().hex[:6]}",
        gpus=2,
        taint=AGENT_TAINT,
        labels=("=".join(AGENT_LABEL),),
    )


def operator_config_for_tests() -> dict[str, Any]:
    """The operator's configuration in the tests: the defaults, plus what real vLLM servers on CPU need."""
    config = OperatorConfig()
    config.gpu_types[AGENT_GPU_TYPE] = GpuTypeConfig(
        node_selector=dict([AGENT_LABEL]),
        tolerations=[GPU_TOLERATION, {"key": AGENT_TAINT.split("=")[0], "operator": "Exists", "effect": "NoSchedule"}],
    )
    # vLLM on CPU sizes its KV cache from this instead of the memory it would take by default.
    config.server.extra_args = ["--kv-cache-memory-bytes", "67108864"]
    config.server.adapter_resync_seconds = 2.0
    # The cache claim, in the namespaces that have one (test_prepare.py): about 1 KB, so that every prepare step
    # evicts what no unfinished job uses, and no idle time before an entry may go.
    config.cache.claim_name = "kubetune-cache"
    config.cache.size_limit_gib = 1e-6
    config.cache.evict_idle_seconds = 0.0
    # Where KEDA would read vLLM's metrics: no Prometheus runs, but ScaledObjects are written and validated.
    config.server.prometheus_address = "http://prometheus.monitoring.svc:9090"
    return config.model_dump(mode="json", by_alias=True)


def operator_fixture(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatorProcess]:
    """CRDs installed and Established, and the operator running."""
    cluster.kubectl("apply", "--server-side", "-f", str(ROOT / "crds"))
    cluster.kubectl(
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        "crd/finetunejobs.kubetune.io",
        "crd/modelservers.kubetune.io",
    )
    log_dir = tmp_path_factory.mktemp("operator")
    config = log_dir / "operator.yaml"
    settings = operator_config_for_tests()
    settings["server"]["signingKeyFile"] = str(key_file(log_dir / "signing-key.pem"))  # the same after a restart
    config.write_text(yaml.safe_dump(settings))
    proc = OperatorProcess(cluster.kubeconfig, log_dir, config, metrics_port=free_ports(1)[0])
    proc.start()
    yield proc
    proc.stop()
