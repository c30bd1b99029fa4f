"""The README demo learns visibly: its jobs, planned and rendered as the operator does and trained on the CPU,
make the tiny model answer every demo question with the SFT answer, then DPO moves each answer to the chosen one
of its pair; the demo's table shows base, SFT and DPO side by side (the same greedy answers it prints when
nothing serves the adapters)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from kubetune.api.v1alpha1 import FineTuneJob
from kubetune.dev import demo
from kubetune.planner import plan_job
from kubetune.render.finetunejob import trainer_config

from .conftest import run_in_process

pytestmark = pytest.mark.trainer


def train_as_the_operator_would(pvc: Path, manifest: dict[str, Any], init_adapter: str | None = None) -> None:
    """The demo's FineTuneJob through the planner (the demo's GPU type) and the trainer config the operator
    renders, run by `kubetune train` in this process."""
    manifest["metadata"]["uid"] = f"uid-{manifest['metadata']['name']}"
    job = FineTuneJob.model_validate(manifest)
    config = trainer_config(job, plan_job(job.spec, gpu_type=demo.GPU_TYPE), init_adapter)
    run = run_in_process(pvc, config.to_wire())
    assert run.code == 0, run.stdout


def test_demo_sft_teaches_the_answers_and_dpo_moves_them_to_the_chosen_ones(pvc: Path) -> None:
    # The demo's claim `storage` is the folder `storage` under the PVC root of these tests.
    root = pvc / demo.CLAIM
    demo.write_assets(root)
    sft = demo.finetunejob(demo.SFT_JOB, "SFT", "sft.jsonl", demo.SFT_STEPS)
    train_as_the_operator_would(pvc, sft)
    dpo = demo.finetunejob(demo.DPO_JOB, "DPO", "dpo.jsonl", demo.DPO_STEPS, fromFineTuneJob=demo.SFT_JOB)
    train_as_the_operator_would(pvc, dpo, f"pvc://{demo.CLAIM}/adapters/{demo.SFT_JOB}/adapter")

    answers = demo.local_answers(root)
    assert answers["SFT"] == [f"The capital of {c} is {k}." for c, k in demo.CAPITALS]
    chosen = {r["prompt"]: r["chosen"] for r in demo.preference_records()}
    assert answers["DPO"] == [chosen[q] for q in demo.QUESTIONS]
    assert all(answer not in chosen.values() for answer in answers["base"])  # nothing learned before training

    table = demo.side_by_side(answers).splitlines()
    assert table[0].split() == ["question", "base", "SFT", "DPO"]
    france = next(line for line in table if line.startswith(demo.QUESTION))
    assert "'The capital of France is Paris.'" in france and "'The capital of France is Paris!'" in france
