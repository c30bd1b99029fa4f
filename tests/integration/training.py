"""FineTuneJobs that train for real on a node agent: the job, waiting for it, the trainer's log events.

Shared by tests/integration/test_dev_flow.py and tests/integration/test_multinode.py.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Any

from tests.integration import serving
from tests.integration.support import AGENT_GPU_TYPE, AgentProcess, Api, dump, wait_for

SELECTOR = {"dev-flow": "served"}


def training_job(name: str, ns: str, steps: int, every: int, **spec: Any) -> dict[str, Any]:
    """An SFT FineTuneJob of the tiny model, trained for real on the agent's CPU."""
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name, "namespace": ns, "labels": dict(SELECTOR)},
        "spec": {
            "method": "SFT",
            "baseModel": {"uri": serving.MODEL_URI},
            "dataset": {"uri": "pvc://data/sft.jsonl"},
            "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "targetModules": ["q_proj", "v_proj"]},
            "hyperparameters": {
                "learningRate": 0.005,
                "warmupRatio": 0.0,
                "maxSteps": steps,
                "globalBatchSize": 4,
                "maxSeqLength": 64,
                "seed": 0,
            },
            "resources": {"nodes": 1, "gpusPerNode": 1, "gpuType": AGENT_GPU_TYPE},
            "output": {"uri": f"pvc://adapters/{name}"},
            "checkpointing": {"everySteps": every, "keep": 2},
            "backoffLimit": 2,
            **spec,
        },
    }


def wait_done(api: Api, ns: str, name: str, timeout: float = 180) -> dict[str, Any]:
    """Wait for Succeeded (fail at once on Failed)."""

    def check() -> dict[str, Any] | None:
        status = api.status("FineTuneJob", ns, name)
        assert status.get("state") != "Failed", dump(status)
        return status if status.get("state") == "Succeeded" else None

    return wait_for(check, timeout, f"FineTuneJob {ns}/{name} Succeeded", interval=1)


def events_of(log_text: str) -> list[dict[str, Any]]:
    """The trainer's JSON event lines."""
    events = []
    for line in log_text.splitlines():
        with contextlib.suppress(ValueError):
            obj = json.loads(line)
            if isinstance(obj, dict) and "event" in obj:
                events.append(obj)
    return events


def pod_logs(agent: AgentProcess, ns: str, pod: str) -> str:
    """Every container log the agent kept of one pod."""
    folders = (agent.state_dir / "logs" / ns).glob(f"{pod}_*")
    return "\n".join(p.read_text(errors="replace") for folder in folders for p in sorted(folder.glob("*.log")))


def job_pods(api: Api, ns: str, name: str) -> list[dict[str, Any]]:
    """The FineTuneJob's training pods, oldest first."""
    pods = api.kube.list("Pod", ns, f"kubetune.io/finetunejob={name}")
    return sorted(pods, key=lambda p: p["metadata"]["creationTimestamp"] + p["metadata"]["name"])


def tiny_model_namespace(api: Api, agent: AgentProcess) -> Iterator[str]:
    """A namespace whose claims models, data and adapters are folders of the agent, with the tiny model and its SFT
    data in them (pvc://models/tiny, pvc://data/sft.jsonl). At the end its pods go while the agent still runs, so
    that it stops their processes, then the namespace."""
    ns = api.create_namespace()
    for claim in ("models", "data", "adapters"):
        api.create_bound_pvc(ns, claim)
    serving.build_model(agent.state_dir / "pvc" / ns)
    try:
        yield ns
    finally:
        api.remove_namespace(ns, "finetunejobs,modelservers,deployments,jobs,pods")


def wait_prepared(api: Api, ns: str, name: str, timeout: float = 180) -> dict[str, Any]:
    """The status once the Prepared condition is True (fail at once on Failed)."""

    def check() -> dict[str, Any] | None:
        status = api.status("FineTuneJob", ns, name)
        assert status.get("state") != "Failed", dump(status)
        prepared = [c for c in status.get("conditions", []) if c["type"] == "Prepared" and c["status"] == "True"]
        return status if prepared else None

    return wait_for(check, timeout, f"FineTuneJob {ns}/{name} Prepared", interval=1)
