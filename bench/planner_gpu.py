"""Validate the planner on one GPU: measured peak memory and tokens/s of several plans versus predictions.

Runs on the GPU machine (docs/gpu-baselines.md: Python 3.12, torch 2.11, transformers 5.17, peft 0.21; trl,
datasets, liger_kernel, deepspeed, pydantic... carried as wheels). Each plan trains the Qwen2.5-7B
architecture with random bf16 weights on random token ids for a few optimizer steps with TRL's SFTTrainer
and a PEFT LoRA adapter (DeepSpeed where the plan says), in its own process, so an OOM or a hang costs one
row, not the run. Writes bench/results/planner_gpu_h200.json (or --out DIR/planner_gpu_h200.json) and
prints a markdown table.

    PYTHONPATH=/tmp/site:operator PYTHONUNBUFFERED=1 python3 bench/planner_gpu.py --out "$OUT"

Checks: every predicted peak within 10% of the measured one (the device-level peak: PyTorch's reserved
memory plus the CUDA context, which is what the planner predicts; allocated and reserved are reported
too), and the planner's plan for 1x H200, seq 8192, global batch 64, LoRA r64 on q,k,v,o at least 1.8x
the tokens/s of the popular recipe (ZeRO-3 + CPU optimizer offload, checkpointing, micro-batch 1 x 8).

Measured steps hold 65,536 tokens for the two plans that are compared (as in the baselines) and 32,768 for the
others; the first step (compilation, DeepSpeed's CPU Adam build) is not timed. The recipe runs in bf16
(the baselines' ran in fp16; same speed and memory, no loss scaling to go wrong): --recipe-fp16 to change.

Importable without torch: the plan list and each plan's configuration are plain data (tests check them).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "operator"))

GIB = float(2**30)
QWEN25_7B: dict[str, Any] = {
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "vocab_size": 152064,
    "max_position_embeddings": 32768,
    "rope_theta": 1_000_000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "use_cache": False,
}
QKVO = ("q_proj", "k_proj", "v_proj", "o_proj")
ALL_LINEAR = ("all-linear",)
LORA_R, LORA_ALPHA, LORA_DROPOUT = 64, 128, 0.05
TOTAL_BUDGET_S = 530.0
"""The GPU machine stops a command after 600 s."""
PLAN_TIMEOUT_S = 170.0
STEPS = 3
"""Optimizer steps per plan; the first is warm-up."""
RECIPE = "popular-recipe"
PLANNER = "planner-h200"


@dataclass(frozen=True)
class BenchPlan:
    """One configuration to measure, as the planner's Setup plus the workload's shape."""

    name: str
    description: str
    seq: int
    targets: tuple[str, ...]
    zero_stage: int
    offload: str  # none | optimizer | all
    checkpointing: bool
    kernels: str  # eager | liger | compile
    micro_batch: int
    tokens_per_step: int = 32768
    precision: str = "bf16"

    @property
    def sequences_per_step(self) -> int:
        return max(self.micro_batch, self.tokens_per_step // self.seq)

    @property
    def accumulation(self) -> int:
        return max(1, self.sequences_per_step // self.micro_batch)


def planner_choice() -> BenchPlan:
    """The planner's own plan for 1x H200, Qwen2.5-7B, seq 8192, global batch 64, LoRA r64 on q,k,v,o."""
    from kubetune.planner import plan_training
    from kubetune.planner.models import known_architecture

    plan = plan_training(
        known_architecture("Qwen/Qwen2.5-7B"),
        model_name="Qwen/Qwen2.5-7B",
        seq=8192,
        global_batch=64,
        lora_rank=LORA_R,
        lora_targets=QKVO,
        lora_dropout=LORA_DROPOUT,
        gpu_type_name="h200",
    )
    offload = "none" if plan.offload == "none" else "all" if plan.memory.weights_gib == 0 else "optimizer"
    kernels = "compile" if plan.compile else "liger" if plan.liger_kernels else "eager"
    return BenchPlan(
        PLANNER,
        "the planner's choice for 1x H200, seq 8192, global batch 64",
        8192,
        QKVO,
        plan.zero_stage,
        offload,
        plan.gradient_checkpointing,
        kernels,
        plan.micro_batch_size,
        tokens_per_step=65536,
    )


