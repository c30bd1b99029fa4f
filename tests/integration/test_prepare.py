"""The prepare step on the node agent: inputs fetched, checked and cached by a CPU pod before any GPU pod.

The tiny model and its data are in a real S3 API (moto's server, whose request log is where downloads are
counted); the namespace has the cache claim the tests' operator configuration names (`kubetune-cache`, a size
limit of about 1 KB and no idle time, so every prepare step evicts what no unfinished job uses). A
`kubectl get pods --watch` runs through each test and records every pod that requests a GPU.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from tests import hub as local_hub
from tests import s3server
from tests.integration import serving
from tests.integration.support import (
    NEEDS_ROOT,
    NEEDS_TRAINER,
    AgentProcess,
    Api,
    OperatorProcess,
    cpu_agent,
    dump,
    wait_for,
)
from tests.integration.training import events_of, job_pods, pod_logs, training_job, wait_done, wait_prepared

from kubetune.dev.controlplane import Cluster

pytestmark = [NEEDS_ROOT, NEEDS_TRAINER]

BUCKET = "prepare"
SECRET = "s3-inputs"
CACHE_CLAIM = "kubetune-cache"
BAD_LINES = {3: "missing 'response'", 5: "'prompt' is empty"}


@dataclass
class Scene:
    ns: str
    root: Path
    """The agent's folder of this namespace's claims."""
    agent: AgentProcess
    bucket: s3server.S3Server
    moto_log: Path
    gpu_pods: list[str] = field(default_factory=list)
    """Every pod that requested a GPU, as the watch saw them."""

    def s3(self, key: str) -> dict[str, Any]:
        return {"uri": f"s3://{BUCKET}/{key}", "s3": {"secretName": SECRET, "endpoint": self.bucket.endpoint}}

    def object_gets(self) -> list[str]:
        """The object downloads moto answered so far (GET of a key, not a listing)."""
        lines = self.moto_log.read_text(errors="replace").splitlines()
        return [m.group(1) for line in lines if (m := re.search(rf'"GET /{BUCKET}/([^ ?]+) HTTP', line))]

    def entries(self) -> list[str]:
        folders = (self.root / CACHE_CLAIM / "entries").glob("*")
        return sorted(p.name for p in folders if (p / "kubetune-entry.json").exists())


@pytest.fixture(scope="module")
def agent(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    yield from cpu_agent(cluster, tmp_path_factory.mktemp("prepare-agent"), "prepare")


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
        root = agent.state_dir / "pvc" / ns
        model = serving.build_model(tmp_path_factory.mktemp("assets"))
        for prefix in ("models/tiny", "models/tiny-copy"):
            bucket.upload_folder(BUCKET, model, prefix)
        records = serving.sft_records()
        client.put_object(Bucket=BUCKET, Key="data/sft.jsonl", Body="".join(f"{json.dumps(r)}\n" for r in records))
        bad = [json.dumps(r) for r in records[:6]]
        bad[2] = '{"prompt": "no answer"}'
        bad[4] = '{"prompt": "", "response": "x"}'
        client.put_object(Bucket=BUCKET, Key="data/bad.jsonl", Body="\n".join(bad) + "\n")
        keys = [f"--from-literal={k}={v}" for k, v in (("AWS_ACCESS_KEY_ID", "t"), ("AWS_SECRET_ACCESS_KEY", "t"))]
        api.kubectl("create", "secret", "generic", SECRET, "-n", ns, *keys)
        scene = Scene(ns, root, agent, bucket, moto_log)
        watch = watch_gpu_pods(api, scene)
        try:
            yield scene
        finally:
            watch.terminate()
            api.remove_namespace(ns, "finetunejobs,jobs,pods")


def watch_gpu_pods(api: Api, scene: Scene) -> subprocess.Popen[str]:
    """`kubectl get pods --watch` for the whole module: every version of every pod passes by it."""
    template = '{.metadata.name}{" "}{.spec.containers[*].resources.limits.nvidia\\.com/gpu}{"\\n"}'
    kubectl = api.cluster.kubectl_path
    args = [str(kubectl), f"--kubeconfig={api.cluster.kubeconfig}", "get", "pods", "-n", scene.ns, "--watch"]
    proc = subprocess.Popen([*args, "-o", f"jsonpath={template}"], stdout=subprocess.PIPE, text=True)

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            name, _, gpus = line.strip().partition(" ")
            if gpus.strip():
                scene.gpu_pods.append(name)

    threading.Thread(target=read, daemon=True).start()
    return proc


def job_spec(
    scene: Scene, name: str, model: str = "models/tiny", data: str = "data/sft.jsonl", split: float = 0.0, **spec: Any
) -> dict[str, Any]:
    dataset = {**scene.s3(data), "validationSplit": split}
    return training_job(name, scene.ns, steps=2, every=2, baseModel=scene.s3(model), dataset=dataset, **spec)


def test_good_dataset_is_checked_on_a_cpu_then_trained_from_the_cache(api: Api, scene: Scene) -> None:
    api.apply(job_spec(scene, "good"))
    status = wait_done(api, scene.ns, "good", timeout=240)
    assert status.get("restarts", 0) == 0, dump(status)
    dataset = status["dataset"]
    assert dataset["records"] == len(serving.sft_records()) and dataset["tokens"] > 0, dump(status)
    lengths = dataset["tokenLengths"]
    assert 0 < lengths["p50"] <= lengths["max"] < dataset["tokens"], dump(status)
    # As trained (the plan's speed estimate reads them): the mean and the token-weighted length E[n^2]/E[n].
    assert 0 < lengths["mean"] <= lengths["weighted"] <= lengths["max"] and lengths["pairFill"] == 0, dump(status)
    assert dataset["truncated"] == 0 and dataset["checkedAt"], dump(status)
    assert dataset["cache"].startswith("/var/cache/kubetune-shared/entries/"), dump(status)
    prepared = next(c for c in status["conditions"] if c["type"] == "Prepared")
    assert (prepared["status"], prepared["reason"]) == ("True", "DatasetChecked"), dump(status)
    assert f"{dataset['records']} records" in prepared["message"]
    # The prepare pod asked for no GPU; the training pod read the cache instead of downloading.
    (prepare_pod,) = api.kube.list("Pod", scene.ns, "kubetune.io/prepare=good")
    assert "nvidia.com/gpu" not in prepare_pod["spec"]["containers"][0]["resources"].get("limits", {})
    (train_pod,) = job_pods(api, scene.ns, "good")
    events = events_of(pod_logs(scene.agent, scene.ns, train_pod["metadata"]["name"]))
    assert [e for e in events if e["event"] == "prepared-inputs"], events[:10]
    # The watch of GPU pods sees training pods (so that its silence about the invalid dataset's job means something).
    wait_for(lambda: train_pod["metadata"]["name"] in scene.gpu_pods, 30, "the watch to report the training pod")
    table = api.kubectl("get", "ftj", "good", "-n", scene.ns).stdout
    assert "DatasetChecked" in table, table


def test_a_second_job_on_the_same_model_and_data_downloads_nothing(api: Api, scene: Scene) -> None:
    before = scene.object_gets()
    # The log counts downloads: the first job's prepare pod fetched the model's files and the data through it.
    assert "models/tiny/model.safetensors" in before and "data/sft.jsonl" in before, before
    api.apply(job_spec(scene, "again"))
    status = wait_done(api, scene.ns, "again", timeout=240)
    assert scene.object_gets() == before, scene.object_gets()[len(before) :]
    assert status["dataset"]["cache"] and status["dataset"]["modelCache"], dump(status)
    # The training pod trained from the read-only cache at its first try.
    assert status.get("restarts", 0) == 0, dump(status)


def test_an_invalid_dataset_fails_before_any_gpu_pod_with_every_bad_line(api: Api, scene: Scene) -> None:
    api.apply(job_spec(scene, "bad", data="data/bad.jsonl"))
    status = api.wait_state("FineTuneJob", scene.ns, "bad", "Failed", timeout=180)
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "DatasetInvalid", dump(status)
    for line, why in BAD_LINES.items():
        assert f"line {line}: {why}" in failed["message"], failed["message"]
    assert status["dataset"]["error"]["reason"] == "DatasetInvalid", dump(status)
    event = api.wait_event(scene.ns, "bad", "DatasetInvalid", "Warning")
    assert "line 3" in event["message"], event
    time.sleep(2)  # what the operator would do after the failure has had its chance
    assert api.get("Job", scene.ns, "bad") is None
    assert not [p for p in scene.gpu_pods if p.startswith("bad-")], scene.gpu_pods


def test_a_killed_download_is_never_used_and_the_next_one_starts_clean(api: Api, scene: Scene) -> None:
    # What a prepare pod killed mid-download leaves: a staging folder, and (copied by hand, say) an entry folder
    # without its marker. The entry of models/tiny-copy must come from a complete download.
    from kubetune.trainer.cache import entry_key

    cache = scene.root / CACHE_CLAIM
    key = entry_key(f"s3://{BUCKET}/models/tiny-copy")
    half = cache / "staging" / f"{key}.killed"
    (half / "model").mkdir(parents=True)
    (half / "model" / "model.safetensors").write_bytes(b"half")
    os.utime(half, (1.0, 1.0))
    (cache / "entries" / key / "model").mkdir(parents=True)
    (cache / "entries" / key / "model" / "config.json").write_text("{")
    api.apply(job_spec(scene, "fresh", model="models/tiny-copy"))
    status = wait_done(api, scene.ns, "fresh", timeout=240)
    assert status["dataset"]["modelCache"] == f"/var/cache/kubetune-shared/entries/{key}/model", dump(status)
    assert (cache / "entries" / key / "kubetune-entry.json").is_file()
    assert (cache / "entries" / key / "model" / "model.safetensors").stat().st_size > 4
    assert not half.exists()


def test_eviction_takes_what_no_unfinished_job_uses(api: Api, scene: Scene) -> None:
    # "held" stays unfinished (suspended after its prepare step): its entries must survive later prepare steps.
    api.apply(job_spec(scene, "held", model="models/tiny-copy", suspend=True))
    held = wait_prepared(api, scene.ns, "held")
    assert held["state"] == "Suspended", dump(held)  # it prepared, suspended
    held_entries = {held["dataset"]["cache"].rsplit("/", 1)[1], held["dataset"]["modelCache"].split("/")[-2]}
    # An entry of a job that finished long ago (complete, last used an hour ago).
    old = scene.root / CACHE_CLAIM / "entries" / "s3-old-model-0123456789abcdef"
    (old / "model").mkdir(parents=True)
    (old / "model" / "config.json").write_text("{}")
    (old / "kubetune-entry.json").write_text(json.dumps({"uri": "s3://old/model", "bytes": 2}))
    os.utime(old / "kubetune-entry.json", (time.time() - 3600,) * 2)
    assert old.name in scene.entries()

    api.apply(job_spec(scene, "next", split=0.25))
    status = wait_done(api, scene.ns, "next", timeout=240)
    mine = {status["dataset"]["cache"].rsplit("/", 1)[1], status["dataset"]["modelCache"].split("/")[-2]}
    # Above its limit (about 1 KB), the cache keeps only what unfinished jobs and this step use.
    assert set(scene.entries()) == held_entries | mine, (scene.entries(), held_entries, mine)
    prepare_pod = api.kube.list("Pod", scene.ns, "kubetune.io/prepare=next")[0]["metadata"]["name"]
    evicted = [e for e in events_of(pod_logs(scene.agent, scene.ns, prepare_pod)) if e["event"] == "cache-evicted"]
    assert old.name in {e["key"] for e in evicted}, evicted


# --- hf:// against a local Hub (tests/hub.py), a ConfigMap, an S3 prefix -----------------------------------------

HUB_MODEL = "kt/tiny"
HUB_DATA = "kt/capitals-gated"
HUB_TOKEN = "hf_granted_token"


@dataclass
class HubScene:
    hub: local_hub.Hub
    endpoint: str
    model_commit: str
    data_commit: str


@pytest.fixture(scope="module")
def hub(scene: Scene, api: Api, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubScene]:
    """The local Hub serving the tiny model and a gated dataset repository with named splits (train: JSONL and
    Parquet files; validation: Parquet), and the Secret of the token it grants."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from kubetune import s3

    # The scene's tiny model, from its bucket (building a second one in this process can hang the tokenizers'
    # trainer once the process has forked).
    model = s3.download(scene.bucket.client(), f"s3://{BUCKET}/models/tiny", tmp_path_factory.mktemp("hub") / "tiny")
    records = serving.sft_records()
    table = tmp_path_factory.mktemp("hub-parquet")
    pq.write_table(pa.Table.from_pylist(records[3:]), table / "train.parquet")
    pq.write_table(pa.Table.from_pylist(records[:2]), table / "validation.parquet")
    files = {
        "train.jsonl": "".join(f"{json.dumps(r)}\n" for r in records[:3]),
        "data/train-00000-of-00001.parquet": (table / "train.parquet").read_bytes(),
        "data/validation-00000-of-00001.parquet": (table / "validation.parquet").read_bytes(),
    }
    api.kubectl("create", "secret", "generic", "hf-token", "-n", scene.ns, f"--from-literal=token={HUB_TOKEN}")
    with local_hub.running() as (served, server):
        model_commit = served.push("model", HUB_MODEL, model)
        data_commit = served.push("dataset", HUB_DATA, files, gated=True, tokens=(HUB_TOKEN,))
        yield HubScene(served, server.endpoint, model_commit, data_commit)


