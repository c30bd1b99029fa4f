"""ModelServers under the installation's settings, on the real API server: the NetworkPolicy the operator writes
for each server, the kernel's OOM kill named from the pod status, and the chat page with the server's API key
(the server's own Secret, or the installation's default) answering through real vLLM.

The settings are the operator's configuration, so this module runs an operator of its own (the session's stands
aside meanwhile, as in test_operator_ha.py) and restarts it to turn the NetworkPolicy off and on. The
NetworkPolicy and OOM tests need no vLLM: their servers' pods are kwok's. The chat page test runs two real
servers and their chat pages on the node agent (the chat pages go there by the installation's uiScheduling).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from tests.integration import serving
from tests.integration.support import (
    AGENT_LABEL,
    AGENT_TAINT,
    NEEDS_ROOT,
    NEEDS_SERVER,
    AgentProcess,
    Api,
    OperatorProcess,
    cpu_agent,
    wait_for,
)

from kubetune.config import GPU_TOLERATION
from kubetune.dev.controlplane import Cluster

OPERATOR_NAMESPACE = "kubetune-system"
OPERATOR_PODS = {"app.kubernetes.io/name": "kubetune"}
MONITORING = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
DEFAULT_KEY_SECRET = "kubetune-api-key"  # the installation's server.apiKeySecretRef, in each server's namespace
DEFAULT_KEY = "kt-default-5b0e2d71"
NAMED_KEY_SECRET = "named-api-key"
NAMED_KEY = "kt-named-93c4aa06"
KWOK_GPU = "rtx-4090d"  # a GPU type of the simulated nodes: kwok runs these pods
UI_PORT = 7860
ADAPTER = "capitals"


@dataclass
class Installation:
    """The operator under this module's configuration; `restart` applies a change of it."""

    operator: OperatorProcess
    settings: dict[str, Any]

    def restart(self, network_policy: bool) -> None:
        self.operator.stop()
        self.settings["server"]["networkPolicy"]["enabled"] = network_policy
        assert self.operator.config is not None
        self.operator.config.write_text(yaml.safe_dump(self.settings))
        self.operator.start()


@pytest.fixture(scope="module")
def installation(operator: OperatorProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installation]:
    """The session's configuration plus NetworkPolicies, a default API key, and chat pages on the agent's Node."""
    assert operator.config is not None
    settings = yaml.safe_load(operator.config.read_text())
    settings["server"]["networkPolicy"] = {
        "enabled": True,
        "operatorNamespace": OPERATOR_NAMESPACE,
        "operatorPodLabels": OPERATOR_PODS,
        "allowFrom": [MONITORING],
    }
    settings["server"]["apiKeySecretRef"] = {"name": DEFAULT_KEY_SECRET, "key": "key"}
    taint = {"key": AGENT_TAINT.split("=")[0], "operator": "Exists", "effect": "NoSchedule"}
    # The agent's Node has GPUs, so it has their taint too.
    settings["uiScheduling"] = {"nodeSelector": dict([AGENT_LABEL]), "tolerations": [taint, GPU_TOLERATION]}
    folder = tmp_path_factory.mktemp("installation-operator")
    (folder / "operator.yaml").write_text(yaml.safe_dump(settings))
    mine = OperatorProcess(operator.kubeconfig, folder, folder / "operator.yaml")
    operator.stop()
    mine.start()
    try:
        yield Installation(mine, settings)
    finally:
        mine.stop()
        operator.start()


@pytest.fixture
def kwok_ns(api: Api, installation: Installation) -> Iterator[str]:
    name = api.create_namespace()
    yield name
    api.kube.delete("Namespace", "", name)


def kwok_server(name: str, ns: str, **spec: Any) -> dict[str, Any]:
    """A ModelServer of a model the operator knows, whose pods kwok simulates (no vLLM runs)."""
    return serving.model_server(
        name, ns, baseModel={"uri": "hf://Qwen/Qwen2.5-0.5B-Instruct"}, gpuType=KWOK_GPU, **spec
    )


