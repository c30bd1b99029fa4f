"""Pure parts of the node agent: environment, addresses, /etc/hosts, status, probes, volumes, logs."""

from __future__ import annotations

import random
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from kubetune.dev.agent import bindshim
from kubetune.dev.agent.env import (
    ConfigError,
    PodFacts,
    bind_any_rewritten,
    container_argv,
    container_env,
    expand,
    field_value,
    pull_failure,
)
from kubetune.dev.agent.logs import container_log, find_pod_log_dir, pod_log_dir, tail_bytes
from kubetune.dev.agent.network import (
    IpAllocator,
    PodRecord,
    ServiceRecord,
    pod_hostname,
    render_hosts,
    service_addresses,
)
from kubetune.dev.agent.node import dev_gpu_node, node_manifest, node_status, parse_taint
from kubetune.dev.agent.probes import ProbeTracker, resolve_port
from kubetune.dev.agent.quantity import ceil_divide, parse_quantity
from kubetune.dev.agent.status import (
    ContainerRecord,
    PodView,
    container_status,
    pod_conditions,
    pod_phase,
    restarted_agent_status,
)
from kubetune.dev.agent.volumes import Mount, PodVolumes, VolumeError, hiding_nothing

POD: dict[str, Any] = {
    "metadata": {
        "name": "train-0-abcde",
        "namespace": "ml",
        "uid": "1234",
        "labels": {"app": "train", "tier": "gpu"},
        "annotations": {"batch.kubernetes.io/job-completion-index": "0"},
    },
    "spec": {
        "nodeName": "dev-gpu-0",
        "serviceAccountName": "trainer",
        "hostname": "train-0",
        "subdomain": "train",
        "containers": [{"name": "main", "resources": {"limits": {"memory": "2Gi", "cpu": "1500m"}}}],
    },
}
FACTS = PodFacts(POD, "127.1.0.7", "127.0.0.1", {"cpu": "2", "memory": "20Gi"})


class FakeLookup:
    """ConfigMaps and Secrets from dicts; also a fake TokenRequest."""

    def __init__(self) -> None:
        self.maps = {"cfg": {"greeting": "hi", "LEVEL": "debug", "bad-name!": "x"}}
        self.secrets = {"creds": {"token": "s3cret"}}
        self.tokens = 0

    def config_map(self, namespace: str, name: str) -> dict[str, str] | None:
        return self.maps.get(name)

    def secret(self, namespace: str, name: str) -> dict[str, str] | None:
        return self.secrets.get(name)

    def config_map_bytes(self, namespace: str, name: str) -> dict[str, bytes] | None:
        data = self.maps.get(name)
        return None if data is None else {k: v.encode() for k, v in data.items()}

    def secret_bytes(self, namespace: str, name: str) -> dict[str, bytes] | None:
        data = self.secrets.get(name)
        return None if data is None else {k: v.encode() for k, v in data.items()}

    def request_token(
        self, namespace: str, service_account: str, pod: dict[str, Any], audience: str | None, seconds: int
    ) -> tuple[str, str]:
        self.tokens += 1
        return f"token-{service_account}-{pod['metadata']['uid']}-{audience}-{self.tokens}", "2030-01-01T00:00:00Z"


# --- environment -------------------------------------------------------------------------------------


def test_expand_replaces_defined_variables_and_keeps_the_rest() -> None:
    env = {"A": "1", "B": "two"}
    assert expand("$(A)-$(B)-$(C)", env) == "1-two-$(C)"
    assert expand("$$(A) costs $$5 $(A", env) == "$(A) costs $5 $(A"


def test_field_refs_of_the_downward_api() -> None:
    assert field_value(FACTS, "metadata.name") == "train-0-abcde"
    assert field_value(FACTS, "metadata.namespace") == "ml"
    assert field_value(FACTS, "metadata.uid") == "1234"
    assert field_value(FACTS, "metadata.annotations['batch.kubernetes.io/job-completion-index']") == "0"
    assert field_value(FACTS, "metadata.labels['tier']") == "gpu"
    assert field_value(FACTS, "metadata.labels") == 'app="train"\ntier="gpu"'
    assert field_value(FACTS, "status.podIP") == "127.1.0.7"
    assert field_value(FACTS, "spec.nodeName") == "dev-gpu-0"
    assert field_value(FACTS, "spec.serviceAccountName") == "trainer"
    with pytest.raises(ConfigError):
        field_value(FACTS, "status.phase")


