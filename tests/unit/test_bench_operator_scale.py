"""bench/operator_scale.py's run without the operator: the Jobs it creates itself and its stage table."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

from kubetune.api.v1alpha1 import FineTuneJob
from kubetune.config import OperatorConfig
from kubetune.planner import plan_job
from kubetune.render import finetunejob as render
from kubetune.render.common import LABEL_FINETUNEJOB
from tests import bench as bench_modules


def load_bench() -> ModuleType:
    return bench_modules.load("operator_scale")


def test_bare_job_is_the_operators_job_without_owner_or_its_service_account() -> None:
    bench = load_bench()
    job = bench.bare_job("job-0007", "bench-1000")

    body = bench.finetunejob("job-0007", "bench-1000")
    body["metadata"]["uid"] = "00000000-0000-0000-0000-000000000000"
    ftj = FineTuneJob.model_validate(body)
    config = OperatorConfig()
    plan = plan_job(ftj.spec, gpu_memory_gib=config.gpu_type("rtx-4090d").memory_gib, gpu_type="rtx-4090d")
    rendered = render.training_job(ftj, render.trainer_config(ftj, plan, None), config)

    assert "ownerReferences" in rendered["metadata"] and "ownerReferences" not in job["metadata"]
    assert rendered["spec"]["template"]["spec"]["serviceAccountName"] == "kubetune-trainer"
    assert job["spec"]["template"]["spec"]["serviceAccountName"] == "default"
    # Apart from those two, the very Job the operator applies: same pods, labels (the bench's pod watch
    # finds them by the FineTuneJob label), GPU request, node selection and kwok run time.
    rendered["spec"]["template"]["spec"]["serviceAccountName"] = "default"
    del rendered["metadata"]["ownerReferences"]
    assert job == rendered
    assert job["spec"]["template"]["metadata"]["labels"][LABEL_FINETUNEJOB] == "job-0007"


def _watcher(**fields: dict[str, object]) -> SimpleNamespace:
    return SimpleNamespace(**{"first_seen": {}, "reached": {}, "done_at": {}, **fields})


def test_stages_without_finetunejobs_start_at_the_pod() -> None:
    bench = load_bench()
    created = {"a": 0.0, "b": 0.5}
    jobs = _watcher(first_seen={"a": 0.1, "b": 0.6}, done_at={"a": 5.0, "b": 7.0})
    pods = _watcher(
        first_seen={"a": 1.0, "b": 2.0},
        reached={
            "Pending/": {"a": 1.0, "b": 2.0},
            "Pending/node-1": {"a": 1.2, "b": 2.1},
            "Running/node-1": {"a": 2.0, "b": 3.0},
            "Succeeded/node-1": {"a": 3.0, "b": 4.5},
        },
    )
    without = bench.stages(0.0, created, jobs, pods, None)
    assert [row["stage"] for row in without] == [
        "pod (Job controller)",
        "bound (scheduler)",
        "Running (kwok)",
        "pod Succeeded (kwok, 1 s delay)",
        "Job complete (Job controller)",
    ]
    assert without[0]["last_at_s"] == 2.0 and without[-1]["last_at_s"] == 7.0
    assert without[-1]["p99_s"] == 2.5  # b: pod Succeeded at 4.5, Job complete at 7.0

    ftjs = _watcher(done_at={"a": 5.1, "b": 7.2})
    with_operator = bench.stages(0.0, created, jobs, pods, ftjs)
    assert with_operator[0]["stage"] == "Job (operator)" and with_operator[-1]["stage"] == "Succeeded (operator)"
    assert len(with_operator) == len(without) + 2


def test_admission_burst_reads_each_step_from_the_audit_log(tmp_path: Path) -> None:
    burst = bench_modules.load("admission_burst")

    def entry(resource: str, name: str, user: str, received: str, answered: str, **ref: str) -> str:
        return json.dumps(
            {
                "objectRef": {"resource": resource, "namespace": "bench-10-1", "name": name, **ref},
                "user": {"username": user},
                "requestReceivedTimestamp": f"2026-11-29T16:00:{received}Z",
                "stageTimestamp": f"2026-11-29T16:00:{answered}Z",
            }
        )

    operator = burst.scale.OPERATOR.user
    log = tmp_path / "audit.log"
    log.write_text(
        "\n".join(
            [
                entry("finetunejobs", "job-0001", "admin", "00.000000", "00.010000"),
                entry("serviceaccounts", "kubetune-trainer", operator, "00.060000", "00.080000"),
                entry("jobs", "job-0001", operator, "00.095000", "00.140000"),
                entry("finetunejobs", "job-0001", operator, "00.150000", "00.170000", subresource="status"),
                entry("finetunejobs", "job-0002", "admin", "01.000000", "01.010000"),  # never admitted
            ]
        )
    )
    [steps] = burst.steps_per_job(log)
    assert [round(s, 3) for s in steps] == [0.085, 0.045, 0.13]


def test_log_problems_counts_each_kind_of_warning_once_for_all_jobs(tmp_path: Path) -> None:
    bench = load_bench()
    log = tmp_path / "operator.log"
    log.write_text(
        "2026-11-29 16:33:28,301 INFO kopf.activities.startup: Activity 'configure' succeeded.\n"
        "2026-11-29 16:33:29,301 WARNING kubetune.handlers.finetunejob: status of bench-1000-1/job-0001 not "
        "written, retrying: 0 Unreachable: ReadTimeoutError: read timed out\n"
        "2026-11-29 16:33:30,301 WARNING kubetune.handlers.finetunejob: status of bench-1000-1/job-0977 not "
        "written, retrying: 0 Unreachable: ReadTimeoutError: read timed out\n"
        "2026-11-29 16:33:31,301 ERROR kopf.objects: [bench-1000-1/job-0002] Handler 'x' failed with an exception\n"
    )
    assert bench.log_problems(log) == {
        "WARNING kubetune.handlers.finetunejob: status of NAMESPACE/NAME not written, retrying": 2,
        "ERROR kopf.objects: [NAMESPACE/NAME] Handler 'x' failed with an exception": 1,
    }
    assert bench.log_problems(tmp_path / "missing.log") == {}


def test_compare_pairs_each_floor_with_the_operators_run_of_the_same_size() -> None:
    bench = load_bench()

    def run(jobs: int, operator: bool, seconds: float, requests: float) -> dict[str, Any]:
        finished = {"all_succeeded_s": seconds} if operator else {"all_jobs_complete_s": seconds}
        own = 4.0 if operator else None
        return {"jobs": jobs, "operator": operator, **finished, "api_requests_per_job_all_clients": requests,
                "api_requests_per_job": own}

    rows = bench.compare([run(10, False, 2.0, 16.0), run(10, True, 2.5, 19.5), run(100, True, 9.0, 19.0)])
    assert rows == [
        {
            "jobs": 10,
            "floor_s": 2.0,
            "operator_s": 2.5,
            "time_ratio": 1.25,
            "requests_per_job_floor": 16.0,
            "requests_per_job_with_operator": 19.5,
            "operator_requests_per_job": 4.0,
        }
    ]
