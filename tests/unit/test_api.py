"""The API models: parsing, defaults, every rejection rule with its message."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from kubetune.api.v1alpha1 import FineTuneJob, JobState, ModelServer
from tests.rejections import CASES, EXAMPLES, Rejection

MODELS = {"FineTuneJob": FineTuneJob, "ModelServer": ModelServer}


def load(name: str) -> dict:
    return yaml.safe_load((EXAMPLES / name).read_text())


def parse(body: dict) -> FineTuneJob | ModelServer:
    return MODELS[body["kind"]].model_validate(body)


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_parses_and_round_trips(path: Path) -> None:
    body = yaml.safe_load(path.read_text())
    obj = parse(body)
    wire = obj.to_wire()
    assert parse(wire) == obj
    # Every field the user wrote survives the round trip unchanged.
    assert wire["spec"] | body["spec"] == wire["spec"] or _contains(wire["spec"], body["spec"])


def _contains(full: dict, part: dict) -> bool:
    for key, value in part.items():
        if isinstance(value, dict):
            if not _contains(full[key], value):
                return False
        elif isinstance(value, list) and all(isinstance(v, dict) for v in value):
            if len(full[key]) != len(value) or not all(map(_contains, full[key], value)):
                return False
        elif full[key] != value:
            return False
    return True


def test_minimal_finetunejob_gets_the_documented_defaults() -> None:
    job = FineTuneJob.model_validate(
        {
            "metadata": {"name": "m"},
            "spec": {
                "baseModel": {"uri": "hf://Qwen/Qwen2.5-7B"},
                "dataset": {"uri": "pvc://data/train.jsonl"},
                "output": {"uri": "pvc://out/m"},
            },
        }
    )
    s = job.spec
    assert s.method == "SFT"
    assert (s.lora.r, s.lora.alpha, s.lora.dropout) == (64, 128, 0.05)
    assert s.lora.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    h = s.hyperparameters
    assert (h.learning_rate, h.lr_scheduler, h.warmup_ratio, h.weight_decay) == (2e-5, "cosine", 0.1, 0.01)
    assert (h.global_batch_size, h.max_seq_length, h.beta) == (64, 8192, 0.1)
    assert (s.resources.nodes, s.resources.gpus_per_node) == (1, 4)
    d = s.distributed
    assert (d.zero_stage, d.offload, d.gradient_checkpointing, d.attention, d.micro_batch_size) == (
        "auto",
        "auto",
        "auto",
        "auto",
        "auto",
    )
    assert s.dataset.format == "auto"
    assert job.status.state is None


def test_modelserver_defaults() -> None:
    server = ModelServer.model_validate(
        {"metadata": {"name": "s"}, "spec": {"baseModel": {"uri": "hf://Qwen/Qwen2.5-7B"}}}
    )
    g = server.spec.generation_defaults
    assert (g.temperature, g.top_p, g.repetition_penalty) == (0.7, 0.9, 1.1)
    assert server.spec.enable_prefix_caching is True
    assert server.spec.tensor_parallel_size == 1
    assert server.spec.ui.enabled is False


def test_int_or_string_fields_accept_both_forms() -> None:
    body = load("finetunejob-sft.yaml")
    body["spec"]["distributed"] |= {"zeroStage": 3, "microBatchSize": 2}
    body["spec"]["resources"] |= {"cpu": "500m", "memory": 64}
    job = FineTuneJob.model_validate(body)
    assert job.spec.distributed.zero_stage == 3
    assert job.spec.resources.cpu == "500m"


def test_quantity_is_checked() -> None:
    body = load("finetunejob-sft.yaml")
    body["spec"]["resources"]["memory"] = "lots"
    with pytest.raises(ValidationError, match="is not a Kubernetes quantity"):
        FineTuneJob.model_validate(body)


def test_status_round_trips_with_conditions() -> None:
    body = load("finetunejob-sft.yaml")
    body["status"] = {
        "state": "Running",
        "conditions": [
            {
                "type": "Running",
                "status": "True",
                "reason": "PodsRunning",
                "message": "",
                "lastTransitionTime": "2026-11-29T07:00:00Z",
                "observedGeneration": 1,
            }
        ],
        "progress": {"step": 5, "totalSteps": 10, "percent": 50.0, "summary": "50% (5/10)", "loss": 1.5},
    }
    job = FineTuneJob.model_validate(body)
    assert job.status.state is JobState.RUNNING
    assert job.to_wire()["status"]["conditions"][0]["lastTransitionTime"] == "2026-11-29T07:00:00Z"


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_every_rejection_rule_reports_its_message(case: Rejection) -> None:
    with pytest.raises(ValidationError) as err:
        parse(case.body())
    assert case.model_message in str(err.value)


def test_there_are_at_least_fifteen_distinct_rules() -> None:
    assert len({c.model_message for c in CASES}) >= 15
