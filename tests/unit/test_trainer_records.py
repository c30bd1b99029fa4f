"""Dataset record checks (trainer/records.py): every bad line with its number and a reason a person can act on."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kubetune.api.v1alpha1 import DatasetFormat, Method
from kubetune.trainer.errors import TrainerFailure
from kubetune.trainer.records import check_lines, describe_json_error, read_records


def errors_of(*lines: str | bytes, fmt: DatasetFormat = DatasetFormat.AUTO) -> list[str]:
    raw = [line if isinstance(line, bytes) else line.encode() + b"\n" for line in lines]
    return check_lines(raw, fmt).errors


GOOD = json.dumps({"prompt": "What is the capital of Peru?", "response": "Lima."})


@pytest.mark.parametrize(
    ("line", "error"),
    [
        (
            '{"prompt": "a\tb", "response": "c"}',
            "line 2, column 14: a raw control character U+0009 (tab) inside a string; escape it as \\t",
        ),
        ('{"prompt": "a", "response": "two', "line 2, column 29: a string is not closed before the line ends"),
        ('{"prompt": , "response": "c"}', "line 2, column 12: a value is expected, found ','"),
        (
            '{"prompt": "a", "response": "b"} {"prompt": "c"}',
            "line 2, column 34: more text after the end of the record",
        ),
        ('{"prompt": "a", "response": "b",}', "line 2, column 33: a trailing comma before '}'"),
        ("{'prompt': 'a', 'response': 'b'}", "line 2, column 2: a single-quoted string; JSON strings take double"),
        ('{"prompt": "a", "response": True}', "line 2, column 29: 'True' is not a JSON value (write true)"),
        ('{"prompt": "a" "response": "b"}', "line 2, column 16: ',' is expected, found '\"'"),
        ('{"prompt": "a", "response": "b"', "line 2, column 32: the line ends before the record is closed"),
        ('{"prompt": "a", "response": "\\q"}', "line 2, column 30: an invalid escape '\\\\q'"),
    ],
)
def test_json_errors_say_line_column_and_what(line: str, error: str) -> None:
    (found,) = errors_of(GOOD, line)
    assert found.startswith(error), found


def test_describe_json_error_alone() -> None:
    with pytest.raises(json.JSONDecodeError) as err:
        json.loads('{"a": "x\ty"}')
    assert describe_json_error(err.value) == (
        "column 9: a raw control character U+0009 (tab) inside a string; escape it as \\t"
    )


def test_non_utf8_and_byte_order_marks() -> None:
    # A BOM at the start of the file is tolerated (editors write it); a byte that is not UTF-8 is one bad line.
    assert errors_of(b"\xef\xbb\xbf" + GOOD.encode() + b"\n") == []
    assert errors_of(GOOD, b'{"prompt": "caf\xe9", "response": "b"}\n') == [
        "line 2, byte 16: 0xe9 is not UTF-8 (the file must be UTF-8 text)"
    ]


def test_every_bad_line_is_collected() -> None:
    lines = [GOOD, "{not json", json.dumps({"prompt": "a"}), "", json.dumps({"prompt": "a", "response": 3}), GOOD]
    check = check_lines([line.encode() + b"\n" for line in lines], DatasetFormat.AUTO)
    assert check.format == DatasetFormat.PROMPT_RESPONSE and len(check.records) == 2
    assert [e.split(":")[0] for e in check.errors] == ["line 2, column 2", "line 3", "line 5"]
    assert check.errors[1:] == ["line 3: missing 'response'", "line 5: 'response' must be a string, got int"]


def test_dpo_pair_with_the_same_answer_is_invalid() -> None:
    same = {"prompt": "Capital of Peru?", "chosen": "Lima.", "rejected": "Lima. "}
    as_messages = {
        "prompt": "Capital of Peru?",
        "chosen": [{"role": "assistant", "content": "Lima."}],
        "rejected": [{"role": "assistant", "content": "Lima."}],
    }
    differs = {"prompt": "Capital of Peru?", "chosen": "Lima.", "rejected": "Cusco."}
    errors = errors_of(json.dumps(differs), json.dumps(same), json.dumps(as_messages))
    reason = "'chosen' and 'rejected' are the same answer: DPO learns nothing from the pair"
    assert errors == [f"line 2: {reason}", f"line 3: {reason}"]


def test_read_records_fails_with_dataset_invalid(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text(GOOD + "\n" + '{"prompt": "a\tb", "response": "c"}\n')
    with pytest.raises(TrainerFailure) as failure:
        read_records(path, DatasetFormat.AUTO, Method.SFT)
    assert failure.value.reason == "DatasetInvalid"
    assert failure.value.message == (
        "1 bad record(s) in train.jsonl: line 2, column 14: a raw control character U+0009 (tab) inside a string; "
        "escape it as \\t"
    )
    path.write_text(GOOD + "\n")
    with pytest.raises(TrainerFailure, match="method DPO needs preference records"):
        read_records(path, DatasetFormat.AUTO, Method.DPO)


def test_records_module_does_not_import_torch() -> None:
    code = (
        "import sys, kubetune.trainer.records; print(sorted({'torch', 'transformers', 'datasets'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
