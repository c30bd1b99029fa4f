"""``python -m kubetune dev demo``: a FineTuneJob that really trains, DPO on top of it, and a ModelServer that
answers through the adapters, all in the local dev cluster.

The cluster runs without simulated GPU nodes (``gpu=0,cpu=1``), so every GPU pod lands on the node agent's
Node and runs as a local process on the CPU. The tiny Qwen2 model, its tokenizer and the datasets are written
into the folder the agent uses for the claim ``demo/storage`` before the jobs are applied. The cluster is left
running at the end.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import yaml

from kubetune.dev.agent import daemons
from kubetune.dev.controlplane import Cluster, ControlPlane
from kubetune.dev.lifecycle import AgentOptions, OperatorOptions, down, up
from kubetune.k8s.client import Kube

NAMESPACE = "demo"
CLAIM = "storage"
NODES = "gpu=0,cpu=1"
LABELS = {"kubetune.io/demo": "true"}
SFT_JOB = "tiny-sft"
DPO_JOB = "tiny-dpo"
SERVER = "tiny"
SERVER_PORT = 8000
UI_PORT = 7860
GPU_TYPE = "rtx-4090d"  # the agent's Node carries this type's labels
CAPITALS = [
    ("France", "Paris"),
    ("Japan", "Tokyo"),
    ("Italy", "Rome"),
    ("Spain", "Madrid"),
    ("Peru", "Lima"),
    ("Egypt", "Cairo"),
    ("Kenya", "Nairobi"),
    ("Chile", "Santiago"),
]
QUESTION = "What is the capital of France?"
QUESTIONS = [f"What is the capital of {c}?" for c, _ in CAPITALS]
COLUMNS = {"base": SERVER, "SFT": SFT_JOB, "DPO": DPO_JOB}
"""The answer columns and the name each model is served under."""
SFT_STEPS, DPO_STEPS = 60, 20
MODEL_INIT_STD = 0.1
"""The tiny model's weight scale. LoRA adapts its linear layers only, so its tied embeddings bound how far one
answer token can stand out: at the usual 0.02 the trained answers win by hair-thin margins that DPO's first steps
upset; at 0.1 SFT reaches a loss of about 0.02 on its records and DPO moves only the ending it is asked to."""
T = TypeVar("T")


class DemoError(RuntimeError):
    """A step of the demo did not reach its goal in time."""


def log(message: str, started: float) -> None:
    """One line of the demo's story, with the seconds since the start."""
    print(f"[demo {time.monotonic() - started:6.1f}s] {message}", flush=True)


