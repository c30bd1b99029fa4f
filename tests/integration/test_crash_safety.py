"""The operator survives an unlucky crash: killed at each step of admission on purpose (kubetune/faults.py),
killed four times while 100 jobs are admitted, and children deleted by hand come back."""

from __future__ import annotations

import time
from typing import Any

import pytest
import yaml
from tests.integration.support import Api, OperatorProcess, dump, example, simulated_ftj, wait_for

FTJ = "FineTuneJob"
LABEL = "kubetune.io/finetunejob"
TWO_NODES = {"nodes": 2, "gpusPerNode": 1, "gpuType": "rtx-4090d"}  # with the headless Service
ACCESS = ("ServiceAccount", "Role", "RoleBinding")  # the namespace's, kubetune-trainer
SUPPORT = (*ACCESS, "Service")


def child_name(kind: str, job: str) -> str:
    return "kubetune-trainer" if kind in ACCESS else f"{job}-trainer"


def children_of(api: Api, ns: str, name: str) -> dict[str, dict[str, Any] | None]:
    """Each object a two-node job must have, by kind (None when missing)."""
    found: dict[str, dict[str, Any] | None] = {kind: api.get(kind, ns, child_name(kind, name)) for kind in SUPPORT}
    found["Job"] = api.get("Job", ns, name)
    return found


def assert_whole(api: Api, ns: str, name: str) -> None:
    """Every object exists, once: the Service and Job controlled by this FineTuneJob, the trainer access
    kubetune's (no owner)."""
    ftj = api.get(FTJ, ns, name)
    assert ftj is not None
    for kind, child in children_of(api, ns, name).items():
        assert child is not None, f"{name}: {kind} is missing"
        if kind in ACCESS:
            assert "ownerReferences" not in child["metadata"], f"{name}: {kind} {dump(child['metadata'])}"
            continue
        owner = next(r for r in child["metadata"]["ownerReferences"] if r.get("controller"))
        assert (owner["kind"], owner["uid"]) == (FTJ, ftj["metadata"]["uid"]), f"{name}: {kind} {dump(owner)}"
    assert len(api.children("Job", ns, LABEL, name)) == 1


def admitted(api: Api, ns: str, name: str) -> dict[str, Any] | None:
    return api.condition(FTJ, ns, name, "Admitted")


def prepared(api: Api, ns: str, name: str) -> bool:
    return (api.condition(FTJ, ns, name, "Prepared") or {}).get("status") == "True"


# Each point is reached once in an admission; the process dies there as with SIGKILL. The supporting
# children go out together, so at "after-write:RoleBinding" the others may or may not have been written.
CRASH_POINTS = {
    "after-write:ServiceAccount": lambda api, ns: api.get("Job", ns, "crash") is None,
    "after-write:RoleBinding": lambda api, ns: api.get("Job", ns, "crash") is None,
    # The prepare step ran first (its status says Admitted, Prepared=False); the patch that says Prepared=True
    # follows the training Job's write.
    "after-write:Job": lambda api, ns: api.get("Job", ns, "crash") is not None and not prepared(api, ns, "crash"),
    "after-admitted": lambda api, ns: (admitted(api, ns, "crash") or {}).get("status") == "True",
}


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_killed_at_each_step_of_admission_the_job_still_trains(
    api: Api, ns: str, operator: OperatorProcess, point: str
) -> None:
    operator.stop()
    try:
        # Armed for this namespace's objects only: its trainer access, and crash (the Job and the FineTuneJob).
        subject = f"{ns}/crash" if point in ("after-write:Job", "after-admitted") else f"{ns}/kubetune-trainer"
        operator.start(KUBETUNE_CRASH_AT=f"{point}@{subject}")
        api.apply(simulated_ftj("crash", ns, run_seconds=2, resources=TWO_NODES))
        proc = operator.proc
        assert proc is not None
        wait_for(lambda: proc.poll() is not None, 60, f"the operator to die at {point}")
        assert proc.returncode == -9, operator.logs()[-3000:]
        # The kill landed where it was meant to: what the API server holds is that step's state.
        assert CRASH_POINTS[point](api, ns), dump(children_of(api, ns, "crash"))
    finally:
        operator.start()
    api.wait_state(FTJ, ns, "crash", "Succeeded", 120)
    assert_whole(api, ns, "crash")


def test_a_kill_storm_during_100_admissions_leaves_every_job_whole(
    api: Api, ns: str, operator: OperatorProcess
) -> None:
    names = [f"storm-{i:03d}" for i in range(100)]
    bodies = [simulated_ftj(name, ns, run_seconds=1, resources=TWO_NODES) for name in names]
    api.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(bodies))
    try:
        for _ in range(4):  # four kills within ten seconds, each while admissions are in flight
            time.sleep(1.5)
            operator.kill()
            operator.start()
    finally:
        if operator.proc is None or operator.proc.poll() is not None:
            operator.start()

    def unfinished() -> list[str]:
        states = {f["metadata"]["name"]: (f.get("status") or {}).get("state") for f in api.kube.list(FTJ, ns)}
        return [n for n in names if states.get(n) != "Succeeded"]

    wait_for(lambda: not unfinished(), 400, "every job to succeed", interval=2)
    for name in names:
        assert_whole(api, ns, name)


@pytest.mark.parametrize("kind", SUPPORT)
def test_a_child_deleted_by_hand_comes_back(api: Api, ns: str, kind: str) -> None:
    api.apply(simulated_ftj("keep", ns, run_seconds=300, resources=TWO_NODES))
    api.wait_state(FTJ, ns, "keep", "Running", 60)
    name = child_name(kind, "keep")
    before = api.get(kind, ns, name)
    assert before is not None
    api.kube.delete(kind, ns, name)
    back = wait_for(
        lambda: (c := api.get(kind, ns, name)) and c["metadata"]["uid"] != before["metadata"]["uid"] and c,
        15,
        f"the {kind} to come back",
    )
    if kind in ACCESS:
        assert back["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "kubetune-operator"
    else:
        assert back["metadata"]["ownerReferences"][0]["uid"] == api.get(FTJ, ns, "keep")["metadata"]["uid"]


def test_a_deleted_training_job_comes_back_while_the_run_is_unfinished(api: Api, ns: str) -> None:
    api.apply(simulated_ftj("again", ns, run_seconds=300))
    api.wait_state(FTJ, ns, "again", "Running", 60)
    before = api.get("Job", ns, "again")
    assert before is not None
    api.kube.delete("Job", ns, "again", propagation="Foreground")
    wait_for(
        lambda: (j := api.get("Job", ns, "again")) and j["metadata"]["uid"] != before["metadata"]["uid"],
        30,
        "a new training Job",
    )


def test_modelserver_children_deleted_by_hand_come_back(api: Api, ns: str) -> None:
    body = example("modelserver.yaml", "srv", ns, adapters=[], ui={"enabled": False})
    body["spec"].pop("adapterSelector", None)
    api.apply(body)
    api.wait_state("ModelServer", ns, "srv", "Ready", 60)
    for kind in ("Service", "Deployment"):
        before = api.get(kind, ns, "srv")
        assert before is not None
        api.kube.delete(kind, ns, "srv")
        wait_for(
            lambda kind=kind, uid=before["metadata"]["uid"]: (c := api.get(kind, ns, "srv"))
            and c["metadata"]["uid"] != uid,
            15,
            f"the {kind} to come back",
        )
    api.wait_state("ModelServer", ns, "srv", "Ready", 60)
