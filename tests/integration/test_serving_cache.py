"""ModelServers and the model cache on the node agent: vLLM (on CPU) reads an s3:// or hf:// base model from the
cache claim that FineTuneJobs' prepare steps fill, and a server on a model not cached yet fills it once.

The models are in a real S3 API (moto's server, whose request log counts downloads); the namespace has the cache
claim of the tests' operator configuration (`kubetune-cache`, about 1 KB and no idle time: every prepare step
evicts what nothing uses). The tests run in order and build on each other.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from tests import hub as local_hub
from tests import s3server
from tests.integration import serving
from tests.integration.support import (
    NEEDS_ROOT,
    NEEDS_SERVER,
    NEEDS_TRAINER,
    AgentProcess,
    Api,
    OperatorProcess,
    cpu_agent,
    dump,
    wait_for,
)
from tests.integration.training import events_of, pod_logs, training_job, wait_done, wait_prepared

from kubetune.dev.controlplane import Cluster
from kubetune.render.modelserver import MODEL_LINK
from kubetune.storage import cached_model_dir, model_entry_key

pytestmark = [pytest.mark.server, NEEDS_ROOT, NEEDS_TRAINER, NEEDS_SERVER]

BUCKET = "served"
SECRET = "s3-models"
CACHE_CLAIM = "kubetune-cache"
MARKER = "kubetune-entry.json"


@dataclass
class Scene:
    ns: str
    root: Path
    """The agent's folder of this namespace's claims."""
    agent: AgentProcess
    bucket: s3server.S3Server
    moto_log: Path

    def s3(self, key: str) -> dict[str, Any]:
        return {"uri": f"s3://{BUCKET}/{key}", "s3": {"secretName": SECRET, "endpoint": self.bucket.endpoint}}

    def object_gets(self, prefix: str = "") -> list[str]:
        """The object downloads moto answered so far (GET of a key, not a listing), under `prefix`."""
        lines = self.moto_log.read_text(errors="replace").splitlines()
        keys = [m.group(1) for line in lines if (m := re.search(rf'"GET /{BUCKET}/([^ ?]+) HTTP', line))]
        return [k for k in keys if k.startswith(prefix)]

    def entry(self, model: str) -> Path:
        return self.root / CACHE_CLAIM / "entries" / model_entry_key(f"s3://{BUCKET}/{model}")


@pytest.fixture(scope="module")
def agent(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    yield from cpu_agent(cluster, tmp_path_factory.mktemp("serving-cache-agent"), "serving-cache")


@pytest.fixture(scope="module")
def scene(
    api: Api, operator: OperatorProcess, agent: AgentProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Scene]:
    moto_log = tmp_path_factory.mktemp("moto") / "moto.log"
    with s3server.running(moto_log) as bucket:
        client = bucket.client()
        client.create_bucket(Bucket=BUCKET)
        ns = api.create_namespace()
        for claim in ("adapters", CACHE_CLAIM):
            api.create_bound_pvc(ns, claim)
        model = serving.build_model(tmp_path_factory.mktemp("assets"))
        for prefix in ("models/tiny", "models/other", "models/third"):
            bucket.upload_folder(BUCKET, model, prefix)
        records = serving.sft_records()
        client.put_object(Bucket=BUCKET, Key="data/sft.jsonl", Body="".join(f"{json.dumps(r)}\n" for r in records))
        keys = [f"--from-literal={k}={v}" for k, v in (("AWS_ACCESS_KEY_ID", "t"), ("AWS_SECRET_ACCESS_KEY", "t"))]
        api.kubectl("create", "secret", "generic", SECRET, "-n", ns, *keys)
        try:
            yield Scene(ns, agent.state_dir / "pvc" / ns, agent, bucket, moto_log)
        finally:
            api.remove_namespace(ns, "modelservers,finetunejobs,jobs,pods", timeout=120)


def server_pods(api: Api, ns: str, server: str) -> list[dict[str, Any]]:
    pods = api.children("Pod", ns, "kubetune.io/modelserver", server)
    return [p for p in pods if p["metadata"]["labels"].get("app.kubernetes.io/component") == "server"]


def fetched(api: Api, ns: str, server: str, but: str = "") -> list[dict[str, Any]] | None:
    """The server's pods (other than the one of UID `but`) whose model init container exited 0; None: none yet."""

    def done(pod: dict[str, Any]) -> bool:
        statuses = pod.get("status", {}).get("initContainerStatuses") or []
        return any((s.get("state", {}).get("terminated") or {}).get("exitCode") == 0 for s in statuses)

    return [p for p in server_pods(api, ns, server) if done(p) and p["metadata"]["uid"] != but] or None


