"""The Helm chart on a real control plane: rendered objects accepted, install, CRD upgrade, and the operator
running as the chart's pod (on the node agent) with nothing but the chart's ServiceAccount and RBAC.

This module starts a control plane of its own: the session's operator must not compete with the chart's.
"""

from __future__ import annotations

import copy
import json
import shutil
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from tests.helm import CHART, helm, set_flags, template_text
from tests.integration.support import (
    EXAMPLES,
    AgentProcess,
    Api,
    example,
    running_agent,
    simulated_ftj,
    started_cluster,
    wait_for,
)

from kubetune.api.v1alpha1 import FineTuneJob, ModelServer, Plan
from kubetune.config import OperatorConfig
from kubetune.dev.controlplane import Cluster
from kubetune.render import finetunejob, modelserver, prepare

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


def apply_policy(api: Api) -> None:
    """The chart's ServiceAccount, RBAC and admission policy; returns once the API server enforces the policy."""
    api.kubectl("create", "namespace", NS, check=False)
    shown = [f"--show-only=templates/{name}.yaml" for name in ("serviceaccount", "rbac", "admission-policy")]
    rendered = helm("template", "kubetune", str(CHART), "-n", NS, *shown).stdout
    api.kubectl("apply", "--server-side", "-f", "-", input=rendered)
    wait_policy_enforced(api)


def wait_policy_enforced(api: Api) -> None:
    """Wait until the policy refuses a Job of the operator's account that is not kubetune's (policies take
    effect a moment after they are created)."""
    bare = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "bare"},
        "spec": {"template": {"spec": {"restartPolicy": "Never", "containers": [{"name": "c", "image": "busybox"}]}}},
    }
    wait_for(lambda: "ValidatingAdmissionPolicy" in create_as_operator(api, bare, "default").stderr, 60, "the policy")


def create_as_operator(api: Api, manifest: dict[str, Any], namespace: str) -> Any:
    """``kubectl create --dry-run=server`` as the operator's ServiceAccount: every admission step runs."""
    body = {**manifest, "metadata": {**manifest["metadata"], "namespace": namespace}}
    args = ["create", "--dry-run=server", f"--as={SA}", "-n", namespace, "-f", "-"]
    return api.kubectl(*args, input=json.dumps(body), check=False)


