"""FineTuneJobs that really train on the node agent (the demo's flow), and what survives a crash.

The trainer runs on the CPU as a pod of the agent's Node (gpuType cpu-agent of the tests' operator config):
a tiny Qwen2 and a few steps. The failure paths: the trainer's process SIGKILLed after its first checkpoint
(a new Job resumes from that checkpoint), the operator SIGKILLed during a training (nothing
duplicated after its restart) and, with vLLM installed, a ModelServer pod killed (its replacement serves every
adapter again).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from tests.integration import serving
from tests.integration.support import (
    NEEDS_ROOT,
    NEEDS_TRAINER,
    AgentProcess,
    Api,
    OperatorProcess,
    cpu_agent,
    dump,
    wait_for,
)
from tests.integration.training import (
    SELECTOR,
    events_of,
    job_pods,
    pod_logs,
    tiny_model_namespace,
    training_job,
    wait_done,
)

from kubetune.dev.controlplane import Cluster

pytestmark = [NEEDS_ROOT, NEEDS_TRAINER]


def vllm_importable() -> bool:
    return importlib.util.find_spec("vllm") is not None and (
        subprocess.run([sys.executable, "-c", "import vllm"], capture_output=True).returncode == 0
    )


@dataclass
class Scene:
    """What the tests of this module share: the namespace and the agent's folder of its claims."""

    ns: str
    root: Path
    agent: AgentProcess