def test_container_env_order_sources_and_expansion() -> None:
    container = {
        "resources": POD["spec"]["containers"][0]["resources"],
        "envFrom": [{"configMapRef": {"name": "cfg"}, "prefix": "CM_"}, {"secretRef": {"name": "creds"}}],
        "env": [
            {"name": "RANK", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
            {"name": "URL", "value": "http://$(POD_IP):8000/$(RANK)"},
            {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}}},
            {"name": "MEM_MI", "valueFrom": {"resourceFieldRef": {"resource": "limits.memory", "divisor": "1Mi"}}},
            {"name": "CPUS", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu"}}},
            {"name": "GPUS", "valueFrom": {"resourceFieldRef": {"resource": "requests.ephemeral-storage"}}},
            {"name": "MAYBE", "valueFrom": {"configMapKeyRef": {"name": "nope", "key": "x", "optional": True}}},
            {"name": "PATH", "value": "/custom"},
        ],
    }
    env = container_env(container, FACTS, FakeLookup(), {"POD_IP": "127.1.0.7", "PATH": "/venv/bin"})
    assert env["CM_greeting"] == "hi" and env["CM_LEVEL"] == "debug" and "CM_bad-name!" not in env
    assert env["token"] == "s3cret" and env["TOKEN"] == "s3cret"
    assert env["URL"] == "http://127.1.0.7:8000/train"
    assert env["MEM_MI"] == "2048"
    assert env["CPUS"] == "2"  # 1500m rounded up
    assert env["GPUS"] == "0"
    assert "MAYBE" not in env
    assert env["PATH"] == "/custom"


