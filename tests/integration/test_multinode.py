"""Two training pods train one model and fail as one group: real trainer processes on the node agent (CPU,
gloo), rendezvous through the job's headless Service, restarts from the newest checkpoint."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.integration.support import (
    AGENT_GPU_TYPE,
    NEEDS_ROOT,
    AgentProcess,
    Api,
    OperatorProcess,
    cpu_agent,
    dump,
    wait_for,
)
from tests.integration.training import events_of, job_pods, tiny_model_namespace, training_job, wait_done

from kubetune.dev.controlplane import Cluster

pytestmark = NEEDS_ROOT
FTJ = "FineTuneJob"
TWO_PODS = {"nodes": 2, "gpusPerNode": 1, "gpuType": AGENT_GPU_TYPE}
FRUITS = ("apple", "pear", "plum", "fig", "lime", "kiwi", "date", "grape")


@pytest.fixture(scope="module")
def agent(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    """Two "GPUs": both pods of a two-node job run on this Node, as two processes."""
    yield from cpu_agent(cluster, tmp_path_factory.mktemp("multinode-agent"), "multinode")


@pytest.fixture(scope="module")
def ns(api: Api, operator: OperatorProcess, agent: AgentProcess) -> Iterator[str]:
    yield from tiny_model_namespace(api, agent)


def trained(agent: AgentProcess, ns: str, name: str) -> tuple[float, dict[str, Any]]:
    """The run's mean training loss over all its steps and the adapter's tensors, as the trainer wrote them."""
    from safetensors.numpy import load_file

    adapter = agent.state_dir / "pvc" / ns / "adapters" / name / "adapter"
    metrics = json.loads((adapter / "kubetune.json").read_text())["metrics"]
    return float(metrics["train_loss"]), load_file(str(adapter / "adapter_model.safetensors"))


def job_pods_all(agent: AgentProcess, ns: str, name: str) -> list[Path]:
    """The trainer logs of every pod the job ever had (the agent keeps them after the pods are gone)."""
    return sorted((agent.state_dir / "logs" / ns).glob(f"{name}-*_*/trainer.log"))


def trainer_pid(agent: AgentProcess, pod: dict[str, Any]) -> int:
    (pid_file,) = (agent.state_dir / "pods" / pod["metadata"]["uid"] / "containers").glob("trainer/pid")
    return int(pid_file.read_text())


def running_pods(api: Api, ns: str, name: str) -> list[dict[str, Any]]:
    pods = [p for p in job_pods(api, ns, name) if p["status"].get("phase") == "Running"]
    return sorted(pods, key=lambda p: p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"])


def test_two_pods_train_one_model_with_the_loss_of_one_pod(api: Api, ns: str, agent: AgentProcess) -> None:
    # Same data, seed and global batch; no dropout (each process would draw its own masks). 8 records in global
    # batches of 4: every step holds the same 4 records whether one process takes them or two take 2 each.
    records = [{"prompt": f"Name fruit number {i}.", "response": f"Fruit {i} is a {f}."} for i, f in enumerate(FRUITS)]
    (agent.state_dir / "pvc" / ns / "data" / "eight.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    data = {"uri": "pvc://data/eight.jsonl"}
    api.apply(training_job("one", ns, steps=6, every=6, dataset=data))
    api.apply(training_job("two", ns, steps=6, every=6, dataset=data, resources=TWO_PODS))
    two = wait_done(api, ns, "two", timeout=300)
    one = wait_done(api, ns, "one", timeout=300)
    assert two["plan"]["worldSize"] == 2 and one["plan"]["worldSize"] == 1
    # Both ranks took part: two processes rendezvoused at rank 0's name under the headless Service.
    events = [e for log in job_pods_all(agent, ns, "two") for e in events_of(log.read_text())]
    # (Once, under a full suite's load, the group started twice: the status then says why it restarted.)
    assert sorted(e["nodeRank"] for e in events if e["event"] == "launch") == [0, 1], (dump(two), events)
    (start,) = [e for e in events if e["event"] == "train"]  # rank 0 speaks for the group
    assert start["worldSize"] == 2
    # One progress stream: only rank 0 reports (its status is the job's).
    assert two["progress"]["step"] == 6, dump(two)
    # One model: the same loss over the run and the same adapter.
    (loss_two, weights_two), (loss_one, weights_one) = trained(agent, ns, "two"), trained(agent, ns, "one")
    assert loss_two == pytest.approx(loss_one, abs=1e-3)
    assert weights_two.keys() == weights_one.keys()
    assert max(float(abs(weights_two[k] - weights_one[k]).max()) for k in weights_one) < 1e-4


def restart_after(api: Api, ns: str, agent: AgentProcess, name: str, kill: Any) -> tuple[dict[str, Any], float]:
    """Run a two-pod job, `kill(pods)` once a checkpoint is complete; the final status and the seconds from the
    failure until both ranks trained a step again."""
    api.apply(training_job(name, ns, steps=24, every=4, resources=TWO_PODS))
    checkpoints = agent.state_dir / "pvc" / ns / "adapters" / name / "checkpoints"
    wait_for(lambda: list(checkpoints.glob("checkpoint-*/kubetune-complete.json")), 300, "a checkpoint", 0.2)
    pods = wait_for(lambda: (p := running_pods(api, ns, name)) and len(p) == 2 and p, 30, "two running pods")
    failed_at = time.monotonic()
    kill(pods)
    old = {p["metadata"]["name"] for p in pods}

    def trained_again() -> bool:
        """A step after the resume, logged by the new rank 0: every rank took part in its all-reduce."""
        pods = [(p.parent.name.split("_")[0], p) for p in job_pods_all(agent, ns, name)]
        new = [log for pod, log in pods if pod not in old and pod.startswith(f"{name}-0-")]
        for log in new:
            events = events_of(log.read_text())
            resumed = [e["step"] for e in events if e["event"] == "resume"]
            if any(e["event"] == "progress" and e["step"] > (resumed or [0])[0] for e in events):
                return True
        return False

    wait_for(trained_again, 180, "both ranks training again", 0.2)
    seconds = time.monotonic() - failed_at
    print(f"\n{name}: {seconds:.1f} s from the failure until both ranks trained a step again")
    return wait_done(api, ns, name, timeout=300), seconds


def test_a_killed_rank_restarts_the_group_from_its_checkpoint(api: Api, ns: str, agent: AgentProcess) -> None:
    killed: list[str] = []

    def kill_rank1(pods: list[dict[str, Any]]) -> None:
        killed.append(pods[1]["metadata"]["name"])
        os.kill(trainer_pid(agent, pods[1]), signal.SIGKILL)

    status, _ = restart_after(api, ns, agent, "kill", kill_rank1)
    assert status["restarts"] == 1 and status["progress"]["step"] == 24, dump(status)
    last = status["lastRestart"]
    assert last["pod"] == killed[0] and last["reason"] == "TrainerFailed" and "code 137" in last["message"], last
    assert last["resumeStep"] % 4 == 0 and last["resumeStep"] >= 4, last
    events = [e for e in api.events(ns, "kill") if e["reason"] == "TrainerRestarted"]
    start = f"from the newest checkpoint, step {last['resumeStep']} as last reported"
    assert len(events) == 1 and start in events[0]["message"], events
    # The new group resumed from that checkpoint: at most one checkpoint interval of steps is trained again.
    resumed = [
        e["step"]
        for log in job_pods_all(agent, ns, "kill")
        for e in events_of(log.read_text())
        if e["event"] == "resume"
    ]
    assert resumed and min(resumed) == status["progress"]["resumedFrom"] >= last["resumeStep"], resumed


def test_a_deleted_rank0_pod_restarts_the_group(api: Api, ns: str, agent: AgentProcess) -> None:
    def delete_rank0(pods: list[dict[str, Any]]) -> None:
        api.kube.delete("Pod", ns, pods[0]["metadata"]["name"])

    status, _ = restart_after(api, ns, agent, "gone", delete_rank0)
    assert status["restarts"] == 1 and status["progress"]["step"] == 24, dump(status)


def test_a_permanent_error_fails_the_group_without_a_restart(api: Api, ns: str, agent: AgentProcess) -> None:
    bad = agent.state_dir / "pvc" / ns / "data" / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "hi", "response": "hello"}) + "\n" + '{"prompt": "no answer"}\n')
    api.apply(training_job("bad", ns, steps=6, every=6, resources=TWO_PODS, dataset={"uri": "pvc://data/bad.jsonl"}))
    status = api.wait_state(FTJ, ns, "bad", "Failed", 240)
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "DatasetInvalid" and "line 2" in failed["message"], failed
    assert status.get("restarts", 0) == 0 and "lastRestart" not in status, dump(status)
