"""The training data: the checked records (records.py) tokenized with the model's chat template.

Everything here runs before any GPU work. Bad records fail the run with DatasetInvalid (records.py); the
report (record count, token lengths against maxSeqLength, truncations) is logged.
"""

from __future__ import annotations

import logging
import math
import random
from array import array
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kubetune.api.v1alpha1 import DatasetFormat, Method
from kubetune.trainer.errors import DATASET_INVALID, TrainerFailure
from kubetune.trainer.records import Message, Record, check_records, stream_records

log = logging.getLogger(__name__)

IGNORE = -100


@dataclass
class TokenStats:
    min: int = 0
    mean: float = 0.0
    p50: int = 0
    p95: int = 0
    max: int = 0
    total: int = 0
    """Tokens of all records (before truncation)."""
    trained_mean: float = 0.0
    """Mean length as trained: each record cut at maxSeqLength."""
    weighted: float = 0.0
    """E[n^2]/E[n] of the lengths as trained: the length of the record an average token sits in, which sets the
    cost of causal attention per token."""
    pair_fill: float = 0.0
    """DPO: the share of real tokens when each pair's two sequences are padded to the longer one (0 for SFT)."""


@dataclass
class DatasetReport:
    """What the dataset check found; logged as the "dataset" event and stored in the adapter's metadata."""

    format: str
    records: int
    train_records: int = 0
    validation_records: int = 0
    max_seq_length: int = 0
    tokens: TokenStats = field(default_factory=TokenStats)
    truncated: int = 0
    """Records longer than maxSeqLength (cut at the end)."""
    dropped: int = 0
    """Records with no response token left after truncation (their prompt fills maxSeqLength)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PreparedData:
    """Train and validation examples ready for the TRL trainers (lists, or memory-mapped datasets.Dataset objects
    when loaded from the prepare step's cache), and the report."""

    train: Any
    validation: Any
    report: DatasetReport


# --- Tokenizing -----------------------------------------------------------------------------------


def load_tokenizer(model_dir: Path) -> Any:
    """The base model's tokenizer, with a pad token and a chat template (ChatML when the model has none)."""
    from transformers import AutoTokenizer

    from kubetune.trainer.tiny import CHATML_TEMPLATE

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        log.warning("%s has no chat template; using ChatML", model_dir)
        tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def render(tokenizer: Any, messages: list[Message], add_generation_prompt: bool = False) -> str:
    """The conversation as text, through the tokenizer's chat template."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    return str(text)


def encode(tokenizer: Any, text: str) -> list[int]:
    # The template already wrote any BOS it wants; add_special_tokens would add a second one.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def assistant_spans(tokenizer: Any, messages: list[Message], full: str) -> list[tuple[int, int]] | None:
    """Character spans of every assistant turn in `full`, or None when the template is not prefix-stable."""
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = render(tokenizer, messages[:i], add_generation_prompt=True)
        end = render(tokenizer, messages[: i + 1])
        if not (end.startswith(start) and full.startswith(end)):
            return None
        spans.append((len(start), len(end)))
    return spans


def tokenize_conversation(tokenizer: Any, messages: list[Message]) -> tuple[list[int], list[int]]:
    """Token ids and labels of a conversation: labels are -100 everywhere except the assistant turns."""
    full = render(tokenizer, messages)
    spans = assistant_spans(tokenizer, messages, full)
    if spans is None:
        # Template renders earlier turns differently once later ones follow: learn the last answer only.
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        prompt_ids = encode(tokenizer, render(tokenizer, messages[:last], add_generation_prompt=True))
        ids = encode(tokenizer, render(tokenizer, messages[: last + 1]))
        shared = next((i for i, (a, b) in enumerate(zip(prompt_ids, ids, strict=False)) if a != b), len(prompt_ids))
        return ids, [IGNORE] * shared + ids[shared:]
    encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoded["input_ids"])
    labels = [
        token if any(start <= offset[0] < end for start, end in spans) else IGNORE
        for token, offset in zip(ids, encoded["offset_mapping"], strict=True)
    ]
    return ids, labels


def token_stats(lengths: Sequence[int], cap: int | None = None) -> TokenStats:
    """Figures of the records' token lengths; `cap` (maxSeqLength) gives the lengths as trained."""
    ordered = sorted(lengths)

    def at(q: float) -> int:
        return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]

    trained = [min(n, cap) for n in ordered] if cap else ordered
    trained_total = sum(trained)
    return TokenStats(
        min=ordered[0],
        mean=round(sum(ordered) / len(ordered), 1),
        p50=at(0.5),
        p95=at(0.95),
        max=ordered[-1],
        total=sum(ordered),
        trained_mean=round(trained_total / len(trained), 1),
        weighted=round(sum(n * n for n in trained) / trained_total, 1) if trained_total else 0.0,
    )


