"""Our trainer on data of realistic lengths: the popular recipe against the planner's choice, in one run.

Every earlier throughput figure came from records that all fill maxSeqLength. Real chat SFT data is skewed: most
conversations are a few hundred tokens, a few are long. This benchmark generates such a dataset (a fixed seed),
trains on it through `kubetune train` (the pods' entry point, in its own process per run, as
bench/trainer_gpu.py does) and compares, on the same GPU in the same call:

  sft-recipe   realistic SFT data, the popular recipe: ZeRO-3 + CPU optimizer offload, gradient checkpointing,
               micro-batch 1 x accumulation 8, no packing
  sft-plan     realistic SFT data, the planner's plan for this GPU (kubetune.planner.plan_training, packing auto)
  full-recipe  records that fill maxSeqLength (bench/trainer_gpu.py's data), the recipe
  full-plan    the same full-length data, the planner's plan
  dpo-plan     realistic preference pairs (maxSeqLength 2048, 16 pairs per step), the planner's DPO plan  [optional]
  sft-plan-sdpa  sft-plan with attention fixed to sdpa (packed records kept apart by a dense mask)  [optional]
  dpo-plan-bucketed, sft-recipe-bucketed  the same with unpacked micro-batches padded to a multiple of 64 tokens
               (trainer/batching.py's shape buckets, off in the trainer by default)  [optional]

The planner plans as the operator does once the prepare step has measured the data: its estimate uses the
lengths (the trainer's token_stats of them), its decisions do not. `--profile RUN,...` writes a torch.profiler
table of one micro-batch of those runs (profile-RUN.txt under --out).

The optional runs only start when the time budget (--minutes) leaves room for them after the others; name them
in --runs to measure them first. All runs: the Qwen2.5-7B architecture with random bf16 weights (random weights
train as fast as real ones), our tiny BPE tokenizer over a word list whose words are single tokens (so lengths
are exact), LoRA r64/alpha128/dropout 0.05 on q,k,v,o, maxSeqLength 8192, global batch 8 as the recipe's
(1 x 8 sequences; with packing 8 windows of 8192 tokens), bf16.

Lengths of the realistic SFT data (tokens per conversation, the whole chat-templated record): log-normal,
median 900, sigma 1.0, capped at 8192 and at least 64; 800 records of 1 to 4 turns, a fifth of each turn's tokens
the user's. The 800 records drawn (seed 18) tokenize to: median 956, mean 1,522, p90 3,526, max 8192 with 2.1%
of the records (17) at that cap; token-weighted mean length (E[n^2]/E[n]) 3,280. The run records the tokenized
lengths it trained on (`lengths` in the results). Source, approximate and quoted
from the published tables as recalled, nothing was downloaded: UltraChat (Ding et al. 2023, arXiv:2305.14233)
reports about 3.85 turns and 1,467 tokens per dialogue on average; the ShareGPT conversations behind Vicuna,
tabulated in the LMSYS-Chat-1M paper (Zheng et al. 2023, arXiv:2309.11998), about 3.5 turns of ~94 prompt and
~348 response tokens, about 1,550 tokens per conversation. Those papers give means; the median and p90 here come
from the log-normal shape assumed around that mean, a long right tail as such data has (most chats short, a few
running into the context limit). Preference pairs (DPO): prompt log-normal median 150 (sigma 1.0, at most
1024), each answer log-normal median 300 (sigma 0.8, at most 1024), an assumption shaped like binarized
UltraFeedback-style pairs, no published percentiles used.

Recorded per run, from the trainer's own output plus a step timer added in the child process: non-padding
tokens/s over the optimizer steps after the first (compilation, CPU Adam's build), the padding fraction (packed
windows: 1 - fill; one record per micro-batch pads nothing), peak allocated and reserved GPU memory, the
planner's prediction, and MFU counting only real tokens: (6 x LoRA params + 4 x base matmul params + 6 x
q_dim x layers x E[n^2]/E[n]) FLOPs per real token (causal attention over each record's own length n; no
recompute counted) over the card's dense bf16 peak (989 TFLOP/s) and over its measured matmul speed. The
ratios the targets of issue 18 name: sft-plan / sft-recipe (>= 5), sft-plan / full-plan (>= 0.85), full-plan /
full-recipe (>= 2.0). Writes bench/results/trainer_realistic_<gpu>.json (h100 or h200; and a copy under --out).

On the GPU machine (the wheels of docs/gpu-baselines.md in .whl/, as for bench/trainer_gpu.py), about 8 minutes:

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \\
        .whl/*.whl && export PYTHONPATH=/tmp/site:operator PYTHONUNBUFFERED=1 && \\
        python3 bench/trainer_realistic.py --out "$OUT" --minutes 8.5

`--smoke` runs the same wiring on the CPU with the tiny model (lengths scaled to maxSeqLength 256, compile off)
in a minute or two; `--dry-run` prints the datasets' length figures and the trainer configurations.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import math
import os
import random
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "operator"))
sys.path.insert(0, str(ROOT / "bench"))  # trainer_gpu builds the model

SEQ = 8192
SMOKE_SEQ = 256
GLOBAL_BATCH = 8
DPO_SEQ, DPO_GLOBAL_BATCH = 2048, 16
SEED = 18
SFT_RECORDS, DPO_PAIRS = 800, 240
SMOKE_SFT_RECORDS, SMOKE_DPO_PAIRS = 80, 48
MEDIAN, SIGMA, MIN_TOKENS = 900, 1.0, 64
"""The realistic SFT lengths: log-normal median and sigma (tokens per record), capped at SEQ."""
DPO_PROMPT, DPO_ANSWER = (150, 1.0), (300, 0.8)
DPO_PART_MAX = 1024
STEPS = 10
"""Optimizer steps per run; the first is warm-up."""
LORA: dict[str, Any] = {
    "r": 64,
    "alpha": 128,
    "dropout": 0.05,
    "targetModules": ["q_proj", "k_proj", "v_proj", "o_proj"],
}
MODEL = "qwen2.5-7b-random"
RECIPE_PLAN = {
    "zeroStage": 3,
    "offload": "cpu",
    "gradientCheckpointing": True,
    "microBatchSize": 1,
    "gradientAccumulationSteps": GLOBAL_BATCH,
    "attention": "sdpa",
    "ligerKernels": False,
    "compile": False,
    "packing": False,
    "worldSize": 1,
}
TARGETS = {
    "realistic_plan_over_recipe": ("sft-plan", "sft-recipe", 5.0),
    "realistic_plan_over_full_length_plan": ("sft-plan", "full-plan", 0.85),
    "full_length_plan_over_recipe": ("full-plan", "full-recipe", 2.0),
}
"""ratio name: (numerator run, denominator run, the issue's target)."""
FALLBACK = {"sft-plan": "sft-plan-sdpa"}
"""When the planner's run fails (flex_attention's compiled kernels have not run on this GPU before this
benchmark), the same plan with sdpa runs next and stands in for it in the ratios."""


@dataclass(frozen=True)
class Run:
    name: str
    data: str
    """realistic, full or dpo."""
    plan: str
    """recipe, planner or planner-sdpa."""
    estimate_s: float
    """Wall time it is expected to take on one H100/H200 (start, first compiled step, STEPS steps)."""
    optional: bool = False
    shape_buckets: bool = False
    """The trainer pads unpacked micro-batches to a multiple of SHAPE_BUCKET tokens (batching.SHAPE_MULTIPLE, off
    in the trainer by default; False: to the longest sequence)."""


RUNS = [
    Run("sft-plan", "realistic", "planner", 110),
    Run("sft-recipe", "realistic", "recipe", 110),
    Run("full-plan", "full", "planner", 80),
    Run("full-recipe", "full", "recipe", 100),
    Run("dpo-plan", "dpo", "planner", 90, optional=True),
    Run("sft-plan-sdpa", "realistic", "planner-sdpa", 100, optional=True),
    Run("dpo-plan-bucketed", "dpo", "planner", 90, optional=True, shape_buckets=True),
    Run("sft-recipe-bucketed", "realistic", "recipe", 110, optional=True, shape_buckets=True),
]
SHAPE_BUCKET = 64
"""Tokens the *-bucketed runs pad unpacked micro-batches to a multiple of."""
BY_NAME = {r.name: r for r in RUNS}


# --- Data -------------------------------------------------------------------------------------------------

WORDS = [c + v for c in "bcdfghklmnprstvz" for v in "aeiou"][:64]
"""Two-letter words that the tokenizer trained on them keeps as single tokens: a record of n words is n tokens."""


def tokenizer_text(seed: int = SEED) -> list[str]:
    """Text to train the tiny BPE on (every word often enough to become one token)."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(200)) for _ in range(50)]


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(max(1, n)))


def lognormal(rng: random.Random, median: float, sigma: float, low: int, high: int) -> int:
    return int(min(high, max(low, round(median * math.exp(rng.gauss(0.0, sigma))))))


def conversation(rng: random.Random, tokens: int) -> dict[str, Any]:
    """A messages record of about `tokens` tokens in 1 to 4 turns (the template's ~10 tokens per turn included)."""
    turns = rng.randint(1, 4)
    per_turn = max(8, tokens // turns - 10)
    messages = []
    for _ in range(turns):
        user = max(1, per_turn // 5)
        messages += [
            {"role": "user", "content": words(rng, user)},
            {"role": "assistant", "content": words(rng, per_turn - user)},
        ]
    return {"messages": messages}


def realistic_lengths(n: int, seq: int = SEQ, seed: int = SEED) -> list[int]:
    """Target tokens per record: log-normal (MEDIAN, SIGMA) scaled to `seq`, capped at `seq`."""
    rng = random.Random(seed)
    scale = seq / SEQ
    return [lognormal(rng, MEDIAN * scale, SIGMA, max(16, int(MIN_TOKENS * scale)), seq) for _ in range(n)]


def realistic_sft(n: int, seq: int = SEQ, seed: int = SEED) -> list[dict[str, Any]]:
    rng = random.Random(seed + 1)
    return [conversation(rng, tokens) for tokens in realistic_lengths(n, seq, seed)]


def full_length_sft(n: int, seq: int = SEQ, seed: int = SEED) -> list[dict[str, Any]]:
    """Records longer than `seq` (truncated to it), as bench/trainer_gpu.py trains on."""
    rng = random.Random(seed + 2)
    return [{"prompt": words(rng, 20), "response": words(rng, seq + seq // 4)} for _ in range(n)]


def preference_pairs(n: int, part_max: int = DPO_PART_MAX, seed: int = SEED) -> list[dict[str, Any]]:
    rng = random.Random(seed + 3)
    scale = part_max / DPO_PART_MAX
    pairs = []
    for _ in range(n):
        prompt = lognormal(rng, DPO_PROMPT[0] * scale, DPO_PROMPT[1], 8, part_max)
        chosen, rejected = (lognormal(rng, DPO_ANSWER[0] * scale, DPO_ANSWER[1], 8, part_max) for _ in range(2))
        pairs.append({"prompt": words(rng, prompt), "chosen": words(rng, chosen), "rejected": words(rng, rejected)})
    return pairs


def length_figures(lengths: list[int]) -> dict[str, float]:
    """median, mean, p90, p99, max, share at the cap, and E[n^2]/E[n] (the token-weighted record length)."""
    ordered = sorted(lengths)

    def at(q: float) -> int:
        return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]

    total = sum(ordered)
    return {
        "records": len(ordered),
        "median": at(0.5),
        "mean": round(total / len(ordered), 1),
        "p90": at(0.9),
        "p99": at(0.99),
        "max": ordered[-1],
        "share_at_max": round(sum(1 for n in ordered if n == ordered[-1]) / len(ordered), 4),
        "token_weighted_length": round(sum(n * n for n in ordered) / total, 1),
    }


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


@dataclass(frozen=True)
class Scale:
    """The run's sizes: the GPU's, or the smoke test's on the CPU."""

    seq: int
    dpo_seq: int
    sft_records: int
    dpo_pairs: int
    steps: int
    smoke: bool


def write_datasets(pvc: Path, scale: Scale) -> None:
    data = pvc / "data"
    write_jsonl(data / "realistic.jsonl", realistic_sft(scale.sft_records, scale.seq))
    full_records = GLOBAL_BATCH * scale.steps + GLOBAL_BATCH
    write_jsonl(data / "full.jsonl", full_length_sft(full_records, scale.seq))
    write_jsonl(data / "dpo.jsonl", preference_pairs(scale.dpo_pairs, scale.dpo_seq // 2))


def token_lengths(model_dir: Path, path: Path, max_len: int) -> list[int]:  # pragma: no cover - needs the trainer
    """Each record's tokens as the trainer sees it (chat template, truncated to max_len); for preference pairs the
    tokens of both sequences (prompt + chosen, prompt + rejected)."""
    from kubetune.api.v1alpha1 import DatasetFormat, Method
    from kubetune.trainer.data import encode, load_tokenizer, render, tokenize_conversation
    from kubetune.trainer.records import read_records

    tokenizer = load_tokenizer(model_dir)
    preference = path.name == "dpo.jsonl"
    _, records = read_records(path, DatasetFormat.AUTO, Method.DPO if preference else Method.SFT)
    lengths = []
    for record in records:
        if preference:
            assert record.chosen is not None and record.rejected is not None
            for answer in (record.chosen, record.rejected):
                lengths.append(min(max_len, len(encode(tokenizer, render(tokenizer, record.messages + answer)))))
        else:
            lengths.append(min(max_len, len(tokenize_conversation(tokenizer, record.messages)[0])))
    return lengths


# --- Plans and trainer configurations ---------------------------------------------------------------------


def gpu_key(device_name: str) -> str:
    """h200, h100, or the device's name in lower case."""
    for key in ("h200", "h100"):
        if key in device_name.lower():
            return key
    return device_name.lower().replace(" ", "-")


def measured_lengths(lengths: list[int], preference: bool) -> Any:
    """What the prepare step reports of these lengths (`token_lengths`: for pairs, both sequences of each in turn),
    as the planner reads it: the trainer's token_stats and the planner's data_lengths, as in the operator."""
    from kubetune.api.v1alpha1 import TokenLengths
    from kubetune.planner.plan import data_lengths
    from kubetune.trainer.data import token_stats

    records = [max(lengths[i], lengths[i + 1]) for i in range(0, len(lengths), 2)] if preference else lengths
    stats = token_stats(records)
    fill = sum(lengths) / (2 * sum(records)) if preference else 0.0
    return data_lengths(TokenLengths(mean=stats.trained_mean, weighted=stats.weighted, pair_fill=fill))


def recipe_estimate(gpu: str, scale: Scale, lengths: Any = None) -> float:
    """The planner's speed model for the recipe (ZeRO-3 + optimizer offload, eager, checkpointing, one record per
    micro-batch, no packing) on this GPU: plan_training cannot fix the kernels, so the model is asked directly."""
    from kubetune.planner.gpus import gpu_type
    from kubetune.planner.models import known_architecture
    from kubetune.planner.throughput import tokens_per_second
    from kubetune.planner.workload import Setup, Workload

    arch = known_architecture("Qwen/Qwen2.5-7B")
    assert arch is not None
    workload = Workload(
        arch=arch,
        seq=SEQ,
        global_batch=GLOBAL_BATCH,
        lora_rank=int(LORA["r"]),
        lora_targets=tuple(LORA["targetModules"]),
        lora_dropout=float(LORA["dropout"]),
        gpu=gpu_type("h100" if scale.smoke else gpu),
        lengths=lengths,
    )
    setup = Setup(zero_stage=3, offload="optimizer", checkpointing=True, kernels="eager", micro_batch=1)
    assert workload.gpu is not None
    return tokens_per_second(workload, setup, workload.gpu)


def plan_for(run: Run, gpu: str, scale: Scale, lengths: Any = None) -> dict[str, Any]:
    """The plan the trainer runs (wire form): the recipe, or what the planner chooses for this GPU, with the
    dataset's measured `lengths` (DataLengths) as the operator plans after the prepare step."""
    if run.plan == "recipe":
        return {**RECIPE_PLAN, "estimatedTokensPerSecond": round(recipe_estimate(gpu, scale, lengths))}
    from kubetune.planner import Overrides, plan_training
    from kubetune.planner.models import known_architecture

    dpo = run.data == "dpo"
    plan = plan_training(
        known_architecture("Qwen/Qwen2.5-7B"),
        model_name="Qwen/Qwen2.5-7B",
        method="DPO" if dpo else "SFT",
        seq=DPO_SEQ if dpo else SEQ,
        global_batch=DPO_GLOBAL_BATCH if dpo else GLOBAL_BATCH,
        lora_rank=int(LORA["r"]),
        lora_targets=tuple(LORA["targetModules"]),
        lora_dropout=float(LORA["dropout"]),
        gpu_type_name="h100" if scale.smoke else gpu,
        overrides=Overrides(attention="sdpa") if run.plan == "planner-sdpa" else None,
        lengths=lengths,
    ).to_wire()
    if scale.smoke:
        plan["compile"] = False  # the CPU would spend minutes compiling; the smoke run checks the wiring
    return plan


def trainer_config(run: Run, gpu: str, scale: Scale, model: str, lengths: Any = None) -> dict[str, Any]:
    """The TrainerConfig (wire form) the operator would render for this run (after the prepare step measured
    `lengths`, when given)."""
    dpo = run.data == "dpo"
    return {
        "job": {"name": f"bench-{run.name}", "namespace": "bench", "uid": f"uid-{run.name}"},
        "progressIntervalSeconds": 0.5,  # shorter than a step: one report per step
        "spec": {
            "method": "DPO" if dpo else "SFT",
            "baseModel": {"uri": f"pvc://models/{model}"},
            "dataset": {"uri": f"pvc://data/{run.data}.jsonl"},
            "lora": LORA,
            "hyperparameters": {
                "learningRate": 2e-5,
                "maxSteps": scale.steps,
                "globalBatchSize": DPO_GLOBAL_BATCH if dpo else GLOBAL_BATCH,
                "maxSeqLength": scale.dpo_seq if dpo else scale.seq,
                "warmupRatio": 0.0,
                "seed": SEED,
            },
            "resources": {"nodes": 1, "gpusPerNode": 1, "gpuType": gpu},
            "output": {"uri": f"pvc://out/{run.name}"},
            "checkpointing": {"everySteps": 100_000, "keep": 1},
        },
        "plan": plan_for(run, gpu, scale, lengths),
    }


# --- Measuring ----------------------------------------------------------------------------------------------


def events_of(stdout: str) -> list[dict[str, Any]]:
    events = []
    for line in stdout.splitlines():
        if line.startswith("{"):
            with contextlib.suppress(json.JSONDecodeError):
                events.append(json.loads(line))
    return events


def flops_per_real_token(method: str, weighted_length: float) -> float:
    """Model FLOPs per real token: LoRA on the frozen base (6 x adapter + 4 x base matmul parameters), causal
    attention over the record's own length (6 x q_dim x layers x n, weighted by tokens); DPO adds the reference's
    forward pass (2 x base + a third of the attention)."""
    from kubetune.planner.models import known_architecture

    arch = known_architecture("Qwen/Qwen2.5-7B")
    assert arch is not None
    base, lora = float(arch.matmul_params), float(arch.lora_params(int(LORA["r"]), tuple(LORA["targetModules"])))
    attention = 6.0 * arch.q_dim * arch.num_layers * weighted_length
    flops = 6 * lora + 4 * base + attention
    if method == "DPO":
        flops += 2 * base + attention / 3
    return flops


def measure(events: list[dict[str, Any]]) -> dict[str, Any]:
    """Real tokens/s over the steps after the first (from the child's step timer), peak memory, losses, and what
    the trainer said about its data, packing and attention."""
    steps = [e for e in events if e.get("event") == "bench-step"]
    timed = [s for s in steps if s["step"] >= 2]
    seconds = sum(s["seconds"] for s in timed)
    tokens = sum(s["tokens"] for s in timed)
    progress = [e for e in events if e.get("event") == "progress"]
    metrics = progress[-1].get("metrics", {}) if progress else {}
    found = {name: next((e for e in events if e.get("event") == name), None) for name in ("dataset", "packing")}
    attention = next((e for e in events if e.get("event") == "attention"), None)
    return {
        "steps": steps[-1]["step"] if steps else 0,
        "timed_steps": len(timed),
        "tokens_per_second": round(tokens / seconds, 1) if seconds else None,
        "step_seconds": [round(s["seconds"], 3) for s in steps],
        "step_tokens": [s["tokens"] for s in steps],
        "losses": [e.get("loss") for e in progress],
        "peak_allocated_gib": metrics.get("gpu_max_allocated_gib"),
        "peak_reserved_gib": metrics.get("gpu_max_reserved_gib"),
        "attention": {k: v for k, v in (attention or {}).items() if k != "event"},
        "packing": {k: v for k, v in (found["packing"] or {}).items() if k != "event"} or None,
        "dataset_tokens": (found["dataset"] or {}).get("tokens"),
    }


def padding_fraction(run_plan: dict[str, Any], measured: dict[str, Any]) -> float | None:
    """Share of the computed tokens that are padding: a packed window's unfilled tail (1 - fill); nothing with one
    record per micro-batch; unknown for micro-batches of several padded records (DPO: grouped by length)."""
    if measured.get("packing"):
        return round(1.0 - float(measured["packing"]["fill"]), 4)
    if run_plan.get("microBatchSize") == 1:
        return 0.0
    return None


def mfu(tokens_per_second: float | None, flops_per_token: float, gpu: str) -> dict[str, float | None]:
    """Model FLOPs utilisation of the real tokens, over the dense bf16 peak and over the measured matmul speed."""
    from kubetune.planner.gpus import gpu_type

    card = gpu_type(gpu) or gpu_type("h100")
    assert card is not None
    if not tokens_per_second:
        return {"mfu": None, "mfu_of_matmul_peak": None}
    achieved = tokens_per_second * flops_per_token
    return {
        "mfu": round(achieved / (card.bf16_tflops * 1e12), 4),
        "mfu_of_matmul_peak": round(achieved / (card.bf16_tflops * card.matmul_efficiency * 1e12), 4),
    }


def ratios(runs: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The issue's ratios from the measured runs (None where a run is missing or failed)."""
    out = {}
    for name, (top, bottom, target) in TARGETS.items():
        if not (runs.get(top) or {}).get("tokens_per_second") and (runs.get(FALLBACK.get(top, "")) or {}).get(
            "tokens_per_second"
        ):
            top = FALLBACK[top]
        a = (runs.get(top) or {}).get("tokens_per_second")
        b = (runs.get(bottom) or {}).get("tokens_per_second")
        value = round(a / b, 3) if a and b else None
        out[name] = {
            "of": f"{top} / {bottom}",
            "value": value,
            "target": target,
            "met": bool(value and value >= target),
        }
    return out


# --- Running ------------------------------------------------------------------------------------------------


def step_timer() -> Any:  # pragma: no cover - needs transformers
    """A callback printing each optimizer step's wall time and non-padding tokens as a `bench-step` JSON line."""
    import torch
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):  # type: ignore[misc]
        def __init__(self) -> None:
            self.last, self.tokens = 0.0, 0

        def _now(self) -> float:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            return time.perf_counter()

        def on_train_begin(self, args: Any, state: Any, control: Any, **_: Any) -> None:
            self.last, self.tokens = self._now(), state.num_input_tokens_seen

        def on_step_end(self, args: Any, state: Any, control: Any, **_: Any) -> None:
            now = self._now()
            seen = state.num_input_tokens_seen
            if state.is_world_process_zero:
                line = {"event": "bench-step", "step": state.global_step, "seconds": now - self.last}
                print(json.dumps({**line, "tokens": seen - self.tokens}), flush=True)
            self.last, self.tokens = now, seen

    return StepTimer()


def add_step_timer() -> None:  # pragma: no cover - needs the trainer
    """Give every trainer this process builds the step timer (once per process)."""
    import kubetune.trainer.train as train

    if getattr(train.build_trainer, "with_step_timer", False):
        return
    build_trainer = train.build_trainer

    def with_timer(*args: Any, **kwargs: Any) -> Any:
        trainer = build_trainer(*args, **kwargs)
        trainer.add_callback(step_timer())
        return trainer

    with_timer.with_step_timer = True  # type: ignore[attr-defined]
    train.build_trainer = with_timer  # type: ignore[assignment]


PROFILE_ENV = "KUBETUNE_BENCH_PROFILE_TO"
"""Set by --profile for the runs it names: the child profiles one micro-batch into this file (trainer_gpu's
profile callback: the first micro-batch of the second optimizer step, kernel time by kind)."""


def add_profiler(path: Path) -> None:  # pragma: no cover - needs the trainer
    from trainer_gpu import profile_callback

    import kubetune.trainer.train as train

    build_trainer = train.build_trainer

    def with_profiler(*args: Any, **kwargs: Any) -> Any:
        trainer = build_trainer(*args, **kwargs)
        trainer.add_callback(profile_callback(path))
        return trainer

    train.build_trainer = with_profiler  # type: ignore[assignment]


SHAPE_MULTIPLE_ENV = "KUBETUNE_BENCH_SHAPE_MULTIPLE"
"""Set for the *-bucketed runs: the child pads unpacked micro-batches to a multiple of this many tokens."""


def child_main(config: Path) -> int:  # pragma: no cover - needs the trainer
    """`kubetune train --config FILE` in this process, with the step timer (and the profiler of --profile)."""
    add_step_timer()
    import kubetune.trainer.batching as batching

    if os.environ.get(SHAPE_MULTIPLE_ENV):
        batching.SHAPE_MULTIPLE = int(os.environ[SHAPE_MULTIPLE_ENV])
    if os.environ.get(PROFILE_ENV):
        add_profiler(Path(os.environ[PROFILE_ENV]))
    from kubetune.trainer.main import main as trainer_main

    return trainer_main(["--config", str(config)])


def run_one(
    run: Run, work: Path, config: dict[str, Any], timeout: float, in_process: bool, profile: Path | None = None
) -> dict[str, Any]:  # pragma: no cover
    """One `kubetune train` (its own process on the GPU; in this one for --smoke); its measurements."""
    path = work / "configs" / f"{run.name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config))
    shutil.rmtree(work / "pvc" / "out" / run.name, ignore_errors=True)
    started = time.monotonic()
    os.environ["KUBETUNE_PVC_ROOT"] = str(work / "pvc")
    os.environ["KUBETUNE_TERMINATION_LOG"] = str(work / f"{run.name}.termination-log")
    stderr_text = ""
    if in_process:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = child_main(path)
        stdout = out.getvalue()
    else:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if profile is not None:
            env[PROFILE_ENV] = str(profile)
        if run.shape_buckets:
            env[SHAPE_MULTIPLE_ENV] = str(SHAPE_BUCKET)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "operator"), env.get("PYTHONPATH", "")) if p)
        log_path = work / f"{run.name}.stderr"
        try:
            with log_path.open("w") as stderr:
                proc = subprocess.run(
                    [sys.executable, __file__, "--child", str(path)],
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=stderr,
                    text=True,
                    timeout=timeout,
                )
            code, stdout = proc.returncode, proc.stdout
        except subprocess.TimeoutExpired as err:
            code, stdout = -1, err.stdout.decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
        stderr_text = log_path.read_text()
    result = {"exit_code": code, "wall_seconds": round(time.monotonic() - started, 1), **measure(events_of(stdout))}
    if code != 0:
        result["stderr_tail"] = stderr_text[-3000:]
        result["stdout_tail"] = stdout[-2000:]
    return result


def describe(plan: dict[str, Any]) -> dict[str, Any]:
    keys = ("zeroStage", "offload", "gradientCheckpointing", "ligerKernels", "compile", "attention", "packing")
    described = {k: plan.get(k) for k in keys}
    described["batch"] = f"{plan.get('microBatchSize')} x {plan.get('gradientAccumulationSteps')}"
    memory = plan.get("memory") or {}
    if memory.get("totalGib"):
        described["predicted_gib"] = memory["totalGib"]
    if plan.get("estimatedTokensPerSecond"):
        described["predicted_tokens_per_second"] = plan["estimatedTokensPerSecond"]
    return described


def table(results: dict[str, Any]) -> str:
    rows = [
        "| run | plan | real tokens/s | padding | MFU | peak reserved GiB | attention used |",
        "|---" * 7 + "|",
    ]
    for name, r in results["runs"].items():
        plan = r["plan"]
        what = (
            f"ZeRO-{plan['zeroStage']}, {plan['batch']}, ckpt {'on' if plan['gradientCheckpointing'] else 'off'}, "
            f"{'compile' if plan['compile'] else 'liger' if plan['ligerKernels'] else 'eager'}, "
            f"packing {'on' if plan['packing'] else 'off'}"
        )
        rows.append(
            f"| {name} | {what} | {r.get('tokens_per_second')} | {r.get('padding_fraction')} | {r.get('mfu')} | "
            f"{r.get('peak_reserved_gib')} | {(r.get('attention') or {}).get('used')} |"
        )
    rows.append("")
    rows += [
        f"{k}: {v['of']} = {v['value']} (target {v['target']}, met {v['met']})" for k, v in results["ratios"].items()
    ]
    return "\n".join(rows)


def chosen_runs(names: str, budget_left: float, smoke: bool = False) -> list[Run]:
    """The runs asked for (default: every run that is not optional, then the optional ones that fit; all of them
    for --smoke)."""
    if smoke and not names:
        return list(RUNS)
    if names:
        unknown = [n for n in names.split(",") if n and n not in BY_NAME]
        if unknown:
            raise SystemExit(f"unknown runs: {unknown}; known: {', '.join(BY_NAME)}")
        return [BY_NAME[n] for n in names.split(",") if n]
    required = [r for r in RUNS if not r.optional]
    spare = budget_left - sum(r.estimate_s for r in required)
    extra = []
    for r in (r for r in RUNS if r.optional):
        if spare >= r.estimate_s:
            extra.append(r)
            spare -= r.estimate_s
    return required + extra


def versions() -> dict[str, str]:  # pragma: no cover - needs the trainer's packages
    found = {}
    for module in ("torch", "transformers", "peft", "trl", "deepspeed", "accelerate"):
        try:
            found[module] = str(__import__(module).__version__)
        except Exception:
            found[module] = "missing"
    return found


def build_assets(pvc: Path, scale: Scale) -> tuple[str, float]:  # pragma: no cover - needs torch
    """The datasets and the model: the Qwen2.5-7B architecture (GPU) or the tiny Qwen2 (--smoke)."""
    write_datasets(pvc, scale)
    started = time.monotonic()
    if scale.smoke:
        from kubetune.trainer.tiny import build_tiny_model

        if not (pvc / "models" / "tiny" / "config.json").is_file():
            build_tiny_model(pvc / "models" / "tiny", tokenizer_text())
        return "tiny", time.monotonic() - started
    import trainer_gpu

    model_dir = pvc / "models" / MODEL
    if not (model_dir / "config.json").is_file():
        trainer_gpu.build_model(model_dir, tokenizer_text())
    return MODEL, time.monotonic() - started


def measured_run(  # pragma: no cover - needs the trainer
    run: Run,
    work: Path,
    gpu: str,
    scale: Scale,
    model: str,
    figures: dict[str, Any],
    timeout: float,
    profile: Path | None = None,
    lengths: Any = None,
) -> dict[str, Any]:
    """Train one run and describe it: its plan (with the data's measured `lengths`, DataLengths), measurements,
    padding and MFU."""
    config = trainer_config(run, gpu, scale, model, lengths)
    measured = run_one(run, work, config, timeout, in_process=scale.smoke, profile=profile)
    method = "DPO" if run.data == "dpo" else "SFT"
    # The tiny model of --smoke has other FLOPs than Qwen2.5-7B: no MFU there.
    flops = None if scale.smoke else flops_per_real_token(method, figures[run.data]["token_weighted_length"])
    return {
        "data": run.data,
        "plan": describe(config["plan"]),
        **measured,
        "padding_fraction": padding_fraction(config["plan"], measured),
        "flops_per_real_token": round(flops) if flops else None,
        **mfu(measured.get("tokens_per_second") if flops else None, flops or 0.0, gpu),
    }


def main(argv: list[str] | None = None) -> int:  # pragma: no cover - needs the trainer
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="also copy the results file here (e.g. $OUT)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/kubetune-trainer-realistic"))
    parser.add_argument("--runs", default="", help="comma-separated, of: " + ", ".join(BY_NAME))
    parser.add_argument("--steps", type=int, default=STEPS, help="optimizer steps per run (the first is warm-up)")
    parser.add_argument("--minutes", type=float, default=9.3, help="time budget of the whole run, model build included")
    parser.add_argument("--results", type=Path, help="results file (default bench/results/trainer_realistic_GPU.json)")
    parser.add_argument("--smoke", action="store_true", help="the whole wiring on the CPU with the tiny model")
    parser.add_argument(
        "--profile", default="", help="comma-separated runs to profile one micro-batch of (profile-RUN.txt in --out)"
    )
    parser.add_argument("--dry-run", action="store_true", help="print the length figures and configurations, stop")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child_main(args.child)
    deadline = time.monotonic() + 60 * args.minutes
    smoke = args.smoke
    scale = Scale(
        seq=SMOKE_SEQ if smoke else SEQ,
        dpo_seq=SMOKE_SEQ // 2 if smoke else DPO_SEQ,
        sft_records=SMOKE_SFT_RECORDS if smoke else SFT_RECORDS,
        dpo_pairs=SMOKE_DPO_PAIRS if smoke else DPO_PAIRS,
        steps=min(args.steps, 2) if smoke else args.steps,
        smoke=smoke,
    )
    if args.dry_run:
        gpu = "h100"
        print(json.dumps({"target_lengths": length_figures(realistic_lengths(scale.sft_records, scale.seq))}))
        for run in chosen_runs(args.runs, 60 * args.minutes):
            print(json.dumps({run.name: trainer_config(run, gpu, scale, MODEL)}))
        return 0

    work = args.work / ("smoke" if smoke else "gpu")
    pvc = work / "pvc"
    if smoke:
        device = gpu = "cpu"
    else:
        import torch

        device = torch.cuda.get_device_name(0)
        gpu = gpu_key(device)
    model, build_seconds = build_assets(pvc, scale)
    model_dir = pvc / "models" / model
    lengths = {
        "realistic": token_lengths(model_dir, pvc / "data" / "realistic.jsonl", scale.seq),
        "full": token_lengths(model_dir, pvc / "data" / "full.jsonl", scale.seq),
        "dpo": token_lengths(model_dir, pvc / "data" / "dpo.jsonl", scale.dpo_seq),
    }
    figures = {name: length_figures(values) for name, values in lengths.items()}
    results: dict[str, Any] = {
        "gpu": gpu,
        "device": device,
        "versions": versions(),
        "model_build_seconds": round(build_seconds, 1),
        "steps_per_run": scale.steps,
        "global_batch": {"sft": GLOBAL_BATCH, "dpo": DPO_GLOBAL_BATCH},
        "max_seq_length": {"sft": scale.seq, "dpo": scale.dpo_seq},
        "lengths": figures,
        "runs": {},
    }
    out_file = args.results or ROOT / "bench" / "results" / f"trainer_realistic_{gpu}.json"
    if smoke and not args.results:
        out_file = work / "trainer_realistic_smoke.json"
    out_file.parent.mkdir(parents=True, exist_ok=True)
    queue = chosen_runs(args.runs, deadline - time.monotonic(), smoke)
    while queue:
        run = queue.pop(0)
        left = deadline - time.monotonic()
        if run.optional and left < run.estimate_s and not (args.runs or smoke):
            results["runs"][run.name] = {"skipped": f"{left:.0f} s left of the budget"}
            continue
        timeout = max(60.0, left * run.estimate_s / sum(r.estimate_s for r in [run, *queue]))
        profile = None
        if run.name in args.profile.split(",") and not smoke:
            profile = (args.out or work) / f"profile-{run.name}.txt"
            profile.parent.mkdir(parents=True, exist_ok=True)
        measured = measured_lengths(lengths[run.data], run.data == "dpo")
        results["runs"][run.name] = measured_run(run, work, gpu, scale, model, figures, timeout, profile, measured)
        results["ratios"] = ratios(results["runs"])
        out_file.write_text(json.dumps(results, indent=2))  # partial results survive a later timeout
        print(json.dumps({"run": run.name, **results["runs"][run.name]}), flush=True)
        fallback = BY_NAME.get(FALLBACK.get(run.name, ""))
        if results["runs"][run.name]["exit_code"] != 0 and fallback is not None:
            # Next, whatever the budget: it stands in for the failed run in the ratios.
            queue = [dataclasses.replace(fallback, optional=False), *(r for r in queue if r.name != fallback.name)]
    results["ratios"] = ratios(results["runs"])
    out_file.write_text(json.dumps(results, indent=2))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        if (args.out / out_file.name).resolve() != out_file.resolve():
            shutil.copy(out_file, args.out / out_file.name)
    print(table(results))
    failed = [n for n, r in results["runs"].items() if r.get("exit_code", 0) != 0]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
