"""Packing SFT records into windows (and DPO's length-grouped pairs) changes the batches, never the training.

fp32 on the CPU with the tiny Qwen2: a packed micro-batch gives the loss and LoRA gradients of its records run
one by one; a record's logits do not move when another record is packed beside it (each attention path the
planner may name); truncation and the completion-only labels are those of unpacked training; plan.packing reaches
the trainer, which reports what it packed. DPO with micro-batches of pairs draws pairs of similar length and
still starts at loss ln 2 (policy = reference).
"""

from __future__ import annotations

import itertools
import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch

from kubetune.api.v1alpha1 import TrainerConfig
from kubetune.trainer.data import IGNORE
from kubetune.trainer.inputs import stage
from kubetune.trainer.train import build_trainer

from .conftest import CAPITALS, run_in_process, trainer_config, write_jsonl

pytestmark = pytest.mark.trainer

MAX_LEN = 64
PACKED = {"packing": True, "microBatchSize": 2, "gradientAccumulationSteps": 2, "attention": "sdpa"}
UNPACKED = {"packing": False, "microBatchSize": 2, "gradientAccumulationSteps": 2, "attention": "sdpa"}


def conversation(*turns: str) -> dict[str, Any]:
    roles = ("user", "assistant")
    return {"messages": [{"role": roles[i % 2], "content": text} for i, text in enumerate(turns)]}


def mixed_records() -> list[dict[str, Any]]:
    """Records of very different lengths: short single answers, two-turn conversations (two labelled spans), long
    answers that maxSeqLength truncates, and one whose prompt alone fills it (dropped)."""
    records = [conversation(f"What is the capital of {c}?", f"The capital of {c} is {k}.") for c, k in CAPITALS]
    records += [
        conversation(f"Capital of {a}?", f"{ka}.", f"And of {b}?", f"The capital of {b} is {kb}.")
        for (a, ka), (b, kb) in zip(CAPITALS[:4], CAPITALS[4:], strict=True)
    ]
    records += [
        conversation("Name capitals.", " ".join(f"The capital of {c} is {k}." for c, k in CAPITALS)),
        conversation("More capitals, please.", " ".join(f"{k} is in {c}." for c, k in CAPITALS)),
        conversation(" ".join(f"What is the capital of {c}?" for c, _ in CAPITALS), "Paris."),
    ]
    return records


@pytest.fixture(scope="module")
def mixed_data(pvc: Path) -> str:
    write_jsonl(pvc / "data" / "mixed.jsonl", mixed_records())
    return "pvc://data/mixed.jsonl"


def sft_config(name: str, tiny_model: str, data: str, plan: dict[str, Any], **spec: Any) -> TrainerConfig:
    raw = trainer_config(
        name,
        tiny_model,
        dataset={"uri": data},
        hyperparameters={"maxSeqLength": MAX_LEN, "globalBatchSize": 4, "maxSteps": 4},
        plan=plan,
        **spec,
    )
    return TrainerConfig.model_validate(raw)


def trainer_for(config: TrainerConfig) -> Any:
    return build_trainer(config, stage(config), callbacks=[])


def records_of_window(row: dict[str, Any]) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """The (input_ids, labels) of each record packed into a window."""
    out, start = [], 0
    for length in row["seq_lengths"]:
        out.append((tuple(row["input_ids"][start : start + length]), tuple(row["labels"][start : start + length])))
        start += length
    return out


# --- Loss and gradients ---------------------------------------------------------------------------------


def lora_gradients(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if "lora_" in n and p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def records_of_row(batch: dict[str, torch.Tensor]) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """The (input_ids, labels) of each record in a padding-free micro-batch, split where the position ids restart
    (the padding at the row's end has no labels)."""
    starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist()
    bounds = [*starts, batch["input_ids"].shape[1]]
    records = []
    for start, end in itertools.pairwise(bounds):
        ids, labels = batch["input_ids"][0, start:end].tolist(), batch["labels"][0, start:end].tolist()
        if any(label != IGNORE for label in labels):
            records.append((tuple(ids), tuple(labels)))
    return records


def one_by_one(model: torch.nn.Module, records: list[tuple[tuple[int, ...], tuple[int, ...]]]) -> torch.Tensor:
    """The mean per-token loss of the records, each run alone (its own forward pass, no padding, plain logits)."""
    total, count = torch.zeros(()), 0
    for ids, labels in records:
        logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]
        target = torch.tensor(labels[1:])
        total = total + torch.nn.functional.cross_entropy(logits[:-1], target, ignore_index=IGNORE, reduction="sum")
        count += int((target != IGNORE).sum())
    return total / count