def bench_plans(recipe_precision: str = "bf16") -> list[BenchPlan]:
    """The plans measured, most important first (the run stops adding plans when its time runs out)."""
    return [
        planner_choice(),
        BenchPlan(
            RECIPE,
            "popular recipe: ZeRO-3 + CPU optimizer offload, checkpointing, micro-batch 1 x 8",
            8192,
            QKVO,
            3,
            "optimizer",
            True,
            "eager",
            1,
            tokens_per_step=65536,
            precision=recipe_precision,
        ),
        BenchPlan("liger-nockpt", "no DeepSpeed, no checkpointing, Liger", 8192, QKVO, 0, "none", False, "liger", 1),
        BenchPlan(
            "compile-all-linear",
            "no DeepSpeed, no checkpointing, compiled layers, LoRA on all linear layers",
            8192,
            ALL_LINEAR,
            0,
            "none",
            False,
            "compile",
            1,
        ),
        BenchPlan(
            "zero2-ckpt-seq4096",
            "ZeRO-2, checkpointing, Liger, micro-batch 4 at seq 4096",
            4096,
            QKVO,
            2,
            "none",
            True,
            "liger",
            4,
        ),
        BenchPlan(
            "ckpt-seq16384-all-linear",
            "no DeepSpeed, checkpointing, Liger, seq 16384, LoRA on all linear layers",
            16384,
            ALL_LINEAR,
            0,
            "none",
            True,
            "liger",
            1,
        ),
        BenchPlan(
            "zero3-nockpt-seq2048",
            "ZeRO-3, no checkpointing, eager kernels, micro-batch 2 at seq 2048",
            2048,
            QKVO,
            3,
            "none",
            False,
            "eager",
            2,
        ),
        BenchPlan(
            "eager-ckpt",
            "no DeepSpeed, checkpointing, eager kernels (the baselines' second row)",
            8192,
            QKVO,
            0,
            "none",
            True,
            "eager",
            1,
        ),
    ]


# --- Predictions (the planner's models) -----------------------------------------------------------


def predicted(plan: BenchPlan) -> dict[str, float]:
    from kubetune.planner import memory, throughput
    from kubetune.planner.gpus import gpu_type
    from kubetune.planner.models import known_architecture
    from kubetune.planner.workload import Setup, Workload

    gpu = gpu_type("h200")
    arch = known_architecture("Qwen/Qwen2.5-7B")
    assert gpu is not None and arch is not None
    w = Workload(
        arch=arch,
        seq=plan.seq,
        global_batch=plan.sequences_per_step,
        lora_rank=LORA_R,
        lora_targets=plan.targets,
        lora_dropout=LORA_DROPOUT,
        gpu=gpu,
    )
    s = Setup(
        plan.zero_stage,
        plan.offload,  # type: ignore[arg-type]
        plan.checkpointing,
        plan.kernels,  # type: ignore[arg-type]
        "sdpa",
        plan.micro_batch,
    )
    m = memory.estimate(w, s)
    return {
        "total_gib": round(m.total, 2),
        "weights_gib": round(m.weights, 2),
        "lora_gib": round(m.lora, 2),
        "activations_gib": round(m.activations, 2),
        "logits_gib": round(m.logits, 2),
        "overhead_gib": round(m.overhead, 2),
        "tokens_per_second": round(throughput.tokens_per_second(w, s, gpu)),
    }


# --- What one run is made of (plain data) ---------------------------------------------------------