def hub_job(scene: Scene, hub: HubScene, name: str, dataset: dict[str, Any], **spec: Any) -> dict[str, Any]:
    """A job of the Hub's tiny model, the pods pointed at the local Hub by spec.env."""
    model = {"uri": f"hf://{HUB_MODEL}"}
    env = [{"name": "HF_ENDPOINT", "value": hub.endpoint}]
    return training_job(name, scene.ns, steps=2, every=2, baseModel=model, dataset=dataset, env=env, **spec)


def test_an_hf_model_and_a_gated_hf_dataset_are_prepared_from_the_hub(api: Api, scene: Scene, hub: HubScene) -> None:
    dataset = {"uri": f"hf://{HUB_DATA}", "split": "train", "secretRef": {"name": "hf-token", "key": "token"}}
    api.apply(hub_job(scene, hub, "hub", dataset))
    status = wait_done(api, scene.ns, "hub", timeout=300)
    report = status["dataset"]
    # The train split: 3 JSONL records and 2 Parquet rows; the commits the branches named, reported.
    assert report["records"] == 5, dump(status)
    assert (report["modelRevision"], report["datasetRevision"]) == (hub.model_commit, hub.data_commit), dump(status)
    assert report["modelCache"].startswith("/var/cache/kubetune-shared/entries/"), dump(status)
    # The model's files came from the hub once; the gated repository was read with the Secret's token only.
    weights = [p for p in hub.hub.downloads(HUB_MODEL) if p.endswith("/model.safetensors")]
    assert weights == [f"/{HUB_MODEL}/resolve/{hub.model_commit}/model.safetensors"], hub.hub.downloads()
    gated = [r for r in hub.hub.requests if f"/{HUB_DATA}" in r.path]
    assert gated and all(r.token == HUB_TOKEN and r.status == 200 for r in gated), gated
    # The training pod trained from the cache the prepare pod filled.
    (train_pod,) = job_pods(api, scene.ns, "hub")
    events = events_of(pod_logs(scene.agent, scene.ns, train_pod["metadata"]["name"]))
    assert [e for e in events if e["event"] == "prepared-inputs"], events[:10]