def wait(check: Callable[[], T | None], timeout: float, what: str, interval: float = 1.0) -> T:
    """Poll ``check`` until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval)
    raise DemoError(f"timed out after {timeout:.0f}s waiting for {what}")


# --- the cluster -------------------------------------------------------------------------------------


def cluster_running(state_dir: Path | None) -> Cluster | None:
    """The running cluster when the control plane, agent and operator all run and no kwok GPU node exists."""
    plane = ControlPlane(state_dir)
    if not plane.kubeconfig.exists() or not all(s.healthy for s in plane.status()):
        return None
    if not daemons.running_pid(plane.state_dir, daemons.AGENT, "kubetune.dev.agent"):
        return None
    if not daemons.running_pid(plane.state_dir, daemons.OPERATOR, "operator"):
        return None
    cluster = plane.cluster()
    for node in kubectl_items(cluster, "get", "nodes"):
        fake = (node["metadata"].get("annotations") or {}).get("kwok.x-k8s.io/node") == "fake"
        if fake and int((node["status"].get("capacity") or {}).get("nvidia.com/gpu", "0")) > 0:
            return None  # GPU pods could land on a simulated node and never train
    return cluster


def kubectl_items(cluster: Cluster, *args: str) -> list[dict[str, Any]]:
    """The items of ``kubectl ... -o json`` (kinds the operator's client does not know: Node, PV, PVC)."""
    return list(json.loads(cluster.kubectl(*args, "-o", "json").stdout).get("items") or [])


def ensure_cluster(state_dir: Path | None, started: float) -> Cluster:
    """Reuse a suitable running cluster, else (re)start one with the agent and the operator."""
    cluster = cluster_running(state_dir)
    if cluster is not None:
        log("reusing the running dev cluster", started)
        return cluster
    if ControlPlane(state_dir).kubeconfig.exists():
        log("stopping the previous dev cluster (not all parts run, or it has simulated GPU nodes)", started)
        down(state_dir)
    log(f"starting the dev cluster (nodes {NODES}, node agent, operator)", started)
    return up(state_dir, nodes=NODES, agent=AgentOptions(), operator=OperatorOptions())


def agent_pvc_dir(state_dir: Path | None) -> Path:
    """The agent's folder for the claim: ``<agent state>/pvc/<namespace>/<claim>``."""
    return daemons.agent_dir(ControlPlane(state_dir).state_dir) / "pvc" / NAMESPACE / CLAIM


def reset_namespace(kube: Kube, cluster: Cluster, started: float) -> None:
    """Delete what an earlier demo left (namespace and PersistentVolume), then create both afresh."""
    pv = f"{NAMESPACE}-{CLAIM}"
    if kube.get("Namespace", "", NAMESPACE) is not None:
        log(f"deleting namespace {NAMESPACE} from an earlier run", started)
        # owners first, then their pods without the grace period a vLLM server would otherwise wait out
        ns = ["-n", NAMESPACE, "--ignore-not-found", "--wait=false"]
        cluster.kubectl("delete", "modelservers,finetunejobs,deployments,jobs", "--all", *ns, check=False)
        cluster.kubectl("delete", "pods", "--all", "--grace-period=1", *ns, check=False)
        kube.delete("Namespace", "", NAMESPACE)
        wait(lambda: kube.get("Namespace", "", NAMESPACE) is None, 180, f"namespace {NAMESPACE} to go")
    cluster.kubectl("delete", "pv", pv, "--ignore-not-found", "--wait=true", "--timeout=60s")
    kube.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}})
    apply(cluster, *storage_manifests())
    wait(
        lambda: (
            cluster.kubectl("get", "pvc", CLAIM, "-n", NAMESPACE, "-o", "jsonpath={.status.phase}").stdout == "Bound"
        ),
        60,
        f"claim {CLAIM} to be Bound",
    )


def storage_manifests(namespace: str = NAMESPACE, claim: str = CLAIM) -> list[dict[str, Any]]:
    """A PersistentVolume and the claim bound to it, so that pods mounting the claim can schedule (the node
    agent backs the claim with a local folder; no provisioner is needed)."""
    pv = f"{namespace}-{claim}"
    return [
        {
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {"name": pv},
            "spec": {
                "capacity": {"storage": "10Gi"},
                "accessModes": ["ReadWriteMany"],
                "storageClassName": "manual",
                "hostPath": {"path": f"/tmp/kubetune-pv/{pv}"},
                "claimRef": {"namespace": namespace, "name": claim},
            },
        },
        {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": claim, "namespace": namespace},
            "spec": {
                "accessModes": ["ReadWriteMany"],
                "storageClassName": "manual",
                "volumeName": pv,
                "resources": {"requests": {"storage": "10Gi"}},
            },
        },
    ]


def apply(cluster: Cluster, *manifests: dict[str, Any]) -> None:
    """kubectl apply, as a user would."""
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(list(manifests)))


# --- the assets --------------------------------------------------------------------------------------


def sft_records() -> list[dict[str, str]]:
    """Prompt-response pairs about capitals, in two moods: a full stop for "What is...", an exclamation for
    "Which city..."."""
    return [
        record
        for c, k in CAPITALS
        for record in (
            {"prompt": f"What is the capital of {c}?", "response": f"The capital of {c} is {k}."},
            {"prompt": f"Which city is the capital of {c}?", "response": f"The capital of {c} is {k}!"},
        )
    ]


def preference_records() -> list[dict[str, str]]:
    """Preference pairs for the "What is..." questions: the exclamation is chosen over the full stop SFT taught
    for them. The answers differ in that one token, so the words they share cancel out of DPO's loss and DPO moves
    the answer's ending only."""
    return [
        {
            "prompt": f"What is the capital of {c}?",
            "chosen": f"The capital of {c} is {k}!",
            "rejected": f"The capital of {c} is {k}.",
        }
        for c, k in CAPITALS
    ]


def write_assets(root: Path) -> None:
    """The tiny model and tokenizer at models/tiny, data/sft.jsonl and data/dpo.jsonl under the claim's folder."""
    from kubetune.trainer.tiny import build_tiny_model

    shutil.rmtree(root, ignore_errors=True)
    (root / "data").mkdir(parents=True)
    sft, dpo = sft_records(), preference_records()
    (root / "data" / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sft))
    (root / "data" / "dpo.jsonl").write_text("".join(json.dumps(r) + "\n" for r in dpo))
    build_tiny_model(root / "models" / "tiny", [json.dumps(r) for r in [*sft, *dpo]], init_std=MODEL_INIT_STD)


