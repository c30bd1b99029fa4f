"""A ModelServer for production traffic, with real vLLM on CPU: named start failures, an API key on every route,
a replica count that autoscalers own (the scale subresource), adapters before traffic, rollouts that keep them.

As in test_serving.py, the node agent runs the server pods as local processes (two "GPUs"), and the tests run
in order on module state: one server ("prod") is started once and scaled, checked and rolled. Each vLLM start
costs 30 to 60 s on CPU.
"""

from __future__ import annotations

import base64
import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from tests.integration import serving
from tests.integration.support import NEEDS_ROOT, NEEDS_SERVER, AgentProcess, Api, OperatorProcess, cpu_agent, wait_for

from kubetune.api.v1alpha1 import ModelServer
from kubetune.config import OperatorConfig
from kubetune.dev.binaries import ensure_keda_crd
from kubetune.dev.controlplane import Cluster
from kubetune.render import modelserver as render
from kubetune.render import traffic
from kubetune.server import engine
from kubetune.trainer.tiny import build_tiny_model

pytestmark = [pytest.mark.server, NEEDS_ROOT, NEEDS_SERVER]
SERVER = "prod"
ADAPTER = "capitals"
ADAPTER_URI = "pvc://adapters/capitals/adapter"
KEY_SECRET = "prod-api-key"
CANARY = "kt-canary-4e1f0c9b7a2d"
GATE = render.ADAPTERS_GATE
# How soon after vLLM exits its reason must show (the issue's promise); the operator reacts to the pod event.
NAMED_WITHIN_S = 30


@dataclass
class Scene:
    ns: str
    root: Path


