"""Our trainer on several GPUs of one machine: the planner's multi-GPU plans against their predictions (issue 23).

Each case runs `kubetune train`'s worker entry point (`kubetune.trainer.main --worker`, what every rank of a
training pod runs) under torchrun, one process per GPU, on the Qwen2.5-7B architecture with random bf16 weights
at maxSeqLength 8192 (records that fill it, as bench/trainer_realistic.py's full-length runs), LoRA r64/alpha
128/dropout 0.05 on q,k,v,o, global batch 32 (8 sequences per GPU on 4 GPUs). The inputs are staged first with
the launcher's own `stage()`, as a pod's launcher does before it starts its workers.

  h100-plan       the planner's plan for N x H100 (kubetune.planner.plan_training, packing auto)
  h100-plan-1gpu  the same per-rank settings (ZeRO stage, kernels, micro-batch, accumulation) on one GPU, in one
                  process as a one-GPU pod runs: the base of the scaling efficiency
  4090d-plan      the planner's plan for N x RTX 4090D, each rank's caching allocator capped at the card's memory
                  (23.65 GiB as PyTorch reports it) less the CUDA context and NCCL buffers the planner assumes
                  (0.75 + 0.9 GiB): the trainer's KUBETUNE_GPU_MEMORY_CAP_GIB (trainer/gpu_cap.py,
                  torch.cuda.set_per_process_memory_fraction), so a plan that would not fit a 4090D fails here too
  recipe          the popular recipe on N GPUs: ZeRO-3 + CPU optimizer offload, gradient checkpointing,
                  micro-batch 1, SDPA, no packing

Recorded per case: tokens/s over the optimizer steps after the first (rank 0's step timer; HF gathers the token
counts of all ranks), and per rank, written by each rank into its own file: peak allocated and reserved memory,
the memory outside PyTorch (CUDA context, NCCL), the device-level peak (reserved peak + outside; also sampled with
cudaMemGetInfo every 50 ms) against the planner's per-GPU prediction, the losses it logged, a checksum of its
LoRA weights (ZeRO-0/2, where every rank holds them whole), and whether it saved the adapter. The issue's
targets: every predicted per-GPU peak within 10% of the measured device peak; the 24 GB plan fits under the cap;
h100-plan's tokens/s at least 90% of N x h100-plan-1gpu's; h100-plan at least 2x the recipe. Writes
bench/results/trainer_multigpu.json, merging with the cases already in it (one call may run some cases, a later
call the others), and a copy under --out.

On the 4-GPU machine (the wheels of docs/gpu-baselines.md in .whl/, as for bench/trainer_realistic.py), one call
per line, each within 10 minutes (the first call builds the model, ~1 min):

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \\
        .whl/*.whl && export PYTHONPATH=/tmp/site:operator PYTHONUNBUFFERED=1 && \\
        python3 bench/trainer_multigpu.py --case h100-plan,h100-plan-1gpu --out "$OUT"
    ... python3 bench/trainer_multigpu.py --case 4090d-plan --out "$OUT"
    ... python3 bench/trainer_multigpu.py --case recipe --out "$OUT"

`--smoke` runs every case's wiring on the CPU: 2 gloo processes, the tiny Qwen2 built locally, maxSeqLength 256, a
few steps. The trainer runs plain DDP there (it uses DeepSpeed only on GPUs and warns), so ZeRO plans run as DDP;
memory is not measured. It asserts that the ranks agree (same losses, same LoRA weights) and that rank 0 alone
saved the adapter. `--dry-run` prints the trainer configurations.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "operator"))
sys.path.insert(0, str(ROOT / "bench"))  # trainer_realistic's data, trainer_gpu's model

import trainer_realistic as realistic  # noqa: E402

SEQ, SMOKE_SEQ = 8192, 256
GLOBAL_BATCH = 32
"""Sequences per optimizer step over all ranks: 8 per GPU on 4 GPUs."""
SMOKE_GLOBAL_BATCH_PER_RANK = 4
PROCESSES, SMOKE_PROCESSES = 4, 2
SMOKE_STEPS = 3
LORA = realistic.LORA
MODEL = realistic.MODEL
GIB = float(2**30)
RECIPE = {"zero_stage": 3, "offload": "cpu", "checkpointing": True, "micro_batch": 1, "attention": "sdpa"}
"""The popular recipe, as planner overrides (kernels: eager, as the planner never compiles or uses Liger with
ZeRO-3; packing off)."""
MEMORY_TOLERANCE = 0.10
SCALING_TARGET = 0.90
PLAN_OVER_RECIPE_TARGET = 2.0


@dataclass(frozen=True)
class Case:
    name: str
    card: str
    """The GPU type the plan is made for (the planner's name)."""
    plan: str
    """planner, planner-1gpu (the planner's per-rank settings in a world of one) or recipe."""
    capped: bool
    """Each rank's allocator capped to the card's memory (emulating a smaller card)."""
    steps: int
    """Optimizer steps on the GPU; the first is warm-up."""
    estimate_s: float
    """Expected wall time on 4 H100s: start, model load, first (compiled) step, the steps."""


CASES = [
    Case("h100-plan", "h100", "planner", False, 8, 170),
    Case("h100-plan-1gpu", "h100", "planner-1gpu", False, 8, 130),
    Case("4090d-plan", "rtx-4090d", "planner", True, 6, 220),
    Case("recipe", "h100", "recipe", False, 6, 240),
]
BY_NAME = {c.name: c for c in CASES}


@dataclass(frozen=True)
class Scale:
    """The run's sizes: the GPUs', or the smoke test's on the CPU."""

    seq: int
    processes: int
    global_batch: int
    smoke: bool

    def steps(self, case: Case) -> int:
        return SMOKE_STEPS if self.smoke else case.steps

    def world(self, case: Case) -> int:
        return 1 if case.plan == "planner-1gpu" else self.processes


def gpu_scale(processes: int = PROCESSES, global_batch: int = GLOBAL_BATCH) -> Scale:
    return Scale(SEQ, processes, global_batch, smoke=False)


def smoke_scale(processes: int = SMOKE_PROCESSES) -> Scale:
    return Scale(SMOKE_SEQ, processes, SMOKE_GLOBAL_BATCH_PER_RANK * processes, smoke=True)


# --- Plans and trainer configurations ---------------------------------------------------------------------


def planner_plan(card: str, gpus: int, global_batch: int, overrides: Any = None, packing: str = "auto") -> Any:
    """The planner's Plan for Qwen2.5-7B (SFT, seq 8192, this bench's LoRA) on `gpus` cards of one node."""
    from kubetune.planner import plan_training
    from kubetune.planner.models import known_architecture

    return plan_training(
        known_architecture("Qwen/Qwen2.5-7B"),
        model_name="Qwen/Qwen2.5-7B",
        method="SFT",
        seq=SEQ,
        global_batch=global_batch,
        lora_rank=int(LORA["r"]),
        lora_targets=tuple(LORA["targetModules"]),
        lora_dropout=float(LORA["dropout"]),
        gpus_per_node=gpus,
        gpu_type_name=card,
        overrides=overrides,
        packing=packing,  # type: ignore[arg-type]
    )


MEMORY_FIELDS = (
    "peak_allocated_gib",
    "peak_reserved_gib",
    "outside_torch_gib",
    "device_peak_gib",
    "device_peak_sampled_gib",
)
SETTINGS = ("zeroStage", "offload", "gradientCheckpointing", "ligerKernels", "compile", "attention", "packing")


def plan_for(case: Case, scale: Scale) -> dict[str, Any]:
    """The plan the trainer runs (wire form), with the planner's per-GPU prediction for it.

    planner-1gpu is the planner's plan for one GPU and a global batch of one rank's share, with the stage,
    offload, checkpointing, attention and micro-batch of the N-GPU plan fixed: the same per-rank work, and the
    prediction of a world of one (no NCCL buffers)."""
    from kubetune.planner import Overrides

    if case.plan == "recipe":
        plan = planner_plan(case.card, scale.processes, scale.global_batch, Overrides(**RECIPE), "off").to_wire()
        assert not plan["ligerKernels"] and not plan["compile"], plan  # the recipe runs eager kernels
    else:
        plan = planner_plan(case.card, scale.processes, scale.global_batch).to_wire()
    if case.plan == "planner-1gpu":
        full = plan
        fixed = Overrides(
            zero_stage=full["zeroStage"],
            offload=full["offload"],
            checkpointing=full["gradientCheckpointing"],
            attention=full["attention"],
            micro_batch=full["microBatchSize"],
        )
        plan = planner_plan(case.card, 1, scale.global_batch // scale.processes, fixed).to_wire()
        differs = [k for k in (*SETTINGS, "microBatchSize", "gradientAccumulationSteps") if plan[k] != full[k]]
        if differs:
            raise SystemExit(f"the one-GPU plan differs from {case.card}'s {scale.processes}-GPU plan in {differs}")
    if scale.smoke:
        plan["compile"] = False  # the CPU would spend minutes compiling; the smoke run checks the wiring
    return plan


def cap_gib(case: Case) -> float | None:
    """The allocator cap emulating the card: its memory less the CUDA context and NCCL buffers (outside PyTorch's
    allocator, which the cap limits) that the planner's memory model assumes."""
    if not case.capped:
        return None
    from kubetune.planner import memory
    from kubetune.planner.gpus import gpu_type

    card = gpu_type(case.card)
    assert card is not None
    return round(card.memory_gib - memory.CUDA_CONTEXT_GIB - memory.NCCL_GIB, 2)


def trainer_config(case: Case, scale: Scale, model: str) -> dict[str, Any]:
    """The TrainerConfig (wire form) the operator would render for this case."""
    world = scale.world(case)
    return {
        "job": {"name": f"bench-{case.name}", "namespace": "bench", "uid": f"uid-{case.name}"},
        "progressIntervalSeconds": 0.5,
        "spec": {
            "method": "SFT",
            "baseModel": {"uri": f"pvc://models/{model}"},
            "dataset": {"uri": "pvc://data/full.jsonl"},
            "lora": LORA,
            "hyperparameters": {
                "learningRate": 2e-5,
                "maxSteps": scale.steps(case),
                "globalBatchSize": scale.global_batch * world // scale.processes,
                "maxSeqLength": scale.seq,
                "warmupRatio": 0.0,
                "seed": realistic.SEED,
            },
            "resources": {"nodes": 1, "gpusPerNode": world, "gpuType": case.card},
            "output": {"uri": f"pvc://out/{case.name}"},
            "checkpointing": {"everySteps": 100_000, "keep": 1},
        },
        "plan": plan_for(case, scale),
    }


# --- One rank (under torchrun) ----------------------------------------------------------------------------


class RankRecorder:  # pragma: no cover - runs inside the trainer
    """What one rank measures: its step times, the losses it logged, its LoRA weights' checksum, its memory."""

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.device = int(os.environ.get("LOCAL_RANK", "0"))
        self.steps: list[dict[str, Any]] = []
        self.losses: list[float] = []
        self.checksum: dict[str, Any] | None = None
        self.sampled_peak = 0.0
        self.phases: dict[str, float] = {}
        """Bytes by phase of a micro-batch (the largest over all of them): allocated when a forward pass starts
        (what stays resident: weights, adapters, optimizer state), the peak within a forward pass, and the peak
        from the end of the forward pass to the end of the micro-batch (backward, optimizer step)."""
        self._peaks = (0.0, 0.0)  # allocated and reserved peaks before the last reset of the allocator's counters
        self._stop = threading.Event()
        self._last = 0.0
        self._tokens = 0

    def phase(self, name: str, value: float) -> None:
        self.phases[name] = max(self.phases.get(name, 0.0), value)

    def peak_since_reset(self) -> float:
        """The allocated peak since the last reset; the counters then start again (the run's peaks are kept)."""
        import torch

        allocated = float(torch.cuda.max_memory_allocated(self.device))
        reserved = float(torch.cuda.max_memory_reserved(self.device))
        self._peaks = (max(self._peaks[0], allocated), max(self._peaks[1], reserved))
        torch.cuda.reset_peak_memory_stats(self.device)
        return allocated

    def watch_phases(self, model: Any) -> None:
        """Forward hooks on the model that split each micro-batch's memory into its phases (GPU only)."""
        import torch

        if not torch.cuda.is_available() or model is None:
            return

        def forward_starts(*_: Any) -> None:
            self.peak_since_reset()
            self.phase("resident_at_forward_start", float(torch.cuda.memory_allocated(self.device)))

        def forward_ends(*_: Any) -> None:
            self.phase("forward_peak", self.peak_since_reset())

        model.register_forward_pre_hook(forward_starts)
        model.register_forward_hook(forward_ends)

    def micro_batch_ends(self) -> None:
        import torch

        if torch.cuda.is_available():
            self.phase("backward_and_step_peak", self.peak_since_reset())

    def sample(self) -> None:
        """Device-level memory in use (CUDA context and NCCL included), every 50 ms."""
        import torch

        while not self._stop.wait(0.05):
            free, total = torch.cuda.mem_get_info(self.device)  # the device named: a thread has its own current one
            self.sampled_peak = max(self.sampled_peak, float(total - free))

    def start_sampling(self) -> threading.Thread | None:
        import torch

        if not torch.cuda.is_available():
            return None
        torch.cuda.set_device(self.device)
        thread = threading.Thread(target=self.sample, daemon=True)
        thread.start()
        return thread

    def callback(self) -> Any:
        import torch
        from transformers import TrainerCallback

        recorder = self

        def now() -> float:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            return time.perf_counter()

        class Recorder(TrainerCallback):  # type: ignore[misc]
            def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **_: Any) -> None:
                recorder._last, recorder._tokens = now(), state.num_input_tokens_seen
                recorder.watch_phases(model)

            def on_substep_end(self, args: Any, state: Any, control: Any, **_: Any) -> None:
                recorder.micro_batch_ends()

            def on_step_end(self, args: Any, state: Any, control: Any, **_: Any) -> None:
                recorder.micro_batch_ends()
                t, seen = now(), state.num_input_tokens_seen
                recorder.steps.append(
                    {"step": state.global_step, "seconds": t - recorder._last, "tokens": seen - recorder._tokens}
                )
                recorder._last, recorder._tokens = t, seen

            def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **_: Any) -> None:
                if logs and "loss" in logs:
                    recorder.losses.append(float(logs["loss"]))

            def on_train_end(self, args: Any, state: Any, control: Any, model: Any = None, **_: Any) -> None:
                recorder.checksum = lora_checksum(model)

        return Recorder()

    def memory(self) -> dict[str, Any]:
        import torch

        if not torch.cuda.is_available():
            return {"device": "cpu"}
        self._stop.set()
        device = self.device
        free, total = torch.cuda.mem_get_info(device)
        allocated_peak = max(self._peaks[0], float(torch.cuda.max_memory_allocated(device)))
        reserved_peak = max(self._peaks[1], float(torch.cuda.max_memory_reserved(device)))
        outside = max(0.0, float(total - free) - float(torch.cuda.memory_reserved(device)))
        return {
            "device": torch.cuda.get_device_name(device),
            "device_total_gib": round(total / GIB, 2),
            "phases_gib": {name: round(value / GIB, 2) for name, value in self.phases.items()},
            "peak_allocated_gib": round(allocated_peak / GIB, 2),
            "peak_reserved_gib": round(reserved_peak / GIB, 2),
            "outside_torch_gib": round(outside / GIB, 2),
            "device_peak_gib": round((reserved_peak + outside) / GIB, 2),
            "device_peak_sampled_gib": round(self.sampled_peak / GIB, 2),
        }


