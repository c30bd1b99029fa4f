"""A hostile or unlucky neighbour: names someone else holds are never taken over, refusals of the API server
show on the object, and a gpuType the installation does not know is refused instead of running anywhere."""

from __future__ import annotations

from typing import Any

from tests.integration.support import Api, dump, example, simulated_ftj, wait_for

FTJ = "FineTuneJob"
MS = "ModelServer"


def simulated_server(name: str, ns: str, **spec: Any) -> dict[str, Any]:
    body = example("modelserver.yaml", name, ns, adapters=[], ui={"enabled": False}, **spec)
    body["spec"].pop("adapterSelector", None)
    return body


def condition_with(api: Api, kind: str, ns: str, name: str, type_: str, reason: str) -> dict[str, Any] | None:
    cond = api.condition(kind, ns, name, type_)
    return cond if cond and cond["reason"] == reason else None


def test_a_role_someone_else_holds_is_not_taken_over(api: Api, ns: str) -> None:
    foreign = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": {"name": "kubetune-trainer", "namespace": ns},
        "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get"]}],
    }
    api.kube.create(foreign)
    api.apply(simulated_ftj("clash", ns, run_seconds=2))
    cond = wait_for(lambda: condition_with(api, FTJ, ns, "clash", "Admitted", "NameConflict"), 30, "NameConflict")
    assert cond["status"] == "False" and "Role kubetune-trainer already exists" in cond["message"], cond
    assert api.status(FTJ, ns, "clash")["state"] == "Pending"
    api.wait_event(ns, "clash", "NameConflict", "Warning", 15)
    # Nothing of the job's runs while a name is held: no pod may run bound to someone else's Role.
    assert api.get("Job", ns, "clash") is None
    role = api.get("Role", ns, "kubetune-trainer")
    assert role["rules"] == foreign["rules"] and "app.kubernetes.io/managed-by" not in (
        role["metadata"].get("labels") or {}
    ), dump(role)
    # Once the owner of the name gives it up, the job goes on by itself (the retry's back-off starts at 5 s).
    api.kube.delete("Role", ns, "kubetune-trainer")
    api.wait_state(FTJ, ns, "clash", "Succeeded", 60)
    assert api.condition(FTJ, ns, "clash", "Admitted")["status"] == "True"


def test_a_service_someone_else_holds_is_not_redirected_to_the_server(api: Api, ns: str) -> None:
    selector = {"app": "shop"}
    api.kube.create(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "web", "namespace": ns},
            "spec": {"selector": selector, "ports": [{"port": 80}]},
        }
    )
    api.apply(simulated_server("web", ns))
    cond = wait_for(lambda: condition_with(api, MS, ns, "web", "Ready", "NameConflict"), 30, "NameConflict")
    assert "Service web already exists" in cond["message"], cond
    assert api.status(MS, ns, "web")["state"] == "Failed"
    api.wait_event(ns, "web", "NameConflict", "Warning", 15)
    service = api.get("Service", ns, "web")
    assert service["spec"]["selector"] == selector and not service["metadata"].get("ownerReferences")
    assert api.get("Deployment", ns, "web") is None  # the Services go first: no server pod started for it


def test_a_job_and_a_server_of_one_name_do_not_share_a_service(api: Api, ns: str) -> None:
    two_nodes = {"nodes": 2, "gpusPerNode": 1, "gpuType": "rtx-4090d"}
    api.apply(simulated_ftj("same", ns, run_seconds=2, resources=two_nodes))
    api.apply(simulated_server("same", ns))
    api.wait_state(FTJ, ns, "same", "Succeeded", 60)
    api.wait_state(MS, ns, "same", "Ready", 60)
    owners = {n: api.get("Service", ns, n)["metadata"]["ownerReferences"][0]["kind"] for n in ("same", "same-trainer")}
    assert owners == {"same": MS, "same-trainer": FTJ}


def wait_quota_counted(api: Api, ns: str, name: str) -> None:
    wait_for(lambda: ((api.get("ResourceQuota", ns, name) or {}).get("status") or {}).get("hard"), 30, "the quota")


def test_a_refused_write_shows_on_the_job_and_is_tried_again(api: Api, ns: str) -> None:
    quota = {
        "apiVersion": "v1",
        "kind": "ResourceQuota",
        "metadata": {"name": "no-jobs", "namespace": ns},
        "spec": {"hard": {"count/jobs.batch": "0"}},
    }
    api.kube.create(quota)
    wait_quota_counted(api, ns, "no-jobs")
    api.apply(simulated_ftj("quota", ns, run_seconds=2))
    cond = wait_for(lambda: condition_with(api, FTJ, ns, "quota", "Admitted", "ApplyFailed"), 30, "ApplyFailed")
    assert "Job quota" in cond["message"] and "exceeded quota" in cond["message"], cond
    event = api.wait_event(ns, "quota", "ApplyFailed", "Warning", 15)
    assert "exceeded quota: no-jobs" in event["message"]
    api.kube.delete("ResourceQuota", ns, "no-jobs")
    api.wait_state(FTJ, ns, "quota", "Succeeded", 90)


def test_a_refused_server_write_shows_on_the_server(api: Api, ns: str) -> None:
    quota = {
        "apiVersion": "v1",
        "kind": "ResourceQuota",
        "metadata": {"name": "no-deployments", "namespace": ns},
        "spec": {"hard": {"count/deployments.apps": "0"}},
    }
    api.kube.create(quota)
    wait_quota_counted(api, ns, "no-deployments")
    api.apply(simulated_server("capped", ns))
    cond = wait_for(lambda: condition_with(api, MS, ns, "capped", "Ready", "ApplyFailed"), 30, "ApplyFailed")
    assert "Deployment capped" in cond["message"] and "exceeded quota" in cond["message"], cond
    api.wait_event(ns, "capped", "ApplyFailed", "Warning", 15)
    api.kube.delete("ResourceQuota", ns, "no-deployments")
    api.wait_state(MS, ns, "capped", "Ready", 90)


def test_an_unknown_gpu_type_is_refused_not_run_anywhere(api: Api, ns: str) -> None:
    resources = {"nodes": 1, "gpusPerNode": 1, "gpuType": "b200", "gpuMemory": "180Gi"}
    api.apply(simulated_ftj("b200", ns, resources=resources))
    status = api.wait_state(FTJ, ns, "b200", "Failed", 30)
    cond = next(c for c in status["conditions"] if c["type"] == "Admitted")
    assert cond["reason"] == "UnknownGpuType" and "gpuType b200 is not configured" in cond["message"], cond
    assert "rtx-4090d" in cond["message"]  # the types this installation has
    assert api.get("Job", ns, "b200") is None
    api.apply(simulated_server("b200", ns, gpuType="b200"))
    server = api.wait_state(MS, ns, "b200", "Failed", 30)
    ready = next(c for c in server["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "UnknownGpuType" and api.get("Deployment", ns, "b200") is None