def test_a_missing_hf_dataset_fails_before_any_gpu_pod(api: Api, scene: Scene, hub: HubScene) -> None:
    api.apply(hub_job(scene, hub, "hub-missing", {"uri": "hf://kt/no-such-data"}))
    status = api.wait_state("FineTuneJob", scene.ns, "hub-missing", "Failed", timeout=180)
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "DatasetNotFound" and "hf://kt/no-such-data" in failed["message"], dump(status)
    assert status["dataset"]["error"]["reason"] == "DatasetNotFound", dump(status)
    api.wait_event(scene.ns, "hub-missing", "DatasetNotFound", "Warning")
    # Asked once (a 404 is a definite answer, not retried), and nothing of it downloaded.
    asked = [r for r in hub.hub.requests if "/kt/no-such-data" in r.path]
    assert [(r.path, r.status) for r in asked] == [("/api/datasets/kt/no-such-data", 404)], asked
    time.sleep(2)  # what the operator would do after the failure has had its chance
    assert api.get("Job", scene.ns, "hub-missing") is None
    assert not [p for p in scene.gpu_pods if p.startswith("hub-missing-")], scene.gpu_pods


def test_without_a_cache_the_training_pod_fetches_the_commit_that_was_prepared(
    api: Api, scene: Scene, hub: HubScene
) -> None:
    """A namespace without the cache claim: the pods fetch the model themselves. The branch moves between the
    prepare step and training; the training pod still reads the commit the prepare step checked the data with."""
    ns = api.create_namespace()
    api.create_bound_pvc(ns, "adapters")
    data = "".join(f"{json.dumps(r)}\n" for r in serving.sft_records())
    api.kubectl("create", "configmap", "capitals", "-n", ns, f"--from-literal=sft.jsonl={data}")
    spec = hub_job(scene, hub, "pinned", {"uri": "configmap://capitals/sft.jsonl"}, suspend=True)
    spec["metadata"]["namespace"] = ns
    try:
        api.apply(spec)
        prepared = wait_prepared(api, ns, "pinned")["dataset"]
        assert prepared["modelRevision"] == hub.model_commit and not prepared["cache"], dump(prepared)
        repo = hub.hub.repos[("model", HUB_MODEL)]
        moved = hub.hub.push("model", HUB_MODEL, {**repo.commits[hub.model_commit], "README.md": "moved on"})
        served_before = len(hub.hub.downloads(HUB_MODEL))
        api.kubectl("patch", "finetunejob", "pinned", "-n", ns, "--type=merge", "-p", '{"spec":{"suspend":false}}')
        wait_done(api, ns, "pinned", timeout=300)
        weights = [p for p in hub.hub.downloads(HUB_MODEL)[served_before:] if p.endswith("/model.safetensors")]
        assert weights == [f"/{HUB_MODEL}/resolve/{hub.model_commit}/model.safetensors"], (moved, weights)
    finally:
        api.remove_namespace(ns, "finetunejobs,jobs,pods")


