"""`kubetune prepare` on the CPU with the tiny model: the report, the cache entries, every bad line, and the
trainer reading the prepared (Arrow) dataset from the cache."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import pytest

from kubetune.trainer.cache import MARKER
from tests.trainer.conftest import parse_events, run_in_process, trainer_config, write_config, write_jsonl

pytestmark = pytest.mark.trainer


def prepare(pvc: Path, config: dict[str, Any]) -> tuple[int, list[dict[str, Any]]]:
    from kubetune.trainer.prepare import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["--config", str(write_config(pvc, config))])
    return code, parse_events(out.getvalue())


def test_prepare_reports_the_dataset_and_caches_its_tokenized_form(pvc: Path, tiny_model: str, tmp_path: Path) -> None:
    config = trainer_config("prep", tiny_model, plan={})
    config["cache"] = {"root": str(tmp_path / "cache")}
    code, events = prepare(pvc, config)
    assert code == 0, events
    (report,) = [e for e in events if e["event"] == "prepared"]
    assert report["records"] == 8 and report["tokens"] > 0, report
    lengths = report["tokenLengths"]
    assert 0 < lengths["p50"] <= lengths["p95"] <= lengths["max"] < report["tokens"], report
    entry = Path(report["cache"])
    assert (entry / MARKER).is_file() and (entry / "train").is_dir(), report
    # The second run reads the entry: no check, no tokenizing.
    code, again = prepare(pvc, config)
    assert code == 0 and [e for e in again if e["event"] == "cache-hit"], again
    assert next(e for e in again if e["event"] == "prepared")["cache"] == str(entry)
    # The trainer takes the prepared form instead of tokenizing again.
    train = trainer_config("prep-train", tiny_model, hyperparameters={"maxSteps": 2})
    train["prepared"] = {"datasetDir": str(entry)}
    run = run_in_process(pvc, train)
    assert run.code == 0, run.stdout[-2000:]
    assert run.of("prepared-inputs"), run.stdout[-2000:]


def test_prepare_lists_every_bad_line(pvc: Path, tiny_model: str, tmp_path: Path) -> None:
    good = {"prompt": "hi", "response": "hello"}
    lines = [good, {"prompt": "x"}, good, {"prompt": "y", "response": ""}, good]
    write_jsonl(pvc / "data" / "bad.jsonl", lines)
    config = trainer_config("prep-bad", tiny_model, dataset={"uri": "pvc://data/bad.jsonl"})
    code, events = prepare(pvc, config)
    assert code == 3, events
    (failed,) = [e for e in events if e["event"] == "failed"]
    assert failed["reason"] == "DatasetInvalid", failed
    assert "line 2" in failed["message"] and "line 4" in failed["message"], failed
    logged = json.loads((pvc / "termination-log").read_text())
    assert logged["reason"] == "DatasetInvalid"


def test_missing_dataset_is_dataset_not_found(pvc: Path, tiny_model: str) -> None:
    config = trainer_config("prep-missing", tiny_model, dataset={"uri": "pvc://data/nothing.jsonl"})
    config["cache"] = {"root": str(pvc / "cache-missing")}
    code, events = prepare(pvc, config)
    assert code == 3
    assert next(e for e in events if e["event"] == "failed")["reason"] == "DatasetNotFound", events


def test_a_missing_secret_is_access_denied_naming_it(
    pvc: Path, tiny_model: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The prepare pod mounts Secrets optionally, so a missing one is an empty folder or none at all.
    monkeypatch.setenv("KUBETUNE_S3_SECRETS_ROOT", str(pvc / "no-secrets"))
    s3 = {"secretName": "creds", "endpoint": "http://127.0.0.1:9"}
    config = trainer_config("prep-secret", tiny_model, dataset={"uri": "s3://b/data.jsonl", "s3": s3})
    code, events = prepare(pvc, config)
    assert code == 3
    failed = next(e for e in events if e["event"] == "failed")
    assert failed["reason"] == "AccessDenied" and "the Secret creds" in failed["message"], failed


def test_a_folder_of_jsonl_json_and_parquet_files_is_read_by_split(pvc: Path, tiny_model: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    repo = pvc / "data" / "repo"
    record = {"prompt": "What is the capital of France?", "response": "Paris."}
    write_jsonl(repo / "train.jsonl", [record, record])
    (repo / "data").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([record] * 3), repo / "data" / "train-00000-of-00001.parquet")
    (repo / "validation.json").write_text(json.dumps([record, record]))
    write_jsonl(repo / ".cache" / "train.jsonl", [{"not": "data"}])  # hidden: never read
    counts = {}
    for split in ("train", "validation"):
        config = trainer_config(f"prep-{split}", tiny_model, dataset={"uri": "pvc://data/repo", "split": split})
        code, events = prepare(pvc, config)
        assert code == 0, events
        counts[split] = next(e for e in events if e["event"] == "prepared")["records"]
    assert counts == {"train": 5, "validation": 2}
    # A bad row is named by its file and row.
    pq.write_table(pa.Table.from_pylist([record, {"prompt": "x", "response": None}]), repo / "train-extra.parquet")
    dataset = {"uri": "pvc://data/repo", "split": "train"}
    code, events = prepare(pvc, trainer_config("prep-rows", tiny_model, dataset=dataset))
    assert code == 3
    failed = next(e for e in events if e["event"] == "failed")
    assert "train-extra.parquet: line 2: missing 'response'" in failed["message"], failed