# --- the NetworkPolicy: an operator-managed child -------------------------------------------------------------


def test_the_network_policy_follows_the_server_and_the_installation(
    api: Api, kwok_ns: str, installation: Installation
) -> None:
    ns = kwok_ns
    team_a = {"namespaceSelector": {"matchLabels": {"team": "a"}}}
    api.apply(kwok_server("guarded", ns, allowedClients=[team_a]))
    server = wait_for(lambda: api.get("ModelServer", ns, "guarded"), 30, "the ModelServer")
    policy = wait_for(lambda: api.get("NetworkPolicy", ns, "guarded"), 30, "the NetworkPolicy")
    (owner,) = policy["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["name"], owner["uid"], owner["controller"]) == (
        "ModelServer",
        "guarded",
        server["metadata"]["uid"],
        True,
    )
    assert policy["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "kubetune-operator"
    selector = {"app.kubernetes.io/component": "server", "kubetune.io/modelserver": "guarded"}
    chat_page = {"podSelector": {"matchLabels": {**selector, "app.kubernetes.io/component": "ui"}}}
    operator_pods = {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": OPERATOR_NAMESPACE}},
        "podSelector": {"matchLabels": OPERATOR_PODS},
    }
    assert policy["spec"] == {
        "podSelector": {"matchLabels": selector},
        "policyTypes": ["Ingress"],
        "ingress": [
            {"from": [team_a, chat_page, MONITORING], "ports": [{"protocol": "TCP", "port": 8000}]},
            {"from": [operator_pods], "ports": [{"protocol": "TCP", "port": 8001}]},
        ],
    }
    # Its selector is the server pods' (and only theirs): the pods the Deployment runs.
    pods = wait_for(lambda: api.kube.list("Pod", ns, "kubetune.io/modelserver=guarded"), 60, "the server pod")
    chosen = api.kube.list("Pod", ns, ",".join(f"{k}={v}" for k, v in selector.items()))
    assert [p["metadata"]["name"] for p in chosen] == [p["metadata"]["name"] for p in pods]

    # A change of the spec updates it in place.
    gateway = {"podSelector": {"matchLabels": {"role": "gateway"}}}
    patch = json.dumps({"spec": {"allowedClients": [gateway]}})
    api.kubectl("patch", "msrv", "guarded", "-n", ns, "--type=merge", "-p", patch)
    updated = wait_for(
        lambda: (p := api.get("NetworkPolicy", ns, "guarded")) and p["spec"]["ingress"][0]["from"][0] == gateway and p,
        30,
        "the NetworkPolicy to follow allowedClients",
    )
    assert updated["metadata"]["uid"] == policy["metadata"]["uid"]
    assert updated["spec"]["ingress"][0]["from"] == [gateway, chat_page, MONITORING]

    # The installation turns the feature off: the operator deletes its policy, and nothing else.
    deployment_uid = wait_for(lambda: api.get("Deployment", ns, "guarded"), 30, "the Deployment")["metadata"]["uid"]
    installation.restart(network_policy=False)
    wait_for(lambda: api.get("NetworkPolicy", ns, "guarded") is None, 60, "the NetworkPolicy to be deleted")
    assert api.get("Deployment", ns, "guarded")["metadata"]["uid"] == deployment_uid
    # ... and on again: written again.
    installation.restart(network_policy=True)
    again = wait_for(lambda: api.get("NetworkPolicy", ns, "guarded"), 60, "the NetworkPolicy to be written again")
    assert again["spec"]["ingress"][0]["from"] == [gateway, chat_page, MONITORING]

    # The ModelServer deleted while the operator is down: garbage collection removes the policy (ownerReferences).
    installation.operator.stop()
    try:
        api.kubectl("delete", "msrv", "guarded", "-n", ns)
        wait_for(lambda: api.get("NetworkPolicy", ns, "guarded") is None, 60, "the NetworkPolicy to be collected")
        wait_for(lambda: api.get("Deployment", ns, "guarded") is None, 60, "the Deployment to be collected")
    finally:
        installation.operator.start()


# --- OutOfMemory from the pod status ---------------------------------------------------------------------------


def test_an_oom_killed_vllm_is_out_of_memory(api: Api, kwok_ns: str) -> None:
    # kwok plays the kubelet that reports the kernel's OOM kill: the containers terminate with reason OOMKilled
    # and exit code 137, and vLLM writes no error line. (The node agent cannot: it never reports OOMKilled.)
    failure = {"kubetune.io/simulate-failure": "OOMKilled", "kubetune.io/simulate-failure-delay": "2s"}
    api.apply(kwok_server("oom", kwok_ns, podMetadata={"annotations": failure}))
    cond = wait_for(
        lambda: (c := api.condition("ModelServer", kwok_ns, "oom", "Ready")) and c["reason"] == "OutOfMemory" and c,
        60,
        "the Ready condition to say OutOfMemory",
    )
    assert "vLLM exited with code 137 (OOMKilled, killed by SIGKILL): the kernel killed it" in cond["message"], cond
    assert "raise spec.resources.memory" in cond["message"]
    # Failed, or Degraded while kwok's next pod is Ready for the 2 s before it too is killed.
    assert api.status("ModelServer", kwok_ns, "oom")["state"] in ("Failed", "Degraded")
    api.wait_event(kwok_ns, "oom", "OutOfMemory", "Warning")
    api.kubectl("delete", "msrv", "oom", "-n", kwok_ns)


def test_the_chat_page_goes_when_spec_ui_enabled_goes(api: Api, kwok_ns: str) -> None:
    # The chat page's Service and Deployment are children only while spec.ui.enabled: turned off, they are deleted.
    api.apply(kwok_server("paged", kwok_ns, ui={"enabled": True}))
    for kind in ("Service", "Deployment"):
        wait_for(lambda kind=kind: api.get(kind, kwok_ns, "paged-ui"), 60, f"the chat page's {kind}")
    api.kubectl("patch", "msrv", "paged", "-n", kwok_ns, "--type=merge", "-p", '{"spec":{"ui":{"enabled":false}}}')
    wait_for(
        lambda: all(api.get(kind, kwok_ns, "paged-ui") is None for kind in ("Service", "Deployment")),
        60,
        "the chat page's Service and Deployment deleted",
    )
    assert api.get("Deployment", kwok_ns, "paged") is not None  # the server itself stays
    api.kubectl("delete", "msrv", "paged", "-n", kwok_ns)


# --- the chat page with the server's API key --------------------------------------------------------------------


@pytest.fixture(scope="module")
def agent(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    yield from cpu_agent(cluster, tmp_path_factory.mktemp("installation-agent"), "installation")


@dataclass
class Scene:
    ns: str
    root: Path


@pytest.fixture(scope="module")
def scene(api: Api, installation: Installation, agent: AgentProcess) -> Iterator[Scene]:
    ns = api.create_namespace()
    for claim in ("models", "adapters"):
        api.create_bound_pvc(ns, claim)
    root = agent.state_dir / "pvc" / ns
    serving.build_model(root)
    # The untrained tiny model's greedy reply may decode to nothing; the adapter's is its training answer.
    serving.train_adapter(root, ADAPTER, steps=30)
    for secret, key in ((DEFAULT_KEY_SECRET, DEFAULT_KEY), (NAMED_KEY_SECRET, NAMED_KEY)):
        api.kubectl("create", "secret", "generic", secret, "-n", ns, f"--from-literal=key={key}")
    try:
        yield Scene(ns, root)
    finally:
        api.kubectl("delete", "modelservers,deployments,pods", "--all", "-n", ns, "--wait=false", check=False)
        wait_for(lambda: not api.kube.list("Pod", ns, "kubetune.io/modelserver"), 90, "the pods to go")
        api.kube.delete("Namespace", "", ns)


def ready_pod(api: Api, ns: str, server: str, component: str) -> dict[str, Any] | None:
    for pod in api.kube.list("Pod", ns, f"kubetune.io/modelserver={server},app.kubernetes.io/component={component}"):
        conditions = (pod.get("status") or {}).get("conditions") or []
        if not pod["metadata"].get("deletionTimestamp") and any(
            c["type"] == "Ready" and c["status"] == "True" for c in conditions
        ):
            return pod
    return None


def ask_the_page(address: str, model: str, question: str) -> tuple[list[str], str]:
    """What the chat page's backend answers, as the browser asks it (Gradio's API, one session): the models it
    lists on page load, then its reply when `model` is picked."""
    from gradio_client import Client

    client = Client(f"http://{address}/", verbose=False)
    listed = client.predict(api_name="/choices")
    names = [choice[0] for choice in (listed.get("choices") or [])] if isinstance(listed, dict) else []
    assert model in names, f"the page does not list {model}: {listed}"
    return names, str(client.predict(question, model, api_name="/reply"))


@NEEDS_ROOT
@NEEDS_SERVER
@pytest.mark.server
def test_the_chat_page_answers_through_vllm_with_the_servers_key(api: Api, scene: Scene) -> None:
    # Two servers that need a key: "named" names its Secret, "plain" names none and gets the installation's.
    # Both answer at most 16 tokens by default, greedily: the page's reply and vLLM's own are comparable.
    common = {
        "generationDefaults": {"temperature": 0, "topP": 1, "repetitionPenalty": 1.0, "maxTokens": 16},
        "adapters": [{"name": ADAPTER, "uri": f"pvc://adapters/{ADAPTER}/adapter"}],
        "ui": {"enabled": True},
    }
    named_key = {"apiKeySecretRef": {"name": NAMED_KEY_SECRET, "key": "key"}}
    api.apply(serving.model_server("named", scene.ns, auth=named_key, **common))
    api.apply(serving.model_server("plain", scene.ns, **common))
    keys = {"named": (NAMED_KEY_SECRET, NAMED_KEY), "plain": (DEFAULT_KEY_SECRET, DEFAULT_KEY)}
    for name, (secret, _) in keys.items():
        # The chat page's Deployment takes the same key from the same Secret as vLLM, by reference.
        ui = wait_for(lambda n=name: api.get("Deployment", scene.ns, f"{n}-ui"), 30, f"{name}'s chat page Deployment")
        (container,) = ui["spec"]["template"]["spec"]["containers"]
        assert container["env"] == [
            {"name": "OPENAI_API_KEY", "valueFrom": {"secretKeyRef": {"name": secret, "key": "key"}}}
        ], name
    for name, (_, key) in keys.items():
        server = wait_for(lambda n=name: ready_pod(api, scene.ns, n, "server"), 600, f"{name} Ready", interval=1)
        page = wait_for(lambda n=name: ready_pod(api, scene.ns, n, "ui"), 120, f"{name}'s chat page Ready", interval=1)
        address = f"{server['status']['podIP']}:{serving.SERVER_PORT}"
        # vLLM needs this server's key and no other.
        other = next(k for n, (_, k) in keys.items() if n != name)
        assert serving.chat(address, name)[0] == 401 and serving.chat(address, name, api_key=other)[0] == 401
        question = {"model": ADAPTER, "messages": [{"role": "user", "content": serving.QUESTION}]}
        code, body = serving.post(address, "/v1/chat/completions", question, api_key=key)
        assert code == 200, body
        expected = body["choices"][0]["message"]["content"].strip()
        assert expected, body
        # The page, started by the operator with the key from the Secret, lists the models and answers through
        # vLLM exactly what vLLM answers (greedy decoding).
        listed, answer = ask_the_page(f"{page['status']['podIP']}:{UI_PORT}", ADAPTER, serving.QUESTION)
        assert listed == [name, ADAPTER], listed
        assert answer.strip() == expected, (answer, expected)
        print(f"\n{name}: the chat page answered {answer.strip()!r} with the key of {keys[name][0]}")
