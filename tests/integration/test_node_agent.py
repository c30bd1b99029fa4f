"""The node agent runs pods for real: env, volumes, tokens, probes, addresses, restarts, deletion, Jobs.

One agent (a process, as root) serves a Node of its own for this module. The Node is tainted and has no
GPU labels, so nothing of the other tests lands on it; every pod here names it in spec.nodeName.
"""

from __future__ import annotations

import os
import signal
import textwrap
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.integration.support import AgentProcess, Api, running_agent, wait_for

from kubetune.dev.agent.logs import find_pod_log_dir
from kubetune.dev.controlplane import Cluster
from kubetune.k8s.client import Kube

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the node agent needs root")


@pytest.fixture(scope="module")
def agent(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    yield from running_agent(cluster, tmp_path_factory.mktemp("agent"), node=f"agent-test-{uuid.uuid4().hex[:6]}")


@pytest.fixture(scope="module")
def api(cluster: Cluster) -> Api:
    return Api(cluster)


@pytest.fixture(scope="module")
def ns(api: Api, agent: AgentProcess) -> Iterator[str]:
    name = api.create_namespace()
    yield name
    # Pods are deleted while the agent still runs, so it stops their processes.
    api.kubectl("delete", "pods,jobs,services,configmaps,secrets", "--all", "-n", name, "--wait=false", check=False)
    wait_for(lambda: not api.kube.list("Pod", name) or None, 60, f"pods of {name} to be gone")
    api.kubectl("delete", "namespace", name, "--wait=false", check=False)


def pod(name: str, node: str, script: str, restart: str = "Never", **spec: Any) -> dict[str, Any]:
    """A pod on the agent's node running a Python script (images are ignored)."""
    container: dict[str, Any] = {
        "name": "main",
        "image": "python",
        "command": ["python3", "-c", textwrap.dedent(script)],
        **spec.pop("container", {}),
    }
    labels = spec.pop("labels", {})
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels, "annotations": spec.pop("annotations", {})},
        "spec": {"nodeName": node, "restartPolicy": restart, "containers": [container], **spec},
    }


def create(kube: Kube, namespace: str, manifest: dict[str, Any]) -> dict[str, Any]:
    manifest["metadata"]["namespace"] = namespace
    return kube.create(manifest)


def phase_is(kube: Kube, namespace: str, name: str, *phases: str) -> dict[str, Any] | None:
    obj = kube.get("Pod", namespace, name)
    return obj if obj and obj.get("status", {}).get("phase") in phases else None


def wait_phase(kube: Kube, namespace: str, name: str, *phases: str, timeout: float = 60) -> dict[str, Any]:
    return wait_for(lambda: phase_is(kube, namespace, name, *phases), timeout, f"pod {name} in {phases}")


def ready(kube: Kube, namespace: str, name: str) -> dict[str, Any] | None:
    obj = kube.get("Pod", namespace, name) or {}
    conditions = {c["type"]: c["status"] for c in obj.get("status", {}).get("conditions", [])}
    return obj if conditions.get("Ready") == "True" else None


def log_of(agent: AgentProcess, namespace: str, name: str, container: str = "main") -> str:
    folder = find_pod_log_dir(agent.state_dir / "logs", namespace, name)
    return (folder / f"{container}.log").read_text() if folder else ""


def terminated(obj: dict[str, Any], container: str = "main") -> dict[str, Any]:
    statuses = {s["name"]: s for s in obj["status"]["containerStatuses"]}
    return dict(statuses[container]["state"]["terminated"])


WHOAMI = """
    import json, os, ssl, urllib.request
    sa = "/var/run/secrets/kubernetes.io/serviceaccount"
    print("CONFIG", open("/etc/kubetune/trainer.yaml").read().strip())
    print("SECRET", open("/etc/creds/token-file").read().strip(), os.environ["API_KEY"])
    print("DOWNWARD", open("/etc/podinfo/labels").read().strip(), os.environ["MY_NAME"], os.environ["INDEX"])
    print("FROM_CM", os.environ["GREETING"])
    print("POD_IP", os.environ["POD_IP"], os.environ["HOST"])
    token = open(sa + "/token").read()
    review = urllib.request.Request(
        f"https://{os.environ['KUBERNETES_SERVICE_HOST']}:{os.environ['KUBERNETES_SERVICE_PORT']}"
        "/apis/authentication.k8s.io/v1/selfsubjectreviews",
        data=json.dumps({"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"}).encode(),
        headers={"Authorization": "Bearer " + token, "Content-Type": "application/json"},
        method="POST",
    )
    context = ssl.create_default_context(cafile=sa + "/ca.crt")
    user = json.load(urllib.request.urlopen(review, context=context))["status"]["userInfo"]
    print("WHOAMI", user["username"], user["extra"]["authentication.kubernetes.io/pod-name"][0])
    print("NAMESPACE", open(sa + "/namespace").read())
"""