def rendered_children(namespace: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The training Job and the Deployments (server, chat page) exactly as the operator renders them."""
    ftj = yaml.safe_load((EXAMPLES / "finetunejob-sft.yaml").read_text())
    ftj["metadata"] |= {"namespace": namespace, "uid": str(uuid.uuid4())}
    plan = Plan(zero_stage=3, micro_batch_size=1, gradient_accumulation_steps=16, world_size=4)
    (job,) = [
        c for c in finetunejob.children(FineTuneJob.model_validate(ftj), plan, OperatorConfig()) if c["kind"] == "Job"
    ]
    server = yaml.safe_load((EXAMPLES / "modelserver.yaml").read_text())
    server["metadata"] |= {"namespace": namespace, "uid": str(uuid.uuid4())}
    served = modelserver.children(ModelServer.model_validate(server), [], OperatorConfig())
    return job, [c for c in served if c["kind"] == "Deployment"]


def prepare_job(training_job: dict[str, Any]) -> dict[str, Any]:
    """The prepare Job the operator renders before that training Job (its CPU step, same namespace and owner)."""
    namespace = training_job["metadata"]["namespace"]
    ftj = yaml.safe_load((EXAMPLES / "finetunejob-sft.yaml").read_text())
    ftj["metadata"] |= {"namespace": namespace, "uid": training_job["metadata"]["ownerReferences"][0]["uid"]}
    model = FineTuneJob.model_validate(ftj)
    plan = Plan(zero_stage=3, micro_batch_size=1, gradient_accumulation_steps=16, world_size=4)
    return prepare.prepare_job(model, finetunejob.trainer_config(model, plan, None), OperatorConfig(), "cache")


def operator_pod(api: Api) -> dict[str, Any]:
    """The operator pod that reconciles: the holder of the Lease (the chart runs two replicas; one waits)."""

    def leader() -> dict[str, Any] | None:
        pods = api.kube.list("Pod", NS, "app.kubernetes.io/component=operator")
        running = {p["metadata"]["name"]: p for p in pods if p["status"].get("phase") == "Running"}
        lease = api.get("Lease", NS, "kubetune") or {}
        holder = (lease.get("spec") or {}).get("holderIdentity")
        return running[holder] if len(running) == 2 and holder in running else None

    return wait_for(leader, 60, "two operator replicas, one of them holding the Lease")


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

    # The operator's children must pass the chart's admission policy, which is in force from here on.
    wait_policy_enforced(api)
    ns = api.create_namespace()
    api.apply(simulated_ftj("sft", ns))
    status = api.wait_state("FineTuneJob", ns, "sft", "Succeeded", 120)
    assert status["conditions"]
    assert api.get("Role", ns, "kubetune-trainer"), "the operator could not grant the trainer its Role"
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
        ("patch", "modelservers.kubetune.io/scale", "default"),  # the replica count is the autoscalers'
        ("patch", "pods", "default"),  # only their status: the readiness gate
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
        ("watch", "events"),
        # A server pod's readiness gate and its NetworkPolicy (docs/serving.md; the ScaledObject rule, for a
        # kind this cluster does not serve, is in tests/unit/test_chart.py).
        ("patch", "pods", "--subresource=status"),
        ("create", "networkpolicies.networking.k8s.io"),
        ("delete", "networkpolicies.networking.k8s.io"),
    ):
        assert can_i(api, *args, "-n", "default"), args


def test_admission_policy_compiles_against_the_schemas_of_jobs_and_deployments(api: Api) -> None:
    apply_policy(api)

    def type_checked() -> dict[str, Any] | None:
        policy = json.loads(api.kubectl("get", "validatingadmissionpolicy", "kubetune-children", "-o", "json").stdout)
        status = policy.get("status") or {}
        return status if status.get("observedGeneration") == policy["metadata"]["generation"] else None

    status = wait_for(type_checked, 60, "the policy's type check")
    assert not (status.get("typeChecking") or {}).get("expressionWarnings"), status


def with_pod_spec(manifest: dict[str, Any], **changes: Any) -> dict[str, Any]:
    changed = copy.deepcopy(manifest)
    changed["spec"]["template"]["spec"].update(changes)
    return changed


def privileged(manifest: dict[str, Any]) -> dict[str, Any]:
    changed = copy.deepcopy(manifest)
    changed["spec"]["template"]["spec"]["containers"][0]["securityContext"] = {"privileged": True}
    return changed


def unlabelled(manifest: dict[str, Any]) -> dict[str, Any]:
    """Without labels, on the Job and on its pods (a Job without labels takes those of its pod template)."""
    changed = copy.deepcopy(manifest)
    del changed["metadata"]["labels"]
    changed["spec"]["template"]["metadata"]["labels"] = {"app": "plain"}
    return changed


HOST_PATH = {"name": "root", "hostPath": {"path": "/"}}
REFUSED: list[tuple[str, str, Callable[[dict[str, Any], list[dict[str, Any]]], dict[str, Any]], str]] = [
    (
        "Job in kube-system as another account",
        "kube-system",
        lambda job, _: with_pod_spec(job, serviceAccountName="generic-garbage-collector"),
        "A Job of the kubetune operator must run as the namespace's trainer ServiceAccount, kubetune-trainer, "
        "not as generic-garbage-collector.",
    ),
    (
        "Deployment as cluster-admin-sa",
        "default",
        lambda _, deployments: with_pod_spec(deployments[0], serviceAccountName="cluster-admin-sa"),
        "A Deployment of the kubetune operator must run as the namespace's default ServiceAccount, "
        "not as cluster-admin-sa.",
    ),
    (
        "Deployment naming the account in the deprecated field",
        "default",
        lambda _, deployments: with_pod_spec(deployments[0], serviceAccount="cluster-admin-sa"),
        "not as cluster-admin-sa.",
    ),
    (
        "Job with a hostPath volume",
        "default",
        lambda job, _: with_pod_spec(job, volumes=[*job["spec"]["template"]["spec"]["volumes"], HOST_PATH]),
        "The kubetune operator may not mount paths of the node (hostPath volumes) into its pods.",
    ),
    (
        "Deployment on the host network",
        "default",
        lambda _, deployments: with_pod_spec(deployments[1], hostNetwork=True),
        "The kubetune operator may not run pods in the node's network, process or IPC namespace",
    ),
    (
        "privileged Job",
        "default",
        lambda job, _: privileged(job),
        "The kubetune operator may not run privileged containers.",
    ),
    (
        "Job without kubetune's labels",
        "default",
        lambda job, _: unlabelled(job),
        "The kubetune operator may create or change a Job only for a FineTuneJob: it needs the labels "
        "app.kubernetes.io/managed-by=kubetune-operator and kubetune.io/finetunejob (kubetune.io/prepare for its "
        "prepare step)=<name of the FineTuneJob>.",
    ),
    (
        "Job owned by nothing",
        "default",
        lambda job, _: {**job, "metadata": {k: v for k, v in job["metadata"].items() if k != "ownerReferences"}},
        "The kubetune operator may create or change a Job only with a controller ownerReference to the FineTuneJob "
        "named in its kubetune.io/finetunejob label (qwen-sft).",
    ),
]


@pytest.mark.parametrize(("case", "namespace", "change", "message"), REFUSED, ids=[case[0] for case in REFUSED])
def test_admission_policy_refuses_what_the_operator_never_renders(
    api: Api,
    case: str,
    namespace: str,
    change: Callable[[dict[str, Any], list[dict[str, Any]]], dict[str, Any]],
    message: str,
) -> None:
    apply_policy(api)
    job, deployments = rendered_children(namespace)
    result = create_as_operator(api, change(job, deployments), namespace)
    assert result.returncode != 0, f"{case}: admitted"
    assert "kubetune-children" in result.stderr and message in result.stderr, result.stderr
    # The same object from an administrator is none of the policy's business.
    assert create_as_admin(api, change(job, deployments), namespace).returncode == 0


def create_as_admin(api: Api, manifest: dict[str, Any], namespace: str) -> Any:
    body = {**manifest, "metadata": {**manifest["metadata"], "namespace": namespace}}
    return api.kubectl("create", "--dry-run=server", "-n", namespace, "-f", "-", input=json.dumps(body), check=False)


def test_admission_policy_admits_the_children_the_operator_renders(api: Api) -> None:
    apply_policy(api)
    job, deployments = rendered_children("default")
    assert [d["metadata"]["name"] for d in deployments] == ["qwen-7b", "qwen-7b-ui"]  # the server and its chat page
    for manifest in (job, prepare_job(job), *deployments):
        result = create_as_operator(api, manifest, "default")
        assert result.returncode == 0, f"{manifest['kind']} {manifest['metadata']['name']}: {result.stderr}"
