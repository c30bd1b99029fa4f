"""The trainer and server images (several GB each; `make test-images`, not `make test`), run with podman as
the operator renders their pods: the trainer image trains the tiny model on CPU from a rendered FineTuneJob's
Job, and vLLM's CPU build in the server image serves the tiny model with that adapter, which its fetcher
sidecar prepares, as the operator would ask it to.

The server pod's containers share a network namespace of their own (as in a pod); the test talks to them
from inside it, so nothing binds this host's ports.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from tests import containers
from tests.integration import serving, training
from tests.integration.support import operator_config_for_tests, wait_for

from kubetune.api.v1alpha1 import FineTuneJob, ModelServer, Plan
from kubetune.config import OperatorConfig
from kubetune.render import finetunejob, modelserver
from kubetune.signing import Signer

pytestmark = [pytest.mark.slow, pytest.mark.images]
ADAPTER = "tiny-sft"
# Unique per run: containers share the storage with any other run of this module on the machine.
SUFFIX = uuid.uuid4().hex[:8]
OPERATOR = Signer.generate()
"""The operator's key: the fetcher answers only requests it signed (kubetune/signing.py)."""


@dataclass
class TrainerRun:
    code: int
    log: str
    pvc: Path
    args: list[str]


@pytest.fixture(scope="module")
def pvc(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The claims' folders: pvc://models/tiny, pvc://data/sft.jsonl, and pvc://adapters for the output."""
    root = tmp_path_factory.mktemp("pvc")
    serving.build_model(root)
    (root / "adapters").mkdir()
    return root


def training_pod(pvc: Path, workdir: Path) -> containers.Pod:
    """The pod of the Job the operator renders for a one-node, one-"GPU" FineTuneJob of the tiny model."""
    body = training.training_job(ADAPTER, "default", steps=4, every=2)
    body["metadata"]["uid"] = str(uuid.uuid4())
    del body["spec"]["resources"]["gpuType"]
    plan = Plan(zero_stage=0, micro_batch_size=4, gradient_accumulation_steps=1, world_size=1)
    config = OperatorConfig()
    config.images.trainer = containers.ref("trainer")
    (job,) = [c for c in finetunejob.children(FineTuneJob.model_validate(body), plan, config) if c["kind"] == "Job"]
    claims = {name: pvc / name for name in ("models", "data", "adapters")}
    # The Job controller's annotation (NODE_RANK reads it); the pod's name as the Job controller makes it.
    index = {"batch.kubernetes.io/job-completion-index": "0"}
    name = f"{ADAPTER}-0-{SUFFIX}"
    return containers.Pod(job["spec"]["template"], workdir, name, "default", claims, annotations=index)


@pytest.fixture(scope="module")
def trainer_run(pvc: Path, tmp_path_factory: pytest.TempPathFactory) -> TrainerRun:
    containers.build("trainer")
    pod = training_pod(pvc, tmp_path_factory.mktemp("trainer-pod"))
    args = pod.run_args("trainer", network="none")
    result = containers.podman(*args, check=False, timeout=1200)
    return TrainerRun(result.returncode, result.stdout + result.stderr, pvc, args)


def test_trainer_image_trains_the_tiny_model_on_cpu(trainer_run: TrainerRun) -> None:
    assert trainer_run.code == 0, trainer_run.log[-4000:]
    entrypoint = trainer_run.args[trainer_run.args.index("--entrypoint") + 1]
    assert json.loads(entrypoint) == ["kubetune", "train", "--config", "/etc/kubetune/trainer.yaml"]
    assert "--user=65532:65532" in trainer_run.args
    events = training.events_of(trainer_run.log)
    assert [e["step"] for e in events if e["event"] == "checkpoint"] == [2, 4]
    adapter = trainer_run.pvc / "adapters" / ADAPTER / "adapter"
    assert (adapter / "adapter_model.safetensors").stat().st_size > 0
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 8


@pytest.fixture(scope="module")
def server_pod(trainer_run: TrainerRun, tmp_path_factory: pytest.TempPathFactory) -> Iterator[containers.Pod]:
    """The ModelServer's Deployment pod, vLLM's CPU build as the server image (the configuration of a cluster
    without GPUs), started the way the kubelet would: vLLM, then the fetcher in its network namespace."""
    image = containers.build("server-cpu")
    config = OperatorConfig.model_validate(operator_config_for_tests())
    config.images.server = image
    body = serving.model_server("tiny", "default")
    body["metadata"]["uid"] = str(uuid.uuid4())
    # The adapter's URI, as the operator resolves it for a server of the FineTuneJob's adapter: its claim is
    # mounted into both containers.
    server = ModelServer.model_validate(body)
    adapters = [f"pvc://adapters/{ADAPTER}/adapter"]
    served = modelserver.children(server, adapters, config, operator_key=OPERATOR.public_key)
    (deployment,) = [c for c in served if c["kind"] == "Deployment"]
    claims = {name: trainer_run.pvc / name for name in ("models", "adapters")}
    workdir = tmp_path_factory.mktemp("server-pod")
    pod = containers.Pod(deployment["spec"]["template"], workdir, f"tiny-{SUFFIX}", claims=claims)
    names = [f"{pod.name}-vllm", f"{pod.name}-fetcher"]
    try:
        containers.podman(*pod.run_args("vllm", network="none", detach=True))
        containers.podman(*pod.run_args("fetcher", network=f"container:{names[0]}", detach=True))
        yield pod
    finally:
        for name in names:
            log = containers.podman("logs", name, check=False)
            (pod.workdir / f"{name}.log").write_text(log.stdout + log.stderr)
        # the fetcher first: vLLM's container holds the network namespace the fetcher joined
        for name in reversed(names):
            containers.podman("rm", "--force", "--ignore", "--time=10", name)


def request(
    pod: containers.Pod, port: int, path: str, body: dict[str, Any] | None = None, signed: bool = False
) -> tuple[int, Any]:
    """An HTTP request to 127.0.0.1:PORT inside the pod's network namespace (from the fetcher container);
    `signed` with the operator's key for this pod, as the operator signs its requests to the fetcher."""
    text = json.dumps(body) if body else ""
    headers = {"Content-Type": "application/json"}
    if signed:
        headers |= OPERATOR.headers("POST" if body else "GET", path, pod.name, text.encode())
    script = (
        "import json, sys, urllib.request, urllib.error\n"
        "url, body, headers = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])\n"
        "data = body.encode() if body else None\n"
        "req = urllib.request.Request(url, data=data, headers=headers)\n"
        "try:\n"
        "    r = urllib.request.urlopen(req, timeout=60); print(r.status); print(r.read().decode())\n"
        "except urllib.error.HTTPError as e:\n"
        "    print(e.code); print(e.read().decode())\n"
    )
    url = f"http://127.0.0.1:{port}{path}"
    args = ["exec", f"{pod.name}-fetcher", "python3", "-c", script, url, text, json.dumps(headers)]
    result = containers.podman(*args, check=False, timeout=120)
    if result.returncode != 0:
        return 0, result.stderr[-2000:]
    status, _, text = result.stdout.partition("\n")
    return int(status), json.loads(text) if text.strip().startswith(("{", "[")) else text


def healthy(pod: containers.Pod, container: str, port: int, path: str) -> bool:
    """Whether the container answers its probe; fails at once when it has stopped, with its log."""
    state = containers.podman("inspect", "--format", "{{.State.Running}}", f"{pod.name}-{container}").stdout
    if state.strip() != "true":
        log = containers.podman("logs", "--tail=40", f"{pod.name}-{container}", check=False)
        raise AssertionError(f"{container} stopped:\n{log.stdout}{log.stderr}")
    return request(pod, port, path)[0] == 200


def port_of(pod: containers.Pod, container: str) -> int:
    return int(pod.container(container)["ports"][0]["containerPort"])


def test_server_image_serves_the_tiny_model_with_the_trained_adapter(server_pod: containers.Pod) -> None:
    vllm, fetcher = port_of(server_pod, "vllm"), port_of(server_pod, "fetcher")
    health = server_pod.container("vllm")["startupProbe"]["httpGet"]["path"]
    wait_for(lambda: request(server_pod, fetcher, "/health")[0] == 200, 120, "the fetcher's /health", interval=2)
    wait_for(lambda: healthy(server_pod, "vllm", vllm, health), 600, "vLLM's /health", interval=5)
    # What the operator does to load an adapter: the fetcher prepares it, vLLM loads the path it returns.
    status, prepared = request(
        server_pod, fetcher, "/prepare", {"uri": f"pvc://adapters/{ADAPTER}/adapter"}, signed=True
    )
    assert status == 200, prepared
    assert prepared["adapterConfig"]["r"] == 8
    status, loaded = request(
        server_pod, vllm, "/v1/load_lora_adapter", {"lora_name": ADAPTER, "lora_path": prepared["path"]}
    )
    assert status == 200, loaded
    question = {"model": ADAPTER, "messages": [{"role": "user", "content": serving.QUESTION}], "max_tokens": 8}
    status, answer = request(server_pod, vllm, "/v1/chat/completions", question)
    assert status == 200, answer
    assert answer["model"] == ADAPTER and answer["choices"][0]["message"]["content"]


def test_server_containers_run_as_the_pods_user(server_pod: containers.Pod) -> None:
    for name in ("vllm", "fetcher"):
        assert containers.podman("exec", f"{server_pod.name}-{name}", "id", "-u").stdout.strip() == "65532"