@pytest.fixture(scope="module")
def agent(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    yield from cpu_agent(cluster, tmp_path_factory.mktemp("production-agent"), "production")


@pytest.fixture(scope="module")
def scene(api: Api, operator: OperatorProcess, agent: AgentProcess) -> Iterator[Scene]:
    ns = api.create_namespace()
    for claim in ("models", "adapters"):
        api.create_bound_pvc(ns, claim)
    root = agent.state_dir / "pvc" / ns
    serving.build_model(root)
    serving.train_adapter(root, ADAPTER, steps=10)
    api.kubectl("create", "secret", "generic", KEY_SECRET, "-n", ns, f"--from-literal=key={CANARY}")
    try:
        yield Scene(ns, root)
    finally:
        api.kubectl("delete", "hpa,modelservers,deployments,pods", "--all", "-n", ns, "--wait=false", check=False)
        wait_for(lambda: not api.kube.list("Pod", ns, "app.kubernetes.io/component=server"), 90, "server pods to go")
        api.kube.delete("Namespace", "", ns)
        api.kubectl("delete", "crd", "scaledobjects.keda.sh", "--ignore-not-found", check=False)


def server_manifest(name: str, ns: str, **spec: Any) -> dict[str, Any]:
    """A ModelServer of the tiny model as a platform team would keep it: no replicas (the autoscaler's)."""
    body = serving.model_server(name, ns, **spec)
    del body["spec"]["replicas"]
    return body


def apply_as_platform_team(api: Api, body: dict[str, Any]) -> None:
    """Server-side apply under a field manager of its own, as GitOps tools do."""
    api.kubectl("apply", "--server-side", "--field-manager=platform-team", "-f", "-", input=yaml.safe_dump(body))


def ready_condition(api: Api, ns: str, name: str) -> dict[str, Any]:
    return api.condition("ModelServer", ns, name, "Ready") or {}


def when(stamp: str) -> datetime:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00"))


# --- 3. refused before any pod; named within seconds of the exit --------------------------------------------


def test_a_server_vllm_would_refuse_is_refused_before_any_pod(api: Api, scene: Scene) -> None:
    known = {"baseModel": {"uri": "hf://Qwen/Qwen2.5-7B-Instruct"}, "engineArgs": []}
    api.apply(serving.model_server("long", scene.ns, **known, maxModelLen=131072))
    api.apply(serving.model_server("wide", scene.ns, **known, tensorParallelSize=8))
    long = api.wait_state("ModelServer", scene.ns, "long", "Failed", 30)
    cond = ready_condition(api, scene.ns, "long")
    assert cond["reason"] == "MaxModelLenTooLarge", cond
    assert "set maxModelLen to at most 32768, or add ropeScaling {type: yarn, factor: 4" in cond["message"]
    assert long["conditions"] and not api.get("Deployment", scene.ns, "long")
    api.wait_state("ModelServer", scene.ns, "wide", "Failed", 30)
    cond = ready_condition(api, scene.ns, "wide")
    assert cond["reason"] == "TensorParallelSizeInvalid" and cond["message"].endswith("use one of 1, 2, 4"), cond
    assert not api.get("Deployment", scene.ns, "wide")
    # The Event follows the status write.
    wanted = {("Warning", "MaxModelLenTooLarge"), ("Warning", "TensorParallelSizeInvalid")}
    wait_for(
        lambda: wanted <= {(e["type"], e["reason"]) for name in ("long", "wide") for e in api.events(scene.ns, name)},
        10,
        "the Warning Events",
    )
    api.kubectl("delete", "msrv", "long", "wide", "-n", scene.ns)


def exit_of(api: Api, ns: str, server: str) -> dict[str, Any] | None:
    """The vLLM container's failed run (its terminated state, now or last)."""
    for pod in api.children("Pod", ns, "kubetune.io/modelserver", server):
        for status in (pod.get("status") or {}).get("containerStatuses") or []:
            if status["name"] != "vllm":
                continue
            for term in (
                (status.get("state") or {}).get("terminated"),
                (status.get("lastState") or {}).get("terminated"),
            ):
                if term and term.get("exitCode"):
                    return dict(term)
    return None


def test_vllm_start_failures_are_named_within_seconds_of_the_exit(api: Api, scene: Scene) -> None:
    # Two servers at once, one on each of the agent's "GPUs": an argument vLLM does not know (vLLM refuses it), and
    # a context the tiny model (4096 positions; not one the operator knows) does not have, which the pod's engine
    # refuses from the model's config.json before vLLM starts.
    api.apply(serving.model_server("bad-args", scene.ns, engineArgs=["--dtype=float32", "--bogus-flag"]))
    api.apply(serving.model_server("too-long", scene.ns, maxModelLen=8192))
    expected = {
        "bad-args": (
            "InvalidEngineArgs",
            "vLLM exited with code 2 (Error)",
            "api_server.py: error: unrecognized arguments: --bogus-flag",
        ),
        "too-long": (
            "MaxModelLenTooLarge",
            "vLLM not started",
            "maxModelLen 8192 is above the 4096 tokens tiny (Qwen2ForCausalLM) was trained for: set maxModelLen to at "
            "most 4096, or add ropeScaling {type: yarn, factor: 2, originalMaxPositionEmbeddings: 4096} (YaRN) "
            "(config.json: /mnt/pvc/models/tiny/config.json)",
        ),
    }
    # The first exit of each (the engine's refusal is quick, and the agent restarts it after 1 s).
    first_exits: dict[str, dict[str, Any]] = {}

    def both_exited() -> bool:
        for name in expected:
            if name not in first_exits and (term := exit_of(api, scene.ns, name)):
                first_exits[name] = term
        return len(first_exits) == len(expected)

    wait_for(both_exited, 240, "both to exit", interval=0.5)
    for name, (reason, how, says) in expected.items():
        cond = wait_for(
            lambda n=name, r=reason: (c := ready_condition(api, scene.ns, n)).get("reason") == r and c,
            NAMED_WITHIN_S,
            f"{name}'s Ready condition to say {reason}",
            interval=0.5,
        )
        assert says in cond["message"] and how in cond["message"], cond
        assert api.status("ModelServer", scene.ns, name)["state"] == "Failed"
        # The Warning Event is posted when the reason appears (the condition's time is that of Ready turning False).
        event = wait_for(
            lambda n=name, r=reason: next(
                (e for e in api.events(scene.ns, n) if e["reason"] == r and e["type"] == "Warning"), None
            ),
            10,
            f"{name}'s Warning Event",
        )
        seconds = (when(event["metadata"]["creationTimestamp"]) - when(first_exits[name]["finishedAt"])).total_seconds()
        print(f"\n{name}: {reason} {seconds:.0f} s after its first exit seen (within a second of the clocks' rounding)")
    api.kubectl("delete", "msrv", "bad-args", "too-long", "-n", scene.ns)
    wait_for(lambda: not api.kube.list("Pod", scene.ns, "app.kubernetes.io/component=server"), 90, "their pods to go")


def test_the_engine_refuses_what_the_models_config_json_rules_out(api: Api, scene: Scene, agent: AgentProcess) -> None:
    # A model the operator does not know, whose 3 attention heads do not split over 2 GPUs: its Deployment is
    # written (nothing of the model is known before its pod reads it), and the pod's engine refuses it from
    # config.json, as vLLM would after loading for minutes ("Total number of attention heads (3) must be
    # divisible by tensor parallel size (2)"), without starting vLLM.
    build_tiny_model(scene.root / "models" / "odd", heads=(3, 1))
    api.apply(serving.model_server("odd", scene.ns, baseModel={"uri": "pvc://models/odd"}, tensorParallelSize=2))
    term = wait_for(lambda: exit_of(api, scene.ns, "odd"), 240, "the engine to exit", interval=0.5)
    assert term["exitCode"] == engine.EXIT_REFUSED, term
    cond = wait_for(
        lambda: (c := ready_condition(api, scene.ns, "odd")).get("reason") == "TensorParallelSizeInvalid" and c,
        NAMED_WITHIN_S,
        "odd's Ready condition to say TensorParallelSizeInvalid",
        interval=0.5,
    )
    assert "vLLM not started" in cond["message"] and cond["message"].endswith(
        "tensorParallelSize 2 does not split the 3 attention heads (1 key-value heads) of odd (Qwen2ForCausalLM) "
        "evenly: use one of 1 (config.json: /mnt/pvc/models/odd/config.json)"
    ), cond
    assert api.status("ModelServer", scene.ns, "odd")["state"] == "Failed"
    assert api.get("Deployment", scene.ns, "odd") is not None  # the operator could not know
    api.wait_event(scene.ns, "odd", "TensorParallelSizeInvalid", "Warning")
    # The vLLM container's whole output: the refusal, once per start (restarts append to the log).
    logs = (agent.state_dir / "logs" / scene.ns).glob("odd-*/vllm.log")
    lines = {line for log in logs for line in log.read_text().splitlines() if line.strip()}
    refused = "kubetune engine refused to start vLLM: TensorParallelSizeInvalid: tensorParallelSize 2"
    assert lines and all(line.startswith(refused) for line in lines), lines
    api.kubectl("delete", "msrv", "odd", "-n", scene.ns)
    wait_for(lambda: not api.kube.list("Pod", scene.ns, "app.kubernetes.io/component=server"), 90, "its pods to go")


# --- 2. the API key --------------------------------------------------------------------------------------


def ready_pods(api: Api, ns: str) -> list[dict[str, Any]]:
    """The server pods that are Ready (in the Service) and not going away."""
    return [
        p
        for p in api.children("Pod", ns, "kubetune.io/modelserver", SERVER)
        if p["metadata"]["labels"].get("app.kubernetes.io/component") == "server"
        and not p["metadata"].get("deletionTimestamp")
        and any(c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions", []))
    ]


def address(pod: dict[str, Any]) -> str:
    return f"{pod['status']['podIP']}:{serving.SERVER_PORT}"


def request(url: str, method: str = "GET", body: dict[str, Any] | None = None, key: str = "") -> int:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    data = json.dumps(body).encode() if body is not None else None
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data, headers, method=method), timeout=60) as r:
            return int(r.status)
    except urllib.error.HTTPError as err:
        return err.code


