"""Fixtures for the trainer tests: a tiny Qwen2 built locally, small datasets, configs, and runs.

Runs happen in-process where possible (imports of torch/transformers/TRL cost ~20 s per process on 2 cores);
the SIGTERM and multi-process tests start real `kubetune train` processes.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

pytest.importorskip("trl", reason="needs the trainer extra: hack/setup.sh trainer")

CAPITALS = [
    ("France", "Paris"),
    ("Japan", "Tokyo"),
    ("Italy", "Rome"),
    ("Spain", "Madrid"),
    ("Germany", "Berlin"),
    ("Egypt", "Cairo"),
    ("Canada", "Ottawa"),
    ("Peru", "Lima"),
]


def sft_records() -> list[dict[str, Any]]:
    return [
        {
            "system": "Answer briefly.",
            "prompt": f"What is the capital of {c}?",
            "response": f"The capital of {c} is {k}.",
        }
        for c, k in CAPITALS
    ]


def dpo_records() -> list[dict[str, Any]]:
    return [
        {
            "prompt": f"What is the capital of {c}?",
            "chosen": f"The capital of {c} is {k}.",
            "rejected": f"The capital of {c} is {CAPITALS[(i + 3) % len(CAPITALS)][1]}.",
        }
        for i, (c, k) in enumerate(CAPITALS)
    ]


def write_jsonl(path: Path, records: list[Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


@dataclass
class Run:
    """A finished trainer run: exit code, the JSON events it printed, its output directory."""

    code: int
    events: list[dict[str, Any]]
    output: Path
    stdout: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def of(self, event: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("event") == event]


def parse_events(text: str) -> list[dict[str, Any]]:
    events = []
    for line in text.splitlines():
        if line.startswith("{"):
            with contextlib.suppress(json.JSONDecodeError):
                events.append(json.loads(line))
    return events


@pytest.fixture(scope="package")
def pvc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A stand-in for the mounted PVCs: pvc://CLAIM/PATH resolves under it."""
    root = tmp_path_factory.mktemp("pvc")
    write_jsonl(root / "data" / "sft.jsonl", sft_records())
    write_jsonl(root / "data" / "dpo.jsonl", dpo_records())
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KUBETUNE_PVC_ROOT", str(root))
        mp.setenv("KUBETUNE_TERMINATION_LOG", str(root / "termination-log"))
        mp.delenv("KUBERNETES_SERVICE_HOST", raising=False)
        for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "NNODES", "NPROC_PER_NODE", "NODE_RANK"):
            mp.delenv(var, raising=False)
        yield root


@pytest.fixture(scope="package")
def tiny_model(pvc: Path) -> str:
    """pvc://models/tiny: a tiny Qwen2 and a BPE tokenizer trained on the test data."""
    from kubetune.trainer.tiny import build_tiny_model

    text = [json.dumps(r) for r in sft_records() + dpo_records()]
    build_tiny_model(pvc / "models" / "tiny", text)
    return "pvc://models/tiny"


def trainer_config(name: str, tiny_model: str, **spec: Any) -> dict[str, Any]:
    """A TrainerConfig (wire form) for the tiny model; `spec` and `plan`/`progressIntervalSeconds` override."""
    plan = spec.pop("plan", {})
    interval = spec.pop("progressIntervalSeconds", 0.001)  # a report after every step, however fast
    init = spec.pop("initAdapterUri", None)
    base: dict[str, Any] = {
        "method": "SFT",
        "baseModel": {"uri": tiny_model},
        "dataset": {"uri": "pvc://data/sft.jsonl"},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "targetModules": ["all-linear"]},
        "hyperparameters": {
            "learningRate": 0.005,
            "maxSteps": 20,
            "globalBatchSize": 4,
            "maxSeqLength": 64,
            "warmupRatio": 0.0,
        },
        "resources": {"nodes": 1, "gpusPerNode": 1},
        "output": {"uri": f"pvc://out/{name}"},
        "checkpointing": {"everySteps": 5, "keep": 2},
    }
    for key, value in spec.items():
        base[key] = {**base[key], **value} if isinstance(value, dict) and key in base else value
    config = {
        "job": {"name": name, "namespace": "default", "uid": f"uid-{name}"},
        "progressIntervalSeconds": interval,
        "spec": base,
        "plan": {"zeroStage": 0, "microBatchSize": 4, "gradientAccumulationSteps": 1, "worldSize": 1, **plan},
    }
    if init:
        config["initAdapterUri"] = init
    return config


def write_config(pvc: Path, config: dict[str, Any]) -> Path:
    path = pvc / "configs" / f"{config['job']['name']}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return path


def run_in_process(pvc: Path, config: dict[str, Any]) -> Run:
    """`kubetune train --config FILE` in this process, its stdout captured."""
    from kubetune.trainer.main import main

    path = write_config(pvc, config)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["--config", str(path)])
    return Run(code, parse_events(out.getvalue()), pvc / "out" / config["job"]["name"], out.getvalue())


def kubetune_command(config_path: Path) -> list[str]:
    return [sys.executable, "-m", "kubetune.trainer.main", "--config", str(config_path)]


def subprocess_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **extra}
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_subprocess(pvc: Path, config: dict[str, Any], timeout: float = 600, **env: str) -> Run:
    path = write_config(pvc, config)
    proc = subprocess.run(
        kubetune_command(path), env=subprocess_env(**env), capture_output=True, text=True, timeout=timeout
    )
    run = Run(proc.returncode, parse_events(proc.stdout), pvc / "out" / config["job"]["name"], proc.stdout)
    run.extra["stderr"] = proc.stderr
    return run


def run_until_sigterm(pvc: Path, config: dict[str, Any], at_step: int, **env: str) -> list[dict[str, Any]]:
    """Run the trainer in a subprocess, send SIGTERM once it reports step `at_step`, expect the exit code of a
    clean stop after its final checkpoint (143), and return its events."""
    proc = subprocess.Popen(
        kubetune_command(write_config(pvc, config)),
        env=subprocess_env(**env),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if '"event": "progress"' in line and f'"step": {at_step},' in line:
            proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == 143, "".join(lines)
    return parse_events("".join(lines))


@pytest.fixture(scope="package")
def sft_run(pvc: Path, tiny_model: str) -> Run:
    """SFT for 20 steps on the memorisable capitals (shared by several tests and by DPO)."""
    return run_in_process(pvc, trainer_config("sft", tiny_model))
