"""Kueue integration, pure parts: the queued training Job, status from its Workload, the suspend field released
to Kueue, and the dev cluster's webhook configurations."""

from __future__ import annotations

import base64
from typing import Any

import yaml

from kubetune.api.v1alpha1 import FineTuneJob
from kubetune.dev import kueue
from kubetune.k8s import children
from kubetune.render import finetunejob as render
from kubetune.status import finetunejob as fs
from tests.unit.test_render import CONFIG, PLAN, load_ftj

NOW = "2026-12-07T06:00:00Z"


def queued(**spec: Any) -> FineTuneJob:
    ftj = load_ftj("finetunejob-sft.yaml")
    return ftj.model_copy(update={"spec": ftj.spec.model_copy(update={"queue_name": "team-a", **spec})})


def test_a_queued_job_is_created_suspended_and_its_suspend_is_create_only() -> None:
    job = render.children(queued(), PLAN, CONFIG)[-1]
    assert job["spec"]["suspend"] is True  # Kueue resumes it when it admits the Workload
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    assert render.create_only_fields(queued()) == [("spec", "suspend")]
    assert render.create_only_fields(load_ftj("finetunejob-sft.yaml")) == []
    # What the operator applies onto the existing Job says nothing about suspend.
    assert "suspend" not in children.without(job, render.create_only_fields(queued()))["spec"]


def test_an_evicted_trainer_is_no_failure_of_a_queued_job_only() -> None:
    ignore = {
        "action": "Ignore",
        "onExitCodes": {"containerName": "trainer", "operator": "In", "values": [render.EXIT_TERMINATED]},
    }
    queued_rules = render.children(queued(), PLAN, CONFIG)[-1]["spec"]["podFailurePolicy"]["rules"]
    plain_rules = render.children(load_ftj("finetunejob-sft.yaml"), PLAN, CONFIG)[-1]["spec"]["podFailurePolicy"]
    assert queued_rules[-1] == ignore
    assert ignore not in plain_rules["rules"]


def test_priority_is_kueues_label_when_queued_and_the_pods_priority_class_otherwise() -> None:
    job = render.children(queued(priority_class_name="urgent"), PLAN, CONFIG)[-1]
    assert job["metadata"]["labels"]["kueue.x-k8s.io/priority-class"] == "urgent"
    assert "priorityClassName" not in job["spec"]["template"]["spec"]
    plain = load_ftj("finetunejob-sft.yaml")
    plain = plain.model_copy(update={"spec": plain.spec.model_copy(update={"priority_class_name": "urgent"})})
    job = render.children(plain, PLAN, CONFIG)[-1]
    assert job["spec"]["template"]["spec"]["priorityClassName"] == "urgent"
    assert "kueue.x-k8s.io/priority-class" not in job["metadata"]["labels"]


def test_a_queued_job_suspended_by_its_user_has_no_training_job() -> None:
    kinds = [c["kind"] for c in render.children(queued(suspend=True), PLAN, CONFIG)]
    assert kinds == ["ServiceAccount", "Role", "RoleBinding"]
    expected = render.expected_children("team-a", "x", 1, job=False)
    assert [m["kind"] for m in expected] == kinds


def test_released_fields_leave_the_managed_fields_entry() -> None:
    fields = {"f:metadata": {"f:labels": {}}, "f:spec": {"f:suspend": {}, "f:parallelism": {}}}
    assert children.without_fields(fields, [("spec", "suspend")]) == {
        "f:metadata": {"f:labels": {}},
        "f:spec": {"f:parallelism": {}},
    }
    # Kueue took the field already (its update moved the ownership): nothing to give up.
    assert children.without_fields({"f:spec": {"f:parallelism": {}}}, [("spec", "suspend")]) == {
        "f:spec": {"f:parallelism": {}}
    }


class RecordingKube:
    """The calls a write makes, answering a Job created by POST whose entry still owns spec.suspend."""

    field_manager = "kubetune"

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.entry = {"manager": "kubetune", "operation": "Update", "fieldsV1": {"f:spec": {"f:suspend": {}}}}

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any]:
        return {"metadata": {"uid": "u1", "managedFields": [self.entry]}}

    def rename_created_entry(self, *args: Any) -> dict[str, Any]:
        self.calls.append(("rename", args))
        return {}

    def apply(self, manifest: dict[str, Any], uid: str | None = None) -> dict[str, Any]:
        self.calls.append(("apply", manifest))
        return manifest