def test_the_server_answers_only_with_its_api_key(api: Api, scene: Scene) -> None:
    autoscaling = {"minReplicas": 1, "maxReplicas": 2, "metric": "waitingRequests", "targetPerReplica": 2}
    manifest = server_manifest(
        SERVER,
        scene.ns,
        auth={"apiKeySecretRef": {"name": KEY_SECRET, "key": "key"}},
        adapters=[{"name": ADAPTER, "uri": ADAPTER_URI}],
        autoscaling=autoscaling,
    )
    apply_as_platform_team(api, manifest)
    (pod,) = wait_for(lambda: ready_pods(api, scene.ns), 600, "the first replica to be Ready", interval=1)
    api.wait_state("ModelServer", scene.ns, SERVER, "Ready", 60)
    serving.wait_adapter(api, scene.ns, SERVER, ADAPTER, "Loaded", loadedReplicas=1)
    base = f"http://{address(pod)}"
    chat = {"model": SERVER, "messages": [{"role": "user", "content": serving.QUESTION}], "max_tokens": 2}
    load = {"lora_name": "extra", "lora_path": str(scene.root / "adapters" / ADAPTER / "adapter")}
    for path, body in (("/v1/chat/completions", chat), ("/v1/load_lora_adapter", load), ("/invocations", chat)):
        assert request(base + path, "POST", body) == 401, path
        assert request(base + path, "POST", body, key="not-the-key") == 401, path
    assert request(base + "/v1/models") == 401
    assert request(base + "/v1/chat/completions", "POST", chat, key=CANARY) == 200
    assert request(base + "/v1/load_lora_adapter", "POST", load, key=CANARY) == 200
    assert set(serving.served_models(address(pod), CANARY)) >= {SERVER, ADAPTER, "extra"}
    assert request(base + "/health") == 200 and request(base + "/metrics") == 200  # probes, Prometheus
    unload = {"lora_name": "extra"}
    assert request(base + "/v1/unload_lora_adapter", "POST", unload) == 401
    # With the key the request reaches vLLM: 200, or 404 when the operator's adapter sync (every 2 s here) has
    # already unloaded "extra", which the spec does not name.
    assert request(base + "/v1/unload_lora_adapter", "POST", unload, key=CANARY) in (200, 404)
    # The fetcher answers the operator only: unsigned requests are refused.
    fetcher = f"http://{pod['status']['podIP']}:8001"
    assert request(fetcher + "/v1/models") == 401
    assert request(fetcher + "/v1/load_lora_adapter", "POST", load) == 401
    assert request(fetcher + "/prepare", "POST", {"uri": ADAPTER_URI}) == 401
    assert request(fetcher + "/health") == 200


