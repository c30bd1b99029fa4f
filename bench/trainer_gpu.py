"""Our trainer (`kubetune train`) on one H200: Qwen2.5-7B architecture, random weights, seq 8192.

Runs on the GPU machine (docs/gpu-baselines.md: Python 3.12, torch 2.11, transformers 5.17, peft 0.21; trl,
datasets, deepspeed, liger_kernel, pydantic... carried as wheels in .whl/). It builds the model (random bf16
weights, our tiny BPE tokenizer: the token ids do not change the speed) and a JSONL dataset whose records
tokenize past 8192 tokens, then runs the trainer's own entry point (`kubetune train --config FILE`, through
`child_main` here) once per configuration, each in its own process, and reads tokens/s and peak GPU memory
from the trainer's own progress JSON lines. Configurations (LoRA r64/alpha128 on q,k,v,o; micro-batch 1 x
accumulation 8, so 65,536 tokens per optimizer step, as in the baselines of docs/gpu-baselines.md):

  bf16    no DeepSpeed, gradient checkpointing, bf16                       baseline 9,291 tokens/s, 18.9 GiB
  recipe  ZeRO-3 + CPU optimizer offload, gradient checkpointing, bf16     baseline 8,238 tokens/s, 18.6 GiB
  plan    no DeepSpeed, no checkpointing, compiled decoder layers, bf16   baseline 15,216 tokens/s, 47.5 GiB
          (the planner's plan for one H100/H200; not run unless named in --configs)

VARIANTS are the recipe with one thing changed (e.g. `recipe-per-module`: ZeRO-3 hooks every submodule, as
the trainer did before each decoder layer became one fetch); `--configs bf16,recipe,recipe-per-module` picks
configurations, `--profile recipe` writes a torch.profiler table of one micro-batch (profile-NAME.txt).
Tokens/s counts the optimizer steps after the first (warm-up: CPU Adam's build, allocator growth). Writes
bench/results/trainer_gpu_h200.json (or --results FILE, and a copy under --out) and prints a table; only
the configurations (not the variants) must be within 5% of their baselines. Must finish in 9 minutes.

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
    "plan": {
        "description": "the planner's plan for one H100/H200: no DeepSpeed, no checkpointing, compiled decoder layers",
        "plan": {"zeroStage": 0, "offload": "none", "gradientCheckpointing": False, "compile": True},
        "baseline": {"tokens_per_second": 15216, "peak_gib": 47.5},
    },
}
DEFAULT_CONFIGS = ("bf16", "recipe")
TOLERANCE = 0.05

VARIANTS: dict[str, dict[str, Any]] = {
    # The recipe with one thing changed, to show where its time went. The trainer runs unchanged except for what
    # the variant names, patched in by `child_main` here, so no variant leaks into the trainer.
    "recipe-per-module": {
        "of": "recipe",
        "description": "the recipe as before the fix: ZeRO-3 hooks and fetches every submodule",
        "per_module": True,
    },
    "recipe-per-module-fp16": {
        "of": "recipe",
        "description": "the recipe as before the fix, in fp16 as the baseline ran it",
        "per_module": True,
        "precision": "fp16",
    },
    "recipe-per-module-persist": {
        "of": "recipe",
        "description": "the recipe as before the fix, every weight persistent (ZeRO-3 never gathers or releases)",
        "per_module": True,
        "zero": {"stage3_param_persistence_threshold": 10**12},
    },
}


def base_of(name: str) -> str:
    """The configuration a variant changes (a configuration is its own base)."""
    return str(VARIANTS[name]["of"]) if name in VARIANTS else name


def baseline_of(name: str) -> dict[str, Any]:
    return dict(CONFIGS[base_of(name)]["baseline"])


def description_of(name: str) -> str:
    return str(VARIANTS[name]["description"] if name in VARIANTS else CONFIGS[name]["description"])


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
            **CONFIGS[base_of(name)]["plan"],
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
        "grad_norms": [e.get("metrics", {}).get("grad_norm") for e in progress],
        "peak_allocated_gib": metrics.get("gpu_max_allocated_gib"),
        "peak_reserved_gib": metrics.get("gpu_max_reserved_gib"),
    }


def log_facts(text: str) -> dict[str, Any]:
    """What DeepSpeed said about itself: CPU Adam built or loaded, trace-cache invalidations."""
    return {
        "cpu_adam_lines": [line.strip()[-160:] for line in text.splitlines() if "cpu_adam" in line.lower()][:4],
        "trace_invalidations": text.count("Invalidate trace cache"),
    }


def run_config(
    name: str, work: Path, timeout: float, steps: int, profile: Path | None = None
) -> dict[str, Any]:  # pragma: no cover - GPU only
    """One `kubetune train` process (through `child_main`); its measurements, or why it failed."""
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
                [sys.executable, __file__, "--child", name, "--config", str(config_path)]
                + (["--profile-to", str(profile)] if profile else []),
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
    stderr_text = log_path.read_text()
    result.update(log_facts(stdout + stderr_text))  # DeepSpeed logs to stdout, Python warnings to stderr
    if code != 0:
        result["stderr_tail"] = stderr_text[-3000:]
    return result


def compare(name: str, measured: dict[str, Any]) -> dict[str, Any]:
    """Our figures against the baseline (docs/gpu-baselines.md): the ratio, and whether it is within the tolerance."""
    baseline = baseline_of(name)
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


def merged(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def child_main(name: str, config: Path, profile_to: Path | None) -> int:  # pragma: no cover - GPU only
    """Run `kubetune train --config FILE` in this process with the variant's changes patched in."""
    import kubetune.trainer.train as train

    variant = VARIANTS.get(name, {})
    fp16 = variant.get("precision") == "fp16"
    make_deepspeed_config = train.deepspeed_config

    def deepspeed_config(plan: Any, hidden_size: int | None = None, bf16: bool = True) -> dict[str, Any] | None:
        ds = make_deepspeed_config(plan, hidden_size, bf16=bf16 and not fp16)
        if ds is None:
            return None
        ds["zero_optimization"]["log_trace_cache_warnings"] = True
        if fp16:
            ds["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
        return merged(ds, {"zero_optimization": variant.get("zero", {})})

    train.deepspeed_config = deepspeed_config  # type: ignore[assignment]
    if fp16:
        import trl

        sft_config = trl.SFTConfig

        def fp16_sft_config(**kwargs: Any) -> Any:
            return sft_config(**{**kwargs, "bf16": False, "fp16": True})

        trl.SFTConfig = fp16_sft_config  # type: ignore[assignment,misc]

    if variant.get("per_module"):
        train.fetch_decoder_layers_whole = lambda model: 0  # type: ignore[assignment]
    build_trainer = train.build_trainer

    def build_trainer_with_extras(*args: Any, **kwargs: Any) -> Any:
        trainer = build_trainer(*args, **kwargs)
        if profile_to is not None:
            trainer.add_callback(profile_callback(profile_to))
        return trainer

    train.build_trainer = build_trainer_with_extras  # type: ignore[assignment]
    from kubetune.trainer.main import main as trainer_main

    return trainer_main(["--config", str(config)])


KERNEL_KINDS = (
    ("attention", ("flash", "fmha", "attention", "sdpa", "cudnn")),
    ("gemm", ("gemm", "nvjet", "cutlass", "xmma", "cublas")),
    ("compiled (triton)", ("triton",)),
    ("copy/fill", ("memcpy", "memset", "copy", "fill")),
)


def kernel_breakdown(kernels: Any) -> dict[str, float]:
    """GPU seconds per kind of kernel ((name, seconds) pairs): attention, gemm, compiled (Triton), copy/fill,
    other (PyTorch's own elementwise and reduction kernels)."""
    totals: dict[str, float] = {kind: 0.0 for kind, _ in KERNEL_KINDS}
    totals["other"] = 0.0
    for name, seconds in kernels:
        lowered = name.lower()
        kind = next((k for k, marks in KERNEL_KINDS if any(m in lowered for m in marks)), "other")
        totals[kind] += seconds
    return {kind: round(seconds, 4) for kind, seconds in totals.items()}


def profile_callback(path: Path) -> Any:  # pragma: no cover - GPU only
    """Profiles the first micro-batch of the second optimizer step (CPU and CUDA), writes the tables to `path`."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    from transformers import TrainerCallback

    class Profile(TrainerCallback):  # type: ignore[misc]
        def __init__(self) -> None:
            self.prof: Any = None
            self.started = 0.0
            self.micro: list[float] = []
            self.last = 0.0

        def on_step_begin(self, args: Any, state: Any, control: Any, **_: Any) -> None:
            self.last = time.perf_counter()
            if state.global_step == 1 and self.prof is None:
                torch.cuda.synchronize()
                self.prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
                self.prof.__enter__()
                self.started = time.perf_counter()

        def finish(self) -> None:
            """Stop the profiler after its one micro-batch and write the tables."""
            torch.cuda.synchronize()
            wall = time.perf_counter() - self.started
            self.prof.__exit__(None, None, None)
            self.started = 0.0
            averages = self.prof.key_averages()
            kernels = sum(e.self_device_time_total for e in averages if e.device_type.name == "CUDA") / 1e6
            breakdown = kernel_breakdown(
                (e.key, e.self_device_time_total / 1e6) for e in averages if e.device_type.name == "CUDA"
            )
            text = [
                f"one micro-batch: wall {wall:.3f} s, GPU kernels {kernels:.3f} s",
                "GPU kernel seconds by kind: " + json.dumps(breakdown),
                averages.table(sort_by="self_cpu_time_total", row_limit=40, max_name_column_width=70),
                averages.table(sort_by="self_device_time_total", row_limit=30, max_name_column_width=70),
            ]
            path.write_text("\n\n".join(text))

        def on_substep_end(self, args: Any, state: Any, control: Any, **_: Any) -> None:
            now = time.perf_counter()
            if state.global_step == 1:
                self.micro.append(now - self.last)
            self.last = now
            if self.prof is not None and self.started:
                self.finish()
                self.last = time.perf_counter()  # the tables took a while: not the next micro-batch's time

        def on_step_end(self, args: Any, state: Any, control: Any, **_: Any) -> None:
            if self.prof is not None and self.started:
                self.finish()  # a step of one micro-batch (it ends without a substep)
            if state.global_step == 2 and self.micro:
                with path.open("a") as out:
                    out.write("\nmicro-batch wall seconds of step 2 (unprofiled after the first): " + repr(self.micro))

    return Profile()


def main(argv: list[str] | None = None) -> int:  # pragma: no cover - GPU only
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="also copy the results file here (e.g. $OUT)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/kubetune-trainer-bench"))
    parser.add_argument(
        "--configs", default=",".join(DEFAULT_CONFIGS), help="comma-separated, of: " + ", ".join([*CONFIGS, *VARIANTS])
    )
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--profile", default="", help="comma-separated configurations to profile one micro-batch of")
    parser.add_argument("--results", type=Path, help="results file (default: bench/results/trainer_gpu_h200.json)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--config", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--profile-to", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--dry-run", action="store_true", help="print the trainer configurations and stop")
    args = parser.parse_args(argv)
    if args.child:
        return child_main(args.child, args.config, args.profile_to)
    names = [n for n in args.configs.split(",") if n]
    unknown = [n for n in names if n not in CONFIGS and n not in VARIANTS]
    if unknown:
        parser.error(f"unknown configurations: {unknown}")
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
    out_file = args.results or ROOT / "bench" / "results" / "trainer_gpu_h200.json"
    out_file.parent.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        left = deadline - time.monotonic()
        # The quicker plain run goes first; the recipe (DeepSpeed start-up, CPU Adam build) gets what is left.
        timeout = left if i == len(names) - 1 else max(0.4 * left, left / (len(names) - i))
        profile = args.work / f"profile-{name}.txt" if name in args.profile.split(",") else None
        measured = run_config(name, args.work, timeout=max(30.0, timeout), steps=args.steps, profile=profile)
        results["configs"][name] = {"description": description_of(name), **measured, **compare(name, measured)}
        if profile is not None and profile.is_file() and args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            shutil.copy(profile, args.out / profile.name)
        out_file.write_text(json.dumps(results, indent=2))  # partial results survive a later timeout
        print(json.dumps({"config": name, **results["configs"][name]}), flush=True)
    results["all_within_5_percent"] = all(
        r["within_5_percent"] for name, r in results["configs"].items() if name in CONFIGS
    )
    out_file.write_text(json.dumps(results, indent=2))
    if args.out and (args.out / out_file.name).resolve() != out_file.resolve():
        args.out.mkdir(parents=True, exist_ok=True)
        shutil.copy(out_file, args.out / out_file.name)
    print(table(results))
    return 0 if results["all_within_5_percent"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