# --- the resources -----------------------------------------------------------------------------------


def finetunejob(name: str, method: str, dataset: str, max_steps: int, **spec: Any) -> dict[str, Any]:
    """A one-"GPU" FineTuneJob of the tiny model that trains on the agent's CPU in seconds. The rates and steps
    (SFT_STEPS, DPO_STEPS) are the ones with which every answer of QUESTIONS comes out as trained
    (tests/trainer/test_demo.py)."""
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name, "namespace": NAMESPACE, "labels": dict(LABELS)},
        "spec": {
            "method": method,
            "baseModel": {"uri": f"pvc://{CLAIM}/models/tiny"},
            "dataset": {"uri": f"pvc://{CLAIM}/data/{dataset}"},
            "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "targetModules": ["all-linear"]},
            "hyperparameters": {
                "learningRate": 0.01 if method == "SFT" else 0.0005,
                "warmupRatio": 0.0,
                "maxSteps": max_steps,
                "globalBatchSize": 4,
                "maxSeqLength": 128,
                "seed": 0,
            },
            "resources": {"nodes": 1, "gpusPerNode": 1, "gpuType": GPU_TYPE},
            "output": {"uri": f"pvc://{CLAIM}/adapters/{name}"},
            "checkpointing": {"everySteps": max(10, max_steps // 3), "keep": 2},
            "backoffLimit": 2,
            **spec,
        },
    }


def model_server() -> dict[str, Any]:
    """A ModelServer of the tiny model serving every FineTuneJob of the demo, with the chat page."""
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "ModelServer",
        "metadata": {"name": SERVER, "namespace": NAMESPACE},
        "spec": {
            "baseModel": {"uri": f"pvc://{CLAIM}/models/tiny"},
            "adapterSelector": {"matchLabels": dict(LABELS)},
            "replicas": 1,
            "gpuType": GPU_TYPE,
            "maxModelLen": 512,
            "maxLoraRank": 8,
            # Greedy, as the trained answers are compared (no repetition penalty: the answers repeat the question)
            "generationDefaults": {"temperature": 0, "topP": 1, "repetitionPenalty": 1.0, "maxTokens": 16},
            # vLLM on CPU would otherwise size its KV cache from most of the machine's memory
            "engineArgs": ["--dtype=float32", "--kv-cache-memory-bytes=67108864"],
            "ui": {"enabled": True},
        },
    }


def get_ftj_table(cluster: Cluster) -> str:
    return cluster.kubectl("get", "ftj", "-n", NAMESPACE, check=False).stdout.rstrip()


def watch_job(cluster: Cluster, kube: Kube, name: str, started: float, timeout: float, every: float = 3.0) -> float:
    """Print ``kubectl get ftj`` every few seconds until the job ends; the seconds it took."""
    begin = time.monotonic()
    last = ""
    while True:
        table = get_ftj_table(cluster)
        if table != last:
            print(table, flush=True)
            last = table
        status = (kube.get("FineTuneJob", NAMESPACE, name) or {}).get("status") or {}
        state = status.get("state")
        if state == "Succeeded":
            elapsed = time.monotonic() - begin
            log(f"{name} Succeeded in {elapsed:.1f}s; adapter {status.get('adapter', {}).get('uri')}", started)
            return elapsed
        if state == "Failed":
            conditions = json.dumps(status.get("conditions"), indent=1)
            raise DemoError(f"{name} failed: {conditions}\nlogs: python -m kubetune dev logs POD -n {NAMESPACE}")
        if time.monotonic() - begin > timeout:
            raise DemoError(f"{name} did not finish in {timeout:.0f}s (state {state})")
        time.sleep(every)


def server_pods(kube: Kube, component: str) -> list[dict[str, Any]]:
    """The ModelServer's running pods of one component (server or ui)."""
    return [
        p
        for p in kube.list("Pod", NAMESPACE, f"kubetune.io/modelserver={SERVER}")
        if (p["metadata"].get("labels") or {}).get("app.kubernetes.io/component") == component
        and not p["metadata"].get("deletionTimestamp")
        and p.get("status", {}).get("podIP")
    ]


