"""Dataset records: the JSONL formats and their checks, with the line number and reason of every bad line.

Pure Python (no torch, no tokenizer): the trainer checks the dataset with it before any GPU work, and
`kubetune validate FILE.jsonl` runs the same checks on a laptop.

Formats: prompt-response ({"system"?, "prompt", "response"}), messages ({"messages": [{"role", "content"}]}),
preference ({"system"?, "prompt", "chosen", "rejected"}; each a string or a list of messages).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from kubetune.api.v1alpha1 import DatasetFormat, Method
from kubetune.trainer.errors import DATASET_INVALID, TrainerFailure

Message = dict[str, str]
ROLES = ("system", "user", "assistant")
MAX_REPORTED_ERRORS = 20


class RecordInvalid(ValueError):
    """One record is unusable; the message says why."""


@dataclass(frozen=True)
class Record:
    """A checked record: the conversation, or for preference data the prompt and both answers."""

    line: int
    messages: list[Message]
    chosen: list[Message] | None = None
    rejected: list[Message] | None = None


@dataclass
class RecordsCheck:
    """What reading a dataset found: its format (AUTO when no record told), the good records, every bad line."""

    format: DatasetFormat
    count: int = 0
    """Good records."""
    records: list[Record] = field(default_factory=list)
    """The good records themselves, when the reader kept them."""
    errors: list[str] = field(default_factory=list)
    """One "line N: why" per bad line, in file order."""


# --- One record -------------------------------------------------------------------------------------


def detect_format(record: dict[str, Any]) -> DatasetFormat | None:
    """The format a record's keys suggest, or None."""
    if "messages" in record:
        return DatasetFormat.MESSAGES
    if "chosen" in record or "rejected" in record:
        return DatasetFormat.PREFERENCE
    if "prompt" in record or "response" in record:
        return DatasetFormat.PROMPT_RESPONSE
    return None


def _text(record: dict[str, Any], key: str, required: bool = True) -> str | None:
    value = record.get(key)
    if value is None:
        if required:
            raise RecordInvalid(f"missing {key!r}")
        return None
    if not isinstance(value, str):
        raise RecordInvalid(f"{key!r} must be a string, got {type(value).__name__}")
    if required and not value.strip():
        raise RecordInvalid(f"{key!r} is empty")
    return value


