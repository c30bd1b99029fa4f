"""s3:// storage: kubetune.s3 and the trainer's remote output against a real S3 API (moto's server)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from kubetune import s3
from kubetune.api.v1alpha1 import FineTuneJob, S3Access
from kubetune.trainer.checkpoints import MARKER
from kubetune.trainer.remote import RemoteOutput, checkpoint_index
from tests import s3server

pytest.importorskip("boto3", reason="needs boto3: hack/setup.sh trainer")
pytest.importorskip("moto", reason="needs moto's server: the dev extra")

BUCKET = "unit"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[s3server.S3Server]:
    with s3server.running(tmp_path_factory.mktemp("moto") / "moto.log") as running:
        running.client().create_bucket(Bucket=BUCKET)
        yield running


@pytest.fixture
def access(server: s3server.S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> s3.Access:
    """The credentials as a mounted Secret, the endpoint as the API gives it."""
    monkeypatch.setenv("KUBETUNE_S3_SECRETS_ROOT", str(tmp_path / "secrets"))
    s3server.secret_dir(tmp_path / "secrets", "creds")
    return s3.Access(secret_name="creds", endpoint=server.endpoint)


def test_checkpoint_index_counts_only_marked_checkpoints() -> None:
    keys = [
        "checkpoint-5/adapter_model.safetensors",
        f"checkpoint-5/{MARKER}",
        "checkpoint-10/adapter_model.safetensors",
        f"checkpoint-15/{MARKER}",
        "checkpoint-15/optimizer.pt",
        "stray.txt",
        "checkpoint-x/a",
    ]
    assert checkpoint_index(keys) == ([5, 15], [10])
    assert checkpoint_index([]) == ([], [])


def test_access_from_the_api_and_the_wire() -> None:
    block = S3Access(secret_name="minio", endpoint="http://minio.minio.svc:9000")
    assert s3.Access.of(block) == s3.Access("minio", "http://minio.minio.svc:9000", "")
    assert s3.Access.of(block.to_wire()) == s3.Access.of(block)
    assert s3.Access.of(None) == s3.Access()
    assert s3.Access("a", "", "eu-west-1").to_wire() == {"secretName": "a", "region": "eu-west-1"}


def test_s3_block_only_for_s3_locations() -> None:
    spec = {
        "baseModel": {"uri": "hf://Qwen/Qwen2.5-7B"},
        "dataset": {"uri": "pvc://data/train.jsonl"},
        "output": {"uri": "pvc://adapters/x", "s3": {"secretName": "minio"}},
    }
    with pytest.raises(ValueError, match="s3 is only for s3:// locations"):
        FineTuneJob.model_validate({"metadata": {"name": "x"}, "spec": spec})
    spec["output"] = {"uri": "s3://b/x", "s3": {"secretName": "minio", "endpoint": "http://minio:9000"}}
    spec["dataset"] = {"uri": "s3://b/train.jsonl", "secretRef": {"name": "hf", "key": "token"}}
    with pytest.raises(ValueError, match=r"give s3:// credentials in s3\.secretName"):
        FineTuneJob.model_validate({"metadata": {"name": "x"}, "spec": spec})


def test_missing_secret_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBETUNE_S3_SECRETS_ROOT", str(tmp_path))
    with pytest.raises(s3.S3Error, match="Secret absent of this s3:// location is not mounted"):
        s3.client(s3.Access(secret_name="absent"))


def test_download_an_object_and_a_prefix(server: s3server.S3Server, access: s3.Access, tmp_path: Path) -> None:
    c = server.client()
    c.put_object(Bucket=BUCKET, Key="data/train.jsonl", Body=b'{"prompt": "a", "response": "b"}\n')
    c.put_object(Bucket=BUCKET, Key="models/m/config.json", Body=b"{}")
    c.put_object(Bucket=BUCKET, Key="models/m/sub/w.bin", Body=b"w")
    c.put_object(Bucket=BUCKET, Key="models/m-other/config.json", Body=b"other")  # a sibling, not under m/
    client = s3.client(access)
    data = s3.download(client, f"s3://{BUCKET}/data/train.jsonl", tmp_path / "train.jsonl")
    assert data.read_text().startswith('{"prompt"')
    model = s3.download(client, f"s3://{BUCKET}/models/m", tmp_path / "m")
    assert sorted(p.relative_to(model).as_posix() for p in model.rglob("*") if p.is_file()) == [
        "config.json",
        "sub/w.bin",
    ]
    (model / "stale").write_text("from an older download")
    s3.download(client, f"s3://{BUCKET}/models/m/", tmp_path / "m")  # replaced whole
    assert not (model / "stale").exists() and (model / "config.json").is_file()
    with pytest.raises(s3.S3Error) as missing:
        s3.download(client, f"s3://{BUCKET}/models/absent", tmp_path / "absent")
    assert missing.value.not_found and not (tmp_path / "absent").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging left behind


def test_remote_output_checkpoints_and_adapter(server: s3server.S3Server, access: s3.Access, tmp_path: Path) -> None:
    remote = RemoteOutput(f"s3://{BUCKET}/out/job", access)
    root = tmp_path / "staging" / "checkpoints"
    for step in (2, 4, 6):
        path = root / f"checkpoint-{step}"
        path.mkdir(parents=True)
        (path / "adapter_model.safetensors").write_bytes(b"w%d" % step)
        (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        (path / MARKER).write_text(json.dumps({"step": step}))
        remote.upload_checkpoint(path)
        assert remote.index()[1] == [step]  # uploaded, not complete before its marker
        remote.mark_complete(path)
        remote.rotate(keep=2)
    assert remote.index() == ([4, 6], [])
    # A pod killed while uploading checkpoint-8: files without the marker.
    half = root / "checkpoint-8"
    half.mkdir()
    (half / "adapter_model.safetensors").write_bytes(b"half")
    remote.upload_checkpoint(half)
    # A new pod: an empty staging folder; the bucket's newest complete checkpoint comes down, checkpoint-8 goes.
    fresh = tmp_path / "fresh" / "checkpoints"
    assert remote.restore_latest(fresh) == 6
    assert json.loads((fresh / "checkpoint-6" / "trainer_state.json").read_text())["global_step"] == 6
    assert (fresh / "checkpoint-6" / MARKER).is_file()
    assert remote.index() == ([4, 6], [])

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "old-only.bin").write_text("x")
    (adapter / "kubetune.json").write_text("{}")
    remote.upload_adapter(adapter)
    (adapter / "old-only.bin").unlink()
    assert remote.upload_adapter(adapter) == f"s3://{BUCKET}/out/job/adapter"
    assert server.keys(BUCKET, "out/job/adapter/") == [
        "out/job/adapter/adapter_config.json",
        "out/job/adapter/kubetune.json",
    ]