def test_packed_batch_loss_and_lora_gradients_equal_the_records_run_one_by_one(
    pvc: Path, tiny_model: str, mixed_data: str
) -> None:
    trainer = trainer_for(sft_config("pack-grads", tiny_model, mixed_data, PACKED))
    model = trainer.model
    model.train()
    batches = list(trainer.get_train_dataloader())
    assert all(b["input_ids"].shape == (1, 2 * MAX_LEN) for b in batches)  # two windows in one row, fixed shape
    assert all("attention_mask" not in b for b in batches)  # records are told apart by their position ids
    batch = max(batches, key=lambda b: len(records_of_row(b)))
    records = records_of_row(batch)
    assert len(records) >= 3

    packed_loss = trainer.compute_loss(model, dict(batch))
    packed_loss.backward()
    packed = lora_gradients(model)
    reference_loss = one_by_one(model, records)
    reference_loss.backward()
    reference = lora_gradients(model)

    assert packed_loss.item() == pytest.approx(reference_loss.item(), rel=1e-5)
    assert packed.keys() == reference.keys() and len(packed) > 0
    for name, grad in reference.items():
        assert torch.linalg.norm(packed[name] - grad) <= 1e-5 * torch.linalg.norm(grad), name


# --- Isolation ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("attention", ["sdpa", "eager", "flex_attention"])
def test_a_records_logits_do_not_change_when_another_is_packed_beside_it(
    pvc: Path, tiny_model: str, attention: str
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = pvc / "models" / "tiny"
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, attn_implementation=attention).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    first = tokenizer("The capital of France is Paris.")["input_ids"]
    second = tokenizer("What is the capital of Japan? Tokyo.")["input_ids"]
    packed = torch.tensor([first + second])
    positions = torch.tensor([list(range(len(first))) + list(range(len(second)))])
    with torch.no_grad():
        alone = [model(input_ids=torch.tensor([ids]), use_cache=False).logits[0] for ids in (first, second)]
        beside = model(input_ids=packed, position_ids=positions, use_cache=False).logits[0]
        # Without per-record position ids the second record attends to the first: the check below would see it.
        mixed = model(input_ids=packed, use_cache=False).logits[0]
    n = len(first)
    assert torch.allclose(beside[:n], alone[0], atol=1e-5)
    assert torch.allclose(beside[n:], alone[1], atol=1e-5)
    assert not torch.allclose(mixed[n:], alone[1], atol=1e-3)


# --- Truncation and labels ----------------------------------------------------------------------------------


def test_truncation_and_completion_only_labels_are_those_of_unpacked_training(
    pvc: Path, tiny_model: str, mixed_data: str
) -> None:
    packed = trainer_for(sft_config("pack-labels", tiny_model, mixed_data, PACKED)).train_dataset
    unpacked = trainer_for(sft_config("unpack-labels", tiny_model, mixed_data, UNPACKED)).train_dataset
    expected = Counter((tuple(r["input_ids"]), tuple(r["labels"])) for r in unpacked)
    got = Counter(record for row in packed for record in records_of_window(row))
    assert got == expected  # every record whole, truncated and labelled as without packing, none split or lost
    assert len(packed) < len(unpacked)
    assert all(sum(row["seq_lengths"]) <= MAX_LEN for row in packed)
    truncated = [r for r in unpacked if len(r["input_ids"]) == MAX_LEN]
    assert truncated and all(any(label != IGNORE for label in r["labels"]) for r in truncated)
    two_turns = [r for r in unpacked if spans(r["labels"]) == 2]
    assert two_turns  # both assistant turns are learned, the user turn between them is not


def spans(labels: list[int]) -> int:
    """Runs of labelled tokens."""
    return sum(1 for i, label in enumerate(labels) if label != IGNORE and (i == 0 or labels[i - 1] == IGNORE))


# --- The plan reaches the trainer ---------------------------------------------------------------------------


def test_a_packed_run_reports_its_windows_and_the_attention_it_used(
    pvc: Path, tiny_model: str, mixed_data: str
) -> None:
    plan = {**PACKED, "attention": "flex_attention"}  # what the planner names; sdpa on the CPU
    raw = trainer_config(
        "pack-run",
        tiny_model,
        dataset={"uri": mixed_data},
        hyperparameters={"maxSeqLength": MAX_LEN, "globalBatchSize": 4, "maxSteps": 6},
        plan=plan,
    )
    run = run_in_process(pvc, raw)
    assert run.code == 0, run.stdout
    [packing] = run.of("packing")
    records = len(mixed_records()) - 1  # the record whose prompt fills maxSeqLength is dropped
    assert packing["records"] == records and packing["windows"] < records
    assert 0.5 < packing["fill"] <= 1.0 and packing["maxSeqLength"] == MAX_LEN
    [attention] = run.of("attention")
    assert attention["planned"] == "flex_attention" and attention["used"] == "sdpa"
    assert "needs a GPU" in attention["reason"]
    progress = run.of("progress")
    assert progress[-1]["step"] == 6 and progress[-1]["loss"] < progress[0]["loss"]
    meta = json.loads((run.output / "adapter" / "kubetune.json").read_text())
    assert meta["trainerConfig"]["plan"]["packing"] is True


def test_an_unpacked_run_reports_no_packing(pvc: Path, tiny_model: str) -> None:
    raw = trainer_config("unpacked-run", tiny_model, hyperparameters={"maxSteps": 1}, plan={"packing": False})
    run = run_in_process(pvc, raw)
    assert run.code == 0, run.stdout
    assert run.of("packing") == [] and run.of("attention")[0]["used"] == "sdpa"