def lora_checksum(model: Any) -> dict[str, Any] | None:  # pragma: no cover - runs inside the trainer
    """Sum and sum of squares of the trainable weights (None under ZeRO-3, where each rank holds a shard)."""
    if model is None:
        return None
    params = [p for p in model.parameters() if p.requires_grad]
    if any(hasattr(p, "ds_numel") for p in params):
        return None
    total = sum(float(p.detach().double().sum()) for p in params)
    squares = sum(float(p.detach().double().pow(2).sum()) for p in params)
    return {"params": sum(p.numel() for p in params), "sum": total, "sum_of_squares": squares}


def add_recorder(recorder: RankRecorder) -> None:  # pragma: no cover - needs the trainer
    """Give the trainer this rank builds the recorder's callback."""
    import kubetune.trainer.train as train

    build_trainer = train.build_trainer

    def with_recorder(*args: Any, **kwargs: Any) -> Any:
        trainer = build_trainer(*args, **kwargs)
        trainer.add_callback(recorder.callback())
        return trainer

    train.build_trainer = with_recorder  # type: ignore[assignment]


def child_main(config: Path, staged: Path, ranks: Path) -> int:  # pragma: no cover - needs the trainer
    """One rank: `kubetune.trainer.main --config FILE --worker STAGED` with the recorder; stdout to its own file,
    its measurements to rank<R>.json."""
    rank = int(os.environ.get("RANK", "0"))
    ranks.mkdir(parents=True, exist_ok=True)
    with (ranks / f"rank{rank}.stdout").open("w") as out:
        sys.stdout.flush()
        os.dup2(out.fileno(), 1)
    recorder = RankRecorder(rank)
    recorder.start_sampling()
    add_recorder(recorder)
    from kubetune.trainer.main import main as trainer_main

    code = trainer_main(["--config", str(config), "--worker", str(staged)])
    sys.stdout.flush()
    record = {
        "rank": rank,
        "exit_code": code,
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
        "omp_threads": os.environ.get("OMP_NUM_THREADS"),
        "steps": recorder.steps,
        "losses": recorder.losses,
        "lora_checksum": recorder.checksum,
        **recorder.memory(),
    }
    (ranks / f"rank{rank}.json").write_text(json.dumps(record))
    return code