def test_the_first_apply_onto_a_created_queued_job_gives_suspend_up() -> None:
    ftj = queued()
    job = render.children(ftj, PLAN, CONFIG)[-1]
    owner = children.controller_of(job["metadata"])
    assert owner is not None
    known = children.Seen("u1", owner, (("kubetune", "Update"),))
    kube = RecordingKube()
    children.write(kube, job, known, release=render.create_only_fields(ftj))  # type: ignore[arg-type]
    (_, rename), (_, applied) = kube.calls
    assert rename[-1] == ({"f:spec": {"f:suspend": {}}}, {"f:spec": {}})
    assert "suspend" not in applied["spec"]


def workload(*conditions: tuple[str, str, str, str], uid: str = "job-1") -> dict[str, Any]:
    rows = [{"type": t, "status": s, "reason": r, "message": m} for t, s, r, m in conditions]
    return {"metadata": {"name": "job-x-1"}, "jobUid": uid, "status": {"conditions": rows}}


def suspended_job() -> dict[str, Any]:
    return {"metadata": {"name": "x", "uid": "job-1"}, "spec": {"parallelism": 1, "suspend": True}, "status": {}}


def observed(wl: dict[str, Any] | None, status: dict[str, Any] | None = None, **fields: Any) -> fs.Observed:
    return fs.Observed(
        status=status or {},
        generation=1,
        suspend=False,
        output_uri="pvc://adapters/x",
        job=fields.pop("job", suspended_job()),
        pods=[],
        queued=True,
        workload=wl,
        **fields,
    )


QUOTA = (
    "couldn't assign flavors to pod set main: insufficient unused quota for nvidia.com/gpu in flavor gpu, 1 more needed"
)


def test_a_waiting_workload_shows_kueues_reason_and_message() -> None:
    pending = workload(("QuotaReserved", "False", "Pending", QUOTA))
    status = fs.derive(observed(pending), NOW)
    assert status["state"] == "Queued"
    queued_cond = next(c for c in status["conditions"] if c["type"] == "Queued")
    assert (queued_cond["status"], queued_cond["reason"], queued_cond["message"]) == ("True", "Pending", QUOTA)
    running = next(c for c in status["conditions"] if c["type"] == "Running")
    assert (running["status"], running["reason"]) == ("False", "Pending")


def test_no_workload_yet_says_what_it_waits_for() -> None:
    assert fs.outcome(observed(None)) == fs.Outcome(
        "Queued", "WaitingForWorkload", "waiting for Kueue to create the training Job's Workload"
    )


def test_a_preempted_workload_says_by_what_and_where_it_resumes() -> None:
    message = "Preempted to accommodate a workload (UID: w2, JobUID: j2) due to prioritization in the ClusterQueue"
    evicted = workload(
        ("QuotaReserved", "False", "Pending", QUOTA),
        ("Evicted", "True", "Preempted", message),
        ("Preempted", "True", "InClusterQueue", message),
    )
    result = fs.outcome(observed(evicted, {"checkpoint": {"step": 4}}))
    assert result is not None
    assert (result.state, result.reason) == ("Preempted", "InClusterQueue")
    assert result.message.startswith(message)
    assert "resumes from checkpoint step 4" in result.message
    # Kueue's eviction is no failure: nothing is counted.
    status = fs.derive(observed(evicted, {"restarts": 1}), NOW)
    assert status["restarts"] == 1 and "lastRestart" not in status


def test_admitted_again_clears_queued_and_preempted() -> None:
    before = fs.derive(observed(workload(("Evicted", "True", "Preempted", "by w2"))), NOW)
    running_job = {"metadata": {"name": "x", "uid": "job-1"}, "spec": {"parallelism": 1, "suspend": False}}
    pod = {"metadata": {"name": "x-0"}, "status": {"phase": "Running"}}
    after = fs.derive(replace_pods(observed(None, before, job=running_job), [pod]), NOW)
    assert after["state"] == "Running"
    preempted = next(c for c in after["conditions"] if c["type"] == "Preempted")
    assert (preempted["status"], preempted["reason"]) == ("False", "Admitted")


def replace_pods(obs: fs.Observed, pods: list[dict[str, Any]]) -> fs.Observed:
    from dataclasses import replace

    return replace(obs, pods=pods)


def test_a_queued_job_held_by_its_user_is_suspended_without_a_job() -> None:
    result = fs.outcome(observed(None, job=None, held=True))
    assert result == fs.Outcome("Suspended", "Suspended", fs.HELD_MESSAGE)


