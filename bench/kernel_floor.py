"""The floor under the trainer's speed: what one full-length sequence of the Qwen2.5-7B architecture with LoRA r64 on
q,k,v,o costs in its matrix multiplications and attention kernels alone, each timed in isolation on the GPU.

A training step of a LoRA adapter on a frozen base runs, per decoder layer and sequence: each linear layer's
forward and its input gradient (no weight gradient: the base is frozen), LoRA's two small matmuls forward and
four backward per adapted layer, and causal attention forward and backward; then the LM head's forward and input
gradient. `gemms()` lists those shapes. This script times each shape with cuBLAS (bf16, what PyTorch picks), the
attention with each SDPA backend and flex_attention, and one compiled decoder layer with its LoRA adapters whole
(the elementwise work a compiled layer adds: norms, rotary, SiLU, dropout, residuals). From them:

- floor: 28 x (the layer's GEMMs + the fastest attention) + the head's GEMMs: no trainer beats this in bf16;
- compiled layers: 28 x the compiled layer + the head's GEMMs: what the planner's plan could reach with no
  framework overhead at all (loss, optimizer, hooks, Python between the layers).

With the trainer's measured tokens/s for the plan and the recipe (bench/results/trainer_realistic_h100.json,
full-length runs), it prints the highest plan/recipe ratio each bound allows. Run it on the GPU machine (about a
minute, most of it compiling the layer):

    PYTHONPATH=operator python3 bench/kernel_floor.py --out "$OUT"

`--smoke` runs the same code on the CPU with a tiny architecture (no flex_attention); `--dry-run` prints the GEMM
list and its FLOPs per token. Writes bench/results/kernel_floor_<gpu>.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from planner_gpu import QWEN25_7B  # noqa: E402

SEQ = 8192
RANK = 64
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
SMOKE_ARCH = {
    **QWEN25_7B,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 512,
    "num_hidden_layers": 2,
}
SMOKE_SEQ, SMOKE_RANK = 128, 8


@dataclass(frozen=True)
class Gemm:
    """One matrix multiplication (m x k) @ (k x n), run `count` times per decoder layer (or once per sequence for
    the head)."""

    name: str
    m: int
    k: int
    n: int
    per_layer: bool = True

    @property
    def flops(self) -> int:
        return 2 * self.m * self.k * self.n


def linears(arch: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """(in, out) features of each linear layer of a decoder layer."""
    h, i = arch["hidden_size"], arch["intermediate_size"]
    kv = h // arch["num_attention_heads"] * arch["num_key_value_heads"]
    return {
        "q_proj": (h, h),
        "k_proj": (h, kv),
        "v_proj": (h, kv),
        "o_proj": (h, h),
        "gate_proj": (h, i),
        "up_proj": (h, i),
        "down_proj": (i, h),
    }


def gemms(arch: dict[str, Any], seq: int = SEQ, rank: int = RANK, targets: tuple[str, ...] = TARGETS) -> list[Gemm]:
    """Every matmul of one sequence's forward and backward pass with LoRA on `targets` of a frozen base."""
    out: list[Gemm] = []
    for name, (fan_in, fan_out) in linears(arch).items():
        out.append(Gemm(f"{name} forward", seq, fan_in, fan_out))
        out.append(Gemm(f"{name} input grad", seq, fan_out, fan_in))
        if name in targets:
            out += [
                Gemm(f"{name} lora_A forward", seq, fan_in, rank),
                Gemm(f"{name} lora_B forward", seq, rank, fan_out),
                Gemm(f"{name} lora_B input grad", seq, fan_out, rank),
                Gemm(f"{name} lora_B weight grad", rank, seq, fan_out),
                Gemm(f"{name} lora_A weight grad", fan_in, seq, rank),
                Gemm(f"{name} lora_A input grad", seq, rank, fan_in),
            ]
    h, vocab = arch["hidden_size"], arch["vocab_size"]
    out.append(Gemm("lm_head forward", seq, h, vocab, per_layer=False))
    out.append(Gemm("lm_head input grad", seq, vocab, h, per_layer=False))
    return out


