"""Where the trainer finds its inputs: mounted URIs, and hf:// downloads from a local Hub (tests/hub.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kubetune.api.v1alpha1 import JobIdentity
from kubetune.trainer.errors import TrainerFailure
from kubetune.trainer.inputs import dataset_path, fetch, model_path, output_dir
from kubetune.trainer.progress import status_sender
from tests import hub as local_hub


def test_uris_resolve_to_mounts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBETUNE_PVC_ROOT", str(tmp_path))
    (tmp_path / "models" / "m").mkdir(parents=True)
    (tmp_path / "models" / "m" / "config.json").write_text("{}")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "t.jsonl").write_text("{}\n")
    assert model_path("pvc://models/m") == tmp_path / "models" / "m"
    assert dataset_path("pvc://data/t.jsonl") == tmp_path / "data" / "t.jsonl"
    assert output_dir("pvc://out/job") == tmp_path / "out" / "job"
    with pytest.raises(TrainerFailure) as missing:
        model_path("pvc://models/absent")
    assert missing.value.reason == "ModelNotFound"
    with pytest.raises(TrainerFailure) as no_data:
        dataset_path("pvc://data/absent.jsonl")
    assert no_data.value.reason == "DatasetInvalid"
    monkeypatch.setenv("KUBETUNE_CACHE_ROOT", str(tmp_path / "cache"))
    assert output_dir("s3://bucket/out") == tmp_path / "cache" / "s3" / "bucket" / "out"  # staged, then uploaded


def test_hf_uris_download_into_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("KUBETUNE_CACHE_ROOT", str(tmp_path / "cache"))
    with local_hub.running() as (hub, server):
        local_hub.point_client_at(monkeypatch, server.endpoint)
        first = hub.push("model", "org/m", {"config.json": "{}", "tokenizer.json": "{}"}, private=True, tokens=("t",))
        hub.push("model", "org/m", {"config.json": '{"moved": true}'})
        hub.push("dataset", "org/data", {"sft/train.jsonl": "{}\n", "other.jsonl": "{}\n"})
        monkeypatch.setenv("HF_TOKEN", "t")
        # The revision written in the URI: that commit, into the cache root; with the token.
        model = fetch(f"hf://org/m@{first}")
        assert (model / "tokenizer.json").is_file() and (model / "config.json").read_text() == "{}"
        assert model.is_relative_to(tmp_path / "cache" / "hf" / "org" / "m" / ".hub")
        assert {r.token for r in hub.requests if "/org/m/" in r.path} == {"t"}
        # A file of a dataset repository: only that file is downloaded.
        data = fetch("hf://org/data/sft/train.jsonl", "dataset")
        assert data.name == "train.jsonl" and data.read_text() == "{}\n"
        assert hub.downloads("org/data") == [
            f"/datasets/org/data/resolve/{hub.repos['dataset', 'org/data'].refs['main']}/sft/train.jsonl"
        ]
        # A token the private repository does not grant is refused (401), a definite answer: not retried.
        monkeypatch.setenv("HF_TOKEN", "other")
        with pytest.raises(TrainerFailure) as denied:
            model_path("hf://org/m")
        assert (denied.value.reason, denied.value.exit_code) == ("ModelNotFound", 3)
        assert "401" in denied.value.message


def test_the_prepared_commit_wins_over_a_branch_that_moved(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("KUBETUNE_CACHE_ROOT", str(tmp_path / "cache"))
    with local_hub.running() as (hub, server):
        local_hub.point_client_at(monkeypatch, server.endpoint)
        model = hub.push("model", "org/m", {"config.json": '{"v": 1}'})
        data = hub.push("dataset", "org/data", {"train.jsonl": '{"v": 1}\n'})
        hub.push("model", "org/m", {"config.json": '{"v": 2}'})
        hub.push("dataset", "org/data", {"train.jsonl": '{"v": 2}\n'})
        # `@main` now names the second commits; the commits the prepare step resolved are what the pod reads.
        assert (model_path("hf://org/m@main", None, None, model) / "config.json").read_text() == '{"v": 1}'
        assert dataset_path("hf://org/data/train.jsonl@main", None, data).read_text() == '{"v": 1}\n'
        assert (model_path("hf://org/m@main") / "config.json").read_text() == '{"v": 2}'


def test_access_denied_is_the_hub_status_not_digits_in_the_url() -> None:
    from huggingface_hub import HfApi

    from kubetune.trainer.prepare import denied

    with local_hub.running() as (hub, server):
        hub.push("model", "org/gated", {"config.json": "{}"}, gated=True)
        errors = {}
        for repo in ("org/model-401", "org/gated"):  # a 404 whose URL reads 401, and a 401
            with pytest.raises(Exception) as raised:
                HfApi(endpoint=server.endpoint, token=False).repo_info(repo)
            errors[repo] = raised.value
    assert "401" in str(errors["org/model-401"]) and not denied(errors["org/model-401"])
    assert denied(errors["org/gated"])


def test_status_sender_only_in_a_cluster(monkeypatch: pytest.MonkeyPatch) -> None:
    job = JobIdentity(name="j", namespace="n")
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    assert status_sender(job) is None
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    assert status_sender(job) is None  # no service-account token here: training goes on, logging only


def test_an_hf_download_reports_its_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("huggingface_hub")
    from kubetune import hf

    weights = bytes(range(256)) * 8192  # 2 MiB
    with local_hub.running() as (hub, server):
        local_hub.point_client_at(monkeypatch, server.endpoint)
        commit = hub.push("model", "org/big", {"config.json": "{}", "model.safetensors": weights})
        seen: list[tuple[int, int]] = []
        folder = hf.download_model(
            "hf://org/big", commit, tmp_path / "m", lambda done, total: seen.append((done, total))
        )
    assert (folder / "model.safetensors").read_bytes() == weights
    size = len(weights) + 2
    # Bytes as they were written, never past the total, ending with every byte of both files.
    assert seen[-1] == (size, size), seen[-3:]
    assert len(seen) >= 2 and all(done <= total for done, total in seen), seen


def test_a_dataset_repository_is_downloaded_as_far_as_the_split_reads_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("KUBETUNE_CACHE_ROOT", str(tmp_path / "cache"))
    files = {
        "README.md": "# data\n",
        "images.zip": b"\0" * 1024,
        "train.jsonl": '{"n": 1}\n',
        "data/train-00000-of-00001.parquet": b"PAR1 train",
        "data/validation-00000-of-00001.parquet": b"PAR1 validation",
        "odd[1]-validation.jsonl": '{"n": 2}\n',
    }
    with local_hub.running() as (hub, server):
        local_hub.point_client_at(monkeypatch, server.endpoint)
        commit = hub.push("dataset", "org/splits", files)
        folder = dataset_path("hf://org/splits", commit=commit, split="validation")
        served = sorted(p.split(f"/resolve/{commit}/", 1)[1] for p in hub.downloads("org/splits"))
        # The validation split's data files only (a name with glob characters too); no other split, no README, no zip.
        assert served == ["data/validation-00000-of-00001.parquet", "odd%5B1%5D-validation.jsonl"], served
        assert (folder / "data" / "validation-00000-of-00001.parquet").is_file()
        # Without a split, every data file.
        dataset_path("hf://org/splits", commit=commit)
        again = sorted(p.split(f"/resolve/{commit}/", 1)[1] for p in hub.downloads("org/splits"))
        assert [p for p in again if p not in served] == ["data/train-00000-of-00001.parquet", "train.jsonl"], again
