"""`kubetune validate`: datasets checked record by record like the trainer does, manifests against the API."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kubetune.cli import main

SFT = [{"prompt": f"Capital of {c}?", "response": f"{k}."} for c, k in (("Peru", "Lima"), ("Japan", "Tokyo"))]
DPO = [{"prompt": "Capital of Peru?", "chosen": "Lima.", "rejected": "Cusco."}]
EXAMPLES = Path(__file__).parents[2] / "examples"


def jsonl(path: Path, lines: list[object]) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def test_valid_datasets_report_their_count_format_and_method(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sft, dpo = jsonl(tmp_path / "sft.jsonl", SFT), jsonl(tmp_path / "dpo.jsonl", DPO)
    assert main(["validate", str(sft), str(dpo)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"{sft}: valid: 2 record(s), format prompt-response, for SFT",
        f"{dpo}: valid: 1 record(s), format preference, for DPO",
    ]


def test_every_bad_line_is_reported_with_exit_code_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lines = [*SFT, '{"prompt": "a\tb", "response": "c"}', {"prompt": "no answer"}, "", {"response": 1, "prompt": "x"}]
    path = jsonl(tmp_path / "train.jsonl", lines)
    assert main(["validate", str(path)]) == 1
    assert capsys.readouterr().err.splitlines() == [
        f"{path}: line 3, column 14: a raw control character U+0009 (tab) inside a string; escape it as \\t",
        f"{path}: line 4: missing 'response'",
        f"{path}: line 6: 'response' must be a string, got int",
        f"{path}: invalid: 3 of 5 record(s) bad",
    ]


def test_method_and_format_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sft = jsonl(tmp_path / "sft.jsonl", SFT)
    assert main(["validate", "--method", "DPO", str(sft)]) == 1
    assert capsys.readouterr().err == (
        f"{sft}: invalid: method DPO needs preference records (prompt/chosen/rejected), sft.jsonl has "
        "prompt-response records\n"
    )
    assert main(["validate", "--format", "messages", str(sft)]) == 1
    assert "line 1: expected a messages record, found keys ['prompt', 'response']" in capsys.readouterr().err
    same = jsonl(tmp_path / "same.ndjson", [{"prompt": "p", "chosen": "x", "rejected": "x"}])
    assert main(["validate", "--method", "DPO", str(same)]) == 1
    assert "line 1: 'chosen' and 'rejected' are the same answer" in capsys.readouterr().err


def test_json_lines_named_json_are_a_dataset_and_an_empty_one_is_invalid(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = jsonl(tmp_path / "train.json", SFT)
    empty = jsonl(tmp_path / "empty.jsonl", [""])
    assert main(["validate", str(lines), str(empty)]) == 1
    out, err = capsys.readouterr()
    assert out == f"{lines}: valid: 2 record(s), format prompt-response, for SFT\n"
    assert err == f"{empty}: invalid: no records\n"


def test_manifests_still_validate_and_bad_yaml_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(EXAMPLES / "finetunejob-sft.yaml")]) == 0
    assert capsys.readouterr().out.endswith("FineTuneJob/qwen-sft: valid\n")
    broken = tmp_path / "job.yaml"
    broken.write_text("apiVersion: kubetune.io/v1alpha1\nkind: FineTuneJob\nspec: [\n")
    assert main(["validate", str(broken)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"{broken}: not valid YAML (line 4, column 1): ") and "Traceback" not in err


def test_validating_a_dataset_imports_no_torch(tmp_path: Path) -> None:
    path = jsonl(tmp_path / "sft.jsonl", SFT)
    code = (
        "import sys; from kubetune.cli import main; assert main(['validate', sys.argv[1]]) == 0; "
        "print(sorted({'torch', 'transformers', 'datasets', 'trl'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True).stdout
    assert out.splitlines()[-1] == "[]"