# --- Measuring ----------------------------------------------------------------------------------------------


def tokens_per_second(steps: list[dict[str, Any]]) -> float | None:
    """Tokens/s over the optimizer steps after the first (compilation, DeepSpeed's first step)."""
    timed = [s for s in steps if s["step"] >= 2]
    seconds = sum(s["seconds"] for s in timed)
    return round(sum(s["tokens"] for s in timed) / seconds, 1) if seconds else None


def agree(values: list[Any], rel: float = 1e-6) -> bool:
    """All ranks' values equal (floats within `rel`); False when a rank has none."""
    if not values or any(v is None for v in values):
        return False

    def same(a: Any, b: Any) -> bool:
        if isinstance(a, dict):
            return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
        if isinstance(a, list):
            return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
        if isinstance(a, float):
            return math.isclose(a, b, rel_tol=rel, abs_tol=1e-9)
        return bool(a == b)

    return all(same(values[0], v) for v in values[1:])


def memory_error(predicted: float | None, measured: float | None) -> float | None:
    """(predicted - measured) / measured, or None."""
    if not predicted or not measured:
        return None
    return round((predicted - measured) / measured, 4)


def summarize(
    case: Case,
    plan: dict[str, Any],
    ranks: list[dict[str, Any]],
    events: list[list[dict[str, Any]]],
    processes: int,
    adapter_saved: bool,
    stderr: str,
) -> dict[str, Any]:
    """One case's figures from its rank files and its ranks' events (rank order)."""
    predicted = (plan.get("memory") or {}).get("totalGib") or None
    rank0 = next((r for r in ranks if r["rank"] == 0), {})
    adapter_ranks = [i for i, evs in enumerate(events) if any(e.get("event") == "adapter" for e in evs)]
    caps = [e for evs in events for e in evs if e.get("event") == "gpu-memory-cap"]
    attention = next((e for e in (events[0] if events else []) if e.get("event") == "attention"), None)
    checksums = [r.get("lora_checksum") for r in ranks]
    tps = tokens_per_second(rank0.get("steps", []))
    per_rank = []
    for r in sorted(ranks, key=lambda r: r["rank"]):
        per_rank.append(
            {
                "rank": r["rank"],
                "exit_code": r["exit_code"],
                **{k: r.get(k) for k in MEMORY_FIELDS},
                "predicted_gib": predicted,
                "error": memory_error(predicted, r.get("device_peak_gib")),
                "losses": r.get("losses"),
                "lora_checksum": r.get("lora_checksum"),
            }
        )
    return {
        "plan": {
            **{k: plan.get(k) for k in SETTINGS},
            "microBatchSize": plan.get("microBatchSize"),
            "gradientAccumulationSteps": plan.get("gradientAccumulationSteps"),
            "worldSize": plan.get("worldSize"),
        },
        "predicted": {
            "per_gpu_gib": predicted,
            "memory": plan.get("memory"),
            "tokens_per_second": plan.get("estimatedTokensPerSecond"),
        },
        "processes": processes,
        "memory_cap_gib": cap_gib(case),
        "caps_applied": len(caps),
        "device": rank0.get("device"),
        "ranks_reported": len(ranks),
        "steps": len(rank0.get("steps", [])),
        "timed_steps": len([s for s in rank0.get("steps", []) if s["step"] >= 2]),
        "tokens_per_second": tps,
        "tokens_per_second_per_gpu": round(tps / processes, 1) if tps else None,
        "step_seconds": [round(s["seconds"], 3) for s in rank0.get("steps", [])],
        "losses": rank0.get("losses"),
        "attention": {k: v for k, v in (attention or {}).items() if k != "event"},
        "ranks_agree": {
            "losses": agree([r.get("losses") for r in ranks]) and len(ranks) == processes,
            "lora_weights": None if any(c is None for c in checksums) else agree(checksums),
            "adapter_saved_by": adapter_ranks,
            "adapter_saved": adapter_saved,
        },
        "max_device_peak_gib": max((r.get("device_peak_gib") or 0.0 for r in ranks), default=None) or None,
        "oom": "out of memory" in stderr.lower() or "OutOfMemoryError" in stderr,
        "ranks": per_rank,
    }