@pytest.fixture(scope="module")
def agent(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    """A node agent with two "GPUs" that takes only pods of gpuType cpu-agent."""
    yield from cpu_agent(cluster, tmp_path_factory.mktemp("dev-flow-agent"), "dev-flow")


@pytest.fixture(scope="module")
def scene(api: Api, operator: OperatorProcess, agent: AgentProcess) -> Iterator[Scene]:
    for ns in tiny_model_namespace(api, agent):
        yield Scene(ns, agent.state_dir / "pvc" / ns, agent)


def test_sft_job_trains_for_real_and_reports_progress(api: Api, scene: Scene) -> None:
    api.apply(training_job("sft", scene.ns, steps=8, every=4))
    status = wait_done(api, scene.ns, "sft")
    assert status["adapter"]["uri"] == "pvc://adapters/sft/adapter", dump(status)
    assert status["progress"]["step"] == status["progress"]["totalSteps"] == 8, dump(status)
    assert (scene.root / "adapters" / "sft" / "adapter" / "adapter_model.safetensors").is_file()
    assert status.get("restarts", 0) == 0, dump(status)
    table = api.kubectl("get", "ftj", "sft", "-n", scene.ns).stdout
    assert "100% (8/8)" in table, table


def test_killed_trainer_is_retried_and_resumes_from_its_checkpoint(api: Api, scene: Scene) -> None:
    name, steps, every = "crash", 24, 4
    api.apply(training_job(name, scene.ns, steps=steps, every=every))
    checkpoints = scene.root / "adapters" / name / "checkpoints"
    first = wait_for(
        lambda: sorted(checkpoints.glob("checkpoint-*/kubetune-complete.json")), 180, "a complete checkpoint", 0.1
    )
    (pod,) = [p for p in job_pods(api, scene.ns, name) if p["status"].get("phase") == "Running"]
    pid_files = list((scene.agent.state_dir / "pods" / pod["metadata"]["uid"] / "containers").glob("*/pid"))
    assert pid_files, f"no container pid of {pod['metadata']['name']}"
    os.kill(int(pid_files[0].read_text()), signal.SIGKILL)  # the trainer itself (the bootstrap exec'd it)
    killed_at = int(json.loads(first[-1].read_text())["step"])

    status = wait_done(api, scene.ns, name, timeout=240)
    assert status["restarts"] == 1, dump(status)
    assert status["lastRestart"]["pod"] == pod["metadata"]["name"], dump(status)
    assert status["progress"]["step"] == status["progress"]["totalSteps"] == steps, dump(status)
    # The failed pod went with its Job; the new Job's pod trained the rest.
    (retry,) = [p for p in job_pods(api, scene.ns, name) if p["metadata"]["name"] != pod["metadata"]["name"]]
    second = events_of(pod_logs(scene.agent, scene.ns, retry["metadata"]["name"]))
    resumes = [e for e in second if e["event"] == "resume"]
    assert resumes and resumes[0]["step"] >= killed_at and resumes[0]["step"] % every == 0, second[:10]
    progress = [e["step"] for e in second if e["event"] == "progress"]
    assert progress and progress[0] > resumes[0]["step"] and progress[-1] == steps, progress
    assert not [e for e in second if e["event"] == "train" and e.get("step") == 0], "the retry started from step 0"


def test_a_checkpoint_whose_report_a_crash_cut_off_is_resumed_from_and_reported(api: Api, scene: Scene) -> None:
    """The trainer dies (a crash point, as a SIGKILL) right after it marked checkpoint-8 complete and before its
    report: the operator restarts it knowing of checkpoint 4 only, the new pod resumes from 8 and says so."""
    name = "unreported"
    crash = {"name": "KUBETUNE_CRASH_AT", "value": "after-checkpoint@8"}
    api.apply(training_job(name, scene.ns, steps=16, every=4, env=[crash]))
    status = wait_done(api, scene.ns, name, timeout=300)
    last = status["lastRestart"]
    assert status["restarts"] == 1 and "code 137" in last["message"], dump(status)
    # Checkpoint 8 was never reported by the pod that saved it (checkpoint 4's report is sent at once; only a
    # very slow API server could leave even that one out).
    assert last["resumeStep"] in (4, None), last
    (event,) = [e for e in api.events(scene.ns, name) if e["reason"] == "TrainerRestarted"]
    assert f"step {last['resumeStep']} as last reported" in event["message"] or last["resumeStep"] is None, event
    assert status["progress"]["resumedFrom"] == 8 and status["checkpoint"]["step"] == 16, dump(status)
    (retry,) = [p for p in job_pods(api, scene.ns, name) if p["metadata"]["name"] != last["pod"]]
    events = events_of(pod_logs(scene.agent, scene.ns, retry["metadata"]["name"]))
    assert [e["step"] for e in events if e["event"] == "resume"] == [8], events[:10]
    assert {e.get("resumedFrom") for e in events if e["event"] == "progress"} == {8}, events


def test_operator_killed_during_training_duplicates_nothing(api: Api, scene: Scene, operator: OperatorProcess) -> None:
    name = "opkill"
    api.apply(training_job(name, scene.ns, steps=16, every=8))
    wait_for(
        lambda: any(p["status"].get("phase") == "Running" for p in job_pods(api, scene.ns, name)),
        120,
        "the training pod to run",
    )
    operator.kill()
    time.sleep(3)  # the trainer keeps reporting progress with nobody reconciling
    operator.start()
    status = wait_done(api, scene.ns, name, timeout=240)
    assert status["progress"]["step"] == 16, dump(status)
    assert len(api.children("Job", scene.ns, "kubetune.io/finetunejob", name)) == 1
    assert len(job_pods(api, scene.ns, name)) == 1
    assert status.get("restarts", 0) == 0, dump(status)


@pytest.mark.server
@pytest.mark.skipif(not vllm_importable(), reason="needs vLLM: hack/setup.sh trainer server")
def test_killed_server_pod_is_replaced_and_serves_every_adapter(api: Api, scene: Scene) -> None:
    adapters = {"sft", "crash", "opkill"}
    for name in adapters:
        assert api.status("FineTuneJob", scene.ns, name).get("state") == "Succeeded", name
    server = "flow"
    api.apply(
        serving.model_server(
            server, scene.ns, adapterSelector={"matchLabels": SELECTOR}, engineArgs=["--dtype=float32"]
        )
    )

    def serving_all() -> str | None:
        addresses = serving.replica_addresses(api, scene.ns, server)
        if len(addresses) != 1:
            return None
        with contextlib.suppress(OSError, ValueError):
            if adapters <= set(serving.served_models(addresses[0])):
                return addresses[0]
        return None

    first = wait_for(serving_all, 300, "the server with every adapter", 1)
    (pod,) = [
        p
        for p in api.children("Pod", scene.ns, "kubetune.io/modelserver", server)
        if p["metadata"]["labels"].get("app.kubernetes.io/component") == "server"
    ]
    for pid_file in (scene.agent.state_dir / "pods" / pod["metadata"]["uid"] / "containers").glob("*/pid"):
        with contextlib.suppress(OSError, ValueError):
            os.killpg(int(pid_file.read_text()), signal.SIGKILL)
    api.kube.delete("Pod", scene.ns, pod["metadata"]["name"])
    wait_for(
        lambda: pod["metadata"]["name"] not in {p["metadata"]["name"] for p in api.kube.list("Pod", scene.ns)},
        60,
        "the killed pod to go",
    )
    second = wait_for(serving_all, 300, "the replacement with every adapter", 1)
    assert second != first  # a new pod, a new address
    for name in adapters:
        code, body = serving.chat(second, name)
        assert code == 200, body
    wait_for(
        lambda: all(
            (a := serving.adapter_status(api, scene.ns, server, name)) and a["state"] == "Loaded" for name in adapters
        ),
        60,
        "every adapter Loaded in status",
    )
