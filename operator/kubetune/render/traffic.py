"""Which pods receive a ModelServer's traffic, who may send it, and how many replicas share it (pure builders).

- `server_selector`: the server pods' labels (the Service's and the Deployment's selector, and status.selector,
  which the scale subresource hands to HPAs and KEDA);
- `network_policy`: the server pods let in their allowedClients, the installation's allowFrom peers and the chat
  page on the server port, and the operator alone on the adapter fetcher's port;
- `scaled_object`: a KEDA ScaledObject that scales the ModelServer itself (never its Deployment) on a metric
  vLLM exports, read from Prometheus.
"""

from __future__ import annotations

import json
from typing import Any

from kubetune.api.v1alpha1 import LabelSelector, ModelServer
from kubetune.api.v1alpha1.modelserver import AutoscalingMetric, ClientPeer
from kubetune.config import OperatorConfig
from kubetune.render.common import LABEL_COMPONENT, LABEL_MODELSERVER, Manifest, labels, metadata

SCALED_OBJECT_API = "keda.sh/v1alpha1"
# vLLM's metric and the factor that turns it into targetPerReplica's unit.
METRICS: dict[AutoscalingMetric, tuple[str, int]] = {
    AutoscalingMetric.WAITING_REQUESTS: ("vllm:num_requests_waiting", 1),
    AutoscalingMetric.RUNNING_REQUESTS: ("vllm:num_requests_running", 1),
    AutoscalingMetric.KV_CACHE_USAGE: ("vllm:kv_cache_usage_perc", 100),
}


def server_selector(server: ModelServer) -> dict[str, str]:
    """The labels of the server pods (and only those: not the chat page's)."""
    return {LABEL_MODELSERVER: server.metadata.name, LABEL_COMPONENT: "server"}


def selector_text(server: ModelServer) -> str:
    """The server pods' selector as text: status.selector, for the scale subresource."""
    return ",".join(f"{k}={v}" for k, v in sorted(server_selector(server).items()))


def _meta(server: ModelServer, component: str) -> dict[str, Any]:
    name = server.metadata.name
    return metadata(name, server.metadata.namespace, server, labels(LABEL_MODELSERVER, name, component))


def _selector(selector: LabelSelector) -> Manifest:
    return selector.model_dump(mode="json", by_alias=True, exclude_defaults=True)


def _peer(client: ClientPeer) -> Manifest:
    peer: Manifest = {}
    if client.namespace_selector is not None:
        peer["namespaceSelector"] = _selector(client.namespace_selector)
    if client.pod_selector is not None:
        peer["podSelector"] = _selector(client.pod_selector)
    return peer


def operator_peers(config: OperatorConfig) -> list[Manifest]:
    """The operator's pods, as the installation names them (none when it names no namespace)."""
    policy = config.server.network_policy
    if not policy.operator_namespace:
        return []
    return [
        {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": policy.operator_namespace}},
            "podSelector": {"matchLabels": dict(policy.operator_pod_labels)},
        }
    ]


def network_policy(server: ModelServer, config: OperatorConfig) -> Manifest:
    """Ingress to the server pods: the server port from the allowed clients (this namespace's pods when the spec
    names none), the installation's allowFrom peers and the chat page; the fetcher port from the operator only."""
    clients = [_peer(c) for c in server.spec.allowed_clients] or [{"podSelector": {}}]
    chat_page = {"podSelector": {"matchLabels": {LABEL_MODELSERVER: server.metadata.name, LABEL_COMPONENT: "ui"}}}
    extra = [dict(peer) for peer in config.server.network_policy.allow_from]
    server_port = {"from": [*clients, chat_page, *extra], "ports": [{"protocol": "TCP", "port": config.server_port}]}
    # An empty `from` would let everyone in: without the operator's peers the fetcher's port stays shut.
    operator = operator_peers(config)
    fetcher_port = {"from": operator, "ports": [{"protocol": "TCP", "port": config.server.fetcher_port}]}
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _meta(server, "server"),
        "spec": {
            "podSelector": {"matchLabels": server_selector(server)},
            "policyTypes": ["Ingress"],
            "ingress": [server_port, *([fetcher_port] if operator else [])],
        },
    }


def metric_query(server: ModelServer, served_name: str) -> str:
    """The PromQL sum of the autoscaling metric over the server's replicas (vLLM labels every series with the
    served model's name; Prometheus' Kubernetes scraping adds the namespace)."""
    assert server.spec.autoscaling is not None
    metric, scale = METRICS[server.spec.autoscaling.metric]
    selector = f"namespace={json.dumps(server.metadata.namespace)},model_name={json.dumps(served_name)}"
    total = f"sum({metric}{{{selector}}})"
    return f"{total} * {scale}" if scale != 1 else total


def scaled_object(server: ModelServer, config: OperatorConfig, served_name: str) -> Manifest | None:
    """The KEDA ScaledObject of a server with spec.autoscaling (None without): it scales the ModelServer through
    its scale subresource so that the target per replica holds (an AverageValue target)."""
    autoscaling = server.spec.autoscaling
    if autoscaling is None:
        return None
    return {
        "apiVersion": SCALED_OBJECT_API,
        "kind": "ScaledObject",
        "metadata": _meta(server, "server"),
        "spec": {
            "scaleTargetRef": {"apiVersion": server.api_version, "kind": server.kind, "name": server.metadata.name},
            "minReplicaCount": autoscaling.min_replicas,
            "maxReplicaCount": autoscaling.max_replicas,
            "triggers": [
                {
                    "type": "prometheus",
                    "metricType": "AverageValue",
                    "metadata": {
                        "serverAddress": config.server.prometheus_address,
                        "query": metric_query(server, served_name),
                        "threshold": str(autoscaling.target_per_replica),
                    },
                }
            ],
        },
    }
