"""The adapter fetcher beside vLLM (`kubetune fetcher`) and the operator's client of it, over real HTTP, with a real
S3 API (moto's server) behind it."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest

from kubetune.adapters import Adapter
from kubetune.adapters import http as client
from kubetune.server import fetcher
from kubetune.storage import Access
from tests import s3server

pytest.importorskip("moto", reason="needs moto's server: the dev extra")

CONFIG = {"base_model_name_or_path": "Qwen/Qwen2.5-7B", "r": 8, "target_modules": ["q_proj", "v_proj"]}


@pytest.fixture(scope="module")
def bucket(tmp_path_factory: pytest.TempPathFactory) -> Iterator[s3server.S3Server]:
    with s3server.running(tmp_path_factory.mktemp("moto") / "moto.log") as server:
        c = server.client()
        c.create_bucket(Bucket="adapters")
        c.put_object(Bucket="adapters", Key="a/adapter_config.json", Body=json.dumps(CONFIG).encode())
        c.put_object(Bucket="adapters", Key="a/adapter_model.safetensors", Body=b"weights")
        c.put_object(Bucket="adapters", Key="a/kubetune.json", Body=b'{"baseModel": {"uri": "hf://Qwen/Qwen2.5-7B"}}')
        yield server


@pytest.fixture
def address(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The fetcher's HTTP server on a free port, with its pod's folders under tmp_path."""
    monkeypatch.setenv("KUBETUNE_PVC_ROOT", str(tmp_path / "pvc"))
    monkeypatch.setenv("KUBETUNE_CACHE_ROOT", str(tmp_path / "cache"))
    monkeypatch.setenv("KUBETUNE_S3_SECRETS_ROOT", str(tmp_path / "secrets"))
    s3server.secret_dir(tmp_path / "secrets", "creds")
    server = ThreadingHTTPServer(("127.0.0.1", 0), fetcher.Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_s3_adapter_is_downloaded_where_vllm_will_look(bucket: s3server.S3Server, address: str, tmp_path: Path) -> None:
    adapter = Adapter("a", "s3://adapters/a", "uri", s3=Access("creds", bucket.endpoint))
    answer = client.prepare(address, adapter)
    assert answer.status == 200, answer
    assert answer.adapter_config == CONFIG and answer.metadata == {"baseModel": {"uri": "hf://Qwen/Qwen2.5-7B"}}
    local = Path(adapter.path)  # what the operator will pass vLLM as lora_path
    assert local == tmp_path / "cache" / "s3" / "adapters" / "a"
    assert (local / "adapter_model.safetensors").read_bytes() == b"weights"
    # Fetched afresh each time: a replaced adapter is what the next load reads.
    bucket.client().put_object(Bucket="adapters", Key="a/adapter_model.safetensors", Body=b"new weights")
    assert client.prepare(address, adapter).status == 200
    assert (local / "adapter_model.safetensors").read_bytes() == b"new weights"


def test_missing_and_unreachable_s3_adapters(bucket: s3server.S3Server, address: str) -> None:
    missing = client.prepare(address, Adapter("m", "s3://adapters/none", "uri", s3=Access("creds", bucket.endpoint)))
    assert (missing.status, missing.reason) == (404, "AdapterNotFound")
    no_secret = client.prepare(address, Adapter("m", "s3://adapters/a", "uri", s3=Access("absent", bucket.endpoint)))
    assert (no_secret.status, no_secret.reason) == (502, "AdapterFetchFailed") and "absent" in no_secret.message
    down = client.prepare(address, Adapter("m", "s3://adapters/a", "uri", s3=Access("creds", "http://127.0.0.1:9")))
    assert (down.status, down.reason) == (502, "AdapterFetchFailed")


def test_pvc_adapter_is_read_in_place(address: str, tmp_path: Path) -> None:
    folder = tmp_path / "pvc" / "adapters" / "x" / "adapter"
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps(CONFIG))
    answer = client.prepare(address, Adapter("x", "pvc://adapters/x/adapter", "uri"))
    assert (answer.status, answer.adapter_config, answer.metadata) == (200, CONFIG, None)
    gone = client.prepare(address, Adapter("y", "pvc://adapters/y/adapter", "uri"))
    assert (gone.status, gone.reason) == (404, "AdapterNotFound")


def test_no_fetcher_is_no_answer() -> None:
    answer = client.prepare("127.0.0.1:9", Adapter("x", "pvc://adapters/x", "uri"), timeout=2)
    assert answer.status == 0 and "127.0.0.1:9" in answer.message
