"""Inputs fetched through outages: transient failures are retried in the pod and then exit retryable (1), a
definite not-found or access-denied fails at once (3). Real servers: moto's S3 API behind a proxy that fails the
first connections (tests/faultproxy.py), and huggingface_hub talking to a local endpoint that answers errors."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune import s3
from kubetune.trainer.errors import TrainerFailure
from kubetune.trainer.inputs import dataset_path, init_adapter_path, model_path
from kubetune.trainer.main import main
from kubetune.trainer.retries import RetryPolicy, is_transient
from tests import faultproxy, s3server
from tests.faultproxy import FaultProxy

pytest.importorskip("boto3", reason="needs boto3: hack/setup.sh trainer")
pytest.importorskip("moto", reason="needs moto's server: the dev extra")

BUCKET = "inputs"
DATA = b'{"prompt": "Capital of Peru?", "response": "Lima."}\n'
ALWAYS = 10**6


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[s3server.S3Server]:
    with s3server.running(tmp_path_factory.mktemp("moto") / "moto.log") as server:
        client = server.client()
        client.create_bucket(Bucket=BUCKET)
        client.put_object(Bucket=BUCKET, Key="data/train.jsonl", Body=DATA)
        client.put_object(Bucket=BUCKET, Key="models/m/config.json", Body=b"{}")
        yield server


@pytest.fixture(autouse=True)
def pod(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A pod's environment: cache and secrets in tmp_path, quick retries, and botocore not retrying by itself
    (so that each attempt here is one request through the proxy)."""
    monkeypatch.setenv("KUBETUNE_CACHE_ROOT", str(tmp_path / "cache"))
    monkeypatch.setenv("KUBETUNE_S3_SECRETS_ROOT", str(tmp_path / "secrets"))
    monkeypatch.setenv("KUBETUNE_FETCH_ATTEMPTS", "3")
    monkeypatch.setenv("KUBETUNE_FETCH_RETRY_DELAY_SECONDS", "0")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    s3server.secret_dir(tmp_path / "secrets", "creds")


def via(proxy: FaultProxy) -> s3.Access:
    return s3.Access(secret_name="creds", endpoint=proxy.endpoint)


def retries_logged(capsys: pytest.CaptureFixture[str]) -> list[dict[str, Any]]:
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    return [e for e in events if e["event"] == "fetch-retry"]


# --- s3:// ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [503, 500, None], ids=["503", "500", "dropped"])
def test_s3_transient_failures_are_retried_then_succeed(
    moto: s3server.S3Server, status: int | None, capsys: pytest.CaptureFixture[str]
) -> None:
    with faultproxy.running(FaultProxy(faultproxy.target_of(moto.endpoint), 2, status)) as proxy:
        path = dataset_path(f"s3://{BUCKET}/data/train.jsonl", via(proxy))
    assert path.read_bytes() == DATA
    assert proxy.answered == 2 and proxy.forwarded >= 1
    retries = retries_logged(capsys)
    assert [(r["attempt"], r["attempts"]) for r in retries] == [(1, 3), (2, 3)]
    assert retries[0]["what"] == f"dataset s3://{BUCKET}/data/train.jsonl"


def test_s3_outage_that_outlasts_the_retries_exits_retryable(
    moto: s3server.S3Server, capsys: pytest.CaptureFixture[str]
) -> None:
    proxy = FaultProxy(faultproxy.target_of(moto.endpoint), ALWAYS, 503)
    with faultproxy.running(proxy), pytest.raises(TrainerFailure) as failure:
        model_path(f"s3://{BUCKET}/models/m", access=via(proxy))
    assert proxy.answered == 3
    assert (failure.value.reason, failure.value.retryable, failure.value.exit_code) == ("ModelUnavailable", True, 1)
    assert failure.value.message.startswith(
        f"cannot fetch base model s3://{BUCKET}/models/m, still failing after 3 attempt(s) over 0s: listing"
    )
    assert "(503)" in failure.value.message and failure.value.message.endswith("(backoffLimit)")
    assert len(retries_logged(capsys)) == 2


def test_s3_not_found_fails_at_once(moto: s3server.S3Server, capsys: pytest.CaptureFixture[str]) -> None:
    with faultproxy.running(FaultProxy(faultproxy.target_of(moto.endpoint), 0)) as proxy:
        with pytest.raises(TrainerFailure) as missing_key:
            model_path(f"s3://{BUCKET}/models/absent", access=via(proxy))
        with pytest.raises(TrainerFailure) as missing_bucket:
            dataset_path("s3://no-such-bucket/train.jsonl", via(proxy))
    assert (missing_key.value.reason, missing_key.value.exit_code) == ("ModelNotFound", 3)
    assert (missing_bucket.value.reason, missing_bucket.value.exit_code) == ("DatasetInvalid", 3)
    assert "NoSuchBucket" in missing_bucket.value.message
    assert proxy.forwarded == 2 and retries_logged(capsys) == []


def test_s3_access_denied_fails_at_once(capsys: pytest.CaptureFixture[str]) -> None:
    denied = FaultProxy(None, ALWAYS, 403, faultproxy.S3_ACCESS_DENIED, {"Content-Type": "application/xml"})
    with faultproxy.running(denied) as proxy, pytest.raises(TrainerFailure) as failure:
        init_adapter_path(f"s3://{BUCKET}/runs/sft/adapter", via(proxy))
    assert (failure.value.reason, failure.value.exit_code) == ("InitAdapterNotFound", 3)
    assert "AccessDenied" in failure.value.message
    assert proxy.answered == 1 and retries_logged(capsys) == []


