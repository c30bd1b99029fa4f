"""`kubetune plan`: print the training plan for a model on some GPUs, as a table or as JSON."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from kubetune.api.v1alpha1.finetunejob import Plan
from kubetune.planner.gpus import GPU_TYPES, gpu_type
from kubetune.planner.models import LINEAR_NAMES, ModelArchitecture, architecture_for_uri, architecture_from_path
from kubetune.planner.plan import Overrides, PlanInfeasible, plan_training, quantity_gib

# --lora-targets q,k,v,o is short for q_proj,k_proj,v_proj,o_proj.
_SHORT_TARGETS = {n.removesuffix("_proj"): n for n in LINEAR_NAMES}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kubetune plan",
        description="Plan a LoRA training run: ZeRO stage, offload, micro-batch, checkpointing, memory per GPU.",
    )
    p.add_argument("--model", required=True, help="Qwen/Qwen2.5-7B, hf://ORG/NAME, pvc://CLAIM/PATH or a local dir")
    p.add_argument("--gpus", type=int, default=1, help="GPUs per node (default 1)")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpu-type", help=f"one of {', '.join(GPU_TYPES)} (h100 = h100-80gb)")
    p.add_argument("--gpu-memory", help="memory per GPU for other types, GiB or a quantity such as 48Gi")
    p.add_argument("--host-memory", help="host memory per pod (a quantity such as 256Gi) for CPU offload")
    p.add_argument("--seq", type=int, default=8192, help="maxSeqLength (default 8192)")
    p.add_argument("--global-batch", type=int, default=64, help="sequences (SFT) or pairs (DPO) per step")
    p.add_argument("--method", choices=("SFT", "DPO", "sft", "dpo"), default="SFT")
    p.add_argument("--lora-r", type=int, default=64)
    p.add_argument("--lora-targets", default="q_proj,k_proj,v_proj,o_proj", help="comma-separated, or all-linear")
    p.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument("--zero-stage", choices=("auto", "0", "2", "3"), default="auto")
    p.add_argument("--offload", choices=("auto", "none", "cpu"), default="auto")
    p.add_argument("--checkpointing", choices=("auto", "on", "off"), default="auto")
    p.add_argument("--attention", choices=("auto", "sdpa", "flash_attention_2", "eager"), default="auto")
    p.add_argument("--micro-batch", default="auto", help="auto or a number")
    p.add_argument("--packing", choices=("auto", "on", "off"), default="auto", help="pack SFT records into windows")
    p.add_argument("--output", choices=("table", "json"), default="table")
    return p


def _architecture(model: str) -> ModelArchitecture | None:
    path = Path(model)
    if "://" not in model and (path / "config.json").is_file():
        return architecture_from_path(path)
    return architecture_for_uri(model)


def _gib(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        return quantity_gib(value)


def _overrides(args: argparse.Namespace) -> Overrides:
    checkpointing = None if args.checkpointing == "auto" else args.checkpointing == "on"
    return Overrides(
        zero_stage=None if args.zero_stage == "auto" else int(args.zero_stage),
        offload=None if args.offload == "auto" else args.offload,
        checkpointing=checkpointing,
        attention=None if args.attention == "auto" else args.attention,
        micro_batch=None if args.micro_batch == "auto" else int(args.micro_batch),
    )


def _table(plan: Plan, title: str) -> str:
    yes = {True: "yes", False: "no"}
    mem = plan.memory
    rows = [
        ("ZeRO stage", str(plan.zero_stage)),
        ("CPU offload", plan.offload),
        ("micro-batch", str(plan.micro_batch_size)),
        ("gradient accumulation", str(plan.gradient_accumulation_steps)),
        ("GPUs (world size)", str(plan.world_size)),
        ("gradient checkpointing", yes[plan.gradient_checkpointing]),
        ("attention", plan.attention),
        ("Liger kernels", yes[plan.liger_kernels]),
        ("torch.compile", yes[plan.compile]),
        ("packing", yes[plan.packing]),
    ]
    lines = [title, ""]
    lines += [f"  {k:<26}{v}" for k, v in rows]
    if mem.total_gib:
        lines += ["", "Memory per GPU (GiB)"]
        lines += [
            f"  {k:<26}{v:>8.2f}"
            for k, v in (
                ("weights", mem.weights_gib),
                ("LoRA + grads + optimizer", mem.lora_gib),
                ("activations", mem.activations_gib),
                ("logits / loss buffers", mem.logits_gib),
                ("overhead", mem.overhead_gib),
                ("total (predicted peak)", mem.total_gib),
            )
        ]
        if mem.available_gib:
            lines.append(f"  {'usable (after margin)':<26}{mem.available_gib:>8.2f}")
    if plan.estimated_tokens_per_second:
        lines += ["", f"Estimated throughput: {plan.estimated_tokens_per_second:,.0f} tokens/s"]
    lines += ["", "Why:"] + [f"  - {line}" for line in plan.explanation]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    arch = _architecture(args.model)
    targets = tuple(_SHORT_TARGETS.get(t.strip(), t.strip()) for t in args.lora_targets.split(",") if t.strip())
    gpu = gpu_type(args.gpu_type)
    try:
        plan = plan_training(
            arch,
            model_name=args.model,
            method=args.method.upper(),
            seq=args.seq,
            global_batch=args.global_batch,
            lora_rank=args.lora_r,
            lora_targets=targets,
            lora_dropout=args.lora_dropout,
            nodes=args.nodes,
            gpus_per_node=args.gpus,
            gpu_type_name=args.gpu_type,
            gpu_memory_gib=_gib(args.gpu_memory),
            host_memory_gib=_gib(args.host_memory),
            overrides=_overrides(args),
            packing=args.packing,
        )
    except PlanInfeasible as err:
        if args.output == "json":
            print(json.dumps({"feasible": False, "reason": str(err)}, indent=2))
        else:
            print(f"Infeasible: {err}", file=sys.stderr)
        return 1
    if args.output == "json":
        print(json.dumps(plan.to_wire(), indent=2))
        return 0
    model = arch.display_name if arch else args.model
    gpus = f"{args.nodes} x {args.gpus}" if args.nodes > 1 else str(args.gpus)
    gpu_name = gpu.display_name if gpu else (args.gpu_type or "GPU")
    title = (
        f"Plan: {model} {args.method.upper()}, LoRA r{args.lora_r} on {','.join(targets)}, seq {args.seq}, "
        f"global batch {args.global_batch}, {gpus} x {gpu_name}"
    )
    print(_table(plan, title))
    return 0