# --- 1. autoscaling: KEDA, the scale subresource, adapters before traffic ------------------------------------


def test_autoscaling_needs_keda_and_its_scaled_object_is_valid(api: Api, scene: Scene) -> None:
    cond = wait_for(lambda: api.condition("ModelServer", scene.ns, SERVER, "Autoscaling"), 30, "Autoscaling")
    assert (cond["status"], cond["reason"]) == ("False", "KedaNotInstalled"), cond
    assert "install KEDA, or scale the server with kubectl scale or an HPA" in cond["message"]
    # KEDA's real CRD, from its Go module: the operator's next look writes the ScaledObject, which the API
    # server validates against KEDA's schema.
    api.kubectl("apply", "--server-side", "-f", str(ensure_keda_crd()))
    api.kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd/scaledobjects.keda.sh")
    api.kubectl("annotate", "msrv", SERVER, "-n", scene.ns, "example.com/nudge=1")  # a look now, not in 60 s
    scaled = wait_for(lambda: api.get("ScaledObject", scene.ns, SERVER), 60, "the ScaledObject")
    cond = wait_for(
        lambda: (c := api.condition("ModelServer", scene.ns, SERVER, "Autoscaling")) and c["status"] == "True" and c,
        30,
        "Autoscaling True",
    )
    assert cond["reason"] == "ScaledObjectWritten", cond
    assert scaled["spec"]["scaleTargetRef"] == {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "ModelServer",
        "name": SERVER,
    }
    trigger = scaled["spec"]["triggers"][0]["metadata"]
    assert trigger["query"] == f'sum(vllm:num_requests_waiting{{namespace="{scene.ns}",model_name="{SERVER}"}})'
    # The same object from render, and a broken one, against KEDA's schema (server-side dry runs).
    server = ModelServer.model_validate(api.get("ModelServer", scene.ns, SERVER))
    config = OperatorConfig(server={"prometheusAddress": "http://prometheus.monitoring.svc:9090"})
    rendered = traffic.scaled_object(server, config, render.served_name(server))
    assert rendered is not None
    rendered["metadata"]["name"] = "dry-run"
    assert "created (server dry run)" in api.apply(rendered, dry_run=True).stdout
    rendered["spec"]["minReplicaCount"] = "two"
    broken = api.apply(rendered, check=False, dry_run=True)
    assert broken.returncode != 0 and "spec.minReplicaCount" in broken.stderr, broken.stderr
    # Taken out of the spec, the ScaledObject goes, and so does the condition.
    api.kubectl("patch", "msrv", SERVER, "-n", scene.ns, "--type=merge", "-p", '{"spec":{"autoscaling":null}}')
    wait_for(lambda: api.get("ScaledObject", scene.ns, SERVER) is None, 30, "the ScaledObject to go")
    wait_for(lambda: api.condition("ModelServer", scene.ns, SERVER, "Autoscaling") is None, 30, "the condition to go")


