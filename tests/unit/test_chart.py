"""The Helm chart, without a cluster: generated parts up to date, lint, values schema, rendered objects."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from kubetune.chart.generate import generated_files
from kubetune.chart.values import ChartValues
from kubetune.config import OperatorConfig
from tests.helm import CHART, find, helm, template

REPO = Path(__file__).resolve().parents[2]


def test_generated_parts_match_the_models() -> None:
    stale = [name for name, text in generated_files().items() if (CHART / name).read_text() != text]
    assert not stale, f"run `python -m kubetune.chart`: {stale}"
    on_disk = {str(p.relative_to(CHART)) for p in (CHART / "templates" / "crds").glob("*.yaml")}
    assert on_disk == {name for name in generated_files() if name.startswith("templates/crds/")}


def test_values_yaml_holds_exactly_the_defaults_of_the_values_model() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values == ChartValues().model_dump(by_alias=True, mode="json", exclude_none=True)


def test_lint_is_clean() -> None:
    result = helm("lint", "--strict", str(CHART))
    assert "0 chart(s) failed" in result.stdout


def test_values_schema_rejects_a_misspelt_operator_setting() -> None:
    result = helm(
        "template", "t", str(CHART), "--set-json", 'config.gpuTypes.x={"nodeSelectr":{"a":"b"}}', check=False
    )
    assert result.returncode != 0
    assert "nodeSelectr" in result.stderr and "not allowed" in result.stderr


def test_operator_runs_restricted_with_its_configuration() -> None:
    objects = template()
    pod = find(objects, "Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"] == ["kubetune", "operator"]
    assert "--config=/etc/kubetune-operator/config.yaml" in container["args"]
    assert "--metrics-address=0.0.0.0:8000" in container["args"]
    assert pod["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": 65532,
        "runAsGroup": 65532,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "healthz"}
    config = find(objects, "ConfigMap", "kubetune-config")["data"]["config.yaml"]
    expected = OperatorConfig()
    expected.server.signing_key_file = "/var/run/kubetune/signing/key.pem"
    policy = expected.server.network_policy
    policy.enabled, policy.operator_namespace = True, "kubetune-system"
    policy.operator_pod_labels = {
        "app.kubernetes.io/name": "kubetune",
        "app.kubernetes.io/instance": "kubetune",
        "app.kubernetes.io/component": "operator",
    }
    assert OperatorConfig.model_validate(yaml.safe_load(config)) == expected
    # Two replicas, one of which reconciles (the Lease's holder); a rolling update starts standbys first.
    deployment = find(objects, "Deployment")
    assert deployment["spec"]["replicas"] == 2 and deployment["spec"]["strategy"]["type"] == "RollingUpdate"
    assert "--leader-election" in container["args"] and "--lease=kubetune" in container["args"]
    env = {e["name"]: e for e in container["env"]}
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    leader = find(objects, "Role", "kubetune-leader")
    assert leader["metadata"]["namespace"] == "kubetune-system"
    assert leader["rules"][1] == {
        "apiGroups": ["coordination.k8s.io"],
        "resources": ["leases"],
        "resourceNames": ["kubetune"],
        "verbs": ["get", "update"],
    }


def test_cluster_wide_by_default_and_namespaced_when_asked() -> None:
    objects = template()
    kinds = [o["kind"] for o in objects]
    assert kinds.count("ClusterRole") == 2 and kinds.count("ClusterRoleBinding") == 2
    assert [r["metadata"]["name"] for r in objects if r["kind"] == "Role"] == ["kubetune-leader"]  # the Lease only
    objects = template(watchNamespaces='["team-a","team-b"]')
    roles = [o for o in objects if o["kind"] == "Role" and o["metadata"]["name"] == "kubetune"]
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    # Cluster-wide, only reading CRDs (kopf follows them) remains.
    (cluster_role,) = [o for o in objects if o["kind"] == "ClusterRole"]
    assert cluster_role["rules"] == [
        {"apiGroups": ["apiextensions.k8s.io"], "resources": ["customresourcedefinitions"], "verbs": ["list", "watch"]}
    ]
    args = find(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--namespace=team-a" in args and "--namespace=team-b" in args


def test_the_operators_signing_key_is_generated_once_or_brought() -> None:
    objects = template()
    pod = find(objects, "Deployment")["spec"]["template"]["spec"]
    volume = next(v for v in pod["volumes"] if v["name"] == "signing-key")
    assert volume["secret"]["secretName"] == "kubetune-signing-key"
    mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "signing-key")
    assert mount == {"name": "signing-key", "mountPath": "/var/run/kubetune/signing", "readOnly": True}
    pem = base64.b64decode(find(objects, "Secret", "kubetune-signing-key")["data"]["key.pem"])
    assert isinstance(serialization.load_pem_private_key(pem, None), Ed25519PrivateKey)
    own = template(**{"signingKey.existingSecret": '"my-key"'})
    assert not [o for o in own if o["kind"] == "Secret"]
    own_pod = find(own, "Deployment")["spec"]["template"]["spec"]
    assert next(v for v in own_pod["volumes"] if v["name"] == "signing-key")["secret"]["secretName"] == "my-key"


def test_the_rules_for_a_servers_gate_policy_and_scaled_object_are_exactly_what_it_does() -> None:
    rules = find(template(), "ClusterRole", "kubetune")["rules"]
    verbs = {(r["apiGroups"][0], r["resources"][0]): r["verbs"] for r in rules}
    assert verbs["", "pods/status"] == ["patch"]
    assert verbs["networking.k8s.io", "networkpolicies"] == ["get", "list", "watch", "create", "patch", "delete"]
    # Not watched (KEDA may be missing): no list or watch.
    assert verbs["keda.sh", "scaledobjects"] == ["get", "create", "patch", "delete"]


def test_operator_cannot_read_secrets_or_touch_cluster_objects() -> None:
    rules = find(template(), "ClusterRole", "kubetune")["rules"]
    resources = {r for rule in rules for r in rule["resources"]}
    assert not resources & {"secrets", "namespaces", "nodes", "clusterroles", "clusterrolebindings", "*"}
    assert all("*" not in rule["verbs"] for rule in rules)
    # Kueue's Workloads are only read (a queued job's status): the operator never writes what Kueue owns.
    kueue = [rule for rule in rules if rule["apiGroups"] == ["kueue.x-k8s.io"]]
    assert kueue == [{"apiGroups": ["kueue.x-k8s.io"], "resources": ["workloads"], "verbs": ["list", "watch"]}]


def test_crds_are_templates_kept_on_uninstall_and_switchable() -> None:
    crds = [o for o in template() if o["kind"] == "CustomResourceDefinition"]
    assert sorted(c["metadata"]["name"] for c in crds) == ["finetunejobs.kubetune.io", "modelservers.kubetune.io"]
    for crd in crds:
        assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
        assert crd["metadata"]["annotations"]["argocd.argoproj.io/sync-wave"] == "-1"
        source = REPO / "crds" / f"kubetune.io_{crd['spec']['names']['plural']}.yaml"
        assert crd["spec"] == yaml.safe_load(source.read_text())["spec"]
    assert not [o for o in template(**{"crds.install": "false"}) if o["kind"] == "CustomResourceDefinition"]


def test_argocd_health_checks_are_the_lua_files() -> None:
    (cm,) = [o for o in template(**{"argocd.healthChecks": "true"}) if o["metadata"]["name"] == "argocd-cm"]
    assert cm["metadata"]["namespace"] == "argocd"
    source = REPO / "argocd" / "resource_customizations" / "kubetune.io"
    assert cm["data"] == {
        f"resource.customizations.health.kubetune.io_{kind}": (source / kind / "health.lua").read_text()
        for kind in ("FineTuneJob", "ModelServer")
    }


def test_dashboard_ships_in_a_sidecar_configmap() -> None:
    (cm,) = [o for o in template(**{"dashboards.enabled": "true"}) if o["metadata"]["name"] == "kubetune-dashboard"]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["kubetune.json"]) == json.loads((CHART / "dashboards" / "kubetune.json").read_text())


@pytest.mark.parametrize("enabled", [True, False])
def test_metrics_service_and_service_monitor(enabled: bool) -> None:
    objects = template(**{"metrics.serviceMonitor.enabled": json.dumps(enabled)})
    service = find(objects, "Service", "kubetune-metrics")
    assert service["spec"]["ports"] == [{"name": "metrics", "port": 8000, "targetPort": "metrics"}]
    monitors = [o for o in objects if o["kind"] == "ServiceMonitor"]
    assert len(monitors) == (1 if enabled else 0)


def test_admission_policy_binds_to_the_releases_service_account_and_can_be_turned_off() -> None:
    objects = template(release="tune", namespace="ml-system")
    policy = find(objects, "ValidatingAdmissionPolicy", "tune-kubetune-children")
    binding = find(objects, "ValidatingAdmissionPolicyBinding", "tune-kubetune-children")
    service_account = find(objects, "ServiceAccount")["metadata"]["name"]
    (condition,) = policy["spec"]["matchConditions"]
    user = f"system:serviceaccount:ml-system:{service_account}"
    assert condition["expression"] == f'request.userInfo.username == "{user}"'
    assert binding["spec"] == {"policyName": "tune-kubetune-children", "validationActions": ["Deny"]}
    assert policy["spec"]["failurePolicy"] == "Fail"
    off = template(**{"admissionPolicy.enabled": "false"})
    assert not [o for o in off if o["kind"].startswith("ValidatingAdmissionPolicy")]
