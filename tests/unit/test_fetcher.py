"""The adapter fetcher beside vLLM (`kubetune fetcher`) and the operator's client of it, over real HTTP, with a real
S3 API (moto's server) behind it, and a stand-in for vLLM that records what reaches it."""

from __future__ import annotations

import contextlib
import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from kubetune.adapters import Action, Adapter, Replica
from kubetune.adapters import http as client
from kubetune.server import fetcher
from kubetune.signing import Signer, Verifier
from kubetune.storage import Access
from tests import s3server

pytest.importorskip("moto", reason="needs moto's server: the dev extra")

CONFIG = {"base_model_name_or_path": "Qwen/Qwen2.5-7B", "r": 8, "target_modules": ["q_proj", "v_proj"]}
OPERATOR = Signer.generate()
POD = "srv-a"
API_KEY = "canary-key-2b7e"


@pytest.fixture(scope="module")
def bucket(tmp_path_factory: pytest.TempPathFactory) -> Iterator[s3server.S3Server]:
    with s3server.running(tmp_path_factory.mktemp("moto") / "moto.log") as server:
        c = server.client()
        c.create_bucket(Bucket="adapters")
        c.put_object(Bucket="adapters", Key="a/adapter_config.json", Body=json.dumps(CONFIG).encode())
        c.put_object(Bucket="adapters", Key="a/adapter_model.safetensors", Body=b"weights")
        c.put_object(Bucket="adapters", Key="a/kubetune.json", Body=b'{"baseModel": {"uri": "hf://Qwen/Qwen2.5-7B"}}')
        yield server


@contextlib.contextmanager
def serving(server: ThreadingHTTPServer) -> Iterator[str]:
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


class FakeVllm(BaseHTTPRequestHandler):
    """Answers /v1 routes like vLLM with an API key: 401 without it; records what reached it."""

    seen: list[tuple[str, str, str]] = []

    def _answer(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode()
        FakeVllm.seen.append((self.command, self.path, body))
        ok = self.headers.get("Authorization") == f"Bearer {API_KEY}"
        data = b'{"object": "list", "data": []}' if ok else b'{"error": "Unauthorized"}'
        self.send_response(200 if ok else 401)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = _answer

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def vllm() -> Iterator[str]:
    FakeVllm.seen = []
    with serving(ThreadingHTTPServer(("127.0.0.1", 0), FakeVllm)) as address:
        yield address


@pytest.fixture
def address(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, vllm: str) -> Iterator[str]:
    """The fetcher's HTTP server on a free port, with its pod's folders under tmp_path, answering the operator's
    requests for pod POD and forwarding vLLM's routes with the API key."""
    monkeypatch.setenv("KUBETUNE_PVC_ROOT", str(tmp_path / "pvc"))
    monkeypatch.setenv("KUBETUNE_CACHE_ROOT", str(tmp_path / "cache"))
    monkeypatch.setenv("KUBETUNE_S3_SECRETS_ROOT", str(tmp_path / "secrets"))
    s3server.secret_dir(tmp_path / "secrets", "creds")
    verifier = Verifier.from_text(OPERATOR.public_key, POD)
    with serving(fetcher.FetcherServer(("127.0.0.1", 0), verifier, fetcher.Vllm(vllm, API_KEY))) as address:
        yield address


def replica(address: str, pod: str = POD) -> Replica:
    return Replica(pod, address)


def test_s3_adapter_is_downloaded_where_vllm_will_look(bucket: s3server.S3Server, address: str, tmp_path: Path) -> None:
    adapter = Adapter("a", "s3://adapters/a", "uri", s3=Access("creds", bucket.endpoint))
    answer = client.prepare(replica(address), adapter, OPERATOR)
    assert answer.status == 200, answer
    assert answer.adapter_config == CONFIG and answer.metadata == {"baseModel": {"uri": "hf://Qwen/Qwen2.5-7B"}}
    local = Path(adapter.path)  # what the operator will pass vLLM as lora_path
    assert local == tmp_path / "cache" / "s3" / "adapters" / "a"
    assert (local / "adapter_model.safetensors").read_bytes() == b"weights"
    # Fetched afresh each time: a replaced adapter is what the next load reads.
    bucket.client().put_object(Bucket="adapters", Key="a/adapter_model.safetensors", Body=b"new weights")
    assert client.prepare(replica(address), adapter, OPERATOR).status == 200
    assert (local / "adapter_model.safetensors").read_bytes() == b"new weights"


def test_missing_and_unreachable_s3_adapters(bucket: s3server.S3Server, address: str) -> None:
    def prepare(adapter: Adapter) -> client.Prepared:
        return client.prepare(replica(address), adapter, OPERATOR)

    missing = prepare(Adapter("m", "s3://adapters/none", "uri", s3=Access("creds", bucket.endpoint)))
    assert (missing.status, missing.reason) == (404, "AdapterNotFound")
    no_secret = prepare(Adapter("m", "s3://adapters/a", "uri", s3=Access("absent", bucket.endpoint)))
    assert (no_secret.status, no_secret.reason) == (502, "AdapterFetchFailed") and "absent" in no_secret.message
    down = prepare(Adapter("m", "s3://adapters/a", "uri", s3=Access("creds", "http://127.0.0.1:9")))
    assert (down.status, down.reason) == (502, "AdapterFetchFailed")


def test_pvc_adapter_is_read_in_place(address: str, tmp_path: Path) -> None:
    folder = tmp_path / "pvc" / "adapters" / "x" / "adapter"
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps(CONFIG))
    answer = client.prepare(replica(address), Adapter("x", "pvc://adapters/x/adapter", "uri"), OPERATOR)
    assert (answer.status, answer.adapter_config, answer.metadata) == (200, CONFIG, None)
    gone = client.prepare(replica(address), Adapter("y", "pvc://adapters/y/adapter", "uri"), OPERATOR)
    assert (gone.status, gone.reason) == (404, "AdapterNotFound")


