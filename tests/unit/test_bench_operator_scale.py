"""bench/operator_scale.py's pieces: the Jobs it creates without the operator, its stage table, and the ModelServer
phase (the servers it creates, when one counts as done, and the server pods of bench/serving_pods.py)."""

from __future__ import annotations

import json
import os
from http.server import ThreadingHTTPServer
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest

from kubetune.adapters import http
from kubetune.adapters.sync import Action, Adapter, Replica
from kubetune.api.v1alpha1 import FineTuneJob, ModelServer
from kubetune.config import OperatorConfig
from kubetune.planner import plan_job
from kubetune.render import finetunejob as render
from kubetune.render.common import LABEL_FINETUNEJOB
from kubetune.server.fetcher import Vllm
from kubetune.signing import Signer, Verifier
from tests import bench as bench_modules


def load_bench() -> ModuleType:
    return bench_modules.load("operator_scale")


def test_bare_job_is_the_operators_job_without_owner_service_account_or_managed_by_label() -> None:
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
    # Without the operator's managed-by label, which its watches select by: the floor's Jobs and pods, left in
    # the cluster by --compare, are not in the operator's indexes while it runs.
    assert "app.kubernetes.io/managed-by" in rendered["metadata"]["labels"]
    for meta in (rendered["metadata"], rendered["spec"]["template"]["metadata"]):
        del meta["labels"]["app.kubernetes.io/managed-by"]
    # Apart from those, the very Job the operator applies: same pods, labels (the bench's pod watch finds them by
    # the FineTuneJob label), GPU request, node selection and kwok run time.
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
        return {
            "jobs": jobs,
            "operator": operator,
            **finished,
            "api_requests_per_job_all_clients": requests,
            "api_requests_per_job": own,
        }

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


def test_each_server_serves_its_own_succeeded_jobs_through_the_api_the_operator_reads() -> None:
    bench = load_bench()
    jobs = bench.server_jobs(3, 5, 1000)
    server = ModelServer.model_validate(bench.modelserver("server-003", "bench-1000", jobs))

    assert [(a.name, a.from_fine_tune_job) for a in server.spec.adapters] == [(j, j) for j in jobs]
    assert jobs == ["job-0015", "job-0016", "job-0017", "job-0018", "job-0019"]
    assert server.spec.max_loras == 5  # vLLM holds all five at once
    # 200 servers of 5 use each of 1000 jobs once; with fewer jobs the servers go round them.
    every = [job for i in range(200) for job in bench.server_jobs(i, 5, 1000)]
    assert sorted(every) == [f"job-{k:04d}" for k in range(1000)]
    assert bench.server_jobs(2, 5, 12) == ["job-0010", "job-0011", "job-0000", "job-0001", "job-0002"]


def test_a_server_is_done_when_every_adapter_its_status_lists_is_loaded() -> None:
    bench = load_bench()
    # Lines as kubectl prints them with SERVER_STATES ({.status.adapters[*].state} separates states by spaces).
    done = bench.all_loaded(5)
    assert bench.watch_line("server-000 Loaded Loaded Loaded Loaded Loaded\n") == ("server-000", done)
    assert bench.watch_line("server-001 Loaded Loaded Pending Loaded Loaded\n")[1] != done
    assert bench.watch_line("server-002 Loaded Loaded Loaded Loaded\n")[1] != done  # one not listed yet
    assert bench.watch_line("server-003 \n") == ("server-003", "")
    assert bench.watch_line("\n") is None
    # The other watches print one word after the name: unchanged.
    assert bench.watch_line("job-0001 Running/gpu-node-1\n") == ("job-0001", "Running/gpu-node-1")


def test_spread_and_the_peak_rss_of_a_phase() -> None:
    bench = load_bench()
    assert bench.spread([3.0, 1.0, 2.0]) == {"p50_s": 2.0, "p99_s": 3.0, "last_s": 3.0}
    assert bench.spread([]) == {"p50_s": None, "p99_s": None, "last_s": None}

    pid = os.getpid()
    block = bytearray(256 * 1024 * 1024)  # touched: counted in RSS, and its peak with it
    peak_with_block = bench.process_stats(pid)[0]
    del block
    assert bench.reset_peak_rss(pid)
    assert bench.process_stats(pid)[0] < peak_with_block - 200