def test_a_server_on_a_prepared_model_downloads_nothing_and_vllm_reads_the_cache(api: Api, scene: Scene) -> None:
    data = scene.s3("data/sft.jsonl")
    api.apply(training_job("first", scene.ns, steps=2, every=2, baseModel=scene.s3("models/tiny"), dataset=data))
    status = wait_done(api, scene.ns, "first", timeout=300)
    entry = cached_model_dir(f"s3://{BUCKET}/models/tiny")
    assert status["dataset"]["modelCache"] == entry, dump(status)
    before = scene.object_gets()
    assert "models/tiny/model.safetensors" in before, before  # the prepare step downloaded it, once

    api.apply(serving.model_server("cached", scene.ns, baseModel=scene.s3("models/tiny")))
    (address,) = wait_for(
        lambda: serving.replica_addresses(api, scene.ns, "cached") or None, 600, "the server to be Ready", interval=1
    )
    # Not one object downloaded for the server's start: the init container found the prepare step's entry.
    assert scene.object_gets() == before, scene.object_gets()[len(before) :]
    (pod,) = server_pods(api, scene.ns, "cached")
    assert "the cache has it" in pod_logs(scene.agent, scene.ns, pod["metadata"]["name"])
    # vLLM was started on the entry and reads it through a read-only mount.
    vllm = next(c for c in pod["spec"]["containers"] if c["name"] == "vllm")
    assert vllm["args"][:2] == ["--model", entry], vllm["args"]
    shared = [m for m in vllm["volumeMounts"] if m["mountPath"] == "/var/cache/kubetune-shared"]
    assert [m.get("readOnly") for m in shared] == [True], vllm["volumeMounts"]
    (card,) = [m for m in serving.models(address) if m["id"] == "cached"]
    assert card["root"] == entry, card
    code, body = serving.chat(address, "cached")
    assert code == 200 and body["choices"][0]["message"]["content"], body


def test_a_server_on_a_model_not_cached_yet_fills_the_cache_once(api: Api, scene: Scene) -> None:
    assert not scene.entry("models/other").exists()
    files = sorted({k for k in scene.bucket.keys(BUCKET, "models/other/")})
    api.apply(serving.model_server("fresh", scene.ns, baseModel=scene.s3("models/other")))
    (pod,) = wait_for(lambda: fetched(api, scene.ns, "fresh"), 300, "the model fetched")
    # Each object once, into the entry a FineTuneJob on this model would use, marker and all.
    assert sorted(scene.object_gets("models/other/")) == files, scene.object_gets("models/other/")
    assert (scene.entry("models/other") / MARKER).is_file()
    assert not list((scene.root / CACHE_CLAIM / "staging").iterdir())
    # A new pod (a restart, a rollout, another replica) downloads nothing.
    api.kube.delete("Pod", scene.ns, pod["metadata"]["name"])
    wait_for(lambda: fetched(api, scene.ns, "fresh", pod["metadata"]["uid"]), 300, "a new pod's model fetched")
    assert sorted(scene.object_gets("models/other/")) == files, scene.object_gets("models/other/")