def test_pod_sees_its_env_volumes_and_a_working_token(api: Api, agent: AgentProcess, ns: str) -> None:
    kube = api.kube
    create(
        kube,
        ns,
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "cfg"},
            "data": {"trainer.yaml": "steps: 7", "greeting": "hello-cm"},
        },
    )
    create(
        kube,
        ns,
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "creds"},
            "stringData": {"token": "s3cret-file", "API_KEY": "s3cret-env"},
        },
    )
    env = [
        {"name": "MY_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "INDEX", "valueFrom": {"fieldRef": {"fieldPath": "metadata.annotations['example.com/index']"}}},
        {"name": "GREETING", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "greeting"}}},
    ]
    mounts = [
        {"name": "config", "mountPath": "/etc/kubetune", "readOnly": True},
        {"name": "creds", "mountPath": "/etc/creds", "readOnly": True},
        {"name": "podinfo", "mountPath": "/etc/podinfo"},
    ]
    volumes = [
        {"name": "config", "configMap": {"name": "cfg", "items": [{"key": "trainer.yaml", "path": "trainer.yaml"}]}},
        {"name": "creds", "secret": {"secretName": "creds", "items": [{"key": "token", "path": "token-file"}]}},
        {
            "name": "podinfo",
            "downwardAPI": {"items": [{"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}}]},
        },
    ]
    container = {"env": env, "envFrom": [{"secretRef": {"name": "creds"}}], "volumeMounts": mounts}
    manifest = pod(
        "whoami",
        agent.node,
        WHOAMI,
        container=container,
        volumes=volumes,
        labels={"app": "whoami"},
        annotations={"example.com/index": "5"},
    )
    create(kube, ns, manifest)
    obj = wait_phase(kube, ns, "whoami", "Succeeded", "Failed")
    log = log_of(agent, ns, "whoami")
    assert obj["status"]["phase"] == "Succeeded", log
    assert terminated(obj) | {"exitCode": 0, "reason": "Completed"} == terminated(obj)
    ip = obj["status"]["podIP"]
    assert ip.startswith("127.") and ip != "127.0.0.1"
    assert obj["status"]["podIPs"] == [{"ip": ip}]
    assert "CONFIG steps: 7" in log
    assert "SECRET s3cret-file s3cret-env" in log
    assert 'DOWNWARD app="whoami" whoami 5' in log
    assert "FROM_CM hello-cm" in log
    assert f"POD_IP {ip} {ip}" in log
    assert f"WHOAMI system:serviceaccount:{ns}:default whoami" in log
    assert f"NAMESPACE {ns}" in log


def test_failing_command_reports_exit_code_and_termination_message(api: Api, agent: AgentProcess, ns: str) -> None:
    manifest = pod(
        "fails",
        agent.node,
        """
        import sys
        open("/dev/termination-log", "w").write("dataset has no rows")
        sys.exit(3)
        """,
    )
    fallback = {
        "name": "fallback",
        "image": "python",
        "command": [
            "python3",
            "-c",
            "import sys; print('first line'); print('the last words', file=sys.stderr); sys.exit(2)",
        ],
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    manifest["spec"]["containers"].append(fallback)
    create(api.kube, ns, manifest)
    obj = wait_phase(api.kube, ns, "fails", "Failed", "Succeeded")
    assert obj["status"]["phase"] == "Failed"
    main = terminated(obj)
    assert (main["exitCode"], main["reason"], main["message"]) == (3, "Error", "dataset has no rows")
    other = terminated(obj, "fallback")
    assert other["exitCode"] == 2
    assert "the last words" in other["message"]


SERVER = """
    import http.server, os, sys
    host = sys.argv[sys.argv.index("--host") + 1] if "--host" in sys.argv else os.environ["POD_IP"]
    print("LISTEN", host, flush=True)
    class Hello(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()
            self.wfile.write(os.environ["HOSTNAME"].encode())
    http.server.HTTPServer((host, 8000), Hello).serve_forever()
"""
READINESS = {"httpGet": {"path": "/", "port": "http"}, "periodSeconds": 1}


def server_pod(name: str, node: str, args: list[str] | None = None, script: str = SERVER) -> dict[str, Any]:
    container = {"args": args or [], "ports": [{"name": "http", "containerPort": 8000}], "readinessProbe": READINESS}
    return pod(name, node, script, restart="Always", container=container, labels={"app": name})


def get_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return str(response.read().decode())


def test_readiness_probe_makes_the_pod_ready(api: Api, agent: AgentProcess, ns: str) -> None:
    create(api.kube, ns, server_pod("ready", agent.node))
    obj = wait_for(lambda: ready(api.kube, ns, "ready"), 60, "pod ready to be Ready")
    status = obj["status"]["containerStatuses"][0]
    assert status["ready"] is True and "running" in status["state"]
    assert get_text(f"http://{obj['status']['podIP']}:8000/") == "ready"


def test_two_pods_listening_on_all_addresses_at_port_8000_do_not_collide(
    api: Api, agent: AgentProcess, ns: str
) -> None:
    # One is rewritten by the agent (--host 0.0.0.0 -> pod IP), one by the bind shim (python -m http.server).
    create(api.kube, ns, server_pod("any-a", agent.node, ["--host", "0.0.0.0"]))
    module = "import runpy, sys; sys.argv = ['x', '8000']; runpy.run_module('http.server', run_name='__main__')"
    probe = {"readinessProbe": {"tcpSocket": {"port": 8000}, "periodSeconds": 1}}
    create(api.kube, ns, pod("any-b", agent.node, module, restart="Always", container=probe))
    a = wait_for(lambda: ready(api.kube, ns, "any-a"), 60, "any-a Ready")
    b = wait_for(lambda: ready(api.kube, ns, "any-b"), 60, "any-b Ready")
    assert a["status"]["podIP"] != b["status"]["podIP"]
    assert get_text(f"http://{a['status']['podIP']}:8000/") == "any-a"
    assert f"LISTEN {a['status']['podIP']}" in log_of(agent, ns, "any-a")
    assert "Directory listing" in get_text(f"http://{b['status']['podIP']}:8000/")
    for name in ("any-a", "any-b"):
        assert (api.kube.get("Pod", ns, name) or {})["status"]["containerStatuses"][0]["restartCount"] == 0


def test_service_name_resolves_to_a_ready_pod(api: Api, agent: AgentProcess, ns: str) -> None:
    create(api.kube, ns, server_pod("backend", agent.node))
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "backend-svc"},
        "spec": {"selector": {"app": "backend"}, "ports": [{"port": 8000, "targetPort": 8000}]},
    }
    create(api.kube, ns, service)
    backend = wait_for(lambda: ready(api.kube, ns, "backend"), 60, "backend Ready")
    client = """
        import time, urllib.request
        for _ in range(100):
            try:
                print("GOT", urllib.request.urlopen("http://backend-svc:8000/", timeout=2).read().decode())
                break
            except OSError as error:
                print("retry", error)
                time.sleep(0.3)
    """
    create(api.kube, ns, pod("client", agent.node, client))
    wait_phase(api.kube, ns, "client", "Succeeded")
    assert "GOT backend" in log_of(agent, ns, "client"), log_of(agent, ns, "client")
    hosts = (agent.state_dir / "pods" / backend["metadata"]["uid"] / "etc" / "hosts").read_text()
    assert f"{backend['status']['podIP']}\tbackend-svc.{ns}.svc.cluster.local" in hosts


def test_deleting_a_running_pod_sends_sigterm_and_removes_it(
    api: Api, agent: AgentProcess, ns: str, tmp_path: Path
) -> None:
    script = """
        import signal, sys, time
        def bye(signum, frame):
            open("/out/terminated", "w").write(str(signum))
            sys.exit(0)
        signal.signal(signal.SIGTERM, bye)
        print("waiting", flush=True)
        time.sleep(600)
    """
    manifest = pod(
        "stopme",
        agent.node,
        script,
        container={
            "volumeMounts": [{"name": "out", "mountPath": "/out"}],
            "lifecycle": {"preStop": {"sleep": {"seconds": 1}}},
        },
        volumes=[{"name": "out", "hostPath": {"path": str(tmp_path), "type": "Directory"}}],
    )
    create(api.kube, ns, manifest)
    wait_phase(api.kube, ns, "stopme", "Running")
    wait_for(lambda: "waiting" in log_of(agent, ns, "stopme"), 30, "the script to run")
    started = time.monotonic()
    api.kubectl("delete", "pod", "stopme", "-n", ns, "--grace-period=20", "--wait=false")
    wait_for(lambda: api.kube.get("Pod", ns, "stopme") is None, 30, "pod stopme to disappear")
    assert 1 <= time.monotonic() - started < 15  # the preStop sleep, then SIGTERM ended it at once
    assert (tmp_path / "terminated").read_text() == str(int(signal.SIGTERM))


def test_a_claim_keeps_its_files_across_pods(api: Api, agent: AgentProcess, ns: str) -> None:
    api.create_bound_pvc(ns, "data")
    volumes = [{"name": "data", "persistentVolumeClaim": {"claimName": "data"}}]
    mounts = {"volumeMounts": [{"name": "data", "mountPath": "/mnt/pvc/data"}]}
    write = "open('/mnt/pvc/data/note.txt', 'w').write('kept')"
    read = "print('READ', open('/mnt/pvc/data/note.txt').read())"
    create(api.kube, ns, pod("writer", agent.node, write, container=mounts, volumes=volumes))
    assert wait_phase(api.kube, ns, "writer", "Succeeded", "Failed")["status"]["phase"] == "Succeeded"
    api.kube.delete("Pod", ns, "writer")
    create(api.kube, ns, pod("reader", agent.node, read, container=mounts, volumes=volumes))
    assert wait_phase(api.kube, ns, "reader", "Succeeded", "Failed")["status"]["phase"] == "Succeeded"
    assert "READ kept" in log_of(agent, ns, "reader")


def test_init_containers_run_first_in_order(api: Api, agent: AgentProcess, ns: str) -> None:
    shared = [{"name": "shared", "mountPath": "/shared"}]
    init = [
        {
            "name": name,
            "image": "python",
            "command": ["python3", "-c", f"open('/shared/order', 'a').write('{name} ')"],
            "volumeMounts": shared,
        }
        for name in ("first", "second")
    ]
    manifest = pod(
        "with-init",
        agent.node,
        "print('ORDER', open('/shared/order').read())",
        container={"volumeMounts": shared},
        initContainers=init,
        volumes=[{"name": "shared", "emptyDir": {}}],
    )
    create(api.kube, ns, manifest)
    obj = wait_phase(api.kube, ns, "with-init", "Succeeded", "Failed")
    assert obj["status"]["phase"] == "Succeeded"
    assert "ORDER first second" in log_of(agent, ns, "with-init")
    reasons = [s["state"]["terminated"]["reason"] for s in obj["status"]["initContainerStatuses"]]
    assert reasons == ["Completed", "Completed"]


def test_on_failure_restarts_the_container_until_it_succeeds(api: Api, agent: AgentProcess, ns: str) -> None:
    script = """
        import os, sys
        path = "/scratch/runs"
        runs = int(open(path).read()) + 1 if os.path.exists(path) else 1
        open(path, "w").write(str(runs))
        print("run", runs)
        sys.exit(0 if runs >= 3 else 1)
    """
    container = {"volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}]}
    manifest = pod(
        "flaky",
        agent.node,
        script,
        restart="OnFailure",
        container=container,
        volumes=[{"name": "scratch", "emptyDir": {}}],
    )
    create(api.kube, ns, manifest)
    obj = wait_phase(api.kube, ns, "flaky", "Succeeded", "Failed", timeout=90)
    status = obj["status"]["containerStatuses"][0]
    assert obj["status"]["phase"] == "Succeeded"
    assert status["restartCount"] == 2
    assert status["lastState"]["terminated"]["exitCode"] == 1
    assert log_of(agent, ns, "flaky").split() == ["run", "1", "run", "2", "run", "3"]


def test_liveness_failure_restarts_the_container(api: Api, agent: AgentProcess, ns: str) -> None:
    script = """
        import os, time
        if not os.path.exists("/scratch/broke-once"):
            open("/scratch/broke-once", "w").close()
        else:
            open("/tmp/healthy", "w").close()
        time.sleep(600)
    """
    liveness = {"exec": {"command": ["cat", "/tmp/healthy"]}, "periodSeconds": 1, "failureThreshold": 2}
    container = {
        "livenessProbe": liveness,
        "volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}, {"name": "tmp", "mountPath": "/tmp"}],
    }
    volumes = [{"name": "scratch", "emptyDir": {}}, {"name": "tmp", "emptyDir": {}}]
    create(api.kube, ns, pod("liveness", agent.node, script, restart="Always", container=container, volumes=volumes))

    def restarted_once() -> dict[str, Any] | None:
        obj = api.kube.get("Pod", ns, "liveness") or {}
        statuses = obj.get("status", {}).get("containerStatuses") or [{}]
        return obj if statuses[0].get("restartCount") == 1 and "running" in statuses[0].get("state", {}) else None

    obj = wait_for(restarted_once, 60, "one restart after a failed liveness probe")
    assert obj["status"]["containerStatuses"][0]["lastState"]["terminated"]["exitCode"] in (137, 143)
    time.sleep(3)  # the second run is healthy: no more restarts
    assert (api.kube.get("Pod", ns, "liveness") or {})["status"]["containerStatuses"][0]["restartCount"] == 1


def test_indexed_job_pods_find_pod_zero_by_its_dns_name(api: Api, agent: AgentProcess, ns: str) -> None:
    script = """
        import os, socket, sys, time
        index = int(os.environ["JOB_COMPLETION_INDEX"])
        if index == 0:
            server = socket.create_server((os.environ["POD_IP"], 29500))
            server.settimeout(60)
            connection, _ = server.accept()
            print("PEER", connection.recv(100).decode())
            sys.exit(0)
        master = os.environ["MASTER_ADDR"]
        for _ in range(200):
            try:
                address = socket.gethostbyname(master)
                with socket.create_connection((address, 29500), timeout=2) as connection:
                    connection.sendall(b"hello from 1")
                break
            except OSError:
                time.sleep(0.2)
        print("RESOLVED", master, address)
    """
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "rdzv"},
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {"job-name": "train"},
            "ports": [{"port": 29500}],
        },
    }
    create(api.kube, ns, service)
    template = pod(
        "x", agent.node, script, container={"env": [{"name": "MASTER_ADDR", "value": f"train-0.rdzv.{ns}.svc"}]}
    )
    template["spec"]["subdomain"] = "rdzv"
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "train"},
        "spec": {
            "completionMode": "Indexed",
            "completions": 2,
            "parallelism": 2,
            "backoffLimit": 0,
            "template": {"spec": template["spec"]},
        },
    }
    create(api.kube, ns, job)

    def pods_done() -> list[dict[str, Any]] | None:
        pods = api.kube.list("Pod", ns, "job-name=train")
        phases = [p.get("status", {}).get("phase") for p in pods]
        return pods if len(pods) == 2 and all(ph in ("Succeeded", "Failed") for ph in phases) else None

    pods = {
        p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"]: p
        for p in wait_for(pods_done, 90, "both job pods to end")
    }
    zero, one = pods["0"], pods["1"]
    log_one = log_of(agent, ns, one["metadata"]["name"])
    assert f"RESOLVED train-0.rdzv.{ns}.svc {zero['status']['podIP']}" in log_one, log_one
    assert "PEER hello from 1" in log_of(agent, ns, zero["metadata"]["name"])
    assert all(p["status"]["phase"] == "Succeeded" for p in pods.values())
    assert zero["status"]["podIP"] != one["status"]["podIP"]