def test_the_trainer_exits_1_with_a_termination_message(
    moto: s3server.S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    log = tmp_path / "termination-log"
    monkeypatch.setenv("KUBETUNE_TERMINATION_LOG", str(log))
    monkeypatch.setenv("KUBETUNE_PVC_ROOT", str(tmp_path / "pvc"))
    with faultproxy.running(FaultProxy(faultproxy.target_of(moto.endpoint), ALWAYS, 503)) as proxy:
        s3_block = {"secretName": "creds", "endpoint": proxy.endpoint}
        config = {
            "job": {"name": "outage", "namespace": "default"},
            "spec": {
                "baseModel": {"uri": f"s3://{BUCKET}/models/m", "s3": s3_block},
                "dataset": {"uri": f"s3://{BUCKET}/data/train.jsonl", "s3": s3_block},
                "output": {"uri": "pvc://out/outage"},
            },
            "plan": {},
        }
        path = tmp_path / "trainer.yaml"
        path.write_text(yaml.safe_dump(config))
        assert main(["--config", str(path)]) == 1
    termination = json.loads(log.read_text())
    assert termination["reason"] == "ModelUnavailable"
    assert "still failing after 3 attempt(s)" in termination["message"]
    failed = [json.loads(line) for line in capsys.readouterr().out.splitlines() if '"failed"' in line]
    assert failed[0]["retryable"] is True


def test_s3_unreachable_endpoint_is_transient(tmp_path: Path) -> None:
    closed = FaultProxy(None, 0)  # bound, then closed: nothing listens on its port
    closed.server_close()
    with pytest.raises(TrainerFailure) as failure:
        dataset_path(f"s3://{BUCKET}/data/train.jsonl", via(closed))
    assert (failure.value.reason, failure.value.exit_code) == ("DatasetUnavailable", 1)
    assert "Could not connect to the endpoint URL" in failure.value.message


# --- hf:// ------------------------------------------------------------------------------------------------


def repo_lookups(proxy: FaultProxy) -> list[str]:
    """The requests for the repository's revision (huggingface_hub also asks the endpoint other things once)."""
    return [r for r in proxy.failed_requests if "/revision/" in r]


@pytest.mark.parametrize("status", [503, 502, 429, None], ids=["503", "502", "429", "dropped"])
def test_hub_outage_is_retried_then_exits_retryable(
    status: int | None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    constants = pytest.importorskip("huggingface_hub.constants")
    with faultproxy.running(FaultProxy(None, ALWAYS, status)) as proxy:
        monkeypatch.setattr(constants, "ENDPOINT", proxy.endpoint)
        with pytest.raises(TrainerFailure) as failure:
            model_path("hf://Qwen/Qwen2.5-7B")
    assert (failure.value.reason, failure.value.exit_code) == ("ModelUnavailable", 1)
    assert repo_lookups(proxy) == ["GET /api/models/Qwen/Qwen2.5-7B/revision/main HTTP/1.1"] * 3
    assert len(retries_logged(capsys)) == 2


@pytest.mark.parametrize(
    ("status", "headers", "error"),
    [
        (404, {}, "404"),
        (404, {"X-Error-Code": "RepoNotFound"}, "Repository Not Found"),
        (403, {"X-Error-Code": "GatedRepo"}, "gated repo"),
        (401, {}, "401"),
        (403, {}, "403"),
    ],
    ids=["404", "repo-not-found", "gated", "401", "403"],
)
def test_hub_not_found_or_denied_fails_at_once(
    status: int, headers: dict[str, str], error: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    constants = pytest.importorskip("huggingface_hub.constants")
    with faultproxy.running(FaultProxy(None, ALWAYS, status, headers=headers)) as proxy:
        monkeypatch.setattr(constants, "ENDPOINT", proxy.endpoint)
        with pytest.raises(TrainerFailure) as failure:
            dataset_path("hf://org/data/train.jsonl")
    assert (failure.value.reason, failure.value.exit_code) == ("DatasetInvalid", 3)
    assert error in failure.value.message
    assert repo_lookups(proxy) == ["GET /api/datasets/org/data/revision/main HTTP/1.1"]


# --- the policy ---------------------------------------------------------------------------------------------


def test_retry_policy_from_the_environment() -> None:
    assert RetryPolicy.from_env({}) == RetryPolicy(attempts=6, first_delay=5.0, max_delay=60.0)
    policy = RetryPolicy.from_env({"KUBETUNE_FETCH_ATTEMPTS": "4", "KUBETUNE_FETCH_RETRY_DELAY_SECONDS": "2"})
    assert [policy.delay(n) for n in (1, 2, 3)] == [2.0, 4.0, 8.0]
    assert [RetryPolicy().delay(n) for n in range(1, 7)] == [5.0, 10.0, 20.0, 40.0, 60.0, 60.0]
    with pytest.raises(TrainerFailure, match="KUBETUNE_FETCH_ATTEMPTS must be a whole number of at least 1, got '0'"):
        RetryPolicy.from_env({"KUBETUNE_FETCH_ATTEMPTS": "0"})
    with pytest.raises(TrainerFailure, match="KUBETUNE_FETCH_MAX_DELAY_SECONDS must be a number of seconds"):
        RetryPolicy.from_env({"KUBETUNE_FETCH_MAX_DELAY_SECONDS": "soon"})


def test_errors_without_a_network_cause_are_permanent() -> None:
    assert not is_transient(ValueError("not a URI: 'x'"))
    assert not is_transient(s3.S3Error("nothing at s3://b/k", not_found=True))
    assert is_transient(TimeoutError("timed out"))
    wrapped = s3.S3Error("listing s3://b/k: timed out")
    wrapped.__cause__ = ConnectionResetError()
    assert is_transient(wrapped)
