"""Status derivation from Jobs, pods and Deployments; conditions; admission of references."""

from __future__ import annotations

import json
from typing import Any

import yaml

from kubetune.api.v1alpha1 import FineTuneJob
from kubetune.k8s.status_writer import changed
from kubetune.status import finetunejob as fs
from kubetune.status import modelserver as ms
from kubetune.status.admission import Admitted, Blocked, check_reference
from kubetune.status.conditions import set_condition
from tests.rejections import EXAMPLES

NOW = "2026-11-29T08:00:00Z"


def job(*conditions: str, failed: int = 0, parallelism: int = 1, uid: str = "job-1") -> dict[str, Any]:
    return {
        "metadata": {"name": "x", "uid": uid},
        "spec": {"parallelism": parallelism},
        "status": {
            "failed": failed,
            "conditions": [{"type": c, "status": "True", "reason": c + "Reason", "message": c} for c in conditions],
        },
    }


def pod(name: str, phase: str, **status: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "creationTimestamp": "2026-11-29T07:00:00Z"},
        "status": {"phase": phase, **status},
    }


def terminated(reason: str, code: int, message: str = "") -> dict[str, Any]:
    return {
        "containerStatuses": [
            {"name": "trainer", "state": {"terminated": {"reason": reason, "exitCode": code, "message": message}}}
        ]
    }


def observed(
    job_obj: dict[str, Any] | None,
    pods: list[dict[str, Any]],
    status: dict[str, Any] | None = None,
    suspend: bool = False,
    backoff_limit: int = 3,
) -> fs.Observed:
    return fs.Observed(status or {}, 2, suspend, "pvc://adapters/x", job_obj, pods, backoff_limit=backoff_limit)


def test_no_job_means_no_status_change() -> None:
    assert fs.derive(observed(None, [])) == {}


def test_unschedulable_copies_the_schedulers_message() -> None:
    message = "0/6 nodes are available: 4 Insufficient nvidia.com/gpu, 2 node(s) had untolerated taint."
    p = pod(
        "x-0",
        "Pending",
        conditions=[{"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": message}],
    )
    patch = fs.derive(observed(job(), [p]), NOW)
    assert patch["state"] == "Pending"
    running = next(c for c in patch["conditions"] if c["type"] == "Running")
    assert (running["status"], running["reason"], running["message"]) == ("False", "Unschedulable", message)


def test_a_finished_pod_keeps_the_job_running_until_the_job_is_complete() -> None:
    running = fs.derive(observed(job(), [pod("x-0", "Running")]), NOW)
    finishing = fs.derive(observed(job(), [pod("x-0", "Succeeded")], status=running), NOW)
    assert changed(running, finishing) == {}  # no write, no Event until the Job controller says Complete


def test_running_then_succeeded_sets_times_and_adapter() -> None:
    p = pod("x-0", "Running", startTime="2026-11-29T07:01:00Z")
    running = fs.derive(observed(job(), [p]), NOW)
    assert running["state"] == "Running" and running["startTime"] == "2026-11-29T07:01:00Z"
    done = fs.derive(observed(job("Complete"), [pod("x-0", "Succeeded")], status=running), NOW)
    assert done["state"] == "Succeeded"
    assert done["startTime"] == "2026-11-29T07:01:00Z"
    assert done["completionTime"] == NOW
    assert done["adapter"] == {"uri": "pvc://adapters/x/adapter"}
    succeeded = next(c for c in done["conditions"] if c["type"] == "Succeeded")
    assert succeeded["status"] == "True"
    assert next(c for c in done["conditions"] if c["type"] == "Running")["status"] == "False"


def test_oomkilled_pod_gives_the_reason() -> None:
    p = pod("x-0", "Failed", **terminated("OOMKilled", 137))
    patch = fs.derive(observed(job("Failed", failed=1), [p], status={"restarts": 3}), NOW)  # backoffLimit used up
    failed = next(c for c in patch["conditions"] if c["type"] == "Failed")
    assert patch["state"] == "Failed" and patch["restarts"] == 3
    assert failed["reason"] == "OOMKilled" and "exit code 137" in failed["message"]


def test_trainer_termination_message_reason_wins() -> None:
    report = json.dumps({"reason": "DatasetInvalid", "message": "line 3: missing 'response'"})
    p = pod("x-0", "Failed", **terminated("Error", 3, report))
    patch = fs.derive(observed(job("Failed"), [p]), NOW)
    failed = next(c for c in patch["conditions"] if c["type"] == "Failed")
    assert (failed["reason"], failed["message"]) == ("DatasetInvalid", "line 3: missing 'response'")


