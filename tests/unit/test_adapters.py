"""Adapters of a ModelServer: resolution, checks, the per-replica sync plan, states and vLLM's error reasons.
(That the operator never loads vLLM or torch is in test_layers.py.)"""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from kubetune.adapters import (
    Action,
    Adapter,
    Failure,
    Replica,
    ReplicaReport,
    adapter_states,
    check_adapter,
    check_adapter_files,
    next_failure,
    next_retry,
    plan_actions,
    reason_for_load_error,
    resolution,
    retry_delay,
)
from kubetune.adapters.checks import same_model
from kubetune.api.v1alpha1 import ModelServer
from kubetune.status import modelserver as ms
from kubetune.storage import Access
from tests.rejections import EXAMPLES

BASE = "hf://Qwen/Qwen2.5-7B"
R1, R2 = Replica("srv-a", "127.1.0.5:8001"), Replica("srv-b", "127.1.0.6:8001")


def server(**spec: Any) -> ModelServer:
    body = yaml.safe_load((EXAMPLES / "modelserver.yaml").read_text())
    body["metadata"] |= {"namespace": "team-a", "uid": "u", "generation": 1}
    body["spec"].update(spec)
    return ModelServer.model_validate(body)


def ftj(name: str, state: str | None, labels: dict[str, str] | None = None, **adapter: Any) -> dict[str, Any]:
    status: dict[str, Any] = {"state": state} if state else {}
    if adapter:
        status["adapter"] = {"uri": f"pvc://adapters/{name}/adapter", **adapter}
    return {
        "metadata": {"name": name, "labels": labels or {}},
        "spec": {"output": {"uri": f"pvc://adapters/{name}"}},
        "status": status,
    }


# --- resolution --------------------------------------------------------------------------------------


def test_resolve_named_selected_waiting_and_refused() -> None:
    jobs = {
        "qwen-sft": ftj("qwen-sft", "Succeeded", baseModel=BASE, rank=16, targetModules=["q_proj", "v_proj"]),
        "qwen-dpo": ftj("qwen-dpo", "Running"),
        "picked": ftj("picked", "Succeeded", {"serve-on": "qwen-7b"}, baseModel=BASE, rank=8),
        "other-base": ftj("other-base", "Succeeded", {"serve-on": "qwen-7b"}, baseModel="hf://meta/llama", rank=8),
        "too-big": ftj("too-big", "Succeeded", {"serve-on": "qwen-7b"}, baseModel=BASE, rank=128),
        "training": ftj("training", "Running", {"serve-on": "qwen-7b"}),
        "unlabelled": ftj("unlabelled", "Succeeded", baseModel=BASE, rank=8),
    }
    res = resolution.resolve(server(), jobs)
    assert [a.name for a in res.serve] == ["support-sft", "picked"]
    assert res.serve[0] == Adapter(
        "support-sft",
        "pvc://adapters/qwen-sft/adapter",
        "fromFineTuneJob/qwen-sft",
        base_model=BASE,
        rank=16,
        target_modules=("q_proj", "v_proj"),
    )
    assert res.names == ["support-sft", "support-dpo", "other-base", "picked", "too-big"]
    assert res.settled["support-dpo"].reason == "WaitingForFineTuneJob"
    assert res.settled["other-base"].reason == "AdapterBaseMismatch"
    assert res.settled["too-big"].reason == "AdapterRankTooLarge"
    # A job still training already has its claim mounted, so its adapter needs no restart later.
    assert "pvc://adapters/training/adapter" in res.locations
    assert "pvc://adapters/unlabelled/adapter" not in res.locations