def deepspeed_config(plan: BenchPlan) -> dict[str, Any] | None:
    if plan.zero_stage == 0:
        return None
    h = QWEN25_7B["hidden_size"]
    zero: dict[str, Any] = {
        "stage": plan.zero_stage,
        "overlap_comm": True,
        "contiguous_gradients": True,
        "reduce_bucket_size": h * h,
    }
    if plan.zero_stage == 3:
        zero.update(
            {
                "stage3_prefetch_bucket_size": int(0.9 * h * h),
                "stage3_param_persistence_threshold": 10 * h,
                "stage3_max_live_parameters": 1_000_000_000,
                "stage3_max_reuse_distance": 1_000_000_000,
                "stage3_gather_16bit_weights_on_model_save": False,
            }
        )
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": plan.micro_batch,
        "gradient_accumulation_steps": plan.accumulation,
        "train_batch_size": plan.micro_batch * plan.accumulation,
        "gradient_clipping": "auto",
        "bf16": {"enabled": plan.precision == "bf16"},
        "fp16": {"enabled": plan.precision == "fp16"},
        "zero_optimization": zero,
        "steps_per_print": 1_000_000,
        "wall_clock_breakdown": False,
    }
    if plan.offload != "none":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        # DeepSpeed's CPU Adam (the recipe's optimizer); JIT-built on first use.
        config["optimizer"] = {
            "type": "AdamW",
            "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"},
        }
        if plan.offload == "all":
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return config


def run_config(plan: BenchPlan, workdir: str = "/tmp/planner-bench") -> dict[str, Any]:
    """Everything the child process builds, as plain data."""
    sft: dict[str, Any] = {
        "output_dir": f"{workdir}/{plan.name}",
        "per_device_train_batch_size": plan.micro_batch,
        "gradient_accumulation_steps": plan.accumulation,
        "max_steps": STEPS,
        "learning_rate": 1e-4,
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        "bf16": plan.precision == "bf16",
        "fp16": plan.precision == "fp16",
        "max_length": plan.seq,
        "packing": False,
        "gradient_checkpointing": plan.checkpointing,
        "gradient_checkpointing_kwargs": {"use_reentrant": False},
        "use_liger_kernel": plan.kernels == "liger",
        "liger_kernel_config": (
            {"rope": True, "rms_norm": True, "swiglu": True, "cross_entropy": False}
            if plan.kernels == "liger"
            else None
        ),
        "deepspeed": deepspeed_config(plan),
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "seed": 0,
    }
    return {
        "model": dict(QWEN25_7B),
        "lora": {
            "r": LORA_R,
            "lora_alpha": LORA_ALPHA,
            "lora_dropout": LORA_DROPOUT,
            "target_modules": "all-linear" if plan.targets == ALL_LINEAR else list(plan.targets),
            "bias": "none",
            "task_type": "CAUSAL_LM",
        },
        "sft": sft,
        "compile_layers": plan.kernels == "compile",
        "sequences": plan.sequences_per_step * STEPS,
        "seq": plan.seq,
        "tokens_per_step": plan.sequences_per_step * plan.seq,
        "distributed": plan.zero_stage > 0,
    }


def smoke_config(plan: BenchPlan) -> dict[str, Any]:
    """`run_config` shrunk to a two-layer model on the CPU without DeepSpeed, Liger or compile: checks that the
    TRL/PEFT wiring of a plan works where there is no GPU (--smoke)."""
    config = run_config(plan)
    seq = 32
    config["model"] = {
        **QWEN25_7B,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 512,
    }
    sequences = plan.micro_batch * min(plan.accumulation, 2)
    config["sft"].update(
        {
            "gradient_accumulation_steps": min(plan.accumulation, 2),
            "bf16": False,
            "fp16": False,
            "deepspeed": None,
            "use_liger_kernel": False,
            "liger_kernel_config": None,
            "max_length": seq,
            "use_cpu": True,
        }
    )
    config.update(
        {
            "seq": seq,
            "sequences": sequences * STEPS,
            "tokens_per_step": sequences * seq,
            "compile_layers": False,
            "cpu": True,
            "distributed": False,
        }
    )
    return config


# --- The child: one plan ----------------------------------------------------------------------------


