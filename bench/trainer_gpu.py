"""Our trainer (`kubetune train`) on one H200: Qwen2.5-7B architecture, random weights, seq 8192.

Runs on the GPU machine (../shared/GPU.md: Python 3.12, torch 2.11, transformers 5.17, peft 0.21; trl,
datasets, deepspeed, liger_kernel, pydantic... carried as wheels in .whl/). It builds the model (random bf16
weights, our tiny BPE tokenizer: the token ids do not change the speed) and a JSONL dataset whose records
tokenize past 8192 tokens, then runs the real `python -m kubetune.trainer.main --config FILE`, once per
configuration, each in its own process, and reads tokens/s and peak GPU memory from the trainer's own
progress JSON lines. Configurations (LoRA r64/alpha128 on q,k,v,o; micro-batch 1 x accumulation 8, so
65,536 tokens per optimizer step, as in GPU.md's baselines):

  bf16    no DeepSpeed, gradient checkpointing, bf16                       baseline 9,291 tokens/s, 18.9 GiB
  recipe  ZeRO-3 + CPU optimizer offload, gradient checkpointing, bf16     baseline 8,238 tokens/s, 18.6 GiB

Tokens/s counts the optimizer steps after the first (warm-up: CPU Adam's build, allocator growth). Writes
bench/results/trainer_gpu_h200.json (and a copy under --out) and prints a table. Must finish in 9 minutes.

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \\
        .whl/*.whl && export PYTHONPATH=/tmp/site:operator PYTHONUNBUFFERED=1 && \\
        python3 bench/trainer_gpu.py --out "$OUT"

`python3 bench/trainer_gpu.py --dry-run` writes the configurations and prints them (no GPU needed).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "operator"))

# The Qwen2.5-7B architecture (config.json fields), shared with the planner's benchmark beside this file.
from planner_gpu import QWEN25_7B  # noqa: E402

SEQ = 8192
MICRO_BATCH, ACCUMULATION = 1, 8
TOKENS_PER_STEP = SEQ * MICRO_BATCH * ACCUMULATION
STEPS = 5
"""Optimizer steps per configuration; the first is warm-up."""
BUDGET_S = 530.0
"""The whole benchmark, model building included (the GPU machine stops a command at 600 s)."""

CONFIGS: dict[str, dict[str, Any]] = {
    "bf16": {
        "description": "no DeepSpeed, gradient checkpointing, micro-batch 1 x 8, bf16",
        "plan": {"zeroStage": 0, "offload": "none", "gradientCheckpointing": True},
        "baseline": {"tokens_per_second": 9291, "peak_gib": 18.9},
    },
    "recipe": {
        "description": "ZeRO-3 + CPU optimizer offload, gradient checkpointing, micro-batch 1 x 8, bf16",
        "plan": {"zeroStage": 3, "offload": "cpu", "gradientCheckpointing": True},
        "baseline": {"tokens_per_second": 8238, "peak_gib": 18.6},
    },
}
TOLERANCE = 0.05


def trainer_config(name: str, steps: int = STEPS) -> dict[str, Any]:
    """The TrainerConfig (wire form) the operator would render for this configuration."""
    return {
        "job": {"name": f"bench-{name}", "namespace": "bench"},
        "progressIntervalSeconds": 0.5,  # shorter than a step: one report (and one tokens/s) per step
        "spec": {
            "method": "SFT",
            "baseModel": {"uri": "pvc://models/qwen2.5-7b-random"},
            "dataset": {"uri": "pvc://data/long.jsonl"},
            "lora": {"r": 64, "alpha": 128, "dropout": 0.05, "targetModules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
            "hyperparameters": {
                "learningRate": 2e-5,
                "maxSteps": steps,
                "globalBatchSize": MICRO_BATCH * ACCUMULATION,
                "maxSeqLength": SEQ,
                "warmupRatio": 0.0,
            },
            "resources": {"nodes": 1, "gpusPerNode": 1, "gpuType": "h200"},
            "output": {"uri": f"pvc://out/{name}"},
            "checkpointing": {"everySteps": 100_000, "keep": 1},
        },
        "plan": {
            "microBatchSize": MICRO_BATCH,
            "gradientAccumulationSteps": ACCUMULATION,
            "attention": "sdpa",
            "worldSize": 1,
            **CONFIGS[name]["plan"],
        },
    }


def random_words(rng: random.Random, n: int) -> str:
    letters = "abcdefghijklmnopqrstuvwxyz"
    return " ".join("".join(rng.choices(letters, k=rng.randint(3, 9))) for _ in range(n))


def write_dataset(path: Path, records: int, seed: int = 0) -> list[str]:
    """Prompt/response records whose responses run well past SEQ tokens (they are truncated to SEQ)."""
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [
        json.dumps({"prompt": random_words(rng, 20), "response": random_words(rng, 2 * SEQ)}) for _ in range(records)
    ]
    path.write_text("\n".join(lines) + "\n")
    return lines[:4]


def build_model(model_dir: Path, text: list[str]) -> float:  # pragma: no cover - GPU only
    """Qwen2.5-7B architecture with random bf16 weights (made on the GPU), saved with a local tokenizer."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from kubetune.trainer.tiny import build_tokenizer

    started = time.monotonic()
    tokenizer = build_tokenizer(text)
    config = Qwen2Config(**QWEN25_7B, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = Qwen2ForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    model.save_pretrained(model_dir, max_shard_size="5GB")
    tokenizer.save_pretrained(model_dir)
    del model
    torch.cuda.empty_cache()
    return time.monotonic() - started


def events_of(stdout: str) -> list[dict[str, Any]]:
    events = []
    for line in stdout.splitlines():
        if line.startswith("{"):
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return events


def measure(events: list[dict[str, Any]]) -> dict[str, Any]:
    """Tokens/s over the steps after the first, and the peak memory, from the trainer's progress lines."""
    progress = [e for e in events if e.get("event") == "progress"]
    timed = [e for e in progress if e["step"] >= 2 and e.get("tokensPerSecond")]
    seconds = sum(TOKENS_PER_STEP / e["tokensPerSecond"] for e in timed)
    metrics = progress[-1].get("metrics", {}) if progress else {}
    return {
        "steps": progress[-1]["step"] if progress else 0,
        "timed_steps": len(timed),
        "tokens_per_second": round(TOKENS_PER_STEP * len(timed) / seconds) if seconds else None,
        "per_step_tokens_per_second": [e["tokensPerSecond"] for e in progress],
        "losses": [e.get("loss") for e in progress],
        "peak_allocated_gib": metrics.get("gpu_max_allocated_gib"),
        "peak_reserved_gib": metrics.get("gpu_max_reserved_gib"),
    }


def run_config(name: str, work: Path, timeout: float, steps: int) -> dict[str, Any]:  # pragma: no cover - GPU only
    """One `kubetune train` process; its measurements, or why it failed."""
    config_path = work / "configs" / f"{name}.json"
    config_path.parent.mkdir(parents=True, exist_ok=True)
    config_path.write_text(json.dumps(trainer_config(name, steps)))
    shutil.rmtree(work / "pvc" / "out" / name, ignore_errors=True)
    env = {**os.environ, "KUBETUNE_PVC_ROOT": str(work / "pvc"), "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "operator"), env.get("PYTHONPATH", "")) if p)
    env["KUBETUNE_TERMINATION_LOG"] = str(work / f"{name}.termination-log")
    started = time.monotonic()
    log_path = work / f"{name}.stderr"
    try:
        with log_path.open("w") as stderr:
            proc = subprocess.run(
                [sys.executable, "-m", "kubetune.trainer.main", "--config", str(config_path)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
                timeout=timeout,
            )
        code, stdout = proc.returncode, proc.stdout
    except subprocess.TimeoutExpired as err:
        code, stdout = -1, err.stdout.decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
    result = {"exit_code": code, "wall_seconds": round(time.monotonic() - started, 1), **measure(events_of(stdout))}
    if code != 0:
        result["stderr_tail"] = log_path.read_text()[-3000:]
    return result


def compare(name: str, measured: dict[str, Any]) -> dict[str, Any]:
    """Our figures against GPU.md's baseline: the ratio, and whether it is within the tolerance."""
    baseline = CONFIGS[name]["baseline"]
    tps = measured.get("tokens_per_second")
    ratio = tps / baseline["tokens_per_second"] if tps else None
    return {
        "baseline": baseline,
        "ratio_to_baseline": round(ratio, 3) if ratio else None,
        "within_5_percent": bool(ratio and ratio >= 1 - TOLERANCE),
    }


def table(results: dict[str, Any]) -> str:
    rows = [
        "| config | tokens/s | baseline | ratio | peak alloc GiB | peak reserved GiB | baseline GiB |",
        "|---" * 7 + "|",
    ]
    for name, r in results["configs"].items():
        rows.append(
            f"| {name} | {r.get('tokens_per_second')} | {r['baseline']['tokens_per_second']} | "
            f"{r.get('ratio_to_baseline')} | {r.get('peak_allocated_gib')} | {r.get('peak_reserved_gib')} | "
            f"{r['baseline']['peak_gib']} |"
        )
    return "\n".join(rows)


def versions() -> dict[str, str]:  # pragma: no cover - GPU only
    found = {}
    for module in ("torch", "transformers", "peft", "trl", "deepspeed", "accelerate"):
        try:
            found[module] = str(__import__(module).__version__)
        except Exception:
            found[module] = "missing"
    return found


def main(argv: list[str] | None = None) -> int:  # pragma: no cover - GPU only
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="also copy the results file here (e.g. $OUT)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/kubetune-trainer-bench"))
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset of: " + ", ".join(CONFIGS))
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--dry-run", action="store_true", help="print the trainer configurations and stop")
    args = parser.parse_args(argv)
    names = [n for n in args.configs.split(",") if n]
    if args.dry_run:
        from kubetune.api.v1alpha1 import TrainerConfig

        configs = {n: TrainerConfig.model_validate(trainer_config(n, args.steps)).to_wire() for n in names}
        print(json.dumps(configs, indent=2))
        return 0

    deadline = time.monotonic() + BUDGET_S
    import torch

    results: dict[str, Any] = {
        "gpu": torch.cuda.get_device_name(0),
        "seq": SEQ,
        "tokens_per_step": TOKENS_PER_STEP,
        "steps": args.steps,
        "versions": versions(),
        "configs": {},
    }
    pvc = args.work / "pvc"
    sample = write_dataset(pvc / "data" / "long.jsonl", records=MICRO_BATCH * ACCUMULATION * args.steps)
    model_dir = pvc / "models" / "qwen2.5-7b-random"
    if not (model_dir / "config.json").is_file():
        results["model_build_seconds"] = round(build_model(model_dir, sample), 1)
    out_file = ROOT / "bench" / "results" / "trainer_gpu_h200.json"
    out_file.parent.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        left = deadline - time.monotonic()
        # The quicker plain run goes first; the recipe (DeepSpeed start-up, CPU Adam build) gets what is left.
        timeout = left if i == len(names) - 1 else 0.4 * left
        measured = run_config(name, args.work, timeout=max(30.0, timeout), steps=args.steps)
        results["configs"][name] = {"description": CONFIGS[name]["description"], **measured, **compare(name, measured)}
        out_file.write_text(json.dumps(results, indent=2))  # partial results survive a later timeout
        print(json.dumps({"config": name, **results["configs"][name]}), flush=True)
    results["all_within_5_percent"] = all(r["within_5_percent"] for r in results["configs"].values())
    out_file.write_text(json.dumps(results, indent=2))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        shutil.copy(out_file, args.out / out_file.name)
    print(table(results))
    return 0 if results["all_within_5_percent"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
