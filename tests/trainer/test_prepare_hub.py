"""`kubetune prepare` on the CPU with hf:// inputs, against a local Hub (tests/hub.py) and the real huggingface_hub
client: a model repository and a dataset repository with named splits, a repository the hub does not have, a
gated one with and without a token, and the cache keyed by the commit a revision names (a moved branch is a new
entry, the same commit is a hit that downloads no file)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kubetune.trainer.cache import MARKER
from tests import hub as local_hub
from tests.trainer.conftest import sft_records, trainer_config
from tests.trainer.test_prepare import prepare

pytestmark = pytest.mark.trainer

MODEL = "kt/tiny"
DATA = "kt/capitals"
GATED = "kt/gated-capitals"
GRANTED = "hf_granted_token"


def jsonl(records: list[dict[str, Any]]) -> str:
    return "".join(f"{json.dumps(r)}\n" for r in records)


def parquet(records: list[dict[str, Any]]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(records), sink)
    return bytes(sink.getvalue().to_pybytes())


def split_files() -> dict[str, bytes | str]:
    """A dataset repository as the Hub holds them: train in JSONL and Parquet (3 + 2), validation in Parquet (2)."""
    records = sft_records()
    return {
        "README.md": "# capitals\n",
        "train.jsonl": jsonl(records[:3]),
        "data/train-00000-of-00001.parquet": parquet(records[3:5]),
        "data/validation-00000-of-00001.parquet": parquet(records[5:7]),
    }


@pytest.fixture(scope="module")
def hub(pvc: Path, tiny_model: str) -> Iterator[local_hub.Hub]:
    """The local Hub with the tiny model and the dataset repositories, and huggingface_hub pointed at it."""
    with local_hub.running() as (hub, server), pytest.MonkeyPatch.context() as mp:
        hub.push("model", MODEL, pvc / "models" / "tiny")
        hub.push("dataset", DATA, split_files())
        hub.push("dataset", GATED, {"train.jsonl": jsonl(sft_records())}, gated=True, tokens=(GRANTED,))
        local_hub.point_client_at(mp, server.endpoint)
        mp.delenv("HF_TOKEN", raising=False)
        mp.setenv("KUBETUNE_FETCH_ATTEMPTS", "1")
        yield hub


def run(pvc: Path, tmp_path: Path, name: str, cache: Path | None = None, **spec: Any) -> tuple[int, dict[str, Any]]:
    """One prepare pod: a fresh download folder (the pod's emptyDir), the shared cache at `cache` when given; the
    exit code and the `prepared` event (or the `failed` one)."""
    spec.setdefault("baseModel", {"uri": f"hf://{MODEL}"})
    config = trainer_config(name, "", **spec)
    if cache is not None:
        config["cache"] = {"root": str(cache)}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KUBETUNE_CACHE_ROOT", str(tmp_path / f"{name}-pod"))
        code, events = prepare(pvc, config)
    last = [e for e in events if e["event"] in ("prepared", "failed")]
    assert last, events
    return code, last[-1]


def test_an_hf_model_and_a_dataset_repository_with_named_splits(
    pvc: Path, hub: local_hub.Hub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kubetune.trainer.prepare import Preparer

    sent: list[str] = []
    monkeypatch.setattr(Preparer, "send", lambda self, report: sent.append(str(report.get("downloaded") or "")))
    cache = tmp_path / "cache"
    counts = {}
    for split in ("train", "validation"):
        code, report = run(pvc, tmp_path, f"hub-{split}", cache, dataset={"uri": f"hf://{DATA}", "split": split})
        assert code == 0, report
        counts[split] = report["records"]
        # The report names the commits; the cache entries are complete.
        assert report["modelRevision"] == hub.repos["model", MODEL].refs["main"], report
        assert report["datasetRevision"] == hub.repos["dataset", DATA].refs["main"], report
        assert (Path(report["cache"]) / MARKER).is_file() and (Path(report["modelCache"]) / "config.json").is_file()
    assert counts == {"train": 5, "validation": 2}
    # While they downloaded, the first step reported the model's and the dataset's bytes (the Prepared condition's
    # message, docs/cache.md).
    assert any(m.startswith(f"base model hf://{MODEL}: ") and " of " in m for m in sent), sent
    assert any(m.startswith(f"dataset hf://{DATA}: ") and " of " in m for m in sent), sent
    # The model was downloaded once, by the first run (the second found it in the cache).
    weights = [p for p in hub.downloads(MODEL) if p.endswith("/model.safetensors")]
    assert len(weights) == 1, hub.downloads(MODEL)
    # One file of a dataset repository: hf://ORG/NAME/FILE.
    code, report = run(pvc, tmp_path, "hub-file", cache, dataset={"uri": f"hf://{DATA}/train.jsonl"})
    assert (code, report["records"]) == (0, 3), report


@pytest.mark.parametrize(
    ("spec", "reason"),
    [
        ({"baseModel": {"uri": "hf://kt/no-such-model"}}, "ModelNotFound"),
        ({"dataset": {"uri": "hf://kt/no-such-data"}}, "DatasetNotFound"),
        ({"dataset": {"uri": f"hf://{DATA}@no-such-branch"}}, "DatasetNotFound"),
        ({"dataset": {"uri": f"hf://{DATA}/no-such-file.jsonl"}}, "DatasetNotFound"),
    ],
    ids=["model-repo", "dataset-repo", "branch", "file"],
)
def test_what_the_hub_does_not_have_is_not_found_at_once(
    spec: dict[str, Any], reason: str, pvc: Path, hub: local_hub.Hub, tmp_path: Path
) -> None:
    code, failed = run(pvc, tmp_path, "hub-missing", tmp_path / "cache", **spec)
    assert (code, failed["reason"]) == (3, reason), failed
    assert "404" in failed["message"] or "nothing at" in failed["message"], failed


def test_a_gated_repository_needs_a_token_it_grants(
    pvc: Path, hub: local_hub.Hub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dataset = {"uri": f"hf://{GATED}"}
    code, failed = run(pvc, tmp_path, "gated-anonymous", tmp_path / "cache", dataset=dataset)
    assert (code, failed["reason"]) == (3, "AccessDenied"), failed
    monkeypatch.setenv("HF_TOKEN", "hf_not_granted")
    code, failed = run(pvc, tmp_path, "gated-other", tmp_path / "cache", dataset=dataset)
    assert (code, failed["reason"]) == (3, "AccessDenied"), failed
    tokens = [r.token for r in hub.requests if f"/{GATED}" in r.path]
    assert tokens == [None, "hf_not_granted"], hub.requests  # refused at the first request, nothing downloaded
    monkeypatch.setenv("HF_TOKEN", GRANTED)
    code, report = run(pvc, tmp_path, "gated-granted", tmp_path / "cache", dataset=dataset)
    assert (code, report["records"]) == (0, len(sft_records())), report
    assert hub.downloads(GATED) and all(r.token == GRANTED for r in hub.requests if f"/{GATED}/resolve/" in r.path)


def test_the_cache_is_keyed_by_the_commit_a_revision_names(pvc: Path, hub: local_hub.Hub, tmp_path: Path) -> None:
    repo = "kt/moving"
    records = sft_records()
    first = hub.push("dataset", repo, {"train.jsonl": jsonl(records[:4])})
    cache = tmp_path / "cache"
    code, report = run(pvc, tmp_path, "moving-1", cache, dataset={"uri": f"hf://{repo}@main"})
    assert (code, report["datasetRevision"], report["records"]) == (0, first, 4), report

    # Another pod, the same commit (written as the branch, then as the sha): a cache hit, no file downloaded; the
    # only requests are one repository-info request per input.
    downloads, requests = len(hub.downloads()), len(hub.requests)
    for name, uri in (("moving-2", f"hf://{repo}"), ("moving-3", f"hf://{repo}@{first}")):
        code, again = run(pvc, tmp_path, name, cache, dataset={"uri": uri})
        assert code == 0 and again["cache"] == report["cache"], (again, report)
        assert again["modelCache"] == report["modelCache"]
    assert len(hub.downloads()) == downloads, hub.downloads()[downloads:]
    asked = [r.path for r in hub.requests[requests:] if r.path != "/api/agent-harnesses"]  # the client's telemetry
    # (Without a revision the default branch is asked for: /api/models/ORG/NAME.)
    expected = [f"/api/models/{MODEL}", f"/api/datasets/{repo}", f"/api/models/{MODEL}"]
    assert sorted(asked) == sorted([*expected, f"/api/datasets/{repo}/revision/{first}"]), asked

    # The branch moves: a new commit, a new entry, the new records; the old entry stays for jobs pinned to it.
    second = hub.push("dataset", repo, {"train.jsonl": jsonl(records)})
    code, moved = run(pvc, tmp_path, "moving-4", cache, dataset={"uri": f"hf://{repo}@main"})
    assert (code, moved["datasetRevision"], moved["records"]) == (0, second, len(records)), moved
    assert moved["cache"] != report["cache"] and Path(report["cache"], MARKER).is_file()
    assert hub.downloads(repo)[-1] == f"/datasets/{repo}/resolve/{second}/train.jsonl", hub.downloads(repo)
    assert moved["modelCache"] == report["modelCache"]  # the model's commit did not move: still a hit