def test_serving_pods_answer_the_operators_adapter_client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The bench's server pods speak the operator's real HTTP path: the real fetcher at each pod's address checks
    the operator's signature for that pod, prepares an s3:// adapter from the fake S3, and the fake vLLM behind it
    keeps each pod's adapters apart."""
    pods = bench_modules.load("serving_pods")
    s3 = ThreadingHTTPServer(("127.0.0.1", 0), pods.FakeS3Handler)
    vllm = pods.FakeVllm(("0.0.0.0", 0))
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{s3.server_address[1]}")
    for name, value in [
        ("AWS_ACCESS_KEY_ID", "bench"),
        ("AWS_SECRET_ACCESS_KEY", "bench"),
        ("AWS_DEFAULT_REGION", "us-east-1"),
        ("KUBETUNE_CACHE_ROOT", str(tmp_path)),
    ]:
        monkeypatch.setenv(name, value)
    signer = Signer.generate()
    replicas = []
    servers = [s3, vllm]
    for pod, ip in [("server-000-a", "127.0.0.1"), ("server-001-b", "127.0.0.2")]:
        assert pods.pod_line(f"{pod} {ip} {signer.public_key}\n") == (pod, ip, signer.public_key)
        verifier = Verifier.from_text(signer.public_key, pod)
        fetcher = pods.CountingFetcher((ip, 0), verifier, Vllm(f"{ip}:{vllm.server_address[1]}"))
        servers.append(fetcher)
        replicas.append(Replica(pod, f"{ip}:{fetcher.server_address[1]}"))
    for server in servers:
        pods.serve(server)
    try:
        first, second = replicas
        adapter = Adapter("job-0001", "s3://bench/bench-1000/job-0001/adapter", "fromFineTuneJob/job-0001")
        prepared = http.prepare(first, adapter, signer)
        assert prepared.status == 200 and prepared.adapter_config["r"] == 8
        assert (tmp_path / "s3/bench/bench-1000/job-0001/adapter/adapter_config.json").is_file()

        assert http.perform(Action(first, "load", adapter.name, adapter.path), signer).ok
        assert http.report(first, signer).loaded == {"job-0001": adapter.path}
        assert http.report(second, signer).loaded == {}
        again = http.perform(Action(first, "load", adapter.name, adapter.path), signer)
        assert again.status == 400 and "already been loaded" in again.message
        assert http.perform(Action(second, "unload", adapter.name), signer).ok  # vLLM's 404: already gone
        assert http.perform(Action(first, "unload", adapter.name), signer).ok
        assert http.report(first, signer).loaded == {}

        # Signed for another pod, or by another key: refused like a real pod's fetcher refuses it.
        assert http.report(Replica(second.pod, first.fetcher), signer).loaded is None
        assert http.report(first, Signer.generate()).loaded is None
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()


def test_fake_vllm_loads_and_unloads_as_vllm_answers() -> None:
    pods = bench_modules.load("serving_pods")
    loaded: dict[str, str] = {}
    assert pods.lora_call(loaded, "/v1/load_lora_adapter", {"lora_name": "a", "lora_path": "/p/a"})[0] == 200
    assert pods.lora_call(loaded, "/v1/load_lora_adapter", {"lora_name": "a", "lora_path": "/p/a"})[0] == 400
    assert pods.models_listing(loaded)["data"][1] == {
        "id": "a",
        "object": "model",
        "root": "/p/a",
        "parent": pods.BASE_MODEL,
    }
    assert pods.models_listing(loaded)["data"][0]["parent"] is None  # the base model is no adapter
    assert pods.lora_call(loaded, "/v1/unload_lora_adapter", {"lora_name": "a"})[0] == 200
    assert pods.lora_call(loaded, "/v1/unload_lora_adapter", {"lora_name": "a"})[0] == 404
    assert loaded == {}


def test_jobs_the_watch_missed_are_done_when_their_succeeded_condition_says() -> None:
    bench = load_bench()

    def ftj(name: str, state: str, when: str = "") -> dict[str, Any]:
        conditions = [{"type": "Succeeded", "status": "True", "lastTransitionTime": when}] if when else []
        return {"metadata": {"name": name}, "status": {"state": state, "conditions": conditions}}

    listed = [ftj("seen", "Succeeded", "2026-12-07T16:00:05Z"), ftj("missed", "Succeeded", "2026-12-07T16:00:07Z")]
    listed.append(ftj("running", "Running"))
    admin = SimpleNamespace(list=lambda kind, namespace: listed if (kind, namespace) == ("FineTuneJob", "ns") else [])
    watcher = SimpleNamespace(done_at={"seen": 104.0}, marked={})
    watcher.mark_done = lambda name, at: watcher.marked.setdefault(name, at)
    start_wall = 1796659200.0  # 2026-12-07T16:00:00Z
    assert bench.missed_by_the_watch(admin, "ns", watcher, 100.0, start_wall) == ["missed"]
    assert watcher.marked == {"missed": 107.0}
