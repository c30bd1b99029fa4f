"""bench/operator_scale.py's run without the operator: the Jobs it creates itself and its stage table."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

from kubetune.api.v1alpha1 import FineTuneJob
from kubetune.config import OperatorConfig
from kubetune.planner import plan_job
from kubetune.render import finetunejob as render
from kubetune.render.common import LABEL_FINETUNEJOB

ROOT = Path(__file__).resolve().parents[2]


def load_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("operator_scale", ROOT / "bench" / "operator_scale.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["operator_scale"] = module
    spec.loader.exec_module(module)
    return module


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
    assert rendered["spec"]["template"]["spec"]["serviceAccountName"] == "job-0007-trainer"
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
