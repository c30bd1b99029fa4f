"""Two ``kubetune dev up`` clusters on one machine at once, each with its node agent: ports, pod address
ranges and processes of their own; a part that does not start is reported; one component restarts in place.

This module starts its two clusters itself (through the functions behind the CLI), not the session's.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from tests.integration.support import wait_for

from kubetune.dev import podranges
from kubetune.dev.__main__ import main
from kubetune.dev.agent import daemons
from kubetune.dev.controlplane import Cluster, ControlPlane, process_alive
from kubetune.dev.lifecycle import AgentOptions, down, status, up

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the node agent needs root")
AGENT_NODE = AgentOptions().node  # the same Node name in both clusters


@dataclass
class DevCluster:
    """One cluster as `kubetune dev up` left it."""

    state_dir: Path
    cluster: Cluster

    @property
    def plane(self) -> ControlPlane:
        return ControlPlane(self.state_dir)

    @property
    def pod_cidr(self) -> str:
        recorded = podranges.recorded_range(daemons.agent_dir(self.state_dir))
        assert recorded, f"no pod range recorded in {self.state_dir}"
        return recorded

    def ports(self) -> set[int]:
        return set(self.plane.read_state()["ports"].values())


@pytest.fixture(scope="module")
def clusters(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[DevCluster]]:
    started: list[DevCluster] = []
    try:
        for name in ("one", "two"):
            state = tmp_path_factory.mktemp(f"dev-{name}")
            started.append(DevCluster(state, up(state, nodes="cpu=1", agent=AgentOptions())))
        yield started
    finally:
        for dev in started:
            down(dev.state_dir)


def server_pod(name: str, text: str) -> dict[str, Any]:
    """A pod on the agent's Node that answers ``text`` on port 8000 of all addresses."""
    script = (
        "import http.server\n"
        "class Hello(http.server.BaseHTTPRequestHandler):\n"
        "    def do_GET(self):\n"
        f"        self.send_response(200); self.end_headers(); self.wfile.write({text.encode()!r})\n"
        "http.server.HTTPServer(('0.0.0.0', 8000), Hello).serve_forever()\n"
    )
    container = {"name": "main", "image": "python", "command": ["python3", "-c", script]}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"nodeName": AGENT_NODE, "containers": [container]},
    }


def pod_ip(dev: DevCluster, name: str) -> str | None:
    pod = json.loads(dev.cluster.kubectl("get", "pod", name, "-o", "json").stdout)
    running = pod.get("status", {}).get("phase") == "Running"
    return pod["status"].get("podIP") if running else None


