"""Real vLLM servers run by the node agent: the tiny model, adapters our trainer made, FineTuneJobs that succeed.

Shared by tests/integration/test_serving.py and bench/adapter_latency.py. The server pods run on the agent's
Node (gpuType cpu-agent, see support.operator_config_for_tests); the FineTuneJobs are simulated by kwok, and
their adapters are trained beforehand, in this process, by kubetune's own trainer into the claim's folder.
"""

from __future__ import annotations

import contextlib
import io
import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from tests.integration.support import AGENT_GPU_TYPE, Api, simulated_ftj, wait_for

CAPITALS = [("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Peru", "Lima")]
QUESTION = "What is the capital of France?"
MODEL_URI = "pvc://models/tiny"
SERVER_PORT = 8000


# --- assets: the tiny model and adapters, written where the agent's PVC folders are ------------------


@contextlib.contextmanager
def pvc_root(root: Path) -> Iterator[None]:
    """pvc://CLAIM/PATH resolves to root/CLAIM/PATH for the trainer running in this process."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KUBETUNE_PVC_ROOT", str(root))
        mp.setenv("KUBETUNE_TERMINATION_LOG", str(root / "termination-log"))
        mp.delenv("KUBERNETES_SERVICE_HOST", raising=False)
        yield


def build_model(root: Path) -> Path:
    """The tiny Qwen2 (hidden 128, 4 heads: vLLM's CPU attention needs head_dim >= 32) at pvc://models/tiny."""
    from kubetune.trainer.tiny import build_tiny_model

    records = sft_records()
    (root / "data").mkdir(parents=True, exist_ok=True)
    (root / "data" / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return build_tiny_model(root / "models" / "tiny", [json.dumps(r) for r in records])


def sft_records() -> list[dict[str, str]]:
    return [{"prompt": f"What is the capital of {c}?", "response": f"The capital of {c} is {k}."} for c, k in CAPITALS]


def train_adapter(root: Path, name: str, rank: int = 8, steps: int = 20, seed: int = 0) -> Path:
    """An SFT LoRA adapter of the tiny model, trained by `kubetune train`, at pvc://adapters/NAME/adapter."""
    from kubetune.trainer.main import main

    config = {
        "job": {"name": name, "namespace": "default", "uid": f"uid-{name}"},
        "progressIntervalSeconds": 60,
        "spec": {
            "baseModel": {"uri": MODEL_URI},
            "dataset": {"uri": "pvc://data/sft.jsonl"},
            "lora": {"r": rank, "alpha": 2 * rank, "dropout": 0.0, "targetModules": ["all-linear"]},
            "hyperparameters": {
                "learningRate": 0.005,
                "maxSteps": steps,
                "globalBatchSize": 4,
                "maxSeqLength": 64,
                "warmupRatio": 0.0,
                "seed": seed,
            },
            "resources": {"nodes": 1, "gpusPerNode": 1},
            "output": {"uri": f"pvc://adapters/{name}"},
            "checkpointing": {"everySteps": 1000, "keep": 1},
        },
        "plan": {"zeroStage": 0, "microBatchSize": 4, "gradientAccumulationSteps": 1, "worldSize": 1},
    }
    path = root / "configs" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    with pvc_root(root), contextlib.redirect_stdout(io.StringIO()):
        code = main(["--config", str(path)])
    assert code == 0, f"training {name} failed"
    return root / "adapters" / name / "adapter"


# --- the cluster side --------------------------------------------------------------------------------


def model_server(name: str, namespace: str, **spec: Any) -> dict[str, Any]:
    """A ModelServer of the tiny model on the agent's Node, greedy by default so answers are comparable."""
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "ModelServer",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "baseModel": {"uri": MODEL_URI},
            "replicas": 1,
            "gpuType": AGENT_GPU_TYPE,
            "maxModelLen": 512,
            "maxLoraRank": 8,
            "generationDefaults": {"temperature": 0, "topP": 1, "repetitionPenalty": 1.0},
            # float32 like HF on CPU, so that logprobs agree to far better than 1e-2
            "engineArgs": ["--dtype=float32"],
            **spec,
        },
    }


def suspended_ftj(
    name: str, namespace: str, labels: dict[str, str], run_seconds: float = 2, output: dict[str, Any] | None = None
) -> dict[str, Any]:
    """A simulated FineTuneJob writing to pvc://adapters/NAME (or `output`); it starts when resumed, kwok
    completes it."""
    body = simulated_ftj(
        name, namespace, run_seconds=run_seconds, suspend=True, output=output or {"uri": f"pvc://adapters/{name}"}
    )
    body["metadata"]["labels"] = labels
    return body