def run_case(case: Case, scale: Scale, work: Path, model: str, timeout: float) -> dict[str, Any]:  # pragma: no cover
    """Stage the inputs (the launcher's stage()), run the ranks (torchrun; one process for a world of one)."""
    from kubetune.api.v1alpha1 import TrainerConfig
    from kubetune.trainer.distributed import Layout
    from kubetune.trainer.gpu_cap import CAP_ENV
    from kubetune.trainer.inputs import stage

    config = trainer_config(case, scale, model)
    config_path = work / "configs" / f"{case.name}.json"
    config_path.parent.mkdir(parents=True, exist_ok=True)
    config_path.write_text(json.dumps(config))
    staged, ranks = work / "staged" / case.name, work / "ranks" / case.name
    for path in (staged, ranks, work / "pvc" / "out" / case.name):
        shutil.rmtree(path, ignore_errors=True)
    started = time.monotonic()
    stage(TrainerConfig.model_validate(config)).save(staged)
    processes = scale.world(case)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "KUBETUNE_METRICS_PORT": "0"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "operator"), env.get("PYTHONPATH", "")) if p)
    env["KUBETUNE_TERMINATION_LOG"] = str(work / f"{case.name}.termination-log")
    # The cores shared out among the local workers, the launcher's rule (trainer/distributed.py); on the CPU one
    # thread each, so that the one-process and the two-process runs compare on the smoke run's shared cores.
    layout = Layout(nproc_per_node=processes)
    env["OMP_NUM_THREADS"] = "1" if scale.smoke else layout.worker_env(0, os.cpu_count() or 1)["OMP_NUM_THREADS"]
    if cap_gib(case) is not None:
        env[CAP_ENV] = str(cap_gib(case))
    child = [str(Path(__file__).resolve()), "--child", str(config_path), "--staged", str(staged), "--ranks", str(ranks)]
    if processes > 1:
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={processes}",
            *child,
        ]
    else:
        command = [sys.executable, *child]  # a one-GPU pod trains in its one process
    log_path = work / f"{case.name}.stderr"
    with log_path.open("w") as log:
        # A session of its own: on timeout the ranks go too, not only torchrun (they would hold the GPUs).
        proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code = -1
    stderr = log_path.read_text(errors="replace")
    rank_files = sorted(ranks.glob("rank*.json"))
    rank_records = [json.loads(p.read_text()) for p in rank_files]
    events = [
        realistic.events_of((ranks / f"rank{i}.stdout").read_text()) if (ranks / f"rank{i}.stdout").exists() else []
        for i in range(processes)
    ]
    adapter = work / "pvc" / "out" / case.name / "adapter" / "adapter_model.safetensors"
    result = {
        "exit_code": code,
        "wall_seconds": round(time.monotonic() - started, 1),
        **summarize(case, config["plan"], rank_records, events, processes, adapter.is_file(), stderr),
    }
    if code != 0:
        result["stderr_tail"] = stderr[-4000:]
    return result