def answer(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return str(response.read().decode())
    except OSError:
        return None


def node_names(dev: DevCluster) -> set[str]:
    nodes = json.loads(dev.cluster.kubectl("get", "nodes", "-o", "json").stdout)["items"]
    return {node["metadata"]["name"] for node in nodes}


def test_two_clusters_run_side_by_side_with_ports_and_pod_ranges_of_their_own(clusters: list[DevCluster]) -> None:
    one, two = clusters
    assert status(one.state_dir) and status(two.state_dir)
    assert not one.ports() & two.ports()
    assert one.pod_cidr != two.pod_cidr
    assert node_names(one) == node_names(two) == {"cpu-0", AGENT_NODE}


def test_each_agent_gives_its_pods_addresses_of_its_own_range(clusters: list[DevCluster]) -> None:
    for index, dev in enumerate(clusters):
        dev.cluster.kubectl("apply", "-f", "-", input=json.dumps(server_pod("hello", f"cluster {index}")))
    for index, dev in enumerate(clusters):
        ip = wait_for(lambda dev=dev: pod_ip(dev, "hello"), 60, "the pod to run")
        assert ipaddress.ip_address(ip) in ipaddress.ip_network(dev.pod_cidr), (ip, dev.pod_cidr)
        # Both pods listen on port 8000; each answers at its own address.
        assert wait_for(lambda ip=ip: answer(f"http://{ip}:8000/"), 60, "the pod's server") == f"cluster {index}"


def test_an_operator_that_cannot_start_is_reported(
    clusters: list[DevCluster], capsys: pytest.CaptureFixture[str]
) -> None:
    one = clusters[0]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        args = ["up", "--state-dir", str(one.state_dir), "--nodes", "cpu=1", "--no-agent"]
        assert main([*args, "--operator-metrics-port", str(port)]) == 1
    error = capsys.readouterr().err
    assert "the cluster runs, but the operator did not start: it exited" in error, error
    assert f"--metrics-address 127.0.0.1:{port}" in error and "Address already in use" in error, error
    assert not status(one.state_dir)  # the operator shows as exited
    assert f"{daemons.OPERATOR:<24} exited" in capsys.readouterr().out

    # Once the port is free to choose, the same command starts it, ready (kopf's liveness endpoint answers).
    assert main(args) == 0
    assert "kubetune dev: operator running" in capsys.readouterr().out
    assert status(one.state_dir)
    assert f"{daemons.OPERATOR:<24} healthy" in capsys.readouterr().out


def test_restarting_the_apiserver_keeps_its_port_and_kubeconfig(clusters: list[DevCluster]) -> None:
    two = clusters[1]
    before = two.plane.read_state()
    kubeconfig = two.cluster.kubeconfig.read_text()
    assert main(["restart", "apiserver", "--state-dir", str(two.state_dir)]) == 0
    after = two.plane.read_state()
    assert after["processes"]["kube-apiserver"]["pid"] != before["processes"]["kube-apiserver"]["pid"]
    assert not process_alive(before["processes"]["kube-apiserver"]["pid"])
    assert after["ports"] == before["ports"]
    assert two.cluster.kubeconfig.read_text() == kubeconfig
    assert node_names(two) == {"cpu-0", AGENT_NODE}  # kubectl with the kubeconfig it had
    # The other components as a test calls them: etcd restarts under the apiserver, which reconnects.
    two.plane.restart("etcd")
    wait_for(lambda: two.cluster.kubectl("get", "pod", "hello", check=False).returncode == 0, 60, "the pod, read again")
    wait_for(lambda: all(s.healthy for s in two.plane.status()), 60, "every component healthy")


def cluster_pids(dev: DevCluster) -> list[int]:
    """Every process of one dev cluster: components, agent, operator and the agent's pods."""
    pids = [int(entry["pid"]) for entry in dev.plane.read_state()["processes"].values()]
    for name in (daemons.AGENT, daemons.OPERATOR):
        pid_file = daemons.pid_file(dev.state_dir, name)
        pids += [int(pid_file.read_text())] if pid_file.exists() else []
    pods = daemons.agent_dir(dev.state_dir) / "pods"
    pids += [int(p.read_text()) for p in pods.glob("*/containers/*/pid")]
    return pids


def test_down_of_one_cluster_leaves_the_other_running(clusters: list[DevCluster]) -> None:
    one, two = clusters
    pids = cluster_pids(one)
    assert len(pids) >= 6 and all(process_alive(pid) for pid in pids)  # 5 components and the agent at least
    octet = podranges.octet_of(one.pod_cidr)
    agent_state = daemons.agent_dir(one.state_dir).resolve()
    assert octet is not None and podranges.holder(podranges.default_registry(), octet) == agent_state

    assert main(["down", "--purge", "--state-dir", str(one.state_dir)]) == 0
    assert [pid for pid in pids if process_alive(pid)] == []
    assert not one.state_dir.exists()
    assert podranges.holder(podranges.default_registry(), octet) is None  # the range is free again

    assert status(two.state_dir)
    assert node_names(two) == {"cpu-0", AGENT_NODE}
    ip = pod_ip(two, "hello")
    assert ip and answer(f"http://{ip}:8000/") == "cluster 1"