def report_adapter(
    api: Api, namespace: str, name: str, base_model: str = MODEL_URI, rank: int = 8, uri: str = ""
) -> None:
    """What the trainer writes into status.adapter at the end of a run (its kubetune.json), before it exits."""
    adapter = {
        "uri": uri or f"pvc://adapters/{name}/adapter",
        "baseModel": base_model,
        "rank": rank,
        "targetModules": ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"],
    }
    api.kube.patch_status("FineTuneJob", namespace, name, {"adapter": adapter})


def resume(api: Api, namespace: str, name: str) -> None:
    api.kubectl("patch", "ftj", name, "-n", namespace, "--type=merge", "-p", '{"spec":{"suspend":false}}')


def replica_addresses(api: Api, namespace: str, server: str) -> list[str]:
    """host:port of each Ready server pod."""
    pods = api.children("Pod", namespace, "kubetune.io/modelserver", server)
    return sorted(
        f"{p['status']['podIP']}:{SERVER_PORT}"
        for p in pods
        if p["metadata"]["labels"].get("app.kubernetes.io/component") == "server"
        and not p["metadata"].get("deletionTimestamp")
        and any(c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions", []))
    )


def post(
    address: str, path: str, body: dict[str, Any], timeout: float = 60, api_key: str = ""
) -> tuple[int, dict[str, Any]]:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {api_key}"} if api_key else {})}
    request = urllib.request.Request(f"http://{address}{path}", json.dumps(body).encode(), headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, _json_or_text(response.read())
    except urllib.error.HTTPError as err:
        return err.code, _json_or_text(err.read())
    except OSError as err:
        return 0, {"error": str(err)}


def _json_or_text(body: bytes) -> dict[str, Any]:
    """A JSON answer, or the text of one that is not (a plain "Internal Server Error"), for the assertion."""
    try:
        return dict(json.loads(body or b"{}"))
    except ValueError:
        return {"text": body.decode(errors="replace")}


def models(address: str, api_key: str = "") -> list[dict[str, Any]]:
    """The model cards of GET /v1/models."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    request = urllib.request.Request(f"http://{address}/v1/models", headers=headers)
    with urllib.request.urlopen(request, timeout=10) as response:
        return list(json.loads(response.read())["data"])


def served_models(address: str, api_key: str = "") -> dict[str, str | None]:
    """Model id -> parent (None for the base model) from GET /v1/models."""
    return {m["id"]: m.get("parent") for m in models(address, api_key)}


def chat(address: str, model: str, max_tokens: int = 8, api_key: str = "", **extra: Any) -> tuple[int, dict[str, Any]]:
    body = {"model": model, "messages": [{"role": "user", "content": QUESTION}], "max_tokens": max_tokens, **extra}
    return post(address, "/v1/chat/completions", body, api_key=api_key)


def answering(address: str, model: str, api_key: str = "") -> bool:
    return chat(address, model, max_tokens=1, api_key=api_key)[0] == 200


def seconds_to_serve(
    api: Api, namespace: str, ftj: str, adapter: str, addresses: list[str], timeout: float = 120
) -> float:
    """From the FineTuneJob's Succeeded (as this process sees it) to the adapter answering on every replica."""
    wait_for(
        lambda: api.status("FineTuneJob", namespace, ftj).get("state") == "Succeeded", timeout, f"{ftj} Succeeded", 0.05
    )
    succeeded = time.monotonic()
    pending = set(addresses)
    deadline = succeeded + timeout
    while pending and time.monotonic() < deadline:
        pending = {a for a in pending if not answering(a, adapter)}
        if pending:
            time.sleep(0.05)
    assert not pending, f"{adapter} not answering on {sorted(pending)} after {timeout}s"
    return time.monotonic() - succeeded


def adapter_status(api: Api, namespace: str, server: str, name: str) -> dict[str, Any] | None:
    return next(
        (a for a in api.status("ModelServer", namespace, server).get("adapters", []) if a["name"] == name), None
    )


def wait_adapter(
    api: Api, namespace: str, server: str, name: str, state: str, timeout: float = 60, **fields: Any
) -> dict[str, Any]:
    """Wait until status.adapters shows `name` in `state` (and with `fields`)."""

    def check() -> dict[str, Any] | None:
        a = adapter_status(api, namespace, server, name)
        return a if a and a["state"] == state and all(a.get(k) == v for k, v in fields.items()) else None

    return wait_for(check, timeout, f"adapter {name} {state} {fields or ''} on {server}")


def hf_logprobs(model_dir: Path, adapter_dir: Path | None, prompt_ids: list[int], generated: list[int]) -> list[float]:
    """Log-probabilities HF transformers (+ PEFT) give the generated tokens after the prompt."""
    import torch
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir))
    with torch.no_grad():
        logits = model.eval()(torch.tensor([prompt_ids + generated])).logits[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    return [logprobs[len(prompt_ids) - 1 + i, token].item() for i, token in enumerate(generated)]