def test_no_fetcher_is_no_answer() -> None:
    answer = client.prepare(replica("127.0.0.1:9"), Adapter("x", "pvc://adapters/x", "uri"), OPERATOR, timeout=2)
    assert answer.status == 0 and "127.0.0.1:9" in answer.message


def test_vllms_routes_reach_vllm_with_the_api_key_the_operator_never_holds(address: str) -> None:
    report = client.report(replica(address), OPERATOR)
    assert report.loaded == {} and report.error == ""
    outcome = client.perform(Action(replica(address), "load", "a", "/mnt/pvc/adapters/a"), OPERATOR)
    assert outcome.ok, outcome
    assert FakeVllm.seen == [
        ("GET", "/v1/models", ""),
        ("POST", "/v1/load_lora_adapter", '{"lora_name": "a", "lora_path": "/mnt/pvc/adapters/a"}'),
    ]


def unsigned(address: str, method: str, path: str, body: bytes | None = None) -> int:
    request = urllib.request.Request(f"http://{address}{path}", data=body, method=method)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as err:
        return err.code


def test_nobody_but_the_operator_gets_an_answer(address: str) -> None:
    # Unsigned, signed by another key, or signed for another pod: refused before vLLM or the storage is touched.
    assert unsigned(address, "GET", "/v1/models") == 401
    assert unsigned(address, "POST", "/v1/load_lora_adapter", b'{"lora_name": "x", "lora_path": "/x"}') == 401
    assert unsigned(address, "POST", "/prepare", b'{"uri": "pvc://adapters/x"}') == 401
    assert client.report(replica(address), Signer.generate()).loaded is None
    assert client.report(replica(address, pod="srv-b"), OPERATOR).loaded is None
    assert FakeVllm.seen == []
    assert unsigned(address, "GET", "/health") == 200  # the kubelet's probe


def test_an_s3_base_model_comes_from_the_cache_entry_the_prepare_step_fills(
    bucket: s3server.S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kubetune.storage import cached_model_dir
    from kubetune.trainer.cache import MARKER, Cache, entry_key

    monkeypatch.setenv("KUBETUNE_S3_SECRETS_ROOT", str(tmp_path / "secrets"))
    s3server.secret_dir(tmp_path / "secrets", "creds")
    access = Access("creds", bucket.endpoint)
    root = tmp_path / "shared"
    # An entry a FineTuneJob's prepare step made (its key: URI and revision): used as it is, nothing downloaded.
    Cache(root).fill(entry_key("s3://adapters/a", None), lambda f: (f / "model").mkdir(), {"uri": "s3://adapters/a"})
    path = fetcher.download_model("s3://adapters/a", access, root)
    assert str(path) == cached_model_dir("s3://adapters/a").replace("/var/cache/kubetune-shared", str(root))
    assert list(path.iterdir()) == []  # the prepare step's (empty) folder, not a download
    # A model not cached yet is downloaded into its entry once, marker last; then the object may go.
    bucket.client().put_object(Bucket="adapters", Key="m/config.json", Body=b"{}")
    filled = fetcher.download_model("s3://adapters/m", access, root)
    assert (filled / "config.json").read_bytes() == b"{}" and (filled.parent / MARKER).is_file()
    bucket.client().delete_object(Bucket="adapters", Key="m/config.json")
    assert fetcher.download_model("s3://adapters/m", access, root) == filled
    assert not list((root / "staging").iterdir())


def test_an_hf_base_model_is_linked_to_the_cache_entry_of_the_commit_its_revision_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("huggingface_hub")
    from kubetune.storage import model_entry_key
    from kubetune.trainer.cache import MARKER
    from tests import hub as local_hub

    root, link = tmp_path / "shared", tmp_path / "link" / "model"
    with local_hub.running() as (hub, server):
        local_hub.point_client_at(monkeypatch, server.endpoint)
        first = hub.push("model", "org/m", {"config.json": '{"v": 1}'})
        # Filled into the entry a prepare step gives that commit (storage.model_entry_key), and linked.
        path = fetcher.download_model("hf://org/m@main", Access(), root, link)
        assert path == root / "entries" / model_entry_key("hf://org/m", first) / "model"
        assert (path.parent / MARKER).is_file() and (link / "config.json").read_text() == '{"v": 1}'
        assert link.resolve() == path.resolve()
        # A restarted pod (the link is there) on the same commit downloads nothing.
        served = len(hub.downloads("org/m"))
        assert fetcher.download_model("hf://org/m@main", Access(), root, link) == path
        assert len(hub.downloads("org/m")) == served
        # The branch moved: the new commit's entry, and the link follows it.
        moved = hub.push("model", "org/m", {"config.json": '{"v": 2}'})
        again = fetcher.download_model("hf://org/m@main", Access(), root, link)
        assert again.parent.name == model_entry_key("hf://org/m", moved) and path.is_dir()
        assert (link / "config.json").read_text() == '{"v": 2}'
        # Without a cache (or a link), vLLM downloads an hf:// model itself: the fetcher refuses to.
        with pytest.raises(ValueError, match="only into the cache"):
            fetcher.download_model("hf://org/m", Access(), None, link)