# --- Targets and report -------------------------------------------------------------------------------------


def targets(runs: dict[str, dict[str, Any]], processes: int) -> dict[str, dict[str, Any]]:
    """The issue's four targets from the cases measured so far (value None: a case is missing or failed)."""
    measured = {n: r for n, r in runs.items() if r and r.get("exit_code") == 0}
    errors = {f"{n}/rank{x['rank']}": x["error"] for n, r in measured.items() for x in r.get("ranks", [])}
    known = [e for e in errors.values() if e is not None]
    worst = max(known, key=abs) if known else None
    out: dict[str, dict[str, Any]] = {
        "memory_within_10_percent": {
            "value": worst,
            "of": "the largest (predicted - measured device peak) / measured over every rank of every case",
            "target": MEMORY_TOLERANCE,
            "met": bool(known) and len(known) == len(errors) and abs(worst or 0) <= MEMORY_TOLERANCE,
            "errors": errors,
        }
    }
    small = runs.get("4090d-plan") or {}
    fits = small.get("exit_code") == 0 and not small.get("oom") and small.get("caps_applied") == processes
    peak, card = small.get("max_device_peak_gib"), _card_gib("rtx-4090d")
    out["fits_24gb"] = {
        "value": peak,
        "of": "4090d-plan: ran under the cap on every rank; its largest device peak (GiB) against the card's",
        "target": card,
        "met": bool(fits and peak is not None and peak <= card),
    }
    four, one = runs.get("h100-plan") or {}, runs.get("h100-plan-1gpu") or {}
    a, b = four.get("tokens_per_second"), one.get("tokens_per_second")
    out["scaling_efficiency"] = {
        "value": round(a / (processes * b), 3) if a and b else None,
        "of": f"h100-plan / ({processes} x h100-plan-1gpu)",
        "target": SCALING_TARGET,
        "same_device": bool(four.get("device")) and four.get("device") == one.get("device"),
    }
    recipe = (runs.get("recipe") or {}).get("tokens_per_second")
    out["plan_over_recipe"] = {
        "value": round(a / recipe, 3) if a and recipe else None,
        "of": "h100-plan / recipe",
        "target": PLAN_OVER_RECIPE_TARGET,
        "same_device": bool(four.get("device")) and four.get("device") == (runs.get("recipe") or {}).get("device"),
    }
    for name in ("scaling_efficiency", "plan_over_recipe"):
        t = out[name]
        t["met"] = bool(t["value"] is not None and t["value"] >= t["target"] and t["same_device"])
    return out


