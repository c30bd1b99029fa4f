"""The operator against the real local control plane: CRDs, rejections, children, status, recovery."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

import pytest
import yaml
from tests.integration.support import (
    Api,
    OperatorProcess,
    dump,
    example,
    simulated_ftj,
    wait_for,
)
from tests.rejections import CASES, EXAMPLES, IMMUTABLE, Rejection, with_changes

from kubetune.k8s.client import ApiError
from kubetune.render.trainer_access import POD_NAME_CLAIM

FTJ = "FineTuneJob"
LABEL = "kubetune.io/finetunejob"


# --- the API as users meet it --------------------------------------------------------------------


def test_crds_are_established_with_names_and_categories(api: Api, operator: OperatorProcess) -> None:
    out = api.kubectl("api-resources", "--api-group=kubetune.io", "-o", "wide").stdout
    assert "finetunejobs" in out and "ftj" in out and "modelservers" in out and "msrv" in out
    assert "kubetune" in out  # category
    # The API server publishes a new CRD's OpenAPI a moment after it is Established.
    explain = wait_for(
        lambda: api.kubectl("explain", "finetunejob.spec.lora", check=False).stdout, 30, "kubectl explain"
    )
    assert "Rank of the low-rank update matrices" in explain


def test_examples_are_accepted(api: Api, ns: str) -> None:
    for name in ("finetunejob-sft.yaml", "finetunejob-dpo.yaml", "modelserver.yaml"):
        body = yaml.safe_load((EXAMPLES / name).read_text())
        body["metadata"]["namespace"] = ns
        result = api.apply(body, dry_run=True)
        assert "created (server dry run)" in result.stdout, result.stdout + result.stderr


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_api_server_rejects_with_the_message(api: Api, ns: str, case: Rejection) -> None:
    body = case.body()
    body["metadata"]["namespace"] = ns
    result = api.apply(body, check=False, dry_run=True)
    assert result.returncode != 0, f"accepted: {result.stdout}"
    assert case.expected_from_server in result.stderr, result.stderr
    if case.server_must_not_say:
        assert case.server_must_not_say not in result.stderr, result.stderr


@pytest.mark.parametrize("field, changes, message", IMMUTABLE, ids=[i[0] for i in IMMUTABLE])
def test_immutable_fields(api: Api, ns: str, field: str, changes: dict, message: str) -> None:
    body = simulated_ftj(f"immutable-{field}", ns, suspend=True)
    api.apply(body)
    result = api.apply(with_changes(body, changes), check=False)
    assert result.returncode != 0 and message in result.stderr, result.stderr


# --- a job's life ----------------------------------------------------------------------------------


def test_job_runs_to_success_with_owned_children(api: Api, ns: str) -> None:
    four_gpus = {"nodes": 1, "gpusPerNode": 4, "gpuType": "rtx-4090d"}
    api.apply(simulated_ftj("sft", ns, run_seconds=3, resources=four_gpus))
    job = wait_for(lambda: api.get("Job", ns, "sft"), 30, "the training Job")
    ftj = api.get(FTJ, ns, "sft")
    assert ftj is not None
    owner = job["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["name"], owner["uid"]) == (FTJ, "sft", ftj["metadata"]["uid"])
    # The namespace's trainer access serves all its jobs: no owner, kubetune's label.
    for child in [job, *(api.get(kind, ns, "kubetune-trainer") for kind in ("ServiceAccount", "Role", "RoleBinding"))]:
        assert child is not None
        assert child["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "kubetune-operator"
        # Created by the operator (POST: a taken name is refused, never overwritten); status is the controllers'.
        entries = child["metadata"].get("managedFields", [])
        assert {m["manager"] for m in entries if not m.get("subresource")} == {"kubetune-operator"}, child["kind"]
        assert child is job or "ownerReferences" not in child["metadata"]
    assert job["spec"]["template"]["spec"]["serviceAccountName"] == "kubetune-trainer"
    assert api.get("Service", ns, "sft-trainer") is None  # one node rendezvouses on its own pod
    assert not api.children("ConfigMap", ns, LABEL, "sft")  # the trainer's configuration is in its pod's annotation
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "4"
    assert job["spec"]["template"]["spec"]["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-GeForce-RTX-4090-D"}
    pods = wait_for(
        lambda: [p for p in api.children("Pod", ns, LABEL, "sft") if p["spec"].get("nodeName")], 30, "a scheduled pod"
    )
    assert pods[0]["spec"]["nodeName"].startswith("gpu-4090d-")
    running = api.wait_state(FTJ, ns, "sft", "Running", 30)
    assert running["startTime"]
    plan = running["plan"]
    assert plan["worldSize"] == 4
    done = api.wait_state(FTJ, ns, "sft", "Succeeded", 60)
    assert done["completionTime"] and done["adapter"]["uri"] == "s3://adapters/sft/adapter"
    assert next(c for c in done["conditions"] if c["type"] == "Succeeded")["status"] == "True"
    # Pending and Running show in the status only; the end is also an Event (posted after the status write).
    api.wait_event(ns, "sft", "Completed", "Normal")
    assert [e["reason"] for e in api.events(ns, "sft") if e["involvedObject"]["kind"] == FTJ] == ["Completed"]


def test_kubectl_get_shows_the_columns(api: Api, ns: str) -> None:
    api.apply(simulated_ftj("cols", ns, run_seconds=120))
    api.wait_state(FTJ, ns, "cols", "Running", 30)
    # The trainer reports progress with its pod's token, which may patch only this job's status.
    report = {"step": 45, "totalSteps": 100, "percent": 45, "summary": "45% (45/100)", "loss": 1.234, "eta": "3m20s"}
    progress = json.dumps({"status": {"progress": report}})
    pod = wait_for(lambda: api.children("Pod", ns, LABEL, "cols"), 30, "the training pod")[0]["metadata"]["name"]
    assert patch_status_as(api, ns, "cols", pod, progress) is None
    table = api.kubectl("get", "finetunejobs", "-n", ns).stdout
    header, row = table.splitlines()[:2]
    assert header.split() == ["NAME", "METHOD", "MODEL", "STATE", "PREPARED", "PROGRESS", "LOSS", "ETA", "AGE"]
    assert "cols" in row and "SFT" in row and "Running" in row and "45%" in row and "1.234" in row and "3m20s" in row
    servers = (
        api.kubectl("get", "msrv", "-n", ns).stderr + api.kubectl("get", "modelservers", "-n", ns, "-o", "wide").stderr
    )
    assert "No resources found" in servers


def patch_status_as(api: Api, ns: str, job: str, pod: str | None, patch: str) -> ApiError | None:
    """A merge patch of a FineTuneJob's status as the trainer sends it (no read first), with the identity of a
    training pod's token: the namespace's trainer account and, unless None, the pod's name claim. The refusal,
    or None."""
    headers = {"Impersonate-User": f"system:serviceaccount:{ns}:kubetune-trainer"}
    if pod is not None:
        headers[f"Impersonate-Extra-{quote(POD_NAME_CLAIM, safe='')}"] = pod
    url = f"/apis/kubetune.io/v1alpha1/namespaces/{ns}/finetunejobs/{job}/status"
    try:
        api.kube.request("PATCH", url, json.loads(patch), content_type="application/merge-patch+json", headers=headers)
    except ApiError as err:
        return err
    return None


def test_a_training_pod_may_patch_only_its_own_jobs_status(api: Api, ns: str) -> None:
    api.apply(simulated_ftj("mine", ns, run_seconds=60))
    api.apply(simulated_ftj("mine-0", ns, run_seconds=60))  # a name that starts like mine's pods
    pods = {
        job: wait_for(lambda job=job: api.children("Pod", ns, LABEL, job), 30, f"{job}'s pod")[0]["metadata"]["name"]
        for job in ("mine", "mine-0")
    }
    progress = json.dumps({"status": {"progress": {"summary": "1% (1/100)"}}})
    assert patch_status_as(api, ns, "mine", pods["mine"], progress) is None
    assert patch_status_as(api, ns, "mine-0", pods["mine-0"], progress) is None
    # A job's prepare pod (render/prepare.py) reports too, to its own job only.
    assert patch_status_as(api, ns, "mine", "mine-prep-x7k2q", progress) is None
    assert patch_status_as(api, ns, "mine-0", "mine-prep-x7k2q", progress) is not None
    assert patch_status_as(api, ns, "mine", "mine-0-prep-x7k2q", progress) is not None
    # The admission policy: another job's status is refused, by name prefix too (mine-0's pod is not mine's).
    for job, pod in (("mine-0", pods["mine"]), ("mine", pods["mine-0"])):
        refused = patch_status_as(api, ns, job, pod, progress)
        assert refused is not None and refused.status == 403, refused
        assert "may change only the status of its own FineTuneJob" in refused.message
        assert f"pod {pod} is not a training pod of FineTuneJob {job}" in refused.message
    # A token of the account that names no pod gets nowhere.
    anonymous = patch_status_as(api, ns, "mine", None, progress)
    assert anonymous is not None and "this token names no pod" in anonymous.message
    # RBAC: nothing but patching FineTuneJob status (not even reading it).
    sa = f"--as=system:serviceaccount:{ns}:kubetune-trainer"
    for verb, what in (("patch", "finetunejobs/mine"), ("get", "finetunejobs/mine"), ("get", "secrets")):
        assert api.kubectl("auth", "can-i", verb, what, "-n", ns, sa, check=False).stdout.strip() == "no", what
    assert api.kubectl("auth", "can-i", "get", "finetunejobs/mine", "--subresource=status", "-n", ns, sa,
                       check=False).stdout.strip() == "no"


def test_oom_failure_reaches_the_condition(api: Api, ns: str) -> None:
    body = simulated_ftj("oom", ns, run_seconds=60, backoffLimit=0)
    body["spec"]["podMetadata"]["annotations"]["kubetune.io/simulate-failure"] = "OOMKilled"
    api.apply(body)
    status = api.wait_state(FTJ, ns, "oom", "Failed", 60)
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "OOMKilled" and "exit code 137" in failed["message"], dump(status)
    api.wait_event(ns, "oom", "OOMKilled", "Warning")


def test_too_many_gpus_stay_pending_with_the_schedulers_message(api: Api, ns: str) -> None:
    body = simulated_ftj("huge", ns, resources={"nodes": 1, "gpusPerNode": 8, "gpuType": "rtx-4090d"})
    api.apply(body)

    def unschedulable() -> dict | None:
        cond = api.condition(FTJ, ns, "huge", "Running")
        return cond if cond and cond["reason"] == "Unschedulable" else None

    cond = wait_for(unschedulable, 60, "the Unschedulable condition")
    assert "Insufficient nvidia.com/gpu" in cond["message"] and cond["message"].startswith("0/")
    assert api.status(FTJ, ns, "huge")["state"] == "Pending"


def test_suspend_and_resume(api: Api, ns: str) -> None:
    api.apply(simulated_ftj("pause", ns, run_seconds=120))
    api.wait_state(FTJ, ns, "pause", "Running", 30)
    api.kubectl("patch", "ftj", "pause", "-n", ns, "--type=merge", "-p", '{"spec":{"suspend":true}}')
    api.wait_state(FTJ, ns, "pause", "Suspended", 30)
    wait_for(
        lambda: not [p for p in api.children("Pod", ns, LABEL, "pause") if not p["metadata"].get("deletionTimestamp")],
        30,
        "the training pods to go",
    )
    assert api.get("Job", ns, "pause")["spec"]["suspend"] is True
    api.kubectl("patch", "ftj", "pause", "-n", ns, "--type=merge", "-p", '{"spec":{"suspend":false}}')
    api.wait_state(FTJ, ns, "pause", "Running", 30)
    resumed = api.condition(FTJ, ns, "pause", "Suspended")
    assert resumed and resumed["status"] == "False" and resumed["reason"] == "Resumed"


def test_delete_cascades_to_children(api: Api, ns: str) -> None:
    two_nodes = {"nodes": 2, "gpusPerNode": 1, "gpuType": "rtx-4090d"}  # two nodes: with the headless Service
    api.apply(simulated_ftj("gone", ns, run_seconds=120, resources=two_nodes))
    wait_for(lambda: api.get("Job", ns, "gone"), 30, "the Job")
    assert api.get("Service", ns, "gone-trainer") is not None
    api.kubectl("delete", "ftj", "gone", "-n", ns, "--wait=true")
    for kind in ("Job", "Service"):
        wait_for(
            lambda kind=kind: api.get(kind, ns, "gone" if kind == "Job" else "gone-trainer") is None,
            30,
            f"{kind} to be garbage-collected",
        )
    # The namespace's trainer access stays for its next jobs.
    assert api.get("RoleBinding", ns, "kubetune-trainer") is not None


def test_dpo_waits_for_its_sft_job_and_then_starts(api: Api, ns: str) -> None:
    dpo = simulated_ftj(
        "dpo",
        ns,
        run_seconds=1,
        method="DPO",
        fromFineTuneJob="base-sft",
        dataset={"uri": "s3://datasets/pairs.jsonl", "format": "preference"},
    )
    api.apply(dpo)
    cond = wait_for(lambda: api.condition(FTJ, ns, "dpo", "Admitted"), 30, "the Admitted condition")
    assert (
        cond["status"] == "False" and cond["reason"] == "WaitingForFineTuneJob" and "does not exist" in cond["message"]
    )
    assert api.get("Job", ns, "dpo") is None
    api.apply(simulated_ftj("base-sft", ns, run_seconds=3))
    api.wait_state(FTJ, ns, "base-sft", "Succeeded", 60)
    api.wait_state(FTJ, ns, "dpo", "Succeeded", 90)
    annotations = api.get("Job", ns, "dpo")["spec"]["template"]["metadata"]["annotations"]
    config = yaml.safe_load(annotations["kubetune.io/trainer-config"])
    assert config["initAdapterUri"] == "s3://adapters/base-sft/adapter"


def test_pvc_locations_are_mounted_and_schedule(api: Api, ns: str) -> None:
    for claim in ("datasets", "adapters"):
        api.create_bound_pvc(ns, claim)
    body = simulated_ftj(
        "pvc", ns, run_seconds=2, dataset={"uri": "pvc://datasets/sft.jsonl"}, output={"uri": "pvc://adapters/pvc"}
    )
    api.apply(body)
    api.wait_state(FTJ, ns, "pvc", "Succeeded", 60)
    volumes = api.get("Job", ns, "pvc")["spec"]["template"]["spec"]["volumes"]
    claims = {
        v["persistentVolumeClaim"]["claimName"]: v["persistentVolumeClaim"].get("readOnly", False)
        for v in volumes
        if "persistentVolumeClaim" in v
    }
    assert claims == {"datasets": True, "adapters": False}


def test_operator_killed_mid_job_recovers_without_duplicates(api: Api, ns: str, operator: OperatorProcess) -> None:
    api.apply(simulated_ftj("crash", ns, run_seconds=15))
    api.wait_state(FTJ, ns, "crash", "Running", 30)
    uid_before = api.get("Job", ns, "crash")["metadata"]["uid"]
    operator.kill()
    try:
        # While it is down the pods finish; nothing reports it.
        wait_for(
            lambda: (api.get("Job", ns, "crash") or {}).get("status", {}).get("succeeded"), 60, "the Job to complete"
        )
        assert api.status(FTJ, ns, "crash")["state"] == "Running"
    finally:
        operator.start()
    api.wait_state(FTJ, ns, "crash", "Succeeded", 60)
    jobs = api.children("Job", ns, LABEL, "crash")
    assert [j["metadata"]["uid"] for j in jobs] == [uid_before]
    assert len([p for p in api.children("Pod", ns, LABEL, "crash")]) == 1


def test_modelserver_deployment_becomes_ready_with_endpoint(api: Api, ns: str) -> None:
    api.create_bound_pvc(ns, "adapters")
    body = example(
        "modelserver.yaml",
        "qwen",
        ns,
        adapters=[
            {"name": "sup", "uri": "pvc://adapters/sup/adapter"},
            {"name": "remote", "uri": "s3://adapters/remote/adapter"},
        ],
        adapterSelector=None,
        tensorParallelSize=2,
        ui={"enabled": False},
    )
    del body["spec"]["adapterSelector"]
    api.apply(body)
    deployment = wait_for(lambda: api.get("Deployment", ns, "qwen"), 30, "the Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert "--tensor-parallel-size" in container["args"] and "--enable-lora" in container["args"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    status = api.wait_state("ModelServer", ns, "qwen", "Ready", 60)
    assert status["endpoint"] == f"http://qwen.{ns}.svc:8000/v1"
    assert status["ready"] == "1/1"
    # kwok's pod is Ready but nothing answers at its address (no fetcher, no vLLM): both adapters, on a
    # claim and in a bucket, wait, saying why.
    def waiting() -> list[dict[str, Any]] | None:
        adapters = api.status("ModelServer", ns, "qwen")["adapters"]
        unreachable = all((a["state"], a["reason"]) == ("Pending", "ReplicaUnreachable") for a in adapters)
        return adapters if unreachable else None

    adapters = wait_for(waiting, 30, "the adapters to wait for an unreachable replica")
    assert [a["name"] for a in adapters] == ["sup", "remote"]
    assert all(a["message"].startswith("pod qwen-") for a in adapters), adapters
    adapters_ready = api.condition("ModelServer", ns, "qwen", "AdaptersReady")
    assert adapters_ready and adapters_ready["status"] == "False"
    table = api.kubectl("get", "modelservers", "-n", ns).stdout
    assert table.split("\n")[0].split() == ["NAME", "MODEL", "STATE", "READY", "ADAPTERS", "ENDPOINT", "AGE"]
    assert "Ready" in table and "1/1" in table
    # A spec change rolls the Deployment.
    generation = deployment["metadata"]["generation"]
    api.kubectl("patch", "msrv", "qwen", "-n", ns, "--type=merge", "-p", '{"spec":{"maxModelLen":4096}}')
    rolled = wait_for(
        lambda: (d := api.get("Deployment", ns, "qwen")) and d["metadata"]["generation"] > generation and d,
        30,
        "a rollout",
    )
    assert "4096" in rolled["spec"]["template"]["spec"]["containers"][0]["args"]
