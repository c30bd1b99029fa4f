"""The prepare step: its Job (render/prepare.py) and where it stands (status/preparation.py)."""

from __future__ import annotations

from typing import Any

import yaml

from kubetune import storage
from kubetune.config import OperatorConfig
from kubetune.controllers import prepare
from kubetune.controllers.context import Context
from kubetune.render import finetunejob
from kubetune.render import prepare as render
from kubetune.render.common import ANNOTATION_SPEC_HASH
from kubetune.status import preparation
from kubetune.storage import SHARED_CACHE_ROOT
from tests.unit.test_render import CONFIG, PLAN, check_golden, load_ftj


def prepare_job(config: OperatorConfig = CONFIG, claim: str | None = None) -> dict[str, Any]:
    ftj = load_ftj("finetunejob-sft.yaml")
    return render.prepare_job(ftj, finetunejob.trainer_config(ftj, PLAN, None), config, claim, ["in-use"])


def test_prepare_job_matches_golden_and_requests_no_gpu() -> None:
    job = prepare_job(claim="kubetune-cache")
    check_golden("finetunejob-prepare.yaml", [job])
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["command"][:2] == ["kubetune", "prepare"]
    assert set(container["resources"]["limits"]) == {"cpu", "memory"}
    # It reads what the training pods read, and writes the cache (the only pod that may).
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert not mounts[SHARED_CACHE_ROOT].get("readOnly")
    config = yaml.safe_load(job["spec"]["template"]["metadata"]["annotations"][finetunejob.ANNOTATION_TRAINER_CONFIG])
    assert (
        config["cache"]["keep"] == ["in-use"]
        and config["inputsHash"] == job["metadata"]["annotations"][ANNOTATION_SPEC_HASH]
    )
    # It is not labelled as a training Job: the training indexes never see it.
    assert "kubetune.io/finetunejob" not in job["metadata"]["labels"]


def test_prepare_runs_on_the_gpu_types_nodes_unless_told_otherwise() -> None:
    job = prepare_job()
    assert job["spec"]["template"]["spec"]["nodeSelector"] == CONFIG.gpu_type("rtx-4090d").node_selector
    own = OperatorConfig.model_validate({"prepare": {"scheduling": {"nodeSelector": {"pool": "cpu"}}}})
    assert prepare_job(own)["spec"]["template"]["spec"]["nodeSelector"] == {"pool": "cpu"}
    assert "tolerations" not in prepare_job(own)["spec"]["template"]["spec"]


def test_training_pods_mount_the_cache_read_only() -> None:
    ftj = load_ftj("finetunejob-sft.yaml")
    prepared = preparation.prepared_inputs({"inputsHash": "h", "cache": f"{SHARED_CACHE_ROOT}/entries/d"}, "h")
    job = finetunejob.children(ftj, PLAN, CONFIG, None, prepared, "kubetune-cache")[-1]
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert {m["mountPath"]: m for m in container["volumeMounts"]}[SHARED_CACHE_ROOT]["readOnly"] is True
    config = yaml.safe_load(job["spec"]["template"]["metadata"]["annotations"][finetunejob.ANNOTATION_TRAINER_CONFIG])
    assert config["prepared"]["datasetDir"] == f"{SHARED_CACHE_ROOT}/entries/d"
    assert not config["prepared"]["modelDir"] and not config["prepared"]["modelRevision"]


def test_training_pods_without_a_cache_fetch_the_commit_the_prepare_step_resolved() -> None:
    ftj = load_ftj("finetunejob-sft.yaml")
    commit = "0123456789abcdef0123456789abcdef01234567"
    # No cache: the pods fetch the inputs themselves, at the commit the branch named when the job was prepared.
    prepared = preparation.prepared_inputs({"inputsHash": "h", "modelRevision": commit}, "h")
    assert prepared is not None and prepared.dataset_dir == ""
    job = finetunejob.children(ftj, PLAN, CONFIG, None, prepared, None)[-1]
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert all(m["mountPath"] != SHARED_CACHE_ROOT for m in container["volumeMounts"])
    config = yaml.safe_load(job["spec"]["template"]["metadata"]["annotations"][finetunejob.ANNOTATION_TRAINER_CONFIG])
    assert config["prepared"]["modelRevision"] == commit and config["prepared"]["datasetDir"] == ""
    assert preparation.prepared_inputs({"inputsHash": "h"}, "h") is None


def job(digest: str, condition: str | None = None, message: str = "") -> dict[str, Any]:
    conditions = [{"type": condition, "status": "True", "message": message}] if condition else []
    return {"metadata": {"annotations": {ANNOTATION_SPEC_HASH: digest}}, "status": {"conditions": conditions}}