@pytest.mark.parametrize(
    "var",
    [
        {"name": "X", "valueFrom": {"configMapKeyRef": {"name": "missing", "key": "k"}}},
        {"name": "X", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "missing"}}},
        {"name": "X", "valueFrom": {"secretKeyRef": {"name": "missing", "key": "k"}}},
    ],
)
def test_container_env_missing_required_source_is_a_config_error(var: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        container_env({"env": [var]}, FACTS, FakeLookup(), {})


def test_argv_expands_and_rewrites_any_address_to_the_pod_ip() -> None:
    container = {"command": ["python3", "-m", "vllm.entrypoints.openai.api_server"], "args": ["--port", "$(PORT)"]}
    assert container_argv(container, {"PORT": "8000"})[-2:] == ["--port", "8000"]
    with pytest.raises(ConfigError):
        container_argv({"image": "busybox"}, {})
    argv = ["serve", "--host", "0.0.0.0", "--host=::", "--other", "0.0.0.0", "--host", "10.0.0.1"]
    assert bind_any_rewritten(argv, "127.1.0.9") == [
        "serve",
        "--host",
        "127.1.0.9",
        "--host=127.1.0.9",
        "--other",
        "0.0.0.0",
        "--host",
        "10.0.0.1",
    ]


def test_quantities() -> None:
    assert parse_quantity("500m") == parse_quantity("0.5")
    assert parse_quantity("20Gi") == 20 * 2**30
    assert parse_quantity("1e3") == 1000
    assert ceil_divide("1G", "1Mi") == 954
    with pytest.raises(ValueError):
        parse_quantity("12Qi")


# --- addresses and names -------------------------------------------------------------------------------


def test_ip_allocator_is_unique_skips_special_addresses_and_reuses_late() -> None:
    ips = IpAllocator("127.5.0.0/23")
    first = [ips.allocate(f"pod-{i}") for i in range(300)]
    assert len(set(first)) == 300
    assert "127.5.0.0" not in first and "127.5.0.255" not in first and "127.5.1.0" not in first
    assert first[0] == "127.5.0.1" and ips.allocate("pod-0") == first[0]
    ips.release("pod-0")
    assert first[-1] == "127.5.1.46"
    assert ips.allocate("new") == "127.5.1.47"  # the next one round the range, not the freed one
    ips.reserve("left-over", "127.5.1.48")
    assert ips.allocate("newer") == "127.5.1.49"
    assert ips.address_of("left-over") == "127.5.1.48"
    with pytest.raises(ValueError):
        IpAllocator("10.0.0.0/24")


def test_ip_allocator_runs_out() -> None:
    ips = IpAllocator("127.9.9.0/30")
    ips.allocate("a"), ips.allocate("b")
    with pytest.raises(RuntimeError):
        ips.allocate("c")


def test_pod_hostname_uses_spec_hostname_and_truncates() -> None:
    assert pod_hostname(POD) == ("train-0", "train")
    assert pod_hostname({"metadata": {"name": "x" * 70}, "spec": {}}) == ("x" * 63, "")


def record(name: str, ip: str, ready: bool = True, **kw: Any) -> PodRecord:
    return PodRecord(
        namespace=kw.pop("namespace", "ml"), name=name, ip=ip, hostname=kw.pop("hostname", name), ready=ready, **kw
    )


def test_service_maps_to_one_ready_selected_pod() -> None:
    pods = [
        record("old-unready", "127.1.0.2", ready=False, labels={"app": "vllm"}, created="2026-01-01T00:00:00Z"),
        record("b", "127.1.0.4", labels={"app": "vllm"}, created="2026-01-02T00:00:00Z"),
        record("a", "127.1.0.3", labels={"app": "vllm"}, created="2026-01-03T00:00:00Z"),
        record("other-ns", "127.1.0.5", labels={"app": "vllm"}, namespace="prod"),
    ]
    services = [
        ServiceRecord("ml", "vllm", {"app": "vllm"}),
        ServiceRecord("ml", "nothing", {"app": "none"}),
        ServiceRecord("ml", "headless", {"app": "vllm"}, publish_not_ready=True),
    ]
    addresses = service_addresses(services, pods)
    assert addresses == {("ml", "vllm"): "127.1.0.4", ("ml", "headless"): "127.1.0.4"}
    only_unready = service_addresses(services, pods[:1])
    assert only_unready == {("ml", "headless"): "127.1.0.2"}


def test_hosts_file_resolves_self_peers_services_and_the_api_server() -> None:
    me = record("train-1", "127.1.0.8", hostname="train-1", subdomain="train")
    peer = record("train-0", "127.1.0.7", hostname="train-0", subdomain="train")
    elsewhere = record("x-0", "127.1.0.9", hostname="x-0", subdomain="x", namespace="other")
    text = render_hosts(
        me,
        [me, peer, elsewhere],
        {("ml", "vllm"): "127.1.0.3", ("other", "ui"): "127.1.0.4"},
        host_aliases=[{"ip": "127.0.0.2", "hostnames": ["alias.local"]}],
        api_host="127.0.0.1",
    )
    lines = text.splitlines()
    assert lines[1:3] == ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
    own = "127.1.0.8\ttrain-1.train.ml.svc.cluster.local train-1 train-1.train.ml.svc train-1.train.ml train-1.train"
    assert lines[3] == own
    assert "127.1.0.7\ttrain-0.train.ml.svc.cluster.local train-0.train.ml.svc train-0.train.ml train-0.train" in lines
    assert "127.1.0.9\tx-0.x.other.svc.cluster.local x-0.x.other.svc x-0.x.other" in lines
    assert "127.0.0.2\talias.local" in lines
    assert "127.1.0.3\tvllm.ml.svc.cluster.local vllm.ml.svc vllm.ml vllm" in lines
    assert "127.1.0.4\tui.other.svc.cluster.local ui.other.svc ui.other" in lines
    assert "127.0.0.1\tkubernetes.default.svc.cluster.local kubernetes.default.svc kubernetes.default" in lines
    names = [name for line in lines[2:] for name in line.split("\t")[1].split()]
    assert len(names) == len(set(names)), "every name appears once"


def run_with_bind_shim(tmp_path: Path, code: str) -> tuple[str, list[str]]:
    """Run `code` in a Python whose sitecustomize is the agent's bind shim, at a random pod IP; (IP, the words
    it printed). Fails with its stderr when it fails."""
    shutil.copyfile(bindshim.__file__, tmp_path / "sitecustomize.py")
    ip = f"127.{random.randint(100, 250)}.{random.randint(1, 250)}.{random.randint(1, 250)}"
    env = {"PYTHONPATH": str(tmp_path), "KUBETUNE_POD_IP": ip, "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    return ip, result.stdout.split()


def test_bind_shim_binds_all_addresses_to_the_pod_ip(tmp_path: Path) -> None:
    code = (
        "import socket\n"
        "for family, host in ((socket.AF_INET, '0.0.0.0'), (socket.AF_INET, ''), (socket.AF_INET6, '::')):\n"
        "    s = socket.socket(family); s.bind((host, 0)); print(s.getsockname()[0]); s.close()\n"
    )
    ip, printed = run_with_bind_shim(tmp_path, code)
    assert printed == [ip, ip, f"::ffff:{ip}"]


def test_bind_shim_sends_localhost_to_the_processs_own_servers_on_the_pod_ip(tmp_path: Path) -> None:
    code = (
        "import socket, urllib.request, threading, http.server\n"
        "server = http.server.HTTPServer(('0.0.0.0', 0), http.server.SimpleHTTPRequestHandler)\n"
        "port = server.server_address[1]\n"
        "threading.Thread(target=server.serve_forever, daemon=True).start()\n"
        "print(urllib.request.urlopen(f'http://localhost:{port}/', timeout=5).status)\n"
        "print(urllib.request.urlopen(f'http://127.0.0.1:{port}/', timeout=5).status)\n"
        "other = socket.socket(); other.bind(('127.0.0.1', 0)); other.listen()\n"
        "probe = socket.socket(); probe.connect(('127.0.0.1', other.getsockname()[1]))\n"
        "print(probe.getpeername()[0])\n"
    )
    _, printed = run_with_bind_shim(tmp_path, code)
    # Its own server is reached through localhost; a server bound to 127.0.0.1 itself stays there.
    assert printed == ["200", "200", "127.0.0.1"]


# --- node ------------------------------------------------------------------------------------------------


def test_node_manifest_has_gpus_labels_taint_and_no_kwok_annotation() -> None:
    spec = dev_gpu_node("dev-gpu-0", gpus=4)
    manifest = node_manifest(spec)
    assert "annotations" not in manifest["metadata"]
    labels = manifest["metadata"]["labels"]
    assert labels["nvidia.com/gpu.product"] == "NVIDIA-GeForce-RTX-4090-D"
    assert labels["kubetune.io/gpu-type"] == "rtx-4090d"
    assert manifest["spec"]["taints"] == [{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}]
    status = node_status(spec, "2026-01-01T00:00:01Z", "2026-01-01T00:00:00Z")
    assert status["allocatable"]["nvidia.com/gpu"] == "4" and status["capacity"]["memory"] == "20Gi"
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "True" and ready["lastTransitionTime"] == "2026-01-01T00:00:00Z"
    plain = node_manifest(dev_gpu_node("cpu-agent", gpus=0))
    assert plain["spec"]["taints"] == [] and "nvidia.com/gpu.product" not in plain["metadata"]["labels"]


def test_parse_taint() -> None:
    assert parse_taint("a=b:NoSchedule") == {"key": "a", "value": "b", "effect": "NoSchedule"}
    assert parse_taint("a:NoExecute") == {"key": "a", "effect": "NoExecute"}
    with pytest.raises(ValueError):
        parse_taint("a=b")


# --- status ----------------------------------------------------------------------------------------------


def done(name: str, code: int) -> ContainerRecord:
    return ContainerRecord(
        name, state="terminated", exit_code=code, reason="Completed" if code == 0 else "Error", ever_ran=True
    )


def test_pod_phase_follows_containers_and_restart_policy() -> None:
    running = ContainerRecord("a", state="running", ever_ran=True)
    waiting = ContainerRecord("a")
    assert pod_phase("Never", [], [waiting]) == "Pending"
    assert pod_phase("Never", [ContainerRecord("init")], [waiting]) == "Pending"
    assert pod_phase("Never", [done("init", 1)], [waiting]) == "Failed"
    assert pod_phase("OnFailure", [done("init", 1)], [waiting]) == "Pending"
    assert pod_phase("Never", [done("init", 0)], [running]) == "Running"
    assert pod_phase("Never", [], [done("a", 0), done("b", 0)]) == "Succeeded"
    assert pod_phase("Never", [], [done("a", 0), done("b", 2)]) == "Failed"
    assert pod_phase("Never", [], [done("a", 0), running]) == "Running"
    assert pod_phase("Always", [], [done("a", 0)]) == "Running"
    backing_off = ContainerRecord("a", state="waiting", reason="CrashLoopBackOff", ever_ran=True)
    assert pod_phase("OnFailure", [], [backing_off]) == "Running"


def test_container_status_states() -> None:
    record = ContainerRecord("main", image="img", state="running", started_at="t0", ready=True, started=True)
    assert container_status(record)["state"] == {"running": {"startedAt": "t0"}}
    assert container_status(record)["ready"] is True
    record = done("main", 3)
    record.message, record.last_terminated = "boom", {"exitCode": 1}
    status = container_status(record)
    assert status["state"]["terminated"]["exitCode"] == 3
    assert status["state"]["terminated"]["message"] == "boom"
    assert status["lastState"] == {"terminated": {"exitCode": 1}}
    waiting = container_status(ContainerRecord("main", reason="CreateContainerConfigError", message="no cm"))
    assert waiting["state"] == {"waiting": {"reason": "CreateContainerConfigError", "message": "no cm"}}


def test_pod_conditions_keep_transition_times_and_other_conditions() -> None:
    ready = ContainerRecord("a", state="running", ready=True, started=True)
    previous = [
        {"type": "Ready", "status": "True", "lastTransitionTime": "t0"},
        {"type": "DisruptionTarget", "status": "True", "lastTransitionTime": "t0"},
    ]
    conditions = pod_conditions(PodView("Running", True, True, [ready]), previous, "t1")
    by_type = {c["type"]: c for c in conditions}
    assert by_type["Ready"] == {"type": "Ready", "status": "True", "lastTransitionTime": "t0"}
    assert by_type["DisruptionTarget"]["status"] == "True"
    assert by_type["PodScheduled"]["status"] == "True"
    unready = pod_conditions(PodView("Running", True, True, [ContainerRecord("a")]), previous, "t1")
    ready_condition = next(c for c in unready if c["type"] == "Ready")
    assert ready_condition["status"] == "False" and ready_condition["lastTransitionTime"] == "t1"
    assert ready_condition["message"] == "containers with unready status: [a]"
    ended = pod_conditions(PodView("Succeeded", True, True, [done("a", 0)]), [], "t2")
    assert next(c for c in ended if c["type"] == "Ready")["reason"] == "PodCompleted"


def test_ready_waits_for_the_readiness_gates_as_a_kubelet_does() -> None:
    ready = ContainerRecord("a", state="running", ready=True, started=True)
    view = PodView("Running", True, True, [ready], readiness_gates=["kubetune.io/adapters-loaded"])
    closed = {c["type"]: c for c in pod_conditions(view, [], "t1")}
    assert closed["ContainersReady"]["status"] == "True"
    assert (closed["Ready"]["status"], closed["Ready"]["reason"]) == ("False", "ReadinessGatesNotReady")
    gate = {"type": "kubetune.io/adapters-loaded", "status": "True", "lastTransitionTime": "t2"}
    opened = {c["type"]: c for c in pod_conditions(view, [*closed.values(), gate], "t3")}
    assert opened["Ready"]["status"] == "True" and opened["kubetune.io/adapters-loaded"] == gate


def test_restarted_agent_status_fails_the_pod_and_keeps_finished_containers() -> None:
    pod = {
        "spec": {"containers": [{"name": "a"}, {"name": "b"}, {"name": "c", "image": "img"}]},
        "status": {
            "phase": "Running",
            "conditions": [{"type": "Initialized", "status": "True", "lastTransitionTime": "t0"}],
            "containerStatuses": [
                {"name": "a", "state": {"running": {"startedAt": "t0"}}, "restartCount": 2},
                {"name": "b", "state": {"terminated": {"exitCode": 0, "reason": "Completed"}}},
            ],
        },
    }
    status = restarted_agent_status(pod, "t9")
    assert (status["phase"], status["reason"]) == ("Failed", "NodeAgentRestarted")
    a, b, c = status["containerStatuses"]
    assert a["state"]["terminated"]["reason"] == "ContainerStatusUnknown"
    assert a["state"]["terminated"]["startedAt"] == "t0" and a["restartCount"] == 2
    assert b["state"]["terminated"] == {"exitCode": 0, "reason": "Completed"}
    assert c["state"]["terminated"]["exitCode"] == 137 and c["image"] == "img"
    assert next(x for x in status["conditions"] if x["type"] == "Initialized")["lastTransitionTime"] == "t0"


# --- probes ----------------------------------------------------------------------------------------------


def test_probe_tracker_thresholds() -> None:
    tracker = ProbeTracker.start(
        "readiness",
        {"initialDelaySeconds": 5, "periodSeconds": 2, "failureThreshold": 2, "successThreshold": 2},
        now=100.0,
    )
    assert tracker.next_at == 105.0 and tracker.result is None
    assert not tracker.record(True, 105.0) and tracker.result is None
    assert tracker.record(True, 107.0) and tracker.result is True
    assert tracker.next_at == 109.0
    assert not tracker.record(False, 109.0) and tracker.result is True
    assert tracker.record(False, 111.0) and tracker.result is False


def test_resolve_port() -> None:
    assert resolve_port(8000, {}) == 8000
    assert resolve_port("8001", {}) == 8001
    assert resolve_port("http", {"http": 8000}) == 8000
    with pytest.raises(ValueError):
        resolve_port("metrics", {"http": 8000})


# --- volumes ---------------------------------------------------------------------------------------------


def test_volumes_are_materialised_and_mounted(tmp_path: Path) -> None:
    pod = {
        "metadata": {"name": "p", "namespace": "ml", "uid": "u1", "labels": {"app": "x"}},
        "spec": {
            "serviceAccountName": "trainer",
            "containers": [{"name": "main", "resources": {"limits": {"cpu": "2"}}}],
            "volumes": [
                {"name": "cfg", "configMap": {"name": "cfg", "items": [{"key": "greeting", "path": "sub/hello"}]}},
                {"name": "sec", "secret": {"secretName": "creds", "defaultMode": 0o400}},
                {"name": "opt", "secret": {"secretName": "missing", "optional": True}},
                {
                    "name": "info",
                    "downwardAPI": {
                        "items": [
                            {"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}},
                            {"path": "cpu", "resourceFieldRef": {"containerName": "main", "resource": "limits.cpu"}},
                        ]
                    },
                },
                {
                    "name": "kube-api-access",
                    "projected": {
                        "sources": [
                            {"serviceAccountToken": {"path": "token", "expirationSeconds": 3607}},
                            {"configMap": {"name": "cfg", "items": [{"key": "LEVEL", "path": "level"}]}},
                            {
                                "downwardAPI": {
                                    "items": [{"path": "namespace", "fieldRef": {"fieldPath": "metadata.namespace"}}]
                                }
                            },
                        ]
                    },
                },
                {"name": "scratch", "emptyDir": {"medium": "Memory"}},
                {"name": "data", "persistentVolumeClaim": {"claimName": "data", "readOnly": True}},
                {"name": "host", "hostPath": {"path": str(tmp_path / "host"), "type": "DirectoryOrCreate"}},
            ],
        },
    }
    lookup = FakeLookup()
    volumes = PodVolumes(lookup, PodFacts(pod, "127.1.0.2", "127.0.0.1", {}), tmp_path / "pod", tmp_path / "pvc")
    volumes.prepare()
    root = tmp_path / "pod" / "volumes"
    assert (root / "cfg" / "sub" / "hello").read_text() == "hi"
    assert (root / "sec" / "token").read_text() == "s3cret"
    assert (root / "sec" / "token").stat().st_mode & 0o777 == 0o400
    assert (root / "info" / "labels").read_text() == 'app="x"'
    assert (root / "info" / "cpu").read_text() == "2"
    projected = root / "kube-api-access"
    assert (projected / "token").read_text() == "token-trainer-u1-None-1"
    assert (projected / "level").read_text() == "debug"
    assert (projected / "namespace").read_text() == "ml"
    assert (tmp_path / "host").is_dir() and (tmp_path / "pvc" / "ml" / "data").is_dir()
    renew_at = volumes.refresh_tokens()
    assert renew_at is not None and lookup.tokens == 1  # not due yet
    container = {
        "volumeMounts": [
            {"name": "data", "mountPath": "/mnt/pvc/data"},
            {"name": "scratch", "mountPath": "/dev/shm"},
            {"name": "cfg", "mountPath": "/etc/kubetune", "readOnly": True},
            {"name": "host", "mountPath": "/work", "subPathExpr": "$(POD_NAME)"},
        ]
    }
    mounts = volumes.mounts(container, {"POD_NAME": "p"})
    assert mounts == [
        Mount(str(tmp_path / "pvc" / "ml" / "data"), "/mnt/pvc/data", True),
        Mount(str(root / "scratch"), "/dev/shm", False),
        Mount(str(root / "cfg"), "/etc/kubetune", True),
        Mount(str(tmp_path / "host" / "p"), "/work", False),
    ]


@pytest.mark.parametrize(
    "volume",
    [
        {"name": "v", "configMap": {"name": "missing"}},
        {"name": "v", "secret": {"secretName": "creds", "items": [{"key": "nope", "path": "x"}]}},
        {"name": "v", "nfs": {"server": "x", "path": "/"}},
        {"name": "v", "configMap": {"name": "cfg", "items": [{"key": "greeting", "path": "../escape"}]}},
    ],
)
def test_volumes_that_cannot_be_set_up(tmp_path: Path, volume: dict[str, Any]) -> None:
    pod = {"metadata": {"name": "p", "namespace": "ml", "uid": "u"}, "spec": {"containers": [], "volumes": [volume]}}
    volumes = PodVolumes(FakeLookup(), PodFacts(pod, "127.1.0.2", "127.0.0.1"), tmp_path / "pod", tmp_path / "pvc")
    with pytest.raises(VolumeError):
        volumes.prepare()


# --- logs ------------------------------------------------------------------------------------------------


def test_log_files_are_found_by_pod_name(tmp_path: Path) -> None:
    folder = pod_log_dir(tmp_path, "ml", "train-0", "uid-1")
    folder.mkdir(parents=True)
    (folder / "trainer.log").write_text("".join(f"line {i}\n" for i in range(200)))
    assert find_pod_log_dir(tmp_path, "ml", "train-0") == folder
    assert find_pod_log_dir(tmp_path, "ml", "train") is None
    assert container_log(folder, None) == folder / "trainer.log"
    (folder / "sidecar.log").write_text("")
    with pytest.raises(ValueError, match="several containers"):
        container_log(folder, None)
    with pytest.raises(ValueError, match="trainer"):
        container_log(folder, "nope")
    tail = tail_bytes(folder / "trainer.log", lines=3)
    assert tail == "line 197\nline 198\nline 199"


def test_the_agents_own_files_show_through_volumes_mounted_over_them() -> None:
    protected = [Path("/tmp/ci/.venv"), Path("/usr/local/lib/python3.11"), Path("/var/agent")]
    mounts = [
        Mount("/var/agent/pods/u/volumes/tmp", "/tmp"),  # would hide the venv of a clone under /tmp
        Mount("/var/agent/pods/u/volumes/config", "/etc/kubetune-operator"),
        Mount("/var/agent/pods/u/volumes/cache", "/tmp/ci/.venv-cache"),
    ]
    assert hiding_nothing(mounts, protected) == [*mounts, Mount("/tmp/ci/.venv", "/tmp/ci/.venv")]
    assert hiding_nothing(mounts[1:2], protected) == mounts[1:2]


def test_only_a_registry_under_invalid_fails_to_pull() -> None:
    message = pull_failure("registry.invalid/kubetune/trainer:0.1.0")
    assert message is not None and "lookup registry.invalid: no such host" in message
    assert pull_failure("registry.invalid:5000/trainer") is not None
    for image in ("ghcr.io/kubetune/trainer:0.1.0", "python:3.11", "library/invalid", "kubetune/trainer", ""):
        assert pull_failure(image) is None, image