def test_a_configmap_dataset_and_an_s3_prefix_of_several_files_are_prepared(api: Api, scene: Scene) -> None:
    records = serving.sft_records()
    data = "".join(f"{json.dumps(r)}\n" for r in records)
    api.kubectl("create", "configmap", "capitals", "-n", scene.ns, f"--from-literal=sft.jsonl={data}")
    client = scene.bucket.client()
    parts = {"data/parts/a.jsonl": records[:2], "data/parts/b.jsonl": records[2:], "data/parts/c/d.jsonl": records}
    for key, chunk in parts.items():
        client.put_object(Bucket=BUCKET, Key=key, Body="".join(f"{json.dumps(r)}\n" for r in chunk))
    datasets = {"cm": {"uri": "configmap://capitals/sft.jsonl"}, "prefix": scene.s3("data/parts")}
    for name, dataset in datasets.items():
        # Suspended: the prepare step runs, no training (what it would train on is the other tests' business).
        spec = job_spec(scene, name, suspend=True)
        spec["spec"]["dataset"] = {**dataset, "validationSplit": 0.0}
        api.apply(spec)
    try:
        for name, expected in (("cm", len(records)), ("prefix", 2 * len(records))):
            status = wait_prepared(api, scene.ns, name)
            assert status["dataset"]["records"] == expected, dump(status)
            assert status["dataset"]["cache"], dump(status)
            assert not status["dataset"]["modelRevision"] and not status["dataset"]["datasetRevision"], dump(status)
    finally:
        # Unfinished jobs keep their cache entries from eviction: these must not hold theirs.
        api.kubectl("delete", "finetunejobs", "cm", "prefix", "-n", scene.ns, "--wait=true", check=False)