def _card_gib(card: str) -> float:
    from kubetune.planner.gpus import gpu_type

    found = gpu_type(card)
    assert found is not None
    return found.memory_gib


def report(results: dict[str, Any]) -> str:
    rows = [
        "| case | plan | tokens/s | per GPU | predicted GiB/GPU | device peak GiB (per rank) | worst error |",
        "|---" * 7 + "|",
    ]
    for name, r in results["runs"].items():
        p = r.get("plan") or {}
        what = (
            f"ZeRO-{p.get('zeroStage')}{' + offload' if p.get('offload') == 'cpu' else ''}, "
            f"{p.get('microBatchSize')} x {p.get('gradientAccumulationSteps')} x {r.get('processes')}, "
            f"ckpt {'on' if p.get('gradientCheckpointing') else 'off'}, "
            f"{'compile' if p.get('compile') else 'liger' if p.get('ligerKernels') else 'eager'}"
        )
        peaks = ", ".join(str(x.get("device_peak_gib")) for x in r.get("ranks", []))
        errors = [x["error"] for x in r.get("ranks", []) if x.get("error") is not None]
        worst = f"{max(errors, key=abs):+.1%}" if errors else "-"
        status = "" if r.get("exit_code") == 0 else f" (exit {r.get('exit_code')}{', OOM' if r.get('oom') else ''})"
        rows.append(
            f"| {name}{status} | {what} | {r.get('tokens_per_second')} | {r.get('tokens_per_second_per_gpu')} | "
            f"{(r.get('predicted') or {}).get('per_gpu_gib')} | {peaks} | {worst} |"
        )
    rows.append("")
    if results.get("smoke"):
        rows.append("Smoke run on the CPU (tiny model; predictions are Qwen2.5-7B's): targets are judged on GPUs only.")
    for name, t in results["targets"].items():
        mark = "pass" if t["met"] else ("not measured" if t["value"] is None else "MISS")
        rows.append(f"{name}: {t['of']} = {t['value']} (target {t['target']}): {mark}")
    return "\n".join(rows)


