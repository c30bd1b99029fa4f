"""FineTuneJobs under the real Kueue: queued for quota, admitted, preempted by a higher priority, resumed from their
checkpoint. Kueue's manager (built from its Go module) runs beside the session's control plane; the trainers run
for real on a node agent whose two "GPUs" are more than the ClusterQueue's quota of one."""

from __future__ import annotations

import copy
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from tests.integration.support import (
    EXAMPLES,
    NEEDS_ROOT,
    AgentProcess,
    Api,
    OperatorProcess,
    cpu_agent,
    dump,
    wait_for,
)
from tests.integration.training import events_of, job_pods, tiny_model_namespace, training_job, wait_done

from kubetune.dev import kueue
from kubetune.dev.controlplane import Cluster

pytestmark = NEEDS_ROOT
FTJ = "FineTuneJob"
QUEUE = "team-a"


@pytest.fixture(scope="module")
def kueue_manager(cluster: Cluster) -> Iterator[Path]:
    """Kueue's manager for this module, in the cluster's state folder (certificates from its CA); stopped, and
    its webhooks removed, at the end. Yields its state folder."""
    state_dir = cluster.kubeconfig.parent
    kueue.start(cluster, state_dir)
    try:
        yield state_dir
    finally:
        kueue.stop(cluster, state_dir)