def run_one(config: dict[str, Any]) -> dict[str, Any]:  # pragma: no cover - GPU only
    """Train one plan for STEPS steps; returns measured memory and speed (on CPU, --smoke: speed only)."""
    import threading

    import torch

    cuda = torch.cuda.is_available() and not config.get("cpu")
    total = 0
    sampled: dict[str, Any] = {"device_peak": 0.0, "stop": False}
    if cuda:
        torch.cuda.init()
        torch.empty(1, device="cuda")
        total = torch.cuda.get_device_properties(0).total_memory

    def sample() -> None:  # device-level memory in use (CUDA context included), every 20 ms
        while not sampled["stop"]:
            free, _ = torch.cuda.mem_get_info()
            sampled["device_peak"] = max(sampled["device_peak"], float(total - free))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    if cuda:
        sampler.start()

    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    versions = {}
    for mod in ("torch", "transformers", "trl", "peft", "deepspeed", "liger_kernel", "accelerate"):
        try:
            versions[mod] = str(__import__(mod).__version__)
        except Exception:
            versions[mod] = "missing"

    torch.manual_seed(0)
    model_config = Qwen2Config(**config["model"], attn_implementation="sdpa")
    model_config.use_cache = False
    torch.set_default_dtype(torch.bfloat16 if cuda else torch.float32)
    with torch.device("cuda" if cuda else "cpu"):
        model: Any = Qwen2ForCausalLM(model_config)
    torch.set_default_dtype(torch.float32)
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(**config["lora"]))
    if config["compile_layers"]:
        for layer in model.base_model.model.model.layers:
            layer.compile()

    tok = Tokenizer(WordLevel({"<pad>": 0, "<eos>": 1, "<unk>": 2}, unk_token="<unk>"))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, config["model"]["vocab_size"], (config["sequences"], config["seq"]), generator=gen)
    dataset = Dataset.from_dict({"input_ids": ids.tolist()})

    known = {f.name for f in dataclasses.fields(SFTConfig)}
    sft_kwargs = {k: v for k, v in config["sft"].items() if k in known and v is not None}
    dropped = sorted(k for k, v in config["sft"].items() if k not in known and v is not None)
    args = SFTConfig(**sft_kwargs)

    peaks = {"allocated": 0.0, "reserved": 0.0}
    step_ends: list[float] = []

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    class Measure(TrainerCallback):
        def _peaks(self) -> None:
            if cuda:
                peaks["allocated"] = max(peaks["allocated"], float(torch.cuda.max_memory_allocated()))
                peaks["reserved"] = max(peaks["reserved"], float(torch.cuda.max_memory_reserved()))

        def on_substep_end(self, *a: Any, **k: Any) -> None:
            self._peaks()

        def on_step_end(self, *a: Any, **k: Any) -> None:
            sync()
            step_ends.append(time.perf_counter())
            self._peaks()

    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=dataset, processing_class=tokenizer, callbacks=[Measure()]
    )
    started = time.perf_counter()
    trainer.train()
    sync()
    Measure()._peaks()
    sampled["stop"] = True
    non_torch = 0.0
    if cuda:
        sampler.join(timeout=1)
        non_torch = float(total - torch.cuda.mem_get_info()[0]) - float(torch.cuda.memory_reserved())
    steps = [b - a for a, b in itertools.pairwise(step_ends)]
    tokens_per_second = config["tokens_per_step"] / (sum(steps) / len(steps)) if steps else None
    return {
        "status": "ok",
        "tokens_per_second": round(tokens_per_second) if tokens_per_second else None,
        "step_seconds": [round(s, 3) for s in steps],
        "first_step_seconds": round(step_ends[0] - started, 1) if step_ends else None,
        "max_allocated_gib": round(peaks["allocated"] / GIB, 2),
        "max_reserved_gib": round(peaks["reserved"] / GIB, 2),
        "non_torch_gib": round(non_torch / GIB, 2),
        "device_peak_gib": round((peaks["reserved"] + max(0.0, non_torch)) / GIB, 2),
        "device_peak_sampled_gib": round(sampled["device_peak"] / GIB, 2),
        "gpu": torch.cuda.get_device_name(0) if cuda else "cpu",
        "gpu_total_gib": round(total / GIB, 2),
        "versions": versions,
        "sft_fields_dropped": dropped,
    }


