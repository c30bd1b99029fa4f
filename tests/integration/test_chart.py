"""The Helm chart on a real control plane: rendered objects accepted, install, CRD upgrade, and the operator
running as the chart's pod (on the node agent) with nothing but the chart's ServiceAccount and RBAC.

This module starts a control plane of its own: the session's operator must not compete with the chart's.
"""

from __future__ import annotations

import json
import shutil
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from tests.helm import CHART, helm, set_flags, template_text
from tests.integration.support import (
    AgentProcess,
    Api,
    example,
    running_agent,
    simulated_ftj,
    started_cluster,
)

from kubetune.dev.controlplane import Cluster

NS = "kubetune-system"
SA = f"system:serviceaccount:{NS}:kubetune"
SERVICE_MONITOR_CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "servicemonitors.monitoring.coreos.com"},
    "spec": {
        "group": "monitoring.coreos.com",
        "names": {"kind": "ServiceMonitor", "plural": "servicemonitors"},
        "scope": "Namespaced",
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}},
            }
        ],
    },
}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with started_cluster(tmp_path_factory.mktemp("chart-cluster")) as started:
        yield started


@pytest.fixture(scope="module")
def api(cluster: Cluster) -> Api:
    return Api(cluster)


@pytest.fixture(scope="module")
def agent(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    """The node the chart's operator pod runs on (no GPUs: training pods go to the kwok GPU nodes)."""
    yield from running_agent(cluster, tmp_path_factory.mktemp("chart-agent"), node="chart-0")


def install_values(agent: AgentProcess) -> dict[str, str]:
    """The operator pod onto the agent's Node; the rest is the chart's defaults."""
    return {
        "nodeSelector": json.dumps({"kubernetes.io/hostname": agent.node}),
        "tolerations": json.dumps([{"key": agent.taint.split("=")[0], "operator": "Exists", "effect": "NoSchedule"}]),
    }


def old_chart(destination: Path) -> Path:
    """A copy of the chart as an earlier release: the FineTuneJob CRD without its ETA column."""
    chart = destination / "kubetune"
    shutil.copytree(CHART, chart)
    path = chart / "templates" / "crds" / "kubetune.io_finetunejobs.yaml"
    header, opening, *body, closing = path.read_text().splitlines(keepends=True)
    crd = yaml.safe_load("".join(body))
    for version in crd["spec"]["versions"]:
        version["additionalPrinterColumns"] = [c for c in version["additionalPrinterColumns"] if c["name"] != "ETA"]
    path.write_text(header + opening + yaml.safe_dump(crd, sort_keys=False) + closing)
    return chart


def printer_columns(api: Api) -> list[str]:
    crd = json.loads(api.kubectl("get", "crd", "finetunejobs.kubetune.io", "-o", "json").stdout)
    return [c["name"] for c in crd["spec"]["versions"][0]["additionalPrinterColumns"]]


def can_i(api: Api, *args: str) -> bool:
    result = api.kubectl("auth", "can-i", f"--as={SA}", *args, check=False)
    return result.stdout.strip() == "yes"


def apply_rbac(api: Api) -> None:
    """Only the chart's ServiceAccount and RBAC (no operator Deployment)."""
    api.kubectl("create", "namespace", NS, check=False)
    shown = ["--show-only", "templates/serviceaccount.yaml", "--show-only", "templates/rbac.yaml"]
    rendered = helm("template", "kubetune", str(CHART), "-n", NS, *shown).stdout
    api.kubectl("apply", "--server-side", "-f", "-", input=rendered)


def operator_pod(api: Api) -> dict[str, Any]:
    pods = api.kube.list("Pod", NS, "app.kubernetes.io/component=operator")
    running = [p for p in pods if p["status"].get("phase") == "Running"]
    assert len(running) == 1, [p["metadata"]["name"] for p in pods]
    return running[0]


def test_rendered_chart_is_accepted_by_the_api_server(api: Api) -> None:
    for namespace in (NS, "argocd", "team-a"):
        api.kubectl("create", "namespace", namespace, check=False)
    api.apply(SERVICE_MONITOR_CRD)
    api.kubectl("wait", "--for=condition=Established", "crd/servicemonitors.monitoring.coreos.com")
    variants: list[dict[str, str]] = [
        {},
        {"watchNamespaces": '["team-a"]', "crds.install": "false"},
        {"metrics.serviceMonitor.enabled": "true", "dashboards.enabled": "true", "argocd.healthChecks": "true"},
    ]
    for values in variants:
        rendered = template_text(namespace=NS, **values)
        result = api.kubectl("apply", "--dry-run=server", "-f", "-", input=rendered, check=False)
        assert result.returncode == 0, f"{values}: {result.stderr}"


def test_install_upgrade_and_run_the_flow_with_the_charts_rbac_only(
    api: Api, agent: AgentProcess, tmp_path: Path
) -> None:
    values = set_flags(install_values(agent))
    kubeconfig = api.cluster.kubeconfig
    helm(
        "install",
        "kubetune",
        str(old_chart(tmp_path)),
        "-n",
        NS,
        "--create-namespace",
        *values,
        "--wait",
        "--timeout",
        "180s",
        kubeconfig=kubeconfig,
    )
    assert "ETA" not in printer_columns(api)

    # The upgrade path of the CRDs: they are templates, so `helm upgrade` brings the new schema.
    helm("upgrade", "kubetune", str(CHART), "-n", NS, *values, "--wait", "--timeout", "180s", kubeconfig=kubeconfig)
    assert "ETA" in printer_columns(api)

    # The operator is the chart's pod, run by the node agent: its only credentials are the token of the
    # chart's ServiceAccount (no kubeconfig in its environment).
    pod = operator_pod(api)
    assert pod["spec"]["serviceAccountName"] == "kubetune"
    pid_file = next((agent.state_dir / "pods" / pod["metadata"]["uid"] / "containers" / "operator").glob("pid"))
    environ = Path(f"/proc/{int(pid_file.read_text())}/environ").read_bytes().split(b"\0")
    assert not [e for e in environ if e.startswith(b"KUBECONFIG=")]

    ns = api.create_namespace()
    api.apply(simulated_ftj("sft", ns))
    status = api.wait_state("FineTuneJob", ns, "sft", "Succeeded", 120)
    assert status["conditions"]
    assert api.kube.list("Role", ns), "the operator could not grant the trainer its per-job Role"
    server = example("modelserver.yaml", "qwen", ns, adapters=[], ui={"enabled": False})
    del server["spec"]["adapterSelector"]
    api.apply(server)
    assert api.wait_state("ModelServer", ns, "qwen", "Ready", 90)["endpoint"] == f"http://qwen.{ns}.svc:8000/v1"

    with urllib.request.urlopen(f"http://{pod['status']['podIP']}:8000/metrics", timeout=10) as response:
        metrics = response.read().decode()
    assert 'kubetune_finetunejobs{state="Succeeded"} 1.0' in metrics
    assert "kubetune_modelservers_ready 1.0" in metrics

    logs = "".join(p.read_text() for p in (agent.state_dir / "logs" / NS).glob(f"*_{pod['metadata']['uid']}/*.log"))
    assert logs, "the operator pod wrote no log"
    assert "Forbidden" not in logs, logs

    helm("uninstall", "kubetune", "-n", NS, "--wait", kubeconfig=kubeconfig)
    assert not api.kube.list("Deployment", NS)
    assert printer_columns(api), "the CRDs stay after uninstall"
    assert api.get("FineTuneJob", ns, "sft"), "and so do the FineTuneJobs"


@pytest.mark.parametrize(
    ("verb", "resource", "namespace"),
    [
        ("get", "secrets", "default"),
        ("list", "secrets", NS),
        ("delete", "namespaces", None),
        ("create", "clusterrolebindings", None),
        ("patch", "nodes", None),
        ("delete", "finetunejobs.kubetune.io", "default"),
        ("update", "modelservers.kubetune.io", "default"),
        ("delete", "deployments.apps", "default"),
        ("get", "configmaps", "kube-system"),
        ("create", "configmaps", "default"),  # the trainer's configuration travels in its pod's annotation
        ("create", "pods", "default"),
    ],
)
def test_charts_service_account_is_not_broader_than_needed(
    api: Api, verb: str, resource: str, namespace: str | None
) -> None:
    apply_rbac(api)
    args = [verb, resource] + (["-n", namespace] if namespace else [])
    assert not can_i(api, *args), f"the operator may {' '.join(args)}"


def test_charts_service_account_has_what_the_operator_does(api: Api) -> None:
    apply_rbac(api)
    for args in (
        ("patch", "finetunejobs.kubetune.io", "--subresource=status"),
        ("watch", "modelservers.kubetune.io"),
        ("create", "jobs.batch"),
        ("patch", "deployments.apps"),
        ("create", "roles.rbac.authorization.k8s.io"),
        ("create", "events"),
        # The view of its own children (handlers/children.py), a look at a name someone holds, FailedMount Events.
        ("watch", "services"),
        ("get", "serviceaccounts"),
        ("watch", "rolebindings.rbac.authorization.k8s.io"),
        ("get", "jobs.batch"),
        ("list", "events"),
    ):
        assert can_i(api, *args, "-n", "default"), args