def test_dev_logs_prints_a_container_log(agent: AgentProcess, ns: str, capfd: pytest.CaptureFixture[str]) -> None:
    from kubetune.dev.__main__ import main

    assert main(["logs", "flaky", "-n", ns, "--agent-dir", str(agent.state_dir), "--tail", "2"]) == 0
    assert capfd.readouterr().out.split() == ["run", "2", "run", "3"]
    assert main(["logs", "no-such-pod", "-n", ns, "--agent-dir", str(agent.state_dir)]) == 1


def test_agent_restart_fails_the_pods_of_its_previous_run(api: Api, agent: AgentProcess, ns: str) -> None:
    create(api.kube, ns, pod("orphan", agent.node, "import time; print('up', flush=True); time.sleep(600)"))
    obj = wait_phase(api.kube, ns, "orphan", "Running")
    wait_for(lambda: "up" in log_of(agent, ns, "orphan"), 30, "orphan to run")
    pid = int((agent.state_dir / "pods" / obj["metadata"]["uid"] / "containers" / "main" / "pid").read_text())
    agent.stop(signal.SIGKILL)  # a crash: the pod's process survives it
    assert Path(f"/proc/{pid}").exists()
    agent.start()
    obj = wait_phase(api.kube, ns, "orphan", "Failed", timeout=30)
    assert obj["status"]["reason"] == "NodeAgentRestarted"
    assert terminated(obj)["reason"] == "ContainerStatusUnknown"
    wait_for(lambda: not Path(f"/proc/{pid}").exists() or None, 10, "the leftover process to be killed")
    # The restarted agent still runs new pods.
    create(api.kube, ns, pod("after-restart", agent.node, "print('fine')"))
    assert wait_phase(api.kube, ns, "after-restart", "Succeeded", "Failed")["status"]["phase"] == "Succeeded"