def child_main(plan_name: str, result_path: str, recipe_precision: str) -> int:  # pragma: no cover - GPU only
    plan = next(p for p in bench_plans(recipe_precision) if p.name == plan_name)
    config = run_config(plan)
    try:
        result = run_one(config)
    except Exception as err:  # recorded, the run goes on
        import torch

        oom = isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()
        result = {"status": "oom" if oom else "error", "error": f"{type(err).__name__}: {str(err)[:2000]}"}
        if torch.cuda.is_available():
            result["max_allocated_gib"] = round(torch.cuda.max_memory_allocated() / GIB, 2)
            result["max_reserved_gib"] = round(torch.cuda.max_memory_reserved() / GIB, 2)
    Path(result_path).write_text(json.dumps(result, indent=2))
    return 0 if result["status"] == "ok" else 1


def smoke_main(plans: list[BenchPlan]) -> int:  # pragma: no cover - needs torch
    failed = 0
    for plan in plans:
        try:
            result = run_one(smoke_config(plan))
            dropped = result["sft_fields_dropped"]
            print(f"{plan.name}: ok, {result['tokens_per_second']} tok/s on CPU, SFTConfig fields dropped: {dropped}")
        except Exception as err:
            failed += 1
            print(f"{plan.name}: {type(err).__name__}: {err}")
    return 1 if failed else 0


# --- The orchestrator ----------------------------------------------------------------------------------


@dataclass
class Row:
    plan: BenchPlan
    predicted: dict[str, float]
    measured: dict[str, Any] = field(default_factory=dict)

    def error(self, key: str) -> float | None:
        value = self.measured.get(key)
        if not value or self.measured.get("status") != "ok":
            return None
        return (self.predicted["total_gib"] - value) / value


def _run_child(plan: BenchPlan, timeout: float, port: int, recipe_precision: str, workdir: Path) -> dict[str, Any]:
    result_path = workdir / f"{plan.name}.json"
    env = dict(os.environ)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(workdir / "torch_extensions"))
    env.setdefault("TRITON_CACHE_DIR", str(workdir / "triton"))
    env.setdefault("TORCHINDUCTOR_CACHE_DIR", str(workdir / "inductor"))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "operator"), env.get("PYTHONPATH", "")) if p)
    if plan.zero_stage:
        env.update(
            {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        )
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", plan.name, "--result", str(result_path)]
    cmd += ["--recipe-precision", recipe_precision]
    started = time.monotonic()
    log_path = workdir / f"{plan.name}.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return {"status": "timeout", "seconds": round(time.monotonic() - started), "log_tail": _tail(log_path)}
    seconds = round(time.monotonic() - started)
    if result_path.exists():
        result = json.loads(result_path.read_text())
        result["seconds"] = seconds
        if result.get("status") != "ok":
            result["log_tail"] = _tail(log_path)
        return result
    return {"status": "crashed", "returncode": proc.returncode, "seconds": seconds, "log_tail": _tail(log_path)}


def _tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:+.1%}"


