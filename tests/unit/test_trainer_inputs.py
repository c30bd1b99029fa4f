"""Where the trainer finds its inputs: mounted URIs, and hf:// downloads (faked; no network here)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from kubetune.api.v1alpha1 import JobIdentity
from kubetune.trainer.errors import TrainerFailure
from kubetune.trainer.inputs import dataset_path, fetch, model_path, output_dir
from kubetune.trainer.progress import status_sender


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
    hub = pytest.importorskip("huggingface_hub")
    calls: list[dict[str, Any]] = []

    def snapshot_download(**kwargs: Any) -> str:
        calls.append(kwargs)
        return str(tmp_path / "snapshot")

    monkeypatch.setattr(hub, "snapshot_download", snapshot_download)
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    monkeypatch.setenv("KUBETUNE_CACHE_ROOT", str(tmp_path / "cache"))
    assert fetch("hf://Qwen/Qwen2.5-7B@abc123") == tmp_path / "snapshot"
    assert calls[0]["repo_id"] == "Qwen/Qwen2.5-7B" and calls[0]["revision"] == "abc123"
    assert calls[0]["token"] == "hf_secret" and calls[0]["allow_patterns"] is None
    assert calls[0]["cache_dir"] == str(tmp_path / "cache" / "hf" / "Qwen" / "Qwen2.5-7B" / ".hub")
    assert fetch("hf://org/data/sft/train.jsonl", "dataset") == tmp_path / "snapshot" / "sft" / "train.jsonl"
    assert calls[1]["repo_id"] == "org/data" and calls[1]["repo_type"] == "dataset"
    assert calls[1]["allow_patterns"] == ["sft/train.jsonl"]


def test_status_sender_only_in_a_cluster(monkeypatch: pytest.MonkeyPatch) -> None:
    job = JobIdentity(name="j", namespace="n")
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    assert status_sender(job) is None
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    assert status_sender(job) is None  # no service-account token here: training goes on, logging only
