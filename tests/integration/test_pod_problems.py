"""Pods that cannot start, and trainers that die, show on the FineTuneJob or ModelServer: a reason in the
Running/Ready condition and a Warning Event, not "waiting for pods". The node agent reports what a kubelet
would (a missing Secret, a volume it cannot mount, an image it cannot pull)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from tests.integration.support import (
    AGENT_GPU_TYPE,
    AgentProcess,
    Api,
    OperatorProcess,
    cpu_agent,
    dump,
    example,
    simulated_ftj,
    wait_for,
)
from tests.integration.training import tiny_model_namespace, training_job

from kubetune.dev.controlplane import Cluster

FTJ = "FineTuneJob"
MS = "ModelServer"
ON_AGENT = {"nodes": 1, "gpusPerNode": 1, "gpuType": AGENT_GPU_TYPE}
UNPULLABLE = "registry.invalid/kubetune/trainer:0.1.0"


@pytest.fixture(scope="module")
def agent(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    yield from cpu_agent(cluster, tmp_path_factory.mktemp("problems-agent"), "problems")


def job_on_agent(name: str, ns: str, **spec: Any) -> dict[str, Any]:
    body = simulated_ftj(name, ns, resources=ON_AGENT, **spec)
    body["spec"].pop("podMetadata", None)  # no kwok annotations: the agent runs it
    return body


def not_running_because(api: Api, ns: str, name: str, reason: str) -> dict[str, Any] | None:
    return condition_false_because(api, ns, name, "Running", reason)


def not_prepared_because(api: Api, ns: str, name: str, reason: str) -> dict[str, Any] | None:
    """The prepare pod (the CPU step before the training Job, docs/cache.md) cannot start: Prepared says why."""
    return condition_false_because(api, ns, name, "Prepared", reason)


def condition_false_because(api: Api, ns: str, name: str, type_: str, reason: str) -> dict[str, Any] | None:
    cond = api.condition(FTJ, ns, name, type_)
    return cond if cond and cond["status"] == "False" and cond["reason"] == reason else None


@pytest.fixture
def tiny_ns(api: Api, operator: OperatorProcess, agent: AgentProcess) -> Iterator[str]:
    """A namespace with the tiny model and its data on the agent: the prepare step passes there."""
    yield from tiny_model_namespace(api, agent)


def test_a_missing_secret_is_named(api: Api, tiny_ns: str) -> None:
    # The prepare pod takes the Secret as optional (it has no use for it) and passes; the trainer needs it.
    ns = tiny_ns
    env = [{"name": "WANDB_API_KEY", "secretKeyRef": {"name": "wandb", "key": "key"}}]
    api.apply(training_job("nosecret", ns, 4, 2, env=env))
    cond = wait_for(lambda: not_running_because(api, ns, "nosecret", "MissingSecret"), 240, "MissingSecret")
    assert 'secret "wandb" not found' in cond["message"].lower() and "nosecret-0-" in cond["message"], cond
    assert api.status(FTJ, ns, "nosecret")["state"] == "Pending"
    assert "wandb" in api.wait_event(ns, "nosecret", "MissingSecret", "Warning", 15)["message"]


def test_a_volume_that_cannot_be_mounted_is_named(api: Api, ns: str, agent: AgentProcess) -> None:
    # The kubelet says this only in a FailedMount Event of the pod: the operator reads it.
    # The first pod to mount the dataset is the prepare pod: the run stops there, before any GPU is requested.
    dataset = {"uri": "configmap://chats/train.jsonl", "format": "prompt-response"}
    api.apply(job_on_agent("nomount", ns, dataset=dataset))
    cond = wait_for(lambda: not_prepared_because(api, ns, "nomount", "MissingConfigMap"), 60, "MissingConfigMap")
    assert 'configmap "chats" not found' in cond["message"].lower() and "nomount-prep-" in cond["message"], cond
    assert api.status(FTJ, ns, "nomount")["state"] == "Pending" and api.get("Job", ns, "nomount") is None
    api.wait_event(ns, "nomount", "MissingConfigMap", "Warning", 15)


def test_an_image_that_cannot_be_pulled_is_named(api: Api, ns: str, agent: AgentProcess) -> None:
    api.apply(job_on_agent("nopull", ns, image=UNPULLABLE))  # the prepare pod runs from it first
    cond = wait_for(lambda: not_prepared_because(api, ns, "nopull", "ImagePullBackOff"), 60, "ImagePullBackOff")
    assert UNPULLABLE in cond["message"] and "no such host" in cond["message"], cond
    api.wait_event(ns, "nopull", "ImagePullBackOff", "Warning", 15)


def test_a_server_whose_image_cannot_be_pulled_says_so(api: Api, ns: str, agent: AgentProcess) -> None:
    body = example("modelserver.yaml", "nopull", ns, adapters=[], ui={"enabled": False})
    body["spec"].pop("adapterSelector", None)
    body["spec"] |= {"gpuType": AGENT_GPU_TYPE, "tensorParallelSize": 1, "image": UNPULLABLE}

    def pull_failure() -> dict[str, Any] | None:
        cond = api.condition(MS, ns, "nopull", "Ready")
        return cond if cond and cond["reason"] == "ImagePullBackOff" else None

    api.apply(body)
    cond = wait_for(pull_failure, 60, "Ready=False ImagePullBackOff")
    assert cond["status"] == "False" and UNPULLABLE in cond["message"], cond
    api.wait_event(ns, "nopull", "ImagePullBackOff", "Warning", 15)


def test_a_trainer_that_dies_and_is_restarted_posts_why(api: Api, ns: str) -> None:
    body = simulated_ftj("dies", ns, run_seconds=60, backoffLimit=1)
    body["spec"]["podMetadata"]["annotations"] |= {
        "kubetune.io/simulate-failure": "Error",
        "kubetune.io/simulate-failure-exit-code": "137",
    }
    api.apply(body)
    event = api.wait_event(ns, "dies", "TrainerRestarted", "Warning", 60)
    message = event["message"]
    assert "exited with code 137" in message and "killed by SIGKILL" in message, message
    assert "simulated Error" in message and "restart 1 of at most 1" in message, message
    assert "the training pod starts again from the newest checkpoint (none reported yet)" in message, message
    status = api.wait_state(FTJ, ns, "dies", "Failed", 60)  # the second failure uses up backoffLimit 1
    assert status["restarts"] == 1 and status["lastRestart"]["reason"] == "TrainerFailed", dump(status)