def markdown(rows: list[Row]) -> str:
    head = (
        "| plan | seq | LoRA | ZeRO | offload | ckpt | kernels | micro | predicted GiB | device peak GiB | error "
        "| reserved GiB | allocated GiB | predicted tok/s | measured tok/s |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in rows:
        p, m = r.plan, r.measured
        status = m.get("status", "skipped")
        lora = "all-linear" if p.targets == ALL_LINEAR else "q,k,v,o"

        def val(key: str, m: dict[str, Any] = m, status: str = status) -> str:
            v = m.get(key)
            return status if v is None else f"{v:,}" if isinstance(v, int) else f"{v}"

        lines.append(
            f"| {p.name} | {p.seq} | {lora} | {p.zero_stage} | {p.offload} | {'on' if p.checkpointing else 'off'} "
            f"| {p.kernels} | {p.micro_batch} | {r.predicted['total_gib']} | {val('device_peak_gib')} "
            f"| {_pct(r.error('device_peak_gib'))} | {val('max_reserved_gib')} | {val('max_allocated_gib')} "
            f"| {r.predicted['tokens_per_second']:,} | {val('tokens_per_second')} |"
        )
    return "\n".join(lines)


def summary(rows: list[Row]) -> dict[str, Any]:
    by_name = {r.plan.name: r for r in rows}
    measured = [r for r in rows if r.measured.get("status") == "ok"]
    errors = {r.plan.name: r.error("device_peak_gib") for r in measured}
    ours = by_name.get(PLANNER)
    recipe = by_name.get(RECIPE)
    speedup = None
    if ours and recipe and ours.measured.get("tokens_per_second") and recipe.measured.get("tokens_per_second"):
        speedup = ours.measured["tokens_per_second"] / recipe.measured["tokens_per_second"]
    return {
        "plans_measured": len(measured),
        "memory_errors": {k: None if v is None else round(v, 4) for k, v in errors.items()},
        "all_within_10pct": bool(measured) and all(v is not None and abs(v) <= 0.10 for v in errors.values()),
        "at_least_6_plans": len(measured) >= 6,
        "speedup_vs_recipe": None if speedup is None else round(speedup, 3),
        "speedup_at_least_1_8": speedup is not None and speedup >= 1.8,
    }


def main(argv: list[str] | None = None) -> int:  # pragma: no cover - GPU only
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", help="directory for the results file (default bench/results)")
    parser.add_argument("--plans", help="comma-separated plan names (default: all)")
    parser.add_argument("--budget", type=float, default=TOTAL_BUDGET_S, help="seconds for the whole run")
    parser.add_argument("--recipe-fp16", action="store_true", help="the popular recipe in fp16, as the baselines ran")
    parser.add_argument("--smoke", action="store_true", help="check the plans' wiring on a tiny model on the CPU")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--recipe-precision", default="bf16", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child_main(args.child, args.result, args.recipe_precision)

    deadline = time.monotonic() + args.budget
    precision = "fp16" if args.recipe_fp16 else "bf16"
    plans = bench_plans(precision)
    if args.plans:
        wanted = set(args.plans.split(","))
        plans = [p for p in plans if p.name in wanted]
    if args.smoke:
        return smoke_main(plans)
    out_dir = Path(args.out) if args.out else ROOT / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="planner-bench-"))
    rows = [Row(p, predicted(p)) for p in plans]
    for i, row in enumerate(rows):
        left = deadline - time.monotonic()
        if left < 45:
            row.measured = {"status": "skipped", "reason": "time budget spent"}
            continue
        timeout = min(PLAN_TIMEOUT_S, left - 5)
        print(f"[{time.strftime('%H:%M:%S')}] {row.plan.name}: {row.plan.description} (timeout {timeout:.0f}s)")
        row.measured = _run_child(row.plan, timeout, 29500 + i, precision, workdir)
        m = row.measured
        print(
            f"    {m.get('status')}: {m.get('tokens_per_second')} tok/s, device peak {m.get('device_peak_gib')} GiB "
            f"(predicted {row.predicted['total_gib']} GiB, {row.predicted['tokens_per_second']} tok/s), "
            f"{m.get('seconds')} s"
        )
        _write(out_dir, rows)
    table = markdown(rows)
    print()
    print(table)
    result = _write(out_dir, rows)
    print()
    print(json.dumps(result["summary"], indent=2))
    return 0 if result["summary"]["all_within_10pct"] and result["summary"]["speedup_at_least_1_8"] else 1


def _write(out_dir: Path, rows: list[Row]) -> dict[str, Any]:  # pragma: no cover - GPU only
    result = {
        "what": "Qwen2.5-7B architecture, random bf16 weights, TRL SFTTrainer + PEFT LoRA r64/alpha128, one GPU",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "summary": summary(rows),
        "plans": [{"plan": dataclasses.asdict(r.plan), "predicted": r.predicted, "measured": r.measured} for r in rows],
        "table": markdown(rows),
    }
    (out_dir / "planner_gpu_h200.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    raise SystemExit(main())