def test_resolve_s3_adapters_and_their_secrets() -> None:
    s3_job = ftj("s3-job", "Succeeded", {"serve-on": "qwen-7b"}, baseModel=BASE, rank=8)
    s3_job["spec"]["output"] = {"uri": "s3://bucket/runs/s3-job", "s3": {"secretName": "job-creds"}}
    s3_job["status"]["adapter"]["uri"] = "s3://bucket/runs/s3-job/adapter"
    training = ftj("s3-training", "Running", {"serve-on": "qwen-7b"})
    training["spec"]["output"] = {"uri": "s3://bucket/runs/next", "s3": {"secretName": "next-creds"}}
    uri = {"name": "from-s3", "uri": "s3://bucket/foreign", "s3": {"secretName": "minio", "endpoint": "http://m:9000"}}
    res = resolution.resolve(server(adapters=[uri]), {"s3-job": s3_job, "s3-training": training})
    by_name = {a.name: a for a in res.serve}
    assert by_name["from-s3"].s3 == Access("minio", "http://m:9000", "")
    assert by_name["from-s3"].needs_fetcher and by_name["from-s3"].checked_by_files
    assert by_name["s3-job"].s3 == Access("job-creds") and by_name["s3-job"].path.endswith(
        "/s3/bucket/runs/s3-job/adapter"
    )
    assert by_name["s3-job"].needs_fetcher and not by_name["s3-job"].checked_by_files  # its job reported it
    # Every Secret the fetcher may need, also of a job still training: no restart when it succeeds.
    assert res.secrets == ["job-creds", "minio", "next-creds"]


def test_views_follow_the_status_order() -> None:
    res = resolution.resolve(server(adapterSelector=None), {})
    views = res.views([], {})
    assert [(v.name, v.state, v.reason) for v in views] == [
        ("support-sft", "Pending", "WaitingForFineTuneJob"),
        ("support-dpo", "Pending", "WaitingForFineTuneJob"),
    ]


# --- checks ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "adapter, reason",
    [
        (Adapter("a", "pvc://adapters/a/adapter", "uri"), None),
        (Adapter("a", "hf://org/adapter", "uri"), None),
        (Adapter("a", "s3://bucket/a/adapter", "uri"), None),
        (Adapter("a", "pvc://x/a", "f", base_model="hf://Qwen/Qwen2.5-7B@abc"), None),
        (Adapter("a", "pvc://x/a", "f", base_model="pvc://models/other"), "AdapterBaseMismatch"),
        (Adapter("a", "pvc://x/a", "f", base_model=BASE, rank=64), None),
        (Adapter("a", "pvc://x/a", "f", base_model=BASE, rank=65), "AdapterRankTooLarge"),
        (Adapter("a", "pvc://x/a", "f", target_modules=("q_proj", "embed_tokens")), "AdapterTargetModulesUnsupported"),
    ],
)
def test_check_adapter(adapter: Adapter, reason: str | None) -> None:
    refusal = check_adapter(adapter, BASE, 64)
    assert (refusal.reason if refusal else None) == reason
    if refusal:
        assert refusal.message


KUBETUNE_META = {"baseModel": {"uri": BASE, "revision": None}}


@pytest.mark.parametrize(
    "config, metadata, reason",
    [
        ({"base_model_name_or_path": "/var/cache/x", "r": 8, "target_modules": ["q_proj"]}, KUBETUNE_META, None),
        ({"r": 8, "target_modules": ["q_proj"]}, {"baseModel": {"uri": "pvc://models/other"}}, "AdapterBaseMismatch"),
        ({"base_model_name_or_path": "Qwen/Qwen2.5-7B", "r": 16, "target_modules": ["v_proj", "q_proj"]}, None, None),
        ({"base_model_name_or_path": "meta-llama/Llama-3.1-8B", "r": 8}, None, "AdapterBaseMismatch"),
        ({"base_model_name_or_path": "Qwen/Qwen2.5-7B", "r": 128}, None, "AdapterRankTooLarge"),
        ({"r": 8, "rank_pattern": {"layers.0.q_proj": 128}}, None, "AdapterRankTooLarge"),
        (
            {"r": 8, "target_modules": ["model.layers.0.self_attn.q_proj", "lm_head"]},
            None,
            "AdapterTargetModulesUnsupported",
        ),
        ({"r": 8, "target_modules": ".*proj"}, None, None),  # a PEFT regex: left to vLLM
    ],
)
def test_check_adapter_files(config: dict[str, Any], metadata: dict[str, Any] | None, reason: str | None) -> None:
    adapter = Adapter("a", "s3://bucket/a", "uri")
    refusal = check_adapter_files(adapter, config, metadata, BASE, 64)
    assert (refusal.reason if refusal else None) == reason