def managers_of_replicas(obj: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(manager, operation, subresource) of the managedFields entries that own spec.replicas."""
    return [
        (m["manager"], m["operation"], m.get("subresource", ""))
        for m in obj["metadata"].get("managedFields") or []
        if "f:replicas" in ((m.get("fieldsV1") or {}).get("f:spec") or {})
    ]


def test_an_hpa_scales_the_modelserver_and_a_new_replica_has_every_adapter_before_traffic(
    api: Api, scene: Scene
) -> None:
    scale = json.loads(api.kubectl("get", "msrv", SERVER, "-n", scene.ns, "--subresource=scale", "-o", "json").stdout)
    assert scale["spec"]["replicas"] == 1
    assert scale["status"]["selector"] == f"app.kubernetes.io/component=server,kubetune.io/modelserver={SERVER}"
    (first,) = ready_pods(api, scene.ns)
    hpa = {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": SERVER, "namespace": scene.ns},
        "spec": {
            "scaleTargetRef": {"apiVersion": "kubetune.io/v1alpha1", "kind": "ModelServer", "name": SERVER},
            # Below its minReplicas the HPA scales without any metric: the real controller, no metrics server.
            "minReplicas": 2,
            "maxReplicas": 2,
        },
    }
    api.apply(hpa)
    wait_for(lambda: api.get("ModelServer", scene.ns, SERVER)["spec"]["replicas"] == 2, 60, "the HPA to scale")
    # Every look at the replicas: whichever is Ready (in the Service) serves the adapter already.
    seen_new: list[str] = []

    def both_ready() -> bool:
        pods = ready_pods(api, scene.ns)
        for pod in pods:
            assert serving.answering(address(pod), ADAPTER, CANARY), f"{pod['metadata']['name']} is Ready without it"
            if pod["metadata"]["name"] != first["metadata"]["name"]:
                seen_new.append(pod["metadata"]["name"])
        return len(pods) == 2

    wait_for(both_ready, 600, "the second replica to be Ready", interval=0.5)
    new = api.get("Pod", scene.ns, seen_new[0])
    conditions = {c["type"]: c for c in new["status"]["conditions"]}
    assert conditions[GATE]["status"] == "True" and conditions[GATE]["reason"] == "AdaptersLoaded"
    assert when(conditions[GATE]["lastTransitionTime"]) <= when(conditions["Ready"]["lastTransitionTime"])
    # The figure for docs/serving.md: from the pod's creation (the HPA's scale) to Ready with its adapters.
    seconds = (when(conditions["Ready"]["lastTransitionTime"]) - when(new["metadata"]["creationTimestamp"])).seconds
    print(f"\nscale-up: {seen_new[0]} Ready with {ADAPTER} {seconds} s after it was created")
    serving.wait_adapter(api, scene.ns, SERVER, ADAPTER, "Loaded", loadedReplicas=2)

    # One writer of each replica count: the HPA sets the ModelServer's, through its scale subresource (the API
    # server records no owner for a field that nobody applied, or the scaler's `scale` entry), and the operator
    # alone the Deployment's, copied from the ModelServer.
    server = api.get("ModelServer", scene.ns, SERVER)
    deployment = api.get("Deployment", scene.ns, SERVER)
    assert deployment["spec"]["replicas"] == server["spec"]["replicas"] == 2
    print(f"\nspec.replicas of the ModelServer owned by {managers_of_replicas(server)}")
    assert all(sub == "scale" and manager != "kubetune-operator" for manager, _, sub in managers_of_replicas(server))
    assert managers_of_replicas(deployment) == [("kubetune-operator", "Apply", "")]
    # The platform team applies its manifest again (no replicas in it): the autoscaler's count stays.
    apply_as_platform_team(
        api,
        server_manifest(
            SERVER,
            scene.ns,
            auth={"apiKeySecretRef": {"name": KEY_SECRET, "key": "key"}},
            adapters=[{"name": ADAPTER, "uri": ADAPTER_URI}],
        ),
    )
    assert api.get("ModelServer", scene.ns, SERVER)["spec"]["replicas"] == 2
    api.kubectl("delete", "hpa", SERVER, "-n", scene.ns)


# --- 5. a rollout keeps the adapters served -----------------------------------------------------------------


def test_a_rollout_replaces_one_replica_at_a_time_and_every_ready_one_serves_the_adapter(
    api: Api, scene: Scene
) -> None:
    before = {p["metadata"]["name"] for p in ready_pods(api, scene.ns)}
    assert len(before) == 2
    deployment = api.get("Deployment", scene.ns, SERVER)
    assert deployment["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": 1}
    # A longer context by YaRN (4.): a change of vLLM's arguments, so every pod is replaced.
    rope = {"type": "yarn", "factor": 2, "originalMaxPositionEmbeddings": 4096}
    patch = {"spec": {"maxModelLen": 8192, "ropeScaling": rope}}
    api.kubectl("patch", "msrv", SERVER, "-n", scene.ns, "--type=merge", "-p", json.dumps(patch))
    patched, looks = time.monotonic(), 0

    def rolled() -> bool:
        nonlocal looks
        pods = ready_pods(api, scene.ns)
        assert pods, "no replica was Ready during the rollout"
        for pod in pods:
            assert serving.answering(address(pod), ADAPTER, CANARY), f"{pod['metadata']['name']} lost the adapter"
        looks += 1
        names = {p["metadata"]["name"] for p in pods}
        return len(pods) == 2 and not names & before

    wait_for(rolled, 840, "both replicas to be replaced", interval=0.5)
    took = time.monotonic() - patched
    print(f"\nrollout: {took:.0f} s, {looks} looks, every Ready replica answered {ADAPTER} at each")
    for pod in ready_pods(api, scene.ns):
        (card,) = [m for m in serving.models(address(pod), CANARY) if m["id"] == SERVER]
        assert card["max_model_len"] == 8192  # vLLM took the rope scaling (hf-overrides)
    api.wait_state("ModelServer", scene.ns, SERVER, "Ready", 60)


# --- 2. the key appears nowhere but in its Secret ------------------------------------------------------------


def test_the_api_key_is_nowhere_but_in_its_secret(
    api: Api, scene: Scene, operator: OperatorProcess, agent: AgentProcess
) -> None:
    # The objects of the namespace (status, Events, ConfigMaps, the rendered children and their pods) ...
    kinds = "deployments,replicasets,pods,services,configmaps,events,networkpolicies,scaledobjects,modelservers"
    everything = api.kubectl("get", kinds, "-n", scene.ns, "-o", "json").stdout
    assert CANARY not in everything
    assert '"secretKeyRef"' in everything and KEY_SECRET in everything  # referenced, by name only
    # ... the operator's log and configuration, and the logs of every container (vLLM, the fetcher) ...
    assert CANARY not in operator.logs()
    assert operator.config is not None and CANARY not in operator.config.read_text()
    logs = [p for p in (agent.state_dir / "logs").rglob("*") if p.is_file()]
    assert logs and not [p for p in logs if CANARY.encode() in p.read_bytes()]
    # ... but the Secret holds it.
    secret = api.get("Secret", scene.ns, KEY_SECRET)
    assert secret is not None and base64.b64decode(secret["data"]["key"]).decode() == CANARY


def test_the_network_policy_is_valid_for_the_api_server(api: Api, scene: Scene) -> None:
    server = ModelServer.model_validate(api.get("ModelServer", scene.ns, SERVER))
    config = OperatorConfig()
    config.server.network_policy.enabled, config.server.network_policy.operator_namespace = True, "kubetune-system"
    policy = traffic.network_policy(server, config)
    policy["metadata"]["name"] = "dry-run"
    assert "created (server dry run)" in api.apply(policy, dry_run=True).stdout