def sft_example(tokenizer: Any, record: Record, max_len: int) -> tuple[dict[str, Any], int]:
    """{"input_ids", "labels"} truncated to max_len, and the untruncated length."""
    ids, labels = tokenize_conversation(tokenizer, record.messages)
    return {"input_ids": ids[:max_len], "labels": labels[:max_len]}, len(ids)


def preference_example(tokenizer: Any, record: Record, max_len: int) -> tuple[dict[str, Any], tuple[int, int], int]:
    """The conversational {"prompt", "chosen", "rejected"} for DPO, the lengths of its two sequences (prompt and
    chosen, prompt and rejected), and the prompt's length."""
    assert record.chosen is not None and record.rejected is not None
    prompt_len = len(encode(tokenizer, render(tokenizer, record.messages, add_generation_prompt=True)))
    chosen, rejected = (
        len(encode(tokenizer, render(tokenizer, record.messages + answer)))
        for answer in (record.chosen, record.rejected)
    )
    return (
        {"prompt": record.messages, "chosen": record.chosen, "rejected": record.rejected},
        (chosen, rejected),
        prompt_len,
    )


def held_out(count: int, fraction: float, seed: int) -> set[int]:
    """The indices of the `count` records held out for evaluation: `fraction` of them (at least one when
    fraction > 0, never all), chosen by `seed`."""
    if fraction <= 0 or count < 2:
        return set()
    order = list(range(count))
    random.Random(seed).shuffle(order)
    return set(order[: min(count - 1, max(1, round(fraction * count)))])


class Examples:
    """Where tokenized examples go: a list, or with `folder` an Arrow file written as they come (the memory of
    the prepare step stays flat however many records there are), saved as a datasets folder at the end."""

    def __init__(self, folder: Path | None = None) -> None:
        self.folder = folder
        self.count = 0
        self._kept: list[dict[str, Any]] = []
        self._writer: Any = None

    @property
    def _arrow(self) -> Path:
        assert self.folder is not None
        return self.folder.with_name(self.folder.name + ".arrow")

    def append(self, example: dict[str, Any]) -> None:
        self.count += 1
        if self.folder is None:
            self._kept.append(example)
            return
        if self._writer is None:
            from datasets.arrow_writer import ArrowWriter

            self._arrow.parent.mkdir(parents=True, exist_ok=True)
            self._writer = ArrowWriter(path=str(self._arrow), writer_batch_size=1000)
        self._writer.write(example)

    def result(self) -> Any:
        """The list, or the datasets.Dataset saved in `folder` (memory-mapped); [] when nothing was written."""
        if self.folder is None or self._writer is None:
            return self._kept
        from datasets import Dataset, load_from_disk

        self._writer.finalize()
        self._writer.close()
        Dataset.from_file(str(self._arrow)).save_to_disk(str(self.folder))
        self._arrow.unlink()
        return load_from_disk(str(self.folder))


def prepare(
    tokenizer: Any,
    path: Path,
    method: Method,
    fmt: DatasetFormat,
    max_len: int,
    validation_split: float = 0.0,
    seed: int = 42,
    split_name: str | None = None,
    into: Path | None = None,
) -> PreparedData:
    """Check, then tokenize the dataset (a file, or the files of `split_name` in a folder), one record at a time
    from disk; DatasetInvalid when nothing is left to train on. With `into`, the examples are written there as
    Arrow (`train/`, `validation/`) instead of kept in memory."""
    fmt, count = check_records(path, fmt, method, split_name)
    report = DatasetReport(format=fmt.value, records=count, max_seq_length=max_len)
    held = held_out(count, validation_split, seed)
    train, validation = (Examples(into / name if into else None) for name in ("train", "validation"))
    lengths = array("l")
    pair_tokens = padded_pair_tokens = 0
    for index, record in enumerate(stream_records(path, fmt, split_name)):
        if method == Method.DPO:
            example, (chosen, rejected), prompt_len = preference_example(tokenizer, record, max_len)
            length = max(chosen, rejected)  # what the collator pads the pair to
            pair_tokens += min(chosen, max_len) + min(rejected, max_len)
            padded_pair_tokens += 2 * min(length, max_len)
            usable = prompt_len < max_len
        else:
            example, length = sft_example(tokenizer, record, max_len)
            usable = any(label != IGNORE for label in example["labels"])
        lengths.append(length)
        report.truncated += length > max_len
        if usable:
            (validation if index in held else train).append(example)
        else:
            report.dropped += 1
    report.tokens = token_stats(lengths, max_len)
    if padded_pair_tokens:
        report.tokens.pair_fill = round(pair_tokens / padded_pair_tokens, 4)
    if not train.count + validation.count:
        raise TrainerFailure(
            DATASET_INVALID,
            f"all {count} records of {path.name} lose their response to truncation at maxSeqLength {max_len}",
        )
    report.train_records, report.validation_records = train.count, validation.count
    return PreparedData(train.result(), validation.result(), report)