def test_adapter_files_may_name_a_mounted_base_by_its_path() -> None:
    adapter = Adapter("a", "pvc://adapters/a", "uri")
    config = {"base_model_name_or_path": "/mnt/pvc/models/tiny/", "r": 8}
    assert check_adapter_files(adapter, config, None, "pvc://models/tiny", 8) is None
    refusal = check_adapter_files(adapter, config, None, "pvc://models/other", 8)
    assert refusal is not None and refusal.reason == "AdapterBaseMismatch" and "/mnt/pvc/models/tiny" in refusal.message


def test_same_model_ignores_a_missing_revision_only() -> None:
    assert same_model("hf://Qwen/Qwen2.5-7B/", "hf://Qwen/Qwen2.5-7B@main")
    assert not same_model("hf://Qwen/Qwen2.5-7B@v1", "hf://Qwen/Qwen2.5-7B@v2")
    assert not same_model("pvc://models/a", "pvc://models/b")


@pytest.mark.parametrize(
    "status, message, reason",
    [
        (404, "Loading lora x failed: No adapter found for /mnt/pvc/a", "AdapterNotFound"),
        (500, "Worker failed with error 'LoRA rank 16 is greater than max_lora_rank 8.'", "AdapterRankTooLarge"),
        (500, "While loading /p, expected target modules in {'qkv_proj'} but received ['lm_head']", None),
        (500, "The size of tensor a (128) must match the size of tensor b (256)", "AdapterBaseMismatch"),
        (400, "The lora adapter 'qwen' conflicts with a served base model.", "AdapterNameConflict"),
        (500, "vLLM does not yet support DoRA.", "AdapterUnsupported"),
        (500, "something else", "AdapterLoadFailed"),
    ],
)
def test_reason_for_load_error(status: int, message: str, reason: str | None) -> None:
    assert reason_for_load_error(status, message) == (reason or "AdapterTargetModulesUnsupported")


# --- the per-replica plan and the states -------------------------------------------------------------

A = Adapter("a", "pvc://adapters/a/adapter", "uri")
B = Adapter("b", "pvc://adapters/b/adapter", "uri")


def test_plan_loads_what_is_missing_and_unloads_what_is_not_wanted() -> None:
    reports = [
        ReplicaReport(R1, {"a": A.path, "old": "/mnt/pvc/adapters/old"}),
        ReplicaReport(R2, {}),  # a replica that just started gets everything
    ]
    assert plan_actions([A, B], reports, {}, now=0) == [
        Action(R1, "unload", "old"),
        Action(R1, "load", "b", B.path),
        Action(R2, "load", "a", A.path),
        Action(R2, "load", "b", B.path),
    ]


def test_plan_reloads_a_moved_adapter_skips_unreachable_and_waits_after_a_refusal() -> None:
    reports = [ReplicaReport(R1, {"a": "/elsewhere"}), ReplicaReport(R2, None, "connection refused")]
    failures = {"b": Failure(B.path, "AdapterRankTooLarge", "rank", at=100.0, retry_at=160.0)}
    assert plan_actions([A, B], reports, failures, now=130.0) == [
        Action(R1, "unload", "a"),
        Action(R1, "load", "a", A.path),
    ]
    assert Action(R1, "load", "b", B.path) in plan_actions([A, B], reports, failures, now=160.0)
    moved = {"b": Failure("/old/path", "AdapterNotFound", "gone", at=100.0, retry_at=1000.0)}
    assert Action(R1, "load", "b", B.path) in plan_actions([A, B], reports, moved, now=130.0)  # a new path: at once