def _messages(value: Any, key: str) -> list[Message]:
    if not isinstance(value, list) or not value:
        raise RecordInvalid(f"{key!r} must be a non-empty list of messages")
    out = []
    for i, msg in enumerate(value):
        if not isinstance(msg, dict):
            raise RecordInvalid(f"{key}[{i}] must be an object with role and content")
        role, content = msg.get("role"), msg.get("content")
        if role not in ROLES:
            raise RecordInvalid(f"{key}[{i}].role must be one of {', '.join(ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise RecordInvalid(f"{key}[{i}].content must be a string")
        if role == "system" and i > 0:
            raise RecordInvalid(f"{key}[{i}]: a system message may only come first")
        out.append({"role": role, "content": content})
    return out


def _prompt_messages(record: dict[str, Any]) -> list[Message]:
    system = _text(record, "system", required=False)
    prompt = record.get("prompt")
    messages = (
        _messages(prompt, "prompt")
        if isinstance(prompt, list)
        else [{"role": "user", "content": _text(record, "prompt") or ""}]
    )
    return ([{"role": "system", "content": system}] if system else []) + messages


def _answer(record: dict[str, Any], key: str) -> list[Message]:
    value = record.get(key)
    if isinstance(value, list):
        answer = _messages(value, key)
        if answer[-1]["role"] != "assistant":
            raise RecordInvalid(f"{key!r} must end with an assistant message")
        return answer
    return [{"role": "assistant", "content": _text(record, key) or ""}]


def _same_answer(a: list[Message], b: list[Message]) -> bool:
    # Whitespace at the ends of a turn is no preference signal either.
    return [(m["role"], m["content"].strip()) for m in a] == [(m["role"], m["content"].strip()) for m in b]


def parse_record(record: Any, fmt: DatasetFormat, line: int) -> Record:
    """Check one decoded JSON line against `fmt`."""
    if not isinstance(record, dict):
        raise RecordInvalid(f"expected a JSON object, got {type(record).__name__}")
    found = detect_format(record)
    if found != fmt:
        raise RecordInvalid(f"expected a {fmt.value} record, found keys {sorted(record)}")
    if fmt == DatasetFormat.PROMPT_RESPONSE:
        return Record(
            line, [*_prompt_messages(record), {"role": "assistant", "content": _text(record, "response") or ""}]
        )
    if fmt == DatasetFormat.MESSAGES:
        messages = _messages(record["messages"], "messages")
        if not any(m["role"] == "assistant" for m in messages):
            raise RecordInvalid("'messages' has no assistant message to learn from")
        return Record(line, messages)
    chosen, rejected = _answer(record, "chosen"), _answer(record, "rejected")
    if _same_answer(chosen, rejected):
        raise RecordInvalid("'chosen' and 'rejected' are the same answer: DPO learns nothing from the pair")
    return Record(line, _prompt_messages(record), chosen=chosen, rejected=rejected)


# --- JSON syntax --------------------------------------------------------------------------------------

_ESCAPES = {"\t": ("tab", "\\t"), "\n": ("line feed", "\\n"), "\r": ("carriage return", "\\r")}
_ESCAPES |= {"\b": ("backspace", "\\b"), "\f": ("form feed", "\\f")}
_BARE_WORDS = {"True": "true", "False": "false", "None": "null", "undefined": "null", "nil": "null"}


def _char(c: str) -> str:
    return repr(c) if c.isprintable() else f"U+{ord(c):04X}"


def _after_comma(doc: str, pos: int) -> bool:
    return doc[:pos].rstrip().endswith(",")


def _json_problem(msg: str, doc: str, pos: int) -> str:
    found = doc[pos] if pos < len(doc) else ""
    if msg.startswith("Invalid control character"):
        name, escape = _ESCAPES.get(found, ("", f"\\u{ord(found or ' '):04x}"))
        label = f" ({name})" if name else ""
        return f"a raw control character U+{ord(found or ' '):04X}{label} inside a string; escape it as {escape}"
    if msg.startswith("Unterminated string"):
        return "a string is not closed before the line ends (a record must fit on one line: write line breaks as \\n)"
    if msg.startswith("Illegal trailing comma") or (found in ("}", "]") and _after_comma(doc, pos)):
        return f"a trailing comma before {found or 'the closing bracket'!r}"
    if found == "'":
        return "a single-quoted string; JSON strings take double quotes"
    if msg.startswith("Expecting value"):
        word = re.match(r"[A-Za-z_]\w*", doc[pos:])
        if word:
            fix = _BARE_WORDS.get(word.group())
            hint = f"write {fix}" if fix else "strings take double quotes"
            return f"{word.group()!r} is not a JSON value ({hint})"
        return f"a value is expected, found {_char(found)}" if found else "the line ends where a value is expected"
    if msg.startswith("Expecting property name"):
        if not found:
            return "the line ends inside an object"
        return f"a key in double quotes is expected, found {_char(found)}"
    if msg.startswith(("Expecting ',' delimiter", "Expecting ':' delimiter")):
        wanted = msg.split("'")[1]
        if not found:
            return "the line ends before the record is closed (a missing '}' or ']', or a record cut short)"
        return f"{wanted!r} is expected, found {_char(found)}"
    if msg.startswith("Extra data"):
        rest = doc[pos:]
        shown = repr(rest if len(rest) <= 20 else rest[:20] + "...")
        return f"more text after the end of the record ({shown}); put one JSON object per line"
    if msg.startswith("Invalid \\escape"):
        return f'an invalid escape {doc[pos : pos + 2]!r} (JSON knows \\" \\\\ \\/ \\b \\f \\n \\r \\t \\uXXXX)'
    if msg.startswith("Unexpected UTF-8 BOM"):
        return "a byte-order mark (U+FEFF) before the record; remove it"
    if msg.startswith("Invalid \\uXXXX escape"):
        return "an incomplete \\uXXXX escape (four hex digits)"
    return msg


def describe_json_error(err: json.JSONDecodeError) -> str:
    """Where and what, for one JSON line: "column 12: a raw control character U+0009 (tab) inside a string;
    escape it as \\t"."""
    return f"column {err.colno}: {_json_problem(err.msg, err.doc, err.pos)}"


def _decode(raw: bytes, number: int) -> Any:
    """The JSON value of one line; RecordInvalid("column N: ...") when it is not UTF-8 JSON."""
    try:
        # The line's own end is no part of the record (json would call a "\n" in an open string invalid).
        text = raw.decode("utf-8-sig" if number == 1 else "utf-8").rstrip("\r\n")
    except UnicodeDecodeError as err:
        bad = raw[err.start]
        raise RecordInvalid(f"byte {err.start + 1}: 0x{bad:02x} is not UTF-8 (the file must be UTF-8 text)") from err
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise RecordInvalid(describe_json_error(err)) from err


# --- A whole file ---------------------------------------------------------------------------------------


def check_lines(lines: Iterable[bytes], fmt: DatasetFormat, keep: bool = True) -> RecordsCheck:
    """Every line checked against `fmt` (AUTO: the first record's format); blank lines are skipped. The good
    records are counted, and kept only with `keep`."""
    check = RecordsCheck(fmt)
    for record in _good_records(lines, check):
        check.count += 1
        if keep:
            check.records.append(record)
    return check


def _good_records(lines: Iterable[bytes], check: RecordsCheck) -> Iterator[Record]:
    """The good records of `lines`, one at a time; bad lines go to check.errors, the format found to check.format."""
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            decoded = _decode(raw, number)
        except RecordInvalid as err:
            # "column 5: ..." reads as "line 3, column 5: ..."; other reasons as "line 3: ...".
            sep = ", " if str(err).startswith(("column ", "byte ")) else ": "
            check.errors.append(f"line {number}{sep}{err}")
            continue
        if check.format == DatasetFormat.AUTO:
            check.format = (detect_format(decoded) if isinstance(decoded, dict) else None) or DatasetFormat.AUTO
            if check.format == DatasetFormat.AUTO:
                check.errors.append(
                    f"line {number}: cannot tell the format "
                    "(expected prompt/response, messages or prompt/chosen/rejected)"
                )
                continue
        try:
            record = parse_record(decoded, check.format, number)
        except RecordInvalid as err:
            check.errors.append(f"line {number}: {err}")
            continue
        yield record


def check_file(path: Path, fmt: DatasetFormat, split: str | None = None, keep: bool = True) -> RecordsCheck:
    """check_lines over the file at `path` (read as bytes: a line that is not UTF-8 is one bad line), or over
    every data file of the folder at `path` (of `split` when given), each bad line named with its file."""
    if not path.is_dir():
        return check_lines(file_lines(path), fmt, keep)
    total = RecordsCheck(fmt)
    for file in split_files(path, split):
        check = check_lines(file_lines(file), total.format, keep)
        name = file.relative_to(path).as_posix()
        total.format = check.format
        total.count += check.count
        total.records += check.records
        total.errors += [f"{name}: {error}" for error in check.errors]
    return total


def stream_records(path: Path, fmt: DatasetFormat, split: str | None = None) -> Iterator[Record]:
    """The good records of the file or folder at `path`, read from disk one at a time (for a dataset that
    check_records accepted, with the format it found)."""
    check = RecordsCheck(fmt)
    for file in split_files(path, split) if path.is_dir() else [path]:
        yield from _good_records(file_lines(file), check)


DATA_SUFFIXES = (".jsonl", ".ndjson", ".json", ".parquet")


def split_files(folder: Path, split: str | None) -> list[Path]:
    """The data files under `folder` (hidden ones aside), in name order; with `split`, those whose path names it
    as a word: train.jsonl, train/part-0.parquet, data/train-00000-of-00001.parquet."""
    files = sorted(path for path in folder.rglob("*") if path.is_file())
    return [path for path in files if is_split_file(path.relative_to(folder).as_posix(), split)]


def is_split_file(relative: str, split: str | None) -> bool:
    """Whether the file at `relative` (a path inside a dataset's folder or repository) is a data file of `split`
    (of any split when None): `split_files`' rule, which also chooses what an hf:// repository download fetches."""
    path = PurePosixPath(relative)
    if path.suffix not in DATA_SUFFIXES or any(p.startswith(".") for p in path.parts):
        return False
    return split is None or split in re.split(r"[-_./]", path.with_suffix("").as_posix())


def file_lines(path: Path) -> Iterator[bytes]:
    """One JSON text per record: the lines of a JSONL file (or JSON lines), the elements of a JSON array, the rows
    of a Parquet file. Lines and Parquet row groups are streamed; a JSON array is read whole."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                yield json.dumps(row, ensure_ascii=False).encode()
        return
    with path.open("rb") as lines:
        first = lines.read(64).lstrip()
        lines.seek(0)
        if path.suffix == ".json" and first.startswith(b"["):
            for item in json.load(lines):
                yield json.dumps(item, ensure_ascii=False).encode()
            return
        yield from lines


def method_for(fmt: DatasetFormat) -> Method:
    """The method a dataset of this format trains: DPO for preference records, SFT otherwise."""
    return Method.DPO if fmt == DatasetFormat.PREFERENCE else Method.SFT


def method_mismatch(fmt: DatasetFormat, method: Method, name: str) -> str | None:
    """Why `method` cannot train on records of `fmt` (from the dataset `name`), or None when it can."""
    if method_for(fmt) == method:
        return None
    need = (
        "preference records (prompt/chosen/rejected)" if method == Method.DPO else "prompt/response or messages records"
    )
    return f"method {method.value} needs {need}, {name} has {fmt.value} records"


def read_records(
    path: Path, fmt: DatasetFormat, method: Method, split: str | None = None
) -> tuple[DatasetFormat, list[Record]]:
    """All records of the file (or folder of files) at `path`, in memory; DatasetInvalid listing bad lines when any
    is unusable."""
    fmt, _ = check_records(path, fmt, method, split)
    return fmt, list(stream_records(path, fmt, split))


def check_records(
    path: Path, fmt: DatasetFormat, method: Method, split: str | None = None
) -> tuple[DatasetFormat, int]:
    """The format and number of records of the file (or folder of files) at `path`, none kept in memory;
    DatasetInvalid listing bad lines when any is unusable."""
    if path.is_dir() and not split_files(path, split):
        which = f" of split {split!r}" if split else ""
        raise TrainerFailure(DATASET_INVALID, f"{path.name} has no {', '.join(DATA_SUFFIXES)} files{which}")
    check = check_file(path, fmt, split, keep=False)
    if check.errors:
        shown = "; ".join(check.errors[:MAX_REPORTED_ERRORS])
        extra = len(check.errors) - MAX_REPORTED_ERRORS
        more = f" (and {extra} more)" if extra > 0 else ""
        raise TrainerFailure(DATASET_INVALID, f"{len(check.errors)} bad record(s) in {path.name}: {shown}{more}")
    if not check.count:
        raise TrainerFailure(DATASET_INVALID, f"{path.name} has no records")
    if (problem := method_mismatch(check.format, method, path.name)) is not None:
        raise TrainerFailure(DATASET_INVALID, problem)
    return check.format, check.count