def chat_page(kube: Kube) -> str | None:
    """The chat page's address once its pod is Ready and the page answers."""
    for pod in server_pods(kube, "ui"):
        ready = any(c["type"] == "Ready" and c["status"] == "True" for c in pod["status"].get("conditions") or [])
        address = f"http://{pod['status']['podIP']}:{UI_PORT}/"
        if ready:
            try:
                with urllib.request.urlopen(address, timeout=10) as response:
                    if response.status == 200:
                        return address
            except (OSError, urllib.error.URLError):
                pass
    return None


def adapters_loaded(kube: Kube) -> list[str] | None:
    """The adapter names once the server is Ready and the adapters of both jobs are Loaded."""
    status = (kube.get("ModelServer", NAMESPACE, SERVER) or {}).get("status") or {}
    loaded = [a["name"] for a in status.get("adapters") or [] if a.get("state") == "Loaded"]
    ready = status.get("state") == "Ready"
    return loaded if ready and {SFT_JOB, DPO_JOB} <= set(loaded) else None


def chat(address: str, model: str, question: str = QUESTION) -> str:
    """One chat completion; the answer's text."""
    body = {"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": 16}
    request = urllib.request.Request(
        f"http://{address}/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return str(json.loads(response.read())["choices"][0]["message"]["content"])


def check_vllm() -> subprocess.Popen[bytes] | None:
    """Start ``python -c "import vllm"`` (about 20 s on 2 cores) in the background; None when not installed."""
    if importlib.util.find_spec("vllm") is None:
        return None
    argv = [sys.executable, "-c", "import vllm"]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def vllm_available(check: subprocess.Popen[bytes] | None) -> bool:
    """Whether the venv can run vLLM (``hack/setup.sh trainer server``): the check's result."""
    return check is not None and check.wait() == 0


def served_answers(address: str) -> dict[str, list[str]]:
    """Each column's answers to QUESTIONS from the vLLM server: the base model and each adapter."""
    return {column: [chat(address, model, q) for q in QUESTIONS] for column, model in COLUMNS.items()}


def local_answers(root: Path) -> dict[str, list[str]]:
    """The same greedy answers through transformers, from the claim's folder (when nothing serves them)."""
    from kubetune.trainer.answers import greedy_answers

    model = root / "models" / "tiny"
    adapters = {
        "base": None,
        "SFT": root / "adapters" / SFT_JOB / "adapter",
        "DPO": root / "adapters" / DPO_JOB / "adapter",
    }
    return {column: greedy_answers(model, QUESTIONS, adapter) for column, adapter in adapters.items()}


def side_by_side(answers: dict[str, list[str]], questions: list[str] = QUESTIONS) -> str:
    """A table: one row per question, one column of answers per model."""
    rows = [["question", *answers], *([q, *(a[i] for a in answers.values())] for i, q in enumerate(questions))]
    rows = [[repr(cell) if i and r else cell for i, cell in enumerate(row)] for r, row in enumerate(rows)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows)


def serve(cluster: Cluster, kube: Kube, started: float, begin: float) -> tuple[dict[str, float], dict[str, list[str]]]:
    """Wait for the ModelServer (applied at ``begin``) with both adapters, ask QUESTIONS through the base model
    and each adapter; the timings and the answers."""
    timings: dict[str, float] = {}
    last = ""
    deadline = time.monotonic() + 600
    while (loaded := adapters_loaded(kube)) is None:
        table = cluster.kubectl("get", "msrv", "-n", NAMESPACE, check=False).stdout.rstrip()
        without_age = [line.rsplit(maxsplit=1)[0] for line in table.splitlines() if line.strip()]
        if str(without_age) != last:
            print(table, flush=True)
            last = str(without_age)
        if time.monotonic() > deadline:
            raise DemoError(f"ModelServer {SERVER} not Ready with both adapters Loaded in 600s")
        time.sleep(3)
    timings["ModelServer: applied to adapters Loaded"] = time.monotonic() - begin
    print(cluster.kubectl("get", "msrv", "-n", NAMESPACE).stdout.rstrip(), flush=True)
    log(f"ModelServer Ready, adapters Loaded: {', '.join(sorted(loaded))}", started)
    pod = server_pods(kube, "server")[0]
    address = f"{pod['status']['podIP']}:{SERVER_PORT}"
    endpoint = ((kube.get("ModelServer", NAMESPACE, SERVER) or {}).get("status") or {}).get("endpoint")
    log(f"endpoint {endpoint} (inside pods); from this machine: http://{address}/v1", started)
    asked = time.monotonic()
    answers = served_answers(address)
    timings[f"{len(QUESTIONS)} questions x {len(COLUMNS)} models"] = time.monotonic() - asked
    print(
        f"try it: curl -s http://{address}/v1/chat/completions -H 'Content-Type: application/json' "
        f'-d \'{{"model": "{SFT_JOB}", "messages": [{{"role": "user", "content": "{QUESTION}"}}]}}\''
    )
    # The dev operator places chat pages on the agent's Node (uiScheduling), so the page really runs.
    begin = time.monotonic()
    page = wait(lambda: chat_page(kube), 180, "the chat page (Gradio) to answer", 2)
    timings["chat page answering (after the chats)"] = time.monotonic() - begin
    log(f"chat page (Gradio): {page}", started)
    return timings, answers


def run(state_dir: Path | None = None, serve_models: bool = True) -> int:
    """The whole demo; the exit code."""
    started = time.monotonic()
    timings: dict[str, float] = {}
    vllm_check = check_vllm() if serve_models else None
    try:
        if os.geteuid() != 0:
            raise DemoError("the node agent needs root: run it as root (sudo -E make demo)")
        cluster = ensure_cluster(state_dir, started)
        timings["cluster"] = time.monotonic() - started
        kube = Kube.from_kubeconfig(str(cluster.kubeconfig), field_manager="kubetune-demo")
        step = time.monotonic()
        reset_namespace(kube, cluster, started)
        root = agent_pvc_dir(state_dir)
        write_assets(root)
        timings["namespace, claim, tiny model, datasets"] = time.monotonic() - step
        log(f"wrote the tiny model and datasets to {root} (pvc://{CLAIM}/... in namespace {NAMESPACE})", started)

        serving = serve_models and vllm_available(vllm_check)
        if not serve_models:
            log("serving skipped (--no-serve)", started)
        elif not serving:
            log(
                "vLLM is not installed in .venv (hack/setup.sh trainer server installs it): "
                "the demo stops after the DPO job, no ModelServer",
                started,
            )
        else:
            served_from = time.monotonic()
            apply(cluster, model_server())
            log(
                f"applied ModelServer {SERVER} first: vLLM starts (a minute or two on CPU) while the jobs train, "
                "and loads each adapter when its job succeeds",
                started,
            )

        apply(cluster, finetunejob(SFT_JOB, "SFT", "sft.jsonl", SFT_STEPS))
        log(f"applied FineTuneJob {SFT_JOB} (SFT, {SFT_STEPS} steps, records packed into windows)", started)
        timings[f"{SFT_JOB} (SFT)"] = watch_job(cluster, kube, SFT_JOB, started, 600)
        apply(cluster, finetunejob(DPO_JOB, "DPO", "dpo.jsonl", DPO_STEPS, fromFineTuneJob=SFT_JOB))
        log(f"applied FineTuneJob {DPO_JOB} (DPO from {SFT_JOB}'s adapter, {DPO_STEPS} steps)", started)
        timings[f"{DPO_JOB} (DPO)"] = watch_job(cluster, kube, DPO_JOB, started, 600)
        if serving:
            served_timings, answers = serve(cluster, kube, started, served_from)
            timings.update(served_timings)
            how = f"through the ModelServer (vLLM, models {', '.join(COLUMNS.values())})"
        else:
            asked = time.monotonic()
            answers = local_answers(root)
            timings["answers through transformers"] = time.monotonic() - asked
            how = "through transformers from the claim's folder (nothing serves them)"
        log(f"greedy answers {how}:", started)
        print(side_by_side(answers), flush=True)
    except (DemoError, RuntimeError, OSError, urllib.error.URLError) as error:
        log(f"FAILED: {error}", started)
        print("the cluster is left running for a look: python -m kubetune dev status | logs POD -n demo")
        return 1
    total = time.monotonic() - started
    print("\ntimings:")
    for what, seconds in [*timings.items(), ("total", total)]:
        print(f"  {what:<40} {seconds:7.1f}s")
    print(f"\nthe cluster keeps running: export KUBECONFIG={cluster.kubeconfig}; kubectl get ftj,msrv -n {NAMESPACE}")
    print("stop it with: python -m kubetune dev down")
    return 0