def test_exit_code_failure_message() -> None:
    p = pod("x-0", "Failed", **terminated("Error", 1, "Traceback...\nRuntimeError: boom"))
    outcome = fs.outcome(observed(job("Failed"), [p], backoff_limit=0))
    assert outcome is not None
    assert outcome.reason == "TrainerFailed" and "exited with code 1" in outcome.message and "boom" in outcome.message


def test_suspend_and_resume_conditions() -> None:
    suspended = fs.derive(observed(job("Suspended"), [], suspend=True), NOW)
    assert suspended["state"] == "Suspended"
    cond = next(c for c in suspended["conditions"] if c["type"] == "Suspended")
    assert cond["status"] == "True"
    resumed = fs.derive(observed(job(), [pod("x-0", "Running")], status=suspended), "2026-11-29T09:00:00Z")
    cond = next(c for c in resumed["conditions"] if c["type"] == "Suspended")
    assert resumed["state"] == "Running" and cond["status"] == "False" and cond["reason"] == "Resumed"


def test_partial_start_of_multi_node_job_is_pending() -> None:
    outcome = fs.outcome(observed(job(parallelism=2), [pod("x-0", "Running"), pod("x-1", "Pending")]))
    assert outcome is not None and (outcome.state, outcome.reason) == ("Pending", "PodsStarting")


def test_condition_transition_time_only_moves_on_status_change() -> None:
    first = set_condition([], "Ready", True, "A", now="t1")
    same = set_condition(first, "Ready", True, "B", "other message", now="t2")
    flipped = set_condition(same, "Ready", False, "C", now="t3")
    assert same[0]["lastTransitionTime"] == "t1" and same[0]["reason"] == "B"
    assert flipped[0]["lastTransitionTime"] == "t3"


def _dpo() -> FineTuneJob:
    body = yaml.safe_load((EXAMPLES / "finetunejob-dpo.yaml").read_text())
    return FineTuneJob.model_validate(body)


def _sft_body(state: str | None, **status: Any) -> dict[str, Any]:
    body = yaml.safe_load((EXAMPLES / "finetunejob-sft.yaml").read_text())
    body["status"] = {"state": state, **status} if state else {}
    return body


def test_reference_missing_running_and_succeeded() -> None:
    missing = check_reference(_dpo(), None)
    assert (
        isinstance(missing, Blocked)
        and missing.reason == "WaitingForFineTuneJob"
        and "does not exist" in missing.message
    )
    running = check_reference(_dpo(), _sft_body("Running"))
    assert isinstance(running, Blocked) and "has not succeeded yet (state Running)" in running.message
    done = check_reference(_dpo(), _sft_body("Succeeded", adapter={"uri": "pvc://adapters/qwen-sft/adapter"}))
    assert done == Admitted("pvc://adapters/qwen-sft/adapter")


def test_reference_to_other_base_model_is_refused() -> None:
    other = _sft_body("Succeeded")
    other["spec"]["baseModel"]["uri"] = "hf://Qwen/Qwen2.5-14B"
    result = check_reference(_dpo(), other)
    assert isinstance(result, Blocked) and not result.retry and result.reason == "InvalidReference"


def test_modelserver_ready_and_unschedulable() -> None:
    dep = {"status": {"replicas": 2, "readyReplicas": 2}}
    base = dict(status={}, generation=1, desired_replicas=2, endpoint="http://s.ns.svc:8000/v1", ui_endpoint="")
    ready = ms.derive(ms.ServerObserved(**base, deployment=dep), NOW)
    assert (ready["state"], ready["ready"], ready["endpoint"]) == ("Ready", "2/2", "http://s.ns.svc:8000/v1")
    message = "0/6 nodes are available: 4 Insufficient nvidia.com/gpu"
    pending_pod = pod(
        "s-1",
        "Pending",
        conditions=[{"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": message}],
    )
    half = ms.derive(
        ms.ServerObserved(**base, deployment={"status": {"replicas": 2, "readyReplicas": 1}}, pods=[pending_pod]), NOW
    )
    cond = next(c for c in half["conditions"] if c["type"] == "Ready")
    assert half["state"] == "Degraded" and cond["reason"] == "Unschedulable" and cond["message"] == message


def test_adapters_condition_summarises() -> None:
    views = [
        ms.AdapterView("a", "uri", "pvc://x", "Loaded"),
        ms.AdapterView("b", "fromFineTuneJob/b", state="Pending", reason="WaitingForFineTuneJob", message="not yet"),
    ]
    patch = ms.derive(ms.ServerObserved({}, 1, 1, "e", "", {"status": {"readyReplicas": 1}}, adapters=views), NOW)
    cond = next(c for c in patch["conditions"] if c["type"] == "AdaptersReady")
    assert cond["status"] == "False" and cond["reason"] == "WaitingForFineTuneJob"
    assert patch["loadedAdapters"] == "1/2"