def test_where_the_prepare_step_stands() -> None:
    lengths = {"p50": 80, "p95": 150, "max": 1310}
    report = {"inputsHash": "h", "records": 120, "tokens": 9840, "tokenLengths": lengths, "truncated": 3}
    report["cache"] = "/c/entries/d"
    assert preparation.look(None, None, "h").state == "absent"
    assert preparation.look(job("old"), report, "h").state == "stale"
    progress = "base model: 1.0 GB of 15.0 GB"
    running = preparation.look(job("h"), {"inputsHash": "h", "downloaded": progress}, "h")
    assert (running.state, running.reason, running.message) == ("running", "Downloading", progress)
    done = preparation.look(job("h", "Complete"), report, "h")
    summary = "120 records, 9,840 tokens (p50 80, p95 150, max 1,310 per record), 3 truncated"
    assert done.state == "succeeded" and done.message.startswith(summary), done
    # The prepare pod's reason wins over the Job's; a report of other inputs is not used.
    bad = {"inputsHash": "h", "error": {"reason": "DatasetInvalid", "message": "line 2: missing 'response'"}}
    failed = preparation.look(job("h", "Failed"), bad, "h")
    assert (failed.state, failed.reason, failed.message) == ("failed", "DatasetInvalid", "line 2: missing 'response'")
    crashed = preparation.look(job("h", "Failed", "BackoffLimitExceeded"), {**bad, "inputsHash": "x"}, "h")
    assert crashed.reason == "PrepareFailed" and "BackoffLimitExceeded" in crashed.message
    assert preparation.prepared_inputs(report, "x") is None
    assert preparation.entries_in_use([report, None, {"modelCache": "/c/entries/m/model"}]) == ["d", "m"]


def test_eviction_keeps_the_entries_of_unfinished_jobs_and_of_the_namespaces_servers() -> None:
    ctx = Context(kube=None, config=CONFIG, status=None)  # type: ignore[arg-type]  # indexes only
    running = {"cache": f"{SHARED_CACHE_ROOT}/entries/data", "modelCache": f"{SHARED_CACHE_ROOT}/entries/model/model"}
    done = {"cache": f"{SHARED_CACHE_ROOT}/entries/old"}
    ctx.indexes = {
        "finetunejobs": {
            ("ns", "running"): [{"status": {"state": "Running", "dataset": running}}],
            ("ns", "done"): [{"status": {"state": "Succeeded", "dataset": done}}],
        },
        "modelservers": {
            ("ns", "s3"): [{"spec": {"baseModel": {"uri": "s3://bucket/served"}}}],
            ("ns", "hf"): [{"spec": {"baseModel": {"uri": "hf://org/model@v1"}}}],  # any commit: a pattern
            ("other", "s3"): [{"spec": {"baseModel": {"uri": "s3://bucket/elsewhere"}}}],  # another claim
        },
    }
    served = storage.model_entry_key("s3://bucket/served")
    hf_served = storage.model_entries("hf://org/model")
    assert prepare.entries_in_use(ctx, "ns") == sorted(["data", "model", served, hf_served])


def test_the_plan_reads_the_lengths_the_prepare_step_measured_for_the_current_inputs() -> None:
    ftj = load_ftj("finetunejob-sft.yaml")
    lengths = {"p50": 900, "p95": 3000, "max": 8192, "mean": 1500.0, "weighted": 3300.0}
    digest = render.inputs_hash(ftj.spec)
    measured = prepare.measured_lengths({"status": {"dataset": {"inputsHash": digest, "tokenLengths": lengths}}}, ftj)
    assert measured is not None and (measured.mean, measured.weighted) == (1500.0, 3300.0)
    # A report of other inputs (the spec changed since), or none yet: the plan assumes full records.
    assert prepare.measured_lengths({"status": {"dataset": {"inputsHash": "x", "tokenLengths": lengths}}}, ftj) is None
    assert prepare.measured_lengths({"status": {}}, ftj) is None


def test_the_controller_plans_with_the_measured_lengths_once_reported() -> None:
    """controllers/training.py's planning reads status.dataset of the current inputs (no API call on the way: the
    job names no other job)."""
    from kubetune.controllers import training

    ftj = load_ftj("finetunejob-sft.yaml")
    ctx = Context(kube=None, config=OperatorConfig(), status=None)  # type: ignore[arg-type]
    lengths = {"p50": 900, "p95": 3000, "max": 8192, "mean": 1500.0, "weighted": 3300.0}
    reported = {"status": {"dataset": {"inputsHash": render.inputs_hash(ftj.spec), "tokenLengths": lengths}}}
    before = training._plan(ctx, {"status": {}}, ftj)
    after = training._plan(ctx, reported, ftj)
    assert before is not None and after is not None
    assert not any("as the prepare step measured" in line for line in before[0].explanation)
    assert any("records of 1,500 tokens on average" in line for line in after[0].explanation)
    assert after[0].estimated_tokens_per_second != before[0].estimated_tokens_per_second
