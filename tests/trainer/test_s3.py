"""s3:// end to end on a real S3 API (moto's server): the model and the data come from a bucket, checkpoints and
the adapter go to one, and a run stopped by SIGTERM resumes in a new "pod" (empty staging folder) from the
newest complete checkpoint in the bucket, ending at the same final step."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from kubetune.trainer.checkpoints import MARKER
from kubetune.trainer.remote import checkpoint_index
from tests import s3server

from .conftest import run_in_process, run_until_sigterm, trainer_config

pytest.importorskip("moto", reason="needs moto's server: the dev extra")
pytestmark = pytest.mark.trainer

BUCKET = "kubetune"
MAX_STEPS = 12


@pytest.fixture(scope="module")
def bucket(pvc: Path, tiny_model: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[s3server.S3Server]:
    """A bucket with the tiny model (s3://kubetune/models/tiny/) and the SFT data; the credentials as a Secret."""
    with s3server.running(tmp_path_factory.mktemp("moto") / "moto.log") as server:
        client = server.client()
        client.create_bucket(Bucket=BUCKET)
        server.upload_folder(BUCKET, pvc / "models" / "tiny", "models/tiny")
        client.upload_file(str(pvc / "data" / "sft.jsonl"), BUCKET, "data/sft.jsonl")
        secrets = tmp_path_factory.mktemp("secrets")
        # The model's Secret names the endpoint itself; data and output give it in their s3 block.
        s3server.secret_dir(secrets, "model-creds", endpoint=server.endpoint)
        s3server.secret_dir(secrets, "creds")
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("KUBETUNE_S3_SECRETS_ROOT", str(secrets))
            yield server


def s3_config(server: s3server.S3Server) -> dict:
    s3 = {"secretName": "creds", "endpoint": server.endpoint}
    return trainer_config(
        "s3-resume",
        "unused",
        baseModel={"uri": f"s3://{BUCKET}/models/tiny", "s3": {"secretName": "model-creds"}},
        dataset={"uri": f"s3://{BUCKET}/data/sft.jsonl", "s3": s3},
        output={"uri": f"s3://{BUCKET}/runs/s3-resume", "s3": s3},
        hyperparameters={"maxSteps": MAX_STEPS},
        checkpointing={"everySteps": 3, "keep": 2},
    )


def test_s3_run_resumes_from_the_bucket(
    pvc: Path, bucket: s3server.S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = s3_config(bucket)
    # checkpoint-3 is in the bucket by the time step 4 is reported
    first = run_until_sigterm(pvc, config, 4, KUBETUNE_CACHE_ROOT=str(tmp_path / "pod-1"))
    (stopped,) = [e for e in first if e["event"] == "stopped"]
    stop_step = stopped["step"]
    assert 4 <= stop_step < MAX_STEPS
    keys = bucket.keys(BUCKET, "runs/s3-resume/")
    complete, incomplete = checkpoint_index([k.removeprefix("runs/s3-resume/checkpoints/") for k in keys])
    assert complete[-1] == stop_step and not incomplete and len(complete) <= 2, keys
    assert not [k for k in keys if "/adapter/" in k]
    checkpoint_events = [e for e in first if e["event"] == "checkpoint"]
    assert checkpoint_events[-1]["uri"] == f"s3://{BUCKET}/runs/s3-resume/checkpoints/checkpoint-{stop_step}"

    # A new pod: nothing staged locally, so the checkpoint can only come from the bucket.
    monkeypatch.setenv("KUBETUNE_CACHE_ROOT", str(tmp_path / "pod-2"))
    run = run_in_process(pvc, config)
    assert run.code == 0, run.stdout
    assert run.of("checkpoint-downloaded")[0]["step"] == stop_step
    assert run.of("resume")[0]["step"] == stop_step
    progress = run.of("progress")
    assert progress[0]["step"] == stop_step + 1  # continued, not from 0
    assert progress[-1]["step"] == MAX_STEPS
    (adapter,) = run.of("adapter")
    assert adapter["uri"] == f"s3://{BUCKET}/runs/s3-resume/adapter" and adapter["metrics"]["global_step"] == MAX_STEPS

    client = bucket.client()
    prefix = "runs/s3-resume/adapter/"
    names = {k.removeprefix(prefix) for k in bucket.keys(BUCKET, prefix)}
    assert {"adapter_config.json", "adapter_model.safetensors", "kubetune.json"} <= names
    meta = json.loads(client.get_object(Bucket=BUCKET, Key=prefix + "kubetune.json")["Body"].read())
    weights = client.get_object(Bucket=BUCKET, Key=prefix + "adapter_model.safetensors")["Body"].read()
    assert meta["sha256"] == hashlib.sha256(weights).hexdigest() == adapter["sha256"]
    assert meta["baseModel"]["uri"] == f"s3://{BUCKET}/models/tiny" and meta["metrics"]["global_step"] == MAX_STEPS
    complete, _ = checkpoint_index(
        [k.removeprefix("runs/s3-resume/checkpoints/") for k in bucket.keys(BUCKET, "runs/s3-resume/checkpoints/")]
    )
    assert complete[-1] == MAX_STEPS and len(complete) == 2
    assert all(f"runs/s3-resume/checkpoints/checkpoint-{s}/{MARKER}" in bucket.keys(BUCKET, "runs/") for s in complete)