def test_a_failed_run_started_again_is_no_longer_failed() -> None:
    oom = pod("x-0", "Failed", **terminated("OOMKilled", 137))
    failed = fs.derive(observed(job("Failed"), [oom], backoff_limit=0), NOW)
    assert failed["completionTime"] == NOW
    # spec changed (e.g. a smaller micro-batch): a new Job, its pod running
    again = fs.derive(observed(job(), [pod("x-1", "Running")], status=failed), NOW)
    assert again["state"] == "Running"
    condition = next(c for c in again["conditions"] if c["type"] == "Failed")
    assert (condition["status"], condition["reason"]) == ("False", "Retrying")
    assert "OOMKilled" in condition["message"]
    assert again["completionTime"] is None


# --- the training pods fail and start again as one group ------------------------------------------------


def rank(name: str, finished: str, code: int, reason: str = "Error", message: str = "", uid: str = "job-1") -> dict:
    body = pod(name, "Failed", **terminated(reason, code, message))
    body["status"]["containerStatuses"][0]["state"]["terminated"]["finishedAt"] = finished
    body["metadata"]["labels"] = {"batch.kubernetes.io/controller-uid": uid}
    return body


def test_the_first_failed_pod_restarts_the_group_from_the_checkpoint() -> None:
    # Rank 1 was SIGKILLed; the Job controller then stopped rank 0 (SIGTERM): rank 1 is the cause.
    pods = [
        rank("x-0-a", "2026-11-29T07:30:05Z", 143, message="stopped"),
        rank("x-1-b", "2026-11-29T07:30:01Z", 137, message="step 41"),
    ]
    status = {"restarts": 0, "checkpoint": {"step": 40}}
    patch = fs.derive(observed(job("Failed", parallelism=2), pods, status=status), NOW)
    assert patch["state"] == "Pending" and patch["restarts"] == 1
    record = patch["lastRestart"]
    assert (record["failedJobUid"], record["pod"], record["resumeStep"], record["disruption"]) == (
        "job-1",
        "x-1-b",
        40,
        False,
    )
    running = next(c for c in patch["conditions"] if c["type"] == "Running")
    assert (running["status"], running["reason"]) == ("False", "Restarting")
    assert "x-1-b exited with code 137 (Error, killed by SIGKILL)" in running["message"]
    start = "all 2 training pods start again from the newest checkpoint, step 40 as last reported"
    assert f"{start} (restart 1 of at most 3)" in running["message"]
    # Computed again for the same failed Job (the operator restarted before it replaced the Job): counted once.
    again = fs.derive(observed(job("Failed", parallelism=2), pods, status={**status, **patch}), NOW)
    assert again["restarts"] == 1 and again["lastRestart"] == record


def test_a_disruption_restarts_the_group_without_counting() -> None:
    drained = pod("x-0", "Failed")
    drained["status"]["conditions"] = [
        {"type": "DisruptionTarget", "status": "True", "reason": "EvictionByEvictionAPI", "message": "node drain"}
    ]
    patch = fs.derive(observed(job("Failed"), [drained], status={"restarts": 3}), NOW)  # limit already used up
    assert patch["state"] == "Pending" and patch["restarts"] == 3
    assert patch["lastRestart"]["disruption"] is True and patch["lastRestart"]["reason"] == "Disruption"
    running = next(c for c in patch["conditions"] if c["type"] == "Running")
    assert "a disruption, not counted" in running["message"] and "(none reported yet)" in running["message"]


def test_a_permanent_error_fails_at_once_and_a_used_up_limit_fails() -> None:
    report = json.dumps({"reason": "DatasetInvalid", "message": "line 3: missing 'response'"})
    permanent = fs.derive(observed(job("Failed"), [rank("x-1", "2026-11-29T07:30:01Z", 3, message=report)]), NOW)
    assert permanent["state"] == "Failed" and permanent["restarts"] == 0 and "lastRestart" not in permanent
    assert next(c for c in permanent["conditions"] if c["type"] == "Failed")["reason"] == "DatasetInvalid"
    crashed = [rank("x-0", "2026-11-29T07:30:01Z", 1, message="boom")]
    used_up = fs.derive(observed(job("Failed"), crashed, status={"restarts": 2}, backoff_limit=2), NOW)
    assert used_up["state"] == "Failed" and used_up["restarts"] == 2


def test_pods_of_a_replaced_job_do_not_count() -> None:
    old = rank("x-0-old", "2026-11-29T07:30:01Z", 137, uid="job-1")
    new = pod("x-0-new", "Running")
    new["metadata"]["labels"] = {"batch.kubernetes.io/controller-uid": "job-2"}
    patch = fs.derive(observed(job(uid="job-2"), [old, new], status={"restarts": 1}), NOW)
    assert patch["state"] == "Running" and patch["restarts"] == 1