@pytest.fixture(scope="module")
def agent(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    yield from cpu_agent(cluster, tmp_path_factory.mktemp("kueue-agent"), "kueue")


@pytest.fixture(scope="module")
def ns(api: Api, operator: OperatorProcess, agent: AgentProcess, kueue_manager: Path) -> Iterator[str]:
    """The tiny model's namespace with a LocalQueue in a ClusterQueue of one GPU (examples/kueue/queues.yaml)."""
    for name in tiny_model_namespace(api, agent):
        queues = example_queues(name, gpus=1)
        api.kubectl("apply", "--server-side", "-f", "-", input=yaml.safe_dump_all(queues))
        try:
            yield name
        finally:
            kinds = (
                "clusterqueue/gpus-test,resourceflavor/cpu-agent,workloadpriorityclass/low,workloadpriorityclass/high"
            )
            api.kubectl("delete", *kinds.split(","), "--ignore-not-found", "--wait=false", check=False)


def example_queues(namespace: str, gpus: int) -> list[dict[str, Any]]:
    """examples/kueue/queues.yaml for the agent's Node: one team's LocalQueue in `namespace`, `gpus` of quota."""
    docs = [d for d in yaml.safe_load_all((EXAMPLES / "kueue" / "queues.yaml").read_text()) if d]
    kept = []
    for doc in copy.deepcopy(docs):
        kind, name = doc["kind"], doc["metadata"]["name"]
        if kind == "ResourceFlavor":
            doc["metadata"]["name"] = "cpu-agent"
            doc["spec"] = {}
        elif kind == "ClusterQueue":
            doc["metadata"]["name"] = "gpus-test"
            flavor = doc["spec"]["resourceGroups"][0]["flavors"][0]
            flavor["name"] = "cpu-agent"
            for resource in flavor["resources"]:
                if resource["name"] == "nvidia.com/gpu":
                    resource["nominalQuota"] = gpus
        elif kind == "LocalQueue":
            if name != QUEUE:
                continue
            doc["metadata"]["namespace"] = namespace
            doc["spec"]["clusterQueue"] = "gpus-test"
        kept.append(doc)
    return kept


def workload_of(api: Api, ns: str, job_name: str) -> dict[str, Any] | None:
    """Kueue's Workload of the training Job `job_name` (its controller ownerReference)."""
    out = api.kubectl("get", "workloads.kueue.x-k8s.io", "-n", ns, "-o", "yaml").stdout
    for item in yaml.safe_load(out)["items"]:
        owners = item["metadata"].get("ownerReferences") or []
        if any(o["kind"] == "Job" and o["name"] == job_name for o in owners):
            return dict(item)
    return None


def condition(obj: dict[str, Any], type_: str) -> dict[str, Any]:
    return next((c for c in (obj.get("status") or {}).get("conditions") or [] if c["type"] == type_), {})


def suspend_owners(job: dict[str, Any]) -> list[str]:
    """The managers whose managedFields entry of the Job claims spec.suspend."""
    entries = job["metadata"].get("managedFields") or []
    return [e["manager"] for e in entries if "f:suspend" in ((e.get("fieldsV1") or {}).get("f:spec") or {})]


def queued_job(name: str, ns: str, steps: int, **spec: Any) -> dict[str, Any]:
    return training_job(name, ns, steps, 2, queueName=QUEUE, **spec)


def test_quota_for_one_queues_the_second_with_kueues_reason_and_runs_it_after_the_first(
    api: Api, ns: str, agent: AgentProcess
) -> None:
    api.apply(queued_job("first", ns, 6))
    api.wait_state(FTJ, ns, "first", "Running", timeout=240)
    # The first trainer is held until the second job shows Kueue's words, so that "first" cannot finish and free
    # the quota before the test has looked (its 6 steps take a few seconds).
    (first_pod,) = job_pods(api, ns, "first")
    first_trainer = wait_for(lambda: trainer_pid_or_none(agent, first_pod), 120, "the first trainer's process")
    os.kill(first_trainer, signal.SIGSTOP)
    try:
        api.apply(queued_job("second", ns, 4))
        # A job without queueName is no business of Kueue's: it runs beside them although the quota is used up.
        api.apply(training_job("plain", ns, 2, 2))
        api.wait_state(FTJ, ns, "second", "Queued", timeout=60)
        status = kueue_words_on(api, ns, "second")
        queued = condition({"status": status}, "Queued")
        assert queued["status"] == "True" and status["state"] == "Queued", dump(status)
        assert "insufficient" in queued["message"] and "nvidia.com/gpu" in queued["message"], queued

        # The operator applies onto the queued Job (a spec change it makes in place): suspend stays Kueue's.
        ttl = '{"spec":{"ttlSecondsAfterFinished":3600}}'
        api.kubectl("patch", "finetunejob", "second", "-n", ns, "--type=merge", "-p", ttl)
        spec = lambda: (api.get("Job", ns, "second") or {}).get("spec", {})  # noqa: E731
        wait_for(lambda: spec().get("ttlSecondsAfterFinished") == 3600, 30, "the Job's new ttlSecondsAfterFinished")
        held = api.kubectl("get", "job", "second", "-n", ns, "-o", "yaml", "--show-managed-fields").stdout
        held_job = yaml.safe_load(held)
        assert held_job["spec"]["suspend"] is True, "the operator must not resume a Job that Kueue holds"
        assert "kubetune" not in suspend_owners(held_job), suspend_owners(held_job)
    finally:
        os.kill(first_trainer, signal.SIGCONT)

    plain = wait_done(api, ns, "plain", timeout=300)
    plain_job = api.get("Job", ns, "plain") or {}
    assert "kueue.x-k8s.io/queue-name" not in plain_job["metadata"]["labels"] and plain["state"] == "Succeeded"
    assert workload_of(api, ns, "plain") is None

    wait_done(api, ns, "first", timeout=300)
    wait_done(api, ns, "second", timeout=300)
    second = yaml.safe_load(api.kubectl("get", "job", "second", "-n", ns, "-o", "yaml", "--show-managed-fields").stdout)
    owners = suspend_owners(second)
    assert owners and "kubetune" not in owners, owners  # Kueue resumed it, the operator never touched it
    final = api.status(FTJ, ns, "second")
    assert condition({"status": final}, "Queued")["status"] == "False", dump(final)


def kueue_words_on(api: Api, ns: str, name: str) -> dict[str, Any]:
    """The FineTuneJob's status once its Queued condition says what its Workload's QuotaReserved says."""
    seen: list[Any] = []

    def same_words() -> dict[str, Any] | None:
        status = api.status(FTJ, ns, name)
        reserved = condition(workload_of(api, ns, name) or {}, "QuotaReserved")
        queued = condition({"status": status}, "Queued")
        seen[:] = [queued, reserved]
        same = reserved.get("message") and all(queued.get(k) == reserved.get(k) for k in ("reason", "message"))
        return status if same else None

    try:
        return wait_for(same_words, 60, "Kueue's reason and message on the FineTuneJob")
    except AssertionError as err:
        raise AssertionError(f"{err}; Queued condition, QuotaReserved: {seen}") from None


def test_a_higher_priority_job_preempts_a_lower_one_which_resumes_from_its_checkpoint(
    api: Api, ns: str, agent: AgentProcess
) -> None:
    api.apply(queued_job("low", ns, 40, priorityClassName="low"))
    api.wait_state(FTJ, ns, "low", "Running", timeout=240)
    checkpoints = agent.state_dir / "pvc" / ns / "adapters" / "low" / "checkpoints"
    wait_for(lambda: list(checkpoints.glob("checkpoint-*/kubetune-complete.json")), 300, "a checkpoint of low", 0.3)
    (first,) = job_pods(api, ns, "low")
    first_pod = first["metadata"]["name"]
    # The trainer is held between two instructions until Kueue has preempted it, so that the preemption always
    # meets a run in the middle of its steps (on an idle machine the 40 steps take about 25 s); Kueue's SIGTERM
    # waits for it and is handled when it goes on.
    trainer = trainer_pid(agent, first)
    os.kill(trainer, signal.SIGSTOP)
    try:
        api.apply(queued_job("high", ns, 2, priorityClassName="high"))
        status = api.wait_state(FTJ, ns, "low", "Preempted", timeout=120)
    finally:
        os.kill(trainer, signal.SIGCONT)
    preempted = condition({"status": status}, "Preempted")
    workload = workload_of(api, ns, "low") or {}
    kueue_says = condition(workload, "Preempted") or condition(workload, "Evicted")
    assert preempted["status"] == "True" and preempted["reason"] == kueue_says["reason"], dump(status)
    assert preempted["message"].startswith(kueue_says["message"] + " (FineTuneJob high)"), (preempted, kueue_says)

    wait_done(api, ns, "high", timeout=300)
    final = wait_done(api, ns, "low", timeout=400)
    assert final.get("restarts", 0) == 0, dump(final)  # a preemption is no failure
    assert condition({"status": final}, "Preempted")["status"] == "False", dump(final)

    logs = sorted((agent.state_dir / "logs" / ns).glob("low-*_*/trainer.log"))
    first = [e for log in logs if first_pod in str(log) for e in events_of(log.read_text())]
    later = [e for log in logs if first_pod not in str(log) for e in events_of(log.read_text())]
    stopped = [e for e in first if e["event"] == "stopped"]
    assert stopped and stopped[0]["reason"] == "SIGTERM", first[-5:]  # it checkpointed on SIGTERM
    resumed = [e["step"] for e in later if e["event"] == "resume"]
    assert resumed and resumed[0] >= 2, later[:5]


def test_a_queued_job_suspended_by_its_user_gives_its_quota_back_and_resumes_queued(
    api: Api, ns: str, agent: AgentProcess
) -> None:
    api.apply(queued_job("paused", ns, 10))
    api.wait_state(FTJ, ns, "paused", "Running", timeout=240)
    checkpoints = agent.state_dir / "pvc" / ns / "adapters" / "paused" / "checkpoints"
    wait_for(lambda: list(checkpoints.glob("checkpoint-*/kubetune-complete.json")), 300, "a checkpoint", 0.3)

    api.kubectl("patch", "finetunejob", "paused", "-n", ns, "--type=merge", "-p", '{"spec":{"suspend":true}}')
    status = api.wait_state(FTJ, ns, "paused", "Suspended", timeout=60)
    assert condition({"status": status}, "Suspended")["reason"] == "Suspended", dump(status)
    # The Job goes (its Workload with it): the quota is free for others while the user holds the run.
    wait_for(lambda: api.get("Job", ns, "paused") is None and workload_of(api, ns, "paused") is None, 120, "no Job")

    api.kubectl("patch", "finetunejob", "paused", "-n", ns, "--type=merge", "-p", '{"spec":{"suspend":false}}')
    final = wait_done(api, ns, "paused", timeout=400)
    assert final.get("restarts", 0) == 0, dump(final)
    resumed = [e["step"] for log in trainer_logs(agent, ns, "paused") for e in events_of(log) if e["event"] == "resume"]
    assert resumed and resumed[0] >= 2, resumed


def trainer_pid(agent: AgentProcess, pod: dict[str, Any]) -> int:
    """The process of a pod's trainer container on the node agent (its bootstrap exec'd the trainer)."""
    pid = trainer_pid_or_none(agent, pod)
    assert pid is not None, pod["metadata"]["name"]
    return pid


def trainer_pid_or_none(agent: AgentProcess, pod: dict[str, Any]) -> int | None:
    pid_file = agent.state_dir / "pods" / pod["metadata"]["uid"] / "containers" / "trainer" / "pid"
    text = pid_file.read_text().strip() if pid_file.exists() else ""
    return int(text) if text else None


def trainer_logs(agent: AgentProcess, ns: str, name: str) -> list[str]:
    return [p.read_text() for p in sorted((agent.state_dir / "logs" / ns).glob(f"{name}-*_*/trainer.log"))]