# --- Main ---------------------------------------------------------------------------------------------------


def chosen_cases(names: str) -> list[Case]:
    if not names:
        return list(CASES)
    unknown = [n for n in names.split(",") if n and n not in BY_NAME]
    if unknown:
        raise SystemExit(f"unknown cases: {unknown}; known: {', '.join(BY_NAME)}")
    return [BY_NAME[n] for n in names.split(",") if n]


def build_assets(pvc: Path, scale: Scale, steps: int) -> tuple[str, float]:  # pragma: no cover - needs torch
    """Records that fill maxSeqLength, and the model: the Qwen2.5-7B architecture (GPU) or the tiny Qwen2."""
    records = scale.global_batch * (steps + 1)
    realistic.write_jsonl(pvc / "data" / "full.jsonl", realistic.full_length_sft(records, scale.seq))
    started = time.monotonic()
    if scale.smoke:
        from kubetune.trainer.tiny import build_tiny_model

        if not (pvc / "models" / "tiny" / "config.json").is_file():
            build_tiny_model(pvc / "models" / "tiny", realistic.tokenizer_text())
        return "tiny", time.monotonic() - started
    if not (pvc / "models" / MODEL / "config.json").is_file():
        # In a process of its own: a CUDA context left in this one would count in rank 0's device memory.
        subprocess.run([sys.executable, __file__, "--build-model", str(pvc / "models" / MODEL)], check=True)
    return MODEL, time.monotonic() - started


def smoke_failures(results: dict[str, Any], processes: int) -> list[str]:
    """What the smoke run must show for every case: it ran, every rank reported, the ranks agree, rank 0 alone
    saved the adapter, every field is there."""
    problems = []
    for name, r in results["runs"].items():
        world = 1 if BY_NAME[name].plan == "planner-1gpu" else processes
        agreed = r.get("ranks_agree") or {}
        checks = {
            "exit code 0": r.get("exit_code") == 0,
            f"{world} rank files": r.get("ranks_reported") == world,
            "timed steps": (r.get("timed_steps") or 0) >= 1 and bool(r.get("tokens_per_second")),
            "same losses on every rank": bool(agreed.get("losses")),
            "same LoRA weights on every rank": agreed.get("lora_weights") is True,
            "adapter saved by rank 0 alone": agreed.get("adapter_saved_by") == [0] and agreed.get("adapter_saved"),
            "every field": set(RUN_FIELDS) <= set(r),
        }
        problems += [f"{name}: {what}" for what, ok in checks.items() if not ok]
    if set(results.get("targets", {})) != set(TARGET_NAMES):
        problems.append("targets missing")
    return problems


RUN_FIELDS = (
    "exit_code", "wall_seconds", "plan", "predicted", "processes", "memory_cap_gib", "caps_applied", "device",
    "ranks_reported", "steps", "timed_steps", "tokens_per_second", "tokens_per_second_per_gpu", "step_seconds",
    "losses", "attention", "ranks_agree", "max_device_peak_gib", "oom", "ranks",
)  # fmt: skip
TARGET_NAMES = ("memory_within_10_percent", "fits_24gb", "scaling_efficiency", "plan_over_recipe")