# --- DPO --------------------------------------------------------------------------------------------------------


def varied_pairs() -> list[dict[str, Any]]:
    """64 pairs of two very different lengths, interleaved (the sampler sorts groups of 16 by length)."""
    pairs = []
    for i, (c, k) in enumerate(CAPITALS * 8):
        wrong = CAPITALS[(i + 3) % len(CAPITALS)][1]
        long = i % 2 == 1
        tail = " " + " ".join(f"{kk} is the capital of {cc}." for cc, kk in CAPITALS) if long else ""
        pairs.append(
            {
                "prompt": f"What is the capital of {c}?",
                "chosen": f"The capital of {c} is {k}.{tail}",
                "rejected": f"The capital of {c} is {wrong}.{tail}",
            }
        )
    return pairs


def padding_share(trainer: Any, order: list[int], micro: int = 2) -> float:
    """The share of padded positions when the trainer's collator batches its training pairs in `order`."""
    padded = total = 0
    for i in range(0, len(order), micro):
        mask = trainer.data_collator([trainer.train_dataset[j] for j in order[i : i + micro]])["attention_mask"]
        padded += int((mask == 0).sum())
        total += mask.numel()
    return padded / total


def test_dpo_batches_pairs_of_similar_length_and_starts_at_ln_2(pvc: Path, tiny_model: str) -> None:
    write_jsonl(pvc / "data" / "varied-pairs.jsonl", varied_pairs())
    spec: dict[str, Any] = {
        "method": "DPO",
        "dataset": {"uri": "pvc://data/varied-pairs.jsonl"},
        "hyperparameters": {"maxSteps": 2, "maxSeqLength": 256, "globalBatchSize": 4, "learningRate": 0.001},
    }
    grouped = TrainerConfig.model_validate(
        trainer_config("dpo-grouped", tiny_model, plan={"microBatchSize": 2, "gradientAccumulationSteps": 2}, **spec)
    )
    one_pair = TrainerConfig.model_validate(
        trainer_config("dpo-single", tiny_model, plan={"microBatchSize": 1, "gradientAccumulationSteps": 4}, **spec)
    )
    from trl import DPOTrainer

    assert type(trainer_for(one_pair)) is DPOTrainer  # one pair per micro-batch pads nothing: no grouping
    trainer = trainer_for(grouped)
    grouped_order = list(trainer._get_train_sampler())
    random_order = list(DPOTrainer._get_train_sampler(trainer))  # what TRL would draw
    assert sorted(grouped_order) == sorted(random_order) == list(range(len(varied_pairs())))
    assert padding_share(trainer, grouped_order) < 0.5 * padding_share(trainer, random_order)

    run = run_in_process(pvc, grouped.to_wire())
    assert run.code == 0, run.stdout
    first = run.of("progress")[0]
    assert first["step"] == 1 and first["loss"] == pytest.approx(math.log(2), abs=1e-4)  # policy = reference
    assert first["metrics"]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)


# --- Full-length data ---------------------------------------------------------------------------------------


def test_records_share_windows_exactly_when_trls_packing_puts_two_together() -> None:
    import random

    from datasets import Dataset
    from trl import pack_dataset

    from kubetune.trainer.batching import records_share_windows

    rng = random.Random(0)
    for _ in range(200):
        lengths = [rng.randint(1, 64) for _ in range(rng.randint(1, 12))]
        examples = [{"input_ids": [7] * n} for n in lengths]
        packed = pack_dataset(Dataset.from_list(examples), 64, "bfd")
        assert records_share_windows(examples, 64) == any(len(w) > 1 for w in packed["seq_lengths"]), lengths


def test_windows_of_one_record_each_keep_sdpas_causal_kernel() -> None:
    from kubetune.trainer.train import attention_implementation

    used, why = attention_implementation("flex_attention", single_record_windows=True)
    assert used == "sdpa" and "no two records fit in one window" in why
    assert attention_implementation("sdpa", single_record_windows=True) == ("sdpa", "")


def test_shape_buckets_pad_unpacked_gpu_batches_only_when_set(monkeypatch: pytest.MonkeyPatch) -> None:
    """batching.SHAPE_MULTIPLE (off by default; bench/trainer_realistic.py's *-bucketed runs set it) reaches TRL's
    pad_to_multiple_of for unpacked batches on a GPU, never for packed windows (one shape already) or the CPU."""
    from kubetune.api.v1alpha1 import Plan
    from kubetune.trainer import batching

    unpacked, packed = Plan(packing=False), Plan(packing=True)
    assert batching.SHAPE_MULTIPLE is None and batching.shape_arguments(unpacked, cuda=True) == {}
    monkeypatch.setattr(batching, "SHAPE_MULTIPLE", 64)
    assert batching.shape_arguments(unpacked, cuda=True) == {"pad_to_multiple_of": 64}
    assert batching.shape_arguments(packed, cuda=True) == {} and batching.shape_arguments(unpacked, cuda=False) == {}