MANIFESTS = """
apiVersion: admissionregistration.k8s.io/v1
kind: MutatingWebhookConfiguration
metadata:
  name: mutating-webhook-configuration
webhooks:
- clientConfig:
    service: {name: webhook-service, namespace: system, path: /mutate-batch-v1-job}
  name: mjob.kb.io
  rules: [{apiGroups: [batch], apiVersions: [v1], operations: [CREATE], resources: [jobs]}]
- clientConfig:
    service: {name: webhook-service, namespace: system, path: /mutate--v1-pod}
  name: mpod.kb.io
  rules: [{apiGroups: [""], apiVersions: [v1], operations: [CREATE], resources: [pods]}]
---
apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingWebhookConfiguration
metadata:
  name: validating-webhook-configuration
webhooks:
- clientConfig:
    service: {name: webhook-service, namespace: system, path: /validate-kueue-x-k8s-io-v1beta2-workload}
  name: vworkload.kb.io
  rules: [{apiGroups: [kueue.x-k8s.io], apiVersions: [v1beta2], operations: [CREATE], resources: [workloads]}]
"""


def test_webhooks_call_the_local_manager_and_only_for_jobs_and_kueues_kinds() -> None:
    mutating, validating = kueue.webhook_configurations(MANIFESTS, 9443, b"PEM")
    assert mutating["metadata"] == {"name": "kueue-mutating-webhook-configuration"}
    assert [w["name"] for w in mutating["webhooks"]] == ["mjob.kb.io"]  # pods would all be refused otherwise
    assert mutating["webhooks"][0]["clientConfig"] == {
        "url": "https://127.0.0.1:9443/mutate-batch-v1-job",
        "caBundle": base64.b64encode(b"PEM").decode(),
    }
    assert validating["metadata"]["name"] == kueue.WEBHOOK_NAMES[1]
    assert [w["name"] for w in validating["webhooks"]] == ["vworkload.kb.io"]


def test_configuration_enables_the_job_integration_on_loopback(tmp_path: Any) -> None:
    config = kueue.configuration(9443, 8081, tmp_path)
    assert config["integrations"] == {"frameworks": ["batch/job"]}
    assert config["webhook"] == {"host": "127.0.0.1", "port": 9443, "certDir": str(tmp_path)}
    assert config["health"]["healthProbeBindAddress"] == "127.0.0.1:8081"
    assert yaml.safe_load(yaml.safe_dump(config)) == config


def test_a_resumed_queued_job_is_not_suspended_while_its_condition_lags() -> None:
    # Kueue set spec.suspend false; the Job controller has not yet turned its Suspended condition off.
    lagging = {
        "metadata": {"name": "x", "uid": "job-1"},
        "spec": {"parallelism": 1, "suspend": False},
        "status": {"conditions": [{"type": "Suspended", "status": "True", "reason": "JobSuspended"}]},
    }
    result = fs.outcome(observed(workload(("Admitted", "True", "Admitted", "ok")), job=lagging))
    assert result is not None and result.state == "Pending", result


def test_the_kueue_example_job_is_valid_and_queued_at_its_priority() -> None:
    from tests.rejections import EXAMPLES

    body = yaml.safe_load((EXAMPLES / "kueue" / "finetunejob.yaml").read_text())
    body["metadata"]["uid"] = "u"
    job = render.children(FineTuneJob.model_validate(body), PLAN, CONFIG)[-1]
    labels = job["metadata"]["labels"]
    assert (labels["kueue.x-k8s.io/queue-name"], labels["kueue.x-k8s.io/priority-class"]) == ("team-a", "high")
    queues = list(yaml.safe_load_all((EXAMPLES / "kueue" / "queues.yaml").read_text()))
    local = {d["metadata"]["name"] for d in queues if d["kind"] == "LocalQueue"}
    priorities = {d["metadata"]["name"] for d in queues if d["kind"] == "WorkloadPriorityClass"}
    assert body["spec"]["queueName"] in local and body["spec"]["priorityClassName"] in priorities


def test_the_preempting_finetunejob_is_named() -> None:
    message = (
        "Preempted to accommodate a workload (UID: w2, JobUID: 5f1c-77aa) due to prioritization in the ClusterQueue"
    )
    evicted = workload(("Evicted", "True", "Preempted", message), ("Preempted", "True", "InClusterQueue", message))
    assert fs.preempting_job_uid(evicted) == "5f1c-77aa"
    result = fs.outcome(observed(evicted, preemptor="urgent-sft"))
    assert result is not None and result.message.startswith(message + " (FineTuneJob urgent-sft); resumes")