def container_pid(agent: AgentProcess, pod: dict[str, Any], container: str) -> int:
    """The process of a pod's container on the node agent (its bootstrap exec'd the command)."""
    (pid_file,) = (agent.state_dir / "pods" / pod["metadata"]["uid"] / "containers").glob(f"{container}/pid")
    return int(pid_file.read_text())


def test_a_prepare_pod_killed_mid_download_leaves_nothing_used_and_the_next_one_downloads_afresh(
    api: Api, scene: Scene
) -> None:
    # The model's weights come through a proxy that sends half of the first download, then holds it: the prepare
    # pod is killed while it waits for the rest, with half a file in its staging folder.
    from kubetune.trainer.cache import entry_key

    client = scene.bucket.client()
    for key in scene.bucket.keys(BUCKET, "models/tiny/"):
        copy = key.replace("models/tiny/", "models/tiny-killed/")
        client.copy_object(Bucket=BUCKET, Key=copy, CopySource=f"{BUCKET}/{key}")
    weights = "models/tiny-killed/model.safetensors"
    full = client.head_object(Bucket=BUCKET, Key=weights)["ContentLength"]
    cache = scene.root / CACHE_CLAIM
    key = entry_key(f"s3://{BUCKET}/models/tiny-killed")
    with s3server.holding_proxy(scene.bucket) as proxy:
        proxy.hold(BUCKET, weights)
        model = {**scene.s3("models/tiny-killed"), "s3": {"secretName": SECRET, "endpoint": proxy.endpoint}}
        dataset = {**scene.s3("data/sft.jsonl"), "validationSplit": 0.0}
        api.apply(training_job("killed", scene.ns, steps=2, every=2, baseModel=model, dataset=dataset))
        assert proxy.holding.wait(240), "the prepare pod never reached the model's weights"

        def partial() -> list[Path]:
            """s3.download's files in the making, in the staging folder of the entry (staging/KEY.RANDOM/)."""
            files = [p for folder in cache.glob(f"staging/{key}.*") for p in folder.rglob("model.safetensors*")]
            return [p for p in files if p.is_file() and 0 < p.stat().st_size < full]

        (half,) = wait_for(partial, 30, "half of the weights in a staging folder")
        staging = half.relative_to(cache / "staging").parts[0]
        assert not (cache / "entries" / key).exists()  # nothing complete, nothing visible
        (first,) = api.kube.list("Pod", scene.ns, "kubetune.io/prepare=killed")
        os.kill(container_pid(scene.agent, first, "prepare"), signal.SIGKILL)
        status = wait_done(api, scene.ns, "killed", timeout=300)
    # The next prepare pod downloaded the whole model into a staging folder of its own, renamed it into place, and
    # removed the killed one's; the training pod read that entry and trained at its first try.
    assert status["dataset"]["modelCache"] == f"/var/cache/kubetune-shared/entries/{key}/model", dump(status)
    assert status.get("restarts", 0) == 0, dump(status)
    assert scene.object_gets().count(weights) == 2  # the download held and killed, and the whole one after it
    entry = cache / "entries" / key
    assert (entry / "kubetune-entry.json").is_file()
    original = client.get_object(Bucket=BUCKET, Key=weights)["Body"].read()
    assert (entry / "model" / "model.safetensors").read_bytes() == original
    assert not (cache / "staging" / staging).exists()
    pods = api.kube.list("Pod", scene.ns, "kubetune.io/prepare=killed")
    (second,) = [p for p in pods if p["metadata"]["uid"] != first["metadata"]["uid"]]
    events = events_of(pod_logs(scene.agent, scene.ns, second["metadata"]["name"]))
    misses = [e for e in events if e["event"] == "cache-miss" and e["what"] == "base model"]
    assert misses and misses[0]["key"] == key, events[:10]  # the half entry was not taken for a complete one
    assert staging in {e["folder"] for e in events if e["event"] == "cache-staging-removed"}, events