# --- retries of refused loads ------------------------------------------------------------------------


def test_retry_delay_doubles_to_five_minutes_for_transient_refusals() -> None:
    delays = [retry_delay("AdapterNotFound", n) for n in range(1, 9)]
    assert delays == [10, 20, 40, 80, 160, 300, 300, 300]
    assert retry_delay("AdapterFetchFailed", 1) == retry_delay("AdapterLoadFailed", 1) == 10


@pytest.mark.parametrize(
    "reason",
    ["AdapterRankTooLarge", "AdapterBaseMismatch", "AdapterTargetModulesUnsupported", "AdapterUnsupported"],
)
def test_refusals_the_adapter_decides_are_not_hammered(reason: str) -> None:
    assert retry_delay(reason, 1) == retry_delay(reason, 10) == 300


def test_next_failure_counts_refusals_in_a_row_at_one_path() -> None:
    first = next_failure(None, "/p", "AdapterNotFound", "no", now=100.0)
    assert (first.attempts, first.retry_at) == (1, 110.0)
    second = next_failure(first, "/p", "AdapterNotFound", "no", now=111.0)
    assert (second.attempts, second.retry_at) == (2, 131.0)
    third = next_failure(second, "/p", "AdapterFetchFailed", "store down", now=132.0)
    assert (third.attempts, third.retry_at, third.reason) == (3, 172.0, "AdapterFetchFailed")
    elsewhere = next_failure(third, "/q", "AdapterNotFound", "no", now=200.0)
    assert (elsewhere.attempts, elsewhere.retry_at) == (1, 210.0)  # another path starts afresh
    assert next_retry({}, 0.0) is None
    assert next_retry({"a": third, "b": elsewhere}, now=150.0) == 22.0
    assert next_retry({"a": third}, now=500.0) is None  # due: tried at this look, if a replica is there


def test_adapter_states() -> None:
    failures = {"b": Failure(B.path, "AdapterRankTooLarge", "LoRA rank 16 is greater than max_lora_rank 8.", 0)}
    both = [ReplicaReport(R1, {"a": A.path}), ReplicaReport(R2, {"a": A.path})]
    a, b = adapter_states([A, B], both, failures)
    assert (a.state, a.loaded_replicas) == ("Loaded", 2)
    assert (b.state, b.reason) == ("Failed", "AdapterRankTooLarge")
    (a,) = adapter_states([A], [ReplicaReport(R1, {"a": A.path}), ReplicaReport(R2, {})], {})
    assert (a.state, a.reason, a.loaded_replicas) == ("Pending", "Loading", 1)
    (a,) = adapter_states([A], [ReplicaReport(R1, None, "connection refused")], {})
    assert (a.state, a.reason) == ("Pending", "ReplicaUnreachable") and "srv-a" in a.message
    (a,) = adapter_states([A], [], {})
    assert (a.state, a.reason) == ("Pending", "ServerNotReady")


def test_adapters_ready_condition_names_the_failure() -> None:
    failures = {"a": Failure(A.path, "AdapterNotFound", "No adapter found for /mnt/pvc/adapters/a/adapter", 0)}
    views = adapter_states([A], [ReplicaReport(R1, {})], failures)
    patch = ms.derive(ms.ServerObserved({}, 1, 1, "e", "", {"status": {"readyReplicas": 1}}, adapters=views))
    cond = next(c for c in patch["conditions"] if c["type"] == "AdaptersReady")
    assert (cond["status"], cond["reason"]) == ("False", "AdapterNotFound") and "a: No adapter found" in cond["message"]
    assert patch["adapters"][0]["state"] == "Failed"
