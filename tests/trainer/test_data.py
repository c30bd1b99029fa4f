"""Dataset checks: response-only labels, statistics, and bad records failing with line numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kubetune.api.v1alpha1 import DatasetFormat, Method
from kubetune.trainer.data import IGNORE, load_tokenizer, prepare, tokenize_conversation
from kubetune.trainer.errors import TrainerFailure

from .conftest import run_in_process, trainer_config, write_jsonl

pytestmark = pytest.mark.trainer


@pytest.fixture(scope="module")
def tokenizer(pvc: Path, tiny_model: str):
    return load_tokenizer(pvc / "models" / "tiny")


def test_labels_mask_everything_but_the_responses(tokenizer) -> None:
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "What is the capital of Peru?"},
        {"role": "assistant", "content": "Lima."},
        {"role": "user", "content": "And of Japan?"},
        {"role": "assistant", "content": "Tokyo."},
    ]
    ids, labels = tokenize_conversation(tokenizer, messages)
    assert len(ids) == len(labels)
    learned = tokenizer.decode([t for t, label in zip(ids, labels, strict=True) if label != IGNORE])
    assert learned == "Lima.<|im_end|>\nTokyo.<|im_end|>\n"
    masked = tokenizer.decode([t for t, label in zip(ids, labels, strict=True) if label == IGNORE])
    assert "capital of Peru" in masked and "Lima" not in masked and "assistant" in masked


def test_dataset_statistics_and_truncation(tokenizer, tmp_path: Path) -> None:
    records = [
        {"prompt": "short", "response": "ok"},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello " * 40}]},
        {"prompt": "x " * 80, "response": "lost"},
    ]
    # Mixed formats are refused, so use messages throughout.
    as_messages = [
        {"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["response"]}]}
        if "prompt" in r
        else r
        for r in records
    ]
    path = write_jsonl(tmp_path / "d.jsonl", as_messages)
    data = prepare(tokenizer, path, Method.SFT, DatasetFormat.AUTO, max_len=32, validation_split=0.0)
    report = data.report
    assert report.format == "messages" and report.records == 3
    assert report.truncated == 2  # the long answer and the long prompt
    assert report.dropped == 1  # the long prompt leaves no response token
    assert report.train_records == 2
    assert report.tokens.max > 32 and report.tokens.min < 32 and report.tokens.min <= report.tokens.p50
    assert all(len(e["input_ids"]) <= 32 for e in data.train)


def test_lengths_as_trained_feed_the_speed_estimate(tokenizer, tmp_path: Path) -> None:
    """mean and weighted (E[n^2]/E[n]) count each record cut at maxSeqLength; for DPO a record is its longer
    sequence and pair_fill the share of real tokens once both are padded to it."""
    sft = [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello " * n}]}
        for n in (1, 5, 60)
    ]
    path = write_jsonl(tmp_path / "sft.jsonl", sft)
    report = prepare(tokenizer, path, Method.SFT, DatasetFormat.AUTO, max_len=32).report
    lengths = [len(tokenize_conversation(tokenizer, r["messages"])[0]) for r in sft]
    trained = [min(n, 32) for n in lengths]
    assert lengths[2] > 32 and report.tokens.max == lengths[2]
    assert report.tokens.trained_mean == pytest.approx(sum(trained) / 3, abs=0.05)
    assert report.tokens.weighted == pytest.approx(sum(n * n for n in trained) / sum(trained), abs=0.05)
    assert report.tokens.pair_fill == 0.0

    pairs = [
        {"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "It is " + "not known " * 4},
        {"prompt": "Two plus two?", "chosen": "Four.", "rejected": "Five."},
    ]
    path = write_jsonl(tmp_path / "dpo.jsonl", pairs)
    report = prepare(tokenizer, path, Method.DPO, DatasetFormat.AUTO, max_len=64).report
    sequences = [
        [
            len(
                tokenize_conversation(
                    tokenizer, [{"role": "user", "content": p["prompt"]}, {"role": "assistant", "content": p[answer]}]
                )[0]
            )
            for answer in ("chosen", "rejected")
        ]
        for p in pairs
    ]
    longest = [max(s) for s in sequences]
    assert report.tokens.max == max(longest)
    assert report.tokens.trained_mean == pytest.approx(sum(longest) / 2, abs=0.05)
    assert report.tokens.pair_fill == pytest.approx(sum(map(sum, sequences)) / (2 * sum(longest)), abs=1e-4)
    assert 0.5 < report.tokens.pair_fill < 1.0


def test_validation_split_is_held_out(tokenizer, pvc: Path) -> None:
    data = prepare(tokenizer, pvc / "data" / "sft.jsonl", Method.SFT, DatasetFormat.AUTO, 64, 0.25, seed=1)
    assert (data.report.train_records, data.report.validation_records) == (6, 2)


def test_examples_streamed_to_arrow_are_the_ones_kept_in_memory(tokenizer, pvc: Path, tmp_path: Path) -> None:
    """The prepare step writes examples to Arrow as it tokenizes them (its memory does not grow with the
    dataset): the same examples, the same held-out records, as the in-memory path."""
    path = pvc / "data" / "sft.jsonl"
    in_memory = prepare(tokenizer, path, Method.SFT, DatasetFormat.AUTO, 64, 0.25, seed=1)
    streamed = prepare(tokenizer, path, Method.SFT, DatasetFormat.AUTO, 64, 0.25, seed=1, into=tmp_path / "p")
    assert streamed.report == in_memory.report
    for name in ("train", "validation"):
        assert list(getattr(streamed, name)) == getattr(in_memory, name), name
        assert (tmp_path / "p" / name / "state.json").is_file(), name  # a datasets folder, memory-mapped
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == ["train", "validation"]  # no scratch left


def test_bad_records_are_listed_by_line(tokenizer, tmp_path: Path) -> None:
    lines = [
        json.dumps({"prompt": "a", "response": "b"}),
        "{not json",
        json.dumps({"prompt": "a"}),
        "",
        json.dumps({"prompt": "a", "response": 3}),
        json.dumps({"prompt": "a", "response": "b"}),
    ]
    path = write_jsonl(tmp_path / "bad.jsonl", lines)
    with pytest.raises(TrainerFailure) as failure:
        prepare(tokenizer, path, Method.SFT, DatasetFormat.AUTO, 64)
    assert failure.value.reason == "DatasetInvalid"
    message = failure.value.message
    assert "3 bad record(s)" in message
    assert "line 2, column 2: a key in double quotes is expected, found 'n'" in message
    assert "line 3: missing 'response'" in message
    assert "line 5: 'response' must be a string" in message


def test_wrong_format_for_method(tokenizer, pvc: Path) -> None:
    with pytest.raises(TrainerFailure, match="method DPO needs preference records"):
        prepare(tokenizer, pvc / "data" / "sft.jsonl", Method.DPO, DatasetFormat.AUTO, 64)


def test_invalid_dataset_exits_3_with_termination_message(pvc: Path, tiny_model: str) -> None:
    write_jsonl(pvc / "data" / "broken.jsonl", [{"prompt": "a", "response": "b"}, {"messages": "nope"}])
    log = pvc / "termination-log"
    log.unlink(missing_ok=True)
    run = run_in_process(pvc, trainer_config("broken", tiny_model, dataset={"uri": "pvc://data/broken.jsonl"}))
    assert run.code == 3
    termination = json.loads(log.read_text())
    assert termination["reason"] == "DatasetInvalid"
    assert "line 2" in termination["message"]
    assert run.of("failed")[0]["reason"] == "DatasetInvalid"
    assert not (run.output / "checkpoints").exists()


def test_missing_model_exits_3(pvc: Path, tiny_model: str) -> None:
    run = run_in_process(pvc, trainer_config("nomodel", tiny_model, baseModel={"uri": "pvc://models/absent"}))
    assert run.code == 3
    assert json.loads((pvc / "termination-log").read_text())["reason"] == "ModelNotFound"
