"""`kubetune validate FILE...`: manifests checked against the API models, datasets with the trainer's record checks.

A .jsonl or .ndjson file (or a .json file holding several JSON values, one per line) is a dataset: every bad
line is reported with its number and reason, as the trainer would report it (trainer/records.py, which needs
no torch). Checks that need the tokenizer (lengths against maxSeqLength) happen only in the trainer. Any
other file is YAML with FineTuneJob and ModelServer documents. Exit code 1 when anything is invalid.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml
from pydantic import ValidationError

from kubetune.api.v1alpha1 import DatasetFormat, FineTuneJob, Method, ModelServer
from kubetune.trainer.records import RecordsCheck, check_file, method_for, method_mismatch

DATASET_SUFFIXES = (".jsonl", ".ndjson")
KINDS: dict[str, type[FineTuneJob] | type[ModelServer]] = {"FineTuneJob": FineTuneJob, "ModelServer": ModelServer}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kubetune validate",
        description="Check FineTuneJob/ModelServer manifests against the API, and JSONL datasets record by record.",
    )
    p.add_argument("files", nargs="+", type=Path)
    p.add_argument("--method", choices=[m.value for m in Method], help="datasets: the method they are for")
    p.add_argument(
        "--format",
        choices=[f.value for f in DatasetFormat],
        default=DatasetFormat.AUTO.value,
        help="datasets: the record format (default auto: the first record's keys)",
    )
    return p


def is_dataset(path: Path) -> bool:
    """JSON lines: by suffix, or a .json file whose text is several JSON values rather than one document."""
    if path.suffix.lower() in DATASET_SUFFIXES:
        return True
    if path.suffix.lower() != ".json":
        return False
    try:
        json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        return err.msg == "Extra data"
    except (OSError, UnicodeDecodeError):
        return False
    return False


def _dataset_problem(check: RecordsCheck, method: Method, name: str) -> str | None:
    """What makes the dataset unusable as a whole, in the trainer's order; None when nothing does."""
    if check.errors:
        return f"{len(check.errors)} of {check.count + len(check.errors)} record(s) bad"
    if not check.count:
        return "no records"
    return method_mismatch(check.format, method, name)


def validate_dataset(path: Path, fmt: DatasetFormat, method: Method | None) -> bool:
    """Print every problem (stderr) and a summary; True when the trainer would accept the records."""
    try:
        check = check_file(path, fmt, keep=False)
    except OSError as err:
        print(f"{path}: cannot read: {err}", file=sys.stderr)
        return False
    used = method or method_for(check.format)
    for error in check.errors:
        print(f"{path}: {error}", file=sys.stderr)
    problem = _dataset_problem(check, used, path.name)
    if problem:
        print(f"{path}: invalid: {problem}", file=sys.stderr)
        return False
    print(f"{path}: valid: {check.count} record(s), format {check.format.value}, for {used.value}")
    return True


def validate_manifests(path: Path) -> bool:
    """Print each FineTuneJob/ModelServer document's verdict; True when all are valid."""
    try:
        docs = list(yaml.safe_load_all(path.read_text(encoding="utf-8")))
    except (OSError, UnicodeDecodeError) as err:
        print(f"{path}: cannot read: {err}", file=sys.stderr)
        return False
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        at = f" (line {where.line + 1}, column {where.column + 1})" if where else ""
        problem = getattr(err, "problem", None) or str(err)
        print(f"{path}: not valid YAML{at}: {problem}", file=sys.stderr)
        return False
    valid = True
    for doc in docs:
        if not isinstance(doc, dict) or doc.get("kind") not in KINDS:
            continue
        name = f"{path}: {doc['kind']}/{(doc.get('metadata') or {}).get('name', '?')}"
        try:
            KINDS[doc["kind"]].model_validate(doc)
            print(f"{name}: valid")
        except ValidationError as err:
            valid = False
            print(f"{name}: invalid\n{err}", file=sys.stderr)
    return valid


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    fmt, method = DatasetFormat(args.format), Method(args.method) if args.method else None
    results = [
        validate_dataset(path, fmt, method) if is_dataset(path) else validate_manifests(path) for path in args.files
    ]
    return 0 if all(results) else 1