def test_a_resumed_training_pod_reads_the_cache_and_downloads_nothing(api: Api, scene: Scene) -> None:
    dataset = {**scene.s3("data/sft.jsonl"), "validationSplit": 0.0}
    api.apply(training_job("resumed", scene.ns, steps=24, every=4, baseModel=scene.s3("models/tiny"), dataset=dataset))
    prepared = wait_for(
        lambda: (d := api.status("FineTuneJob", scene.ns, "resumed").get("dataset")) and d.get("checkedAt") and d,
        240,
        "the prepare step's report",
    )
    assert prepared["modelCache"] and prepared["cache"], prepared
    checkpoints = scene.root / "adapters" / "resumed" / "checkpoints"
    wait_for(lambda: list(checkpoints.glob("checkpoint-*/kubetune-complete.json")), 300, "a checkpoint", 0.2)
    # From here on, no object of the model or the data may be downloaded again: not by this pod, not by the next.
    before = scene.object_gets()
    (first,) = [p for p in job_pods(api, scene.ns, "resumed") if p["status"].get("phase") == "Running"]
    os.kill(container_pid(scene.agent, first, "trainer"), signal.SIGKILL)
    status = wait_done(api, scene.ns, "resumed", timeout=400)
    assert status["restarts"] == 1 and status["lastRestart"]["resumeStep"] >= 4, dump(status)
    assert scene.object_gets() == before, scene.object_gets()[len(before) :]
    (second,) = [p for p in job_pods(api, scene.ns, "resumed") if p["metadata"]["uid"] != first["metadata"]["uid"]]
    events = events_of(pod_logs(scene.agent, scene.ns, second["metadata"]["name"]))
    assert [e for e in events if e["event"] == "prepared-inputs"], events[:10]  # the model and data from the cache
    # It resumed from the newest checkpoint: the one the status named at the restart, or one saved just after.
    resumed = [e["step"] for e in events if e["event"] == "resume"]
    assert resumed == [status["progress"]["resumedFrom"]] and resumed[0] >= status["lastRestart"]["resumeStep"], events