def flops_per_token(arch: dict[str, Any], seq: int = SEQ, rank: int = RANK) -> float:
    """The GEMM FLOPs per token of `gemms()` (attention not included)."""
    layers = arch["num_hidden_layers"]
    return sum(g.flops * (layers if g.per_layer else 1) for g in gemms(arch, seq, rank)) / seq


def cuda_timer(fn: Callable[[], Any], device: str, repeat: int) -> float:  # pragma: no cover - timing
    """Median seconds of fn() over `repeat` runs after two warm-up runs."""
    import torch

    for _ in range(2):
        fn()
    times = []
    for _ in range(repeat):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            began = time.perf_counter()
            fn()
            times.append(time.perf_counter() - began)
    return sorted(times)[len(times) // 2]


def time_gemms(shapes: list[Gemm], device: str, repeat: int) -> dict[str, float]:  # pragma: no cover - timing
    import torch

    dtype = torch.bfloat16
    seconds = {}
    for g in shapes:
        a = torch.randn(g.m, g.k, device=device, dtype=dtype)
        b = torch.randn(g.k, g.n, device=device, dtype=dtype)
        seconds[g.name] = cuda_timer(partial(torch.mm, a, b), device, repeat)
    return seconds


def time_attention(arch: dict[str, Any], seq: int, device: str, repeat: int) -> dict[str, Any]:  # pragma: no cover
    """Causal attention forward and forward+backward, per SDPA backend and flex_attention (GQA as the model)."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    heads, kv = arch["num_attention_heads"], arch["num_key_value_heads"]
    dim = arch["hidden_size"] // heads
    q = torch.randn(1, heads, seq, dim, device=device, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, kv, seq, dim, device=device, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(1, kv, seq, dim, device=device, dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(1, heads, seq, dim, device=device, dtype=torch.bfloat16)

    def sdpa() -> Any:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    kernels: dict[str, Callable[[], Any]] = {"sdpa (default choice)": sdpa}
    for backend in ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION"):
        chosen = getattr(SDPBackend, backend)

        def run(chosen: Any = chosen) -> Any:
            with sdpa_kernel([chosen]):
                return sdpa()

        kernels[f"sdpa {backend.lower()}"] = run
    if device == "cuda":
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        mask = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, seq, seq, device=device)
        flex = torch.compile(flex_attention)
        kernels["flex_attention"] = lambda: flex(q, k, v, block_mask=mask, enable_gqa=True)
    results: dict[str, Any] = {}
    for name, fn in kernels.items():
        try:
            forward = cuda_timer(fn, device, repeat)

            def both(fn: Callable[[], Any] = fn) -> None:
                fn().backward(grad)

            results[name] = {"forward_s": forward, "forward_backward_s": cuda_timer(both, device, repeat)}
        except Exception as err:  # a backend that cannot run this shape here
            results[name] = {"error": f"{type(err).__name__}: {str(err)[:200]}"}
        q.grad = k.grad = v.grad = None
    # Causal attention FLOPs: forward two matmuls over half the square (2 x seq^2 x dim per head), backward five
    # (the scores recomputed): 3.5 x the forward in all.
    forward_flops = 2 * seq * seq * dim * heads
    for r in results.values():
        if "forward_s" in r:
            r["forward_tflops"] = round(forward_flops / r["forward_s"] / 1e12, 1)
            r["forward_backward_tflops"] = round(3.5 * forward_flops / r["forward_backward_s"] / 1e12, 1)
    return results


def time_new_lengths(arch: dict[str, Any], device: str, lengths: list[int]) -> dict[str, Any]:  # pragma: no cover
    """What a sequence length never seen before costs SDPA (forward and backward, the default backend): the first
    call of each new length against the same call repeated. Unpacked batches of real data bring a new length with
    almost every micro-batch unless padded to a multiple (docs/trainer.md)."""
    import torch
    import torch.nn.functional as F

    heads, kv = arch["num_attention_heads"], arch["num_key_value_heads"]
    dim = arch["hidden_size"] // heads
    first, again = [], []
    for n in lengths:
        q = torch.randn(2, heads, n, dim, device=device, dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(2, kv, n, dim, device=device, dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(2, kv, n, dim, device=device, dtype=torch.bfloat16, requires_grad=True)

        def step(q: Any = q, k: Any = k, v: Any = v) -> None:
            F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).sum().backward()

        for times in (first, again):
            if device == "cuda":
                torch.cuda.synchronize()
            began = time.perf_counter()
            step()
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - began)
    return {
        "lengths": lengths,
        "first_call_s": [round(t, 5) for t in first],
        "repeated_call_s": [round(t, 5) for t in again],
        "mean_extra_s_per_new_length": round((sum(first) - sum(again)) / len(lengths), 5),
    }


def time_layer(
    arch: dict[str, Any], seq: int, rank: int, device: str, repeat: int
) -> dict[str, Any]:  # pragma: no cover
    """One decoder layer with LoRA (dropout 0.05) on `TARGETS`, compiled as the trainer compiles it, forward and
    backward (input gradient and LoRA gradients) on one sequence."""
    import torch
    from peft import LoraConfig, inject_adapter_in_model
    from transformers import Qwen2Config
    from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2RotaryEmbedding

    config = Qwen2Config(**{**arch, "num_hidden_layers": 1})
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    layer: torch.nn.Module = Qwen2DecoderLayer(config, layer_idx=0).to(device=device, dtype=torch.bfloat16)
    layer = inject_adapter_in_model(
        LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.05, target_modules=list(TARGETS)), layer
    )
    for name, p in layer.named_parameters():
        p.requires_grad = "lora_" in name
    layer.train()
    rotary = Qwen2RotaryEmbedding(config).to(device)
    hidden = torch.randn(1, seq, arch["hidden_size"], device=device, dtype=torch.bfloat16, requires_grad=True)
    positions = torch.arange(seq, device=device)[None]
    cos_sin = rotary(hidden, positions)
    grad = torch.randn_like(hidden)
    compiled = device == "cuda"
    if compiled:
        layer.compile()

    def step() -> None:
        out = layer(hidden, attention_mask=None, position_ids=positions, position_embeddings=cos_sin)
        (out[0] if isinstance(out, tuple) else out).backward(grad)

    began = time.monotonic()
    step()
    first = time.monotonic() - began
    return {
        "compiled": compiled,
        "first_call_s": round(first, 1),
        "forward_backward_s": cuda_timer(step, device, repeat),
    }


def measured_trainer(path: Path) -> dict[str, float]:
    """The trainer's full-length tokens/s (plan and recipe) from trainer_realistic's results, if there."""
    if not path.is_file():
        return {}
    runs = json.loads(path.read_text()).get("runs", {})
    return {
        name: float(runs[name]["tokens_per_second"])
        for name in ("full-plan", "full-recipe")
        if runs.get(name, {}).get("tokens_per_second")
    }


def summary(
    arch: dict[str, Any],
    seq: int,
    rank: int,
    gemm_s: dict[str, float],
    attention: dict[str, Any],
    layer: dict[str, Any],
    trainer: dict[str, float],
) -> dict[str, Any]:
    """Seconds per sequence and tokens/s of each bound, and the plan/recipe ratio each allows."""
    layers = arch["num_hidden_layers"]
    shapes = gemms(arch, seq, rank)
    layer_gemms = sum(gemm_s[g.name] for g in shapes if g.per_layer)
    head = sum(gemm_s[g.name] for g in shapes if not g.per_layer)
    timed = {n: r["forward_backward_s"] for n, r in attention.items() if "forward_backward_s" in r}
    best = min(timed, key=timed.__getitem__)
    bounds = {"floor": layers * (layer_gemms + timed[best]) + head}
    if "forward_backward_s" in layer:
        bounds["compiled layers"] = layers * layer["forward_backward_s"] + head
    out: dict[str, Any] = {
        "layer_gemms_s": layer_gemms,
        "head_gemms_s": head,
        "fastest_attention": best,
        "attention_s": timed[best],
        "gemm_tflops": round(
            sum(g.flops * (layers if g.per_layer else 1) for g in shapes) / (layers * layer_gemms + head) / 1e12, 1
        ),
        "bounds": {},
    }
    for name, seconds in bounds.items():
        tps = seq / seconds
        entry: dict[str, Any] = {"seconds_per_sequence": round(seconds, 4), "tokens_per_second": round(tps)}
        if "full-plan" in trainer:
            entry["plan_fraction_of_bound"] = round(trainer["full-plan"] / tps, 3)
        if "full-recipe" in trainer:
            entry["max_plan_over_recipe"] = round(tps / trainer["full-recipe"], 2)
        out["bounds"][name] = entry
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="also copy the results file here (e.g. $OUT)")
    parser.add_argument("--results", type=Path, help="results file (default bench/results/kernel_floor_GPU.json)")
    parser.add_argument(
        "--trainer-results", type=Path, default=ROOT / "bench/results/trainer_realistic_h100_floor.json"
    )
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--smoke", action="store_true", help="a tiny architecture on the CPU")
    parser.add_argument("--dry-run", action="store_true", help="print the GEMMs and their FLOPs per token, stop")
    parser.add_argument("--new-lengths", action="store_true", help="only time SDPA on lengths it has not seen, print")
    args = parser.parse_args(argv)
    arch, seq, rank = (SMOKE_ARCH, SMOKE_SEQ, SMOKE_RANK) if args.smoke else (QWEN25_7B, SEQ, RANK)
    if args.dry_run:
        for g in gemms(arch, seq, rank):
            print(f"{g.name:28} {g.m:>6} x {g.k:>6} x {g.n:>6}  {'per layer' if g.per_layer else 'once'}")
        print(f"GEMM FLOPs per token: {flops_per_token(arch, seq, rank):.4g}")
        return 0
    import torch

    device = "cpu" if args.smoke else "cuda"
    gpu = "cpu" if args.smoke else torch.cuda.get_device_name(0)
    repeat = 3 if args.smoke else args.repeat
    if args.new_lengths:
        print(json.dumps(time_new_lengths(arch, device, [517 + 37 * i for i in range(12)]), indent=2))
        return 0
    shapes = gemms(arch, seq, rank)
    gemm_s = time_gemms(shapes, device, repeat)
    attention = time_attention(arch, seq, device, repeat)
    try:
        layer = time_layer(arch, seq, rank, device, repeat)
    except Exception as err:
        layer = {"error": f"{type(err).__name__}: {str(err)[:300]}"}
    new_lengths = time_new_lengths(
        arch, device, [SMOKE_SEQ // 4 + 3 * i for i in range(4)] if args.smoke else [517 + 37 * i for i in range(12)]
    )
    trainer = {} if args.smoke else measured_trainer(args.trainer_results)
    results = {
        "gpu": gpu,
        "torch": torch.__version__,
        "seq": seq,
        "lora_rank": rank,
        "gemms": [
            {**asdict(g), "seconds": gemm_s[g.name], "tflops": round(g.flops / gemm_s[g.name] / 1e12, 1)}
            for g in shapes
        ],
        "attention": attention,
        "new_lengths": new_lengths,
        "layer": layer,
        "trainer_tokens_per_second": trainer,
        "summary": summary(arch, seq, rank, gemm_s, attention, layer, trainer),
    }
    key = "cpu" if args.smoke else next((k for k in ("h200", "h100") if k in gpu.lower()), "gpu")
    path = args.results or ROOT / "bench" / "results" / f"kernel_floor_{key}.json"
    if args.smoke and not args.results:
        path = Path("/tmp/kernel_floor_smoke.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / path.name).write_text(path.read_text())
    print(
        json.dumps(
            {"attention": attention, "new_lengths": new_lengths, "layer": layer, "summary": results["summary"]},
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
