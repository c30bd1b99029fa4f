"""The chart's values as a model: the source of charts/kubetune/values.schema.json.

`config` is the operator's own configuration model, so `helm install` rejects a misspelt GPU type
setting before the operator ever starts.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from kubetune.config import OperatorConfig


class _Values(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", use_attribute_docstrings=True
    )


class Image(_Values):
    """The operator's container image."""

    repository: str = "ghcr.io/kubetune/operator"
    tag: str = ""
    """Defaults to the chart's appVersion."""
    pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"


class Crds(_Values):
    """The CustomResourceDefinitions, as templates so that `helm upgrade` upgrades them too."""

    install: bool = True
    """Install and upgrade the CRDs with the release. They are kept on `helm uninstall` (resource-policy: keep)."""


class ServiceMonitor(_Values):
    """A prometheus-operator ServiceMonitor for the metrics Service."""

    enabled: bool = False
    interval: str = "30s"
    labels: dict[str, str] = Field(default_factory=dict)
    """Extra labels, e.g. the `release` label your Prometheus selects."""


class Metrics(_Values):
    """The operator's Prometheus endpoint."""

    enabled: bool = True
    port: int = Field(default=8000, ge=1, le=65535)
    service_monitor: ServiceMonitor = Field(default_factory=ServiceMonitor)


class Dashboards(_Values):
    """The Grafana dashboard as a ConfigMap that Grafana's sidecar picks up."""

    enabled: bool = False
    labels: dict[str, str] = Field(default_factory=lambda: {"grafana_dashboard": "1"})


class ArgoCD(_Values):
    """Argo CD health checks for FineTuneJob and ModelServer, as `resource.customizations.health.*` keys."""

    health_checks: bool = False
    """Render the keys into a ConfigMap named `configMapName`; meant for an Argo CD Application syncing this
    chart with ServerSideApply, which merges the keys into the existing argocd-cm."""
    namespace: str = "argocd"
    config_map_name: str = "argocd-cm"


class AdmissionPolicy(_Values):
    """A ValidatingAdmissionPolicy (Kubernetes 1.30+) that lets the operator's ServiceAccount create and change
    only Jobs and Deployments shaped like kubetune's own (docs/helm.md)."""

    enabled: bool = True
    """Turn it off only on clusters without ValidatingAdmissionPolicy (before 1.30): the operator's RBAC alone
    lets it run any pod as any ServiceAccount of the namespaces it may write to."""


class SigningKey(_Values):
    """The operator's Ed25519 key, with which it signs its requests to the adapter fetchers of the server pods."""

    existing_secret: str = ""
    """A Secret of the release's namespace with the PEM key under `key.pem` (`openssl genpkey -algorithm
    ed25519`). Empty: the chart generates one at install and keeps it on upgrades (`lookup`); renderers without
    cluster access (Argo CD, `helm template`) would generate a new key each time, rolling every server: give
    them a Secret of your own."""


def _chart_config() -> OperatorConfig:
    """The operator's defaults, with NetworkPolicies for the server pods on (the chart knows the operator's
    namespace and labels, which the policies let in)."""
    config = OperatorConfig()
    config.server.network_policy.enabled = True
    return config


class ChartValues(_Values):
    """Values of the kubetune Helm chart."""

    image: Image = Field(default_factory=Image)
    image_pull_secrets: list[dict[str, str]] = Field(default_factory=list)
    crds: Crds = Field(default_factory=Crds)
    replicas: int = Field(default=2, ge=1, le=5)
    """Operator replicas. One reconciles while it holds the Lease; the others wait and take over within seconds
    when it stops or is lost (leader election, docs/helm.md)."""
    watch_namespaces: list[str] = Field(default_factory=list)
    """Namespaces the operator watches (RBAC granted only there); empty: the whole cluster."""
    admission_policy: AdmissionPolicy = Field(default_factory=AdmissionPolicy)
    config: OperatorConfig = Field(default_factory=_chart_config)
    """The operator's configuration: images of the pods it creates, GPU types, serving settings. The chart fills
    in server.networkPolicy.operatorNamespace and operatorPodLabels (when empty) and server.signingKeyFile."""
    signing_key: SigningKey = Field(default_factory=SigningKey)
    log_level: Literal["info", "debug"] = "info"
    liveness_port: int = Field(default=8080, ge=1, le=65535)
    metrics: Metrics = Field(default_factory=Metrics)
    dashboards: Dashboards = Field(default_factory=Dashboards)
    argocd: ArgoCD = Field(default_factory=ArgoCD)
    resources: dict[str, Any] = Field(
        default_factory=lambda: {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "512Mi"}}
    )
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[dict[str, Any]] = Field(default_factory=list)
    affinity: dict[str, Any] = Field(default_factory=dict)
    pod_annotations: dict[str, str] = Field(default_factory=dict)
    pod_labels: dict[str, str] = Field(default_factory=dict)
    priority_class_name: str = ""
