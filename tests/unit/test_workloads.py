"""The operator's own index of Kueue's Workloads (controllers/workloads.py): by Job, changed in place, and each
change has the FineTuneJob look again."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from kubetune.controllers.workloads import Workloads, job_of


def workload(name: str, job: str, reserved: str = "False", ns: str = "team") -> dict[str, Any]:
    owner = {"apiVersion": "batch/v1", "kind": "Job", "name": job, "uid": f"uid-{job}", "controller": True}
    return {
        "metadata": {"name": name, "namespace": ns, "uid": f"w-{name}", "ownerReferences": [owner]},
        "status": {"conditions": [{"type": "QuotaReserved", "status": reserved, "reason": "Pending"}]},
    }


def store() -> tuple[Workloads, list[tuple[str, str]]]:
    looked: list[tuple[str, str]] = []
    ctx = SimpleNamespace(indexes={"finetunejobs": {}}, later=lambda _delay, work, _ctx, key: looked.append(key))
    return Workloads(ctx), looked  # type: ignore[arg-type]


def test_a_workload_is_kept_under_its_job_and_its_job_looks_again() -> None:
    workloads, looked = store()
    workloads.changed(workload("w1", "first"))
    assert workloads.by_job[("team", "first")][0]["jobUid"] == "uid-first"
    assert looked == [("team", "first")]
    workloads.deleted(workload("w1", "first"))
    assert workloads.by_job == {} and looked == [("team", "first")] * 2


def test_a_new_listing_changes_the_same_dict_and_only_what_changed_looks_again() -> None:
    workloads, looked = store()
    held = workloads.by_job  # what Context.indexes holds
    workloads.changed(workload("w1", "first"))
    workloads.changed(workload("w2", "gone"))
    looked.clear()
    # After an expired watch: "gone" was deleted meanwhile, "first" was admitted, "new" appeared.
    workloads.listed([workload("w1", "first", reserved="True"), workload("w3", "new")])
    assert workloads.by_job is held and sorted(k[1] for k in held) == ["first", "new"]
    assert sorted(k[1] for k in looked) == ["first", "gone", "new"]
    looked.clear()
    workloads.listed([workload("w1", "first", reserved="True"), workload("w3", "new")])
    assert looked == []


def test_only_workloads_of_jobs_count() -> None:
    other = workload("w", "x")
    other["metadata"]["ownerReferences"][0]["kind"] = "JobSet"
    assert job_of(other) is None and job_of(workload("w", "x")) == ("x", "uid-x")
    workloads, looked = store()
    workloads.changed(other)
    assert workloads.by_job == {} and looked == []