def test_a_prepare_step_makes_room_before_its_download_but_never_takes_a_served_model(api: Api, scene: Scene) -> None:
    # The cache (about 1 KB) holds the models of both servers and the finished job's dataset. A job on a third model
    # (suspended: only its prepare step runs) must evict before its download, but only what nothing uses.
    finished = Path(api.status("FineTuneJob", scene.ns, "first")["dataset"]["cache"]).name
    entries = scene.root / CACHE_CLAIM / "entries"
    assert (entries / finished).is_dir()
    data = scene.s3("data/sft.jsonl")
    spec = training_job("third", scene.ns, steps=2, every=2, baseModel=scene.s3("models/third"), dataset=data)
    api.apply({**spec, "spec": {**spec["spec"], "suspend": True}})
    status = wait_prepared(api, scene.ns, "third", timeout=240)
    assert status["state"] == "Suspended", dump(status)
    assert status["dataset"]["modelCache"] == cached_model_dir(f"s3://{BUCKET}/models/third"), dump(status)
    (prepare_pod,) = api.kube.list("Pod", scene.ns, "kubetune.io/prepare=third")
    events = events_of(pod_logs(scene.agent, scene.ns, prepare_pod["metadata"]["name"]))
    evicted = [e for e in events if e["event"] == "cache-evicted"]
    # Evicted for the incoming model, before it was downloaded (the download's size is known from the listing).
    assert any(e["key"] == finished and e["incoming"] > 0 for e in evicted), evicted
    assert not (entries / finished).exists()
    # The served models stay, although the cache is far above its limit.
    assert (scene.entry("models/tiny") / MARKER).is_file() and (scene.entry("models/other") / MARKER).is_file()
    assert {scene.entry("models/tiny").name, scene.entry("models/other").name}.isdisjoint(e["key"] for e in evicted)


HUB_MODEL = "kt/tiny"


def test_an_hf_server_reads_the_entry_a_prepare_step_filled_for_the_commit_its_branch_names(
    api: Api, scene: Scene, tmp_path: Path
) -> None:
    from kubetune import s3

    # The earlier servers have made their point: their vLLMs would only slow this one's start on two cores.
    api.kubectl("delete", "modelservers", "cached", "fresh", "-n", scene.ns, "--wait=true", check=False)
    model = s3.download(scene.bucket.client(), f"s3://{BUCKET}/models/tiny", tmp_path / "tiny")
    with local_hub.running() as (hub, server):
        commit = hub.push("model", HUB_MODEL, model)
        env = [{"name": "HF_ENDPOINT", "value": server.endpoint}]
        uri = f"hf://{HUB_MODEL}@main"
        data = scene.s3("data/sft.jsonl")
        spec = training_job("hubjob", scene.ns, steps=2, every=2, baseModel={"uri": uri}, dataset=data, env=env)
        api.apply({**spec, "spec": {**spec["spec"], "suspend": True}})  # its prepare step fills the entry
        status = wait_prepared(api, scene.ns, "hubjob", timeout=240)
        entry = f"/var/cache/kubetune-shared/entries/{model_entry_key(uri, commit)}/model"
        assert status["dataset"]["modelCache"] == entry, dump(status)
        before = hub.downloads(HUB_MODEL)
        assert before, hub.requests  # the prepare step downloaded the commit's files

        api.apply(serving.model_server("hub", scene.ns, baseModel={"uri": uri}, env=env))
        (address,) = wait_for(
            lambda: serving.replica_addresses(api, scene.ns, "hub") or None, 600, "the server to be Ready", interval=1
        )
        # The pod asked the Hub which commit main names, found that commit's entry, and downloaded no file.
        assert hub.downloads(HUB_MODEL) == before, hub.downloads(HUB_MODEL)[len(before) :]
        (pod,) = server_pods(api, scene.ns, "hub")
        logs = pod_logs(scene.agent, scene.ns, pod["metadata"]["name"])
        assert f"the revision names commit {commit}" in logs and "the cache has it" in logs, logs[-2000:]
        vllm = next(c for c in pod["spec"]["containers"] if c["name"] == "vllm")
        assert vllm["args"][:2] == ["--model", MODEL_LINK], vllm["args"]
        code, body = serving.chat(address, "hub")
        assert code == 200 and body["choices"][0]["message"]["content"], body