def main(argv: list[str] | None = None) -> int:  # pragma: no cover - needs the trainer
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", default="", help="comma-separated, of: " + ", ".join(BY_NAME) + " (default all)")
    parser.add_argument(
        "--processes", type=int, help=f"GPUs/processes (default {PROCESSES}; --smoke {SMOKE_PROCESSES})"
    )
    parser.add_argument(
        "--global-batch",
        type=int,
        help=f"sequences per optimizer step (default {GLOBAL_BATCH // PROCESSES} per process: {GLOBAL_BATCH} on "
        f"{PROCESSES}); with --processes 1, the 24 GB emulation of one card (--case 4090d-plan) on a one-GPU machine",
    )
    parser.add_argument("--out", type=Path, help="also copy the results file here (e.g. $OUT)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/kubetune-trainer-multigpu"))
    parser.add_argument("--minutes", type=float, default=9.3, help="time budget of the call, model build included")
    parser.add_argument("--results", type=Path, help="results file (default bench/results/trainer_multigpu.json)")
    parser.add_argument("--smoke", action="store_true", help="every case's wiring on the CPU (gloo, tiny model)")
    parser.add_argument("--dry-run", action="store_true", help="print the trainer configurations, stop")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--staged", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--ranks", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--build-model", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child_main(args.child, args.staged, args.ranks)
    if args.build_model:
        import trainer_gpu

        trainer_gpu.build_model(args.build_model, realistic.tokenizer_text())
        return 0
    deadline = time.monotonic() + 60 * args.minutes
    processes = args.processes or (SMOKE_PROCESSES if args.smoke else PROCESSES)
    if args.smoke:
        scale = smoke_scale(processes)
    else:
        scale = gpu_scale(processes, args.global_batch or GLOBAL_BATCH * processes // PROCESSES)
    cases = chosen_cases(args.case)
    if args.dry_run:
        for case in cases:
            print(json.dumps({case.name: {**trainer_config(case, scale, MODEL), "memoryCapGib": cap_gib(case)}}))
        return 0
    work = args.work / ("smoke" if scale.smoke else "gpu")
    pvc = work / "pvc"
    os.environ["KUBETUNE_PVC_ROOT"] = str(pvc)
    model, build_seconds = build_assets(pvc, scale, max(scale.steps(c) for c in CASES))
    out_file = args.results or (
        work / "trainer_multigpu_smoke.json" if scale.smoke else ROOT / "bench" / "results" / "trainer_multigpu.json"
    )
    results: dict[str, Any] = json.loads(out_file.read_text()) if out_file.is_file() and not scale.smoke else {}
    results.update(
        {
            "smoke": scale.smoke,
            "machine": f"CPU, {os.cpu_count()} cores, {platform.machine()} (gloo)"
            if scale.smoke
            else f"{scale.processes} GPUs of one machine",
            "cpu_count": os.cpu_count(),
            "versions": realistic.versions(),
            "model": model,
            "max_seq_length": scale.seq,
            "global_batch": scale.global_batch,
            "processes": scale.processes,
            "lora": LORA,
            "model_build_seconds": round(build_seconds, 1),
        }
    )
    results.setdefault("runs", {})
    out_file.parent.mkdir(parents=True, exist_ok=True)
    queue = list(cases)
    while queue:
        case = queue.pop(0)
        left = deadline - time.monotonic()
        timeout = max(60.0, left * case.estimate_s / sum(c.estimate_s for c in [case, *queue]))
        result = run_case(case, scale, work, model, timeout)
        result["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        results["runs"][case.name] = result
        results["targets"] = targets(results["runs"], scale.processes)
        out_file.write_text(json.dumps(results, indent=2))  # partial results survive a later timeout
        summary = {k: result.get(k) for k in ("exit_code", "wall_seconds", "tokens_per_second", "max_device_peak_gib")}
        print(json.dumps({"case": case.name, **summary}), flush=True)
    results["targets"] = targets(results["runs"], scale.processes)
    out_file.write_text(json.dumps(results, indent=2))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        if (args.out / out_file.name).resolve() != out_file.resolve():
            shutil.copy(out_file, args.out / out_file.name)
    print(report(results))
    if scale.smoke:
        problems = smoke_failures(results, scale.processes)
        for problem in problems:
            print("smoke check failed:", problem)
        return 1 if problems else 0
    return 1 if any(results["runs"][c.name].get("exit_code") != 0 for c in cases) else 0


if __name__ == "__main__":
    raise SystemExit(main())
