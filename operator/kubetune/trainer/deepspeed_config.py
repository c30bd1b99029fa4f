"""The DeepSpeed configuration derived from the plan: a plain dict, no DeepSpeed import needed.

Batch sizes are written out from the plan (so DeepSpeed and the Trainer agree on the global batch);
precision, learning rate and clipping stay "auto" for the Trainer to fill from its arguments.
"""

from __future__ import annotations

from typing import Any

from kubetune.api.v1alpha1 import Plan

# Bucket sizes in elements when the model's hidden size is unknown (DeepSpeed's own defaults).
DEFAULT_BUCKET = 500_000_000


def offloads_parameters(plan: Plan) -> bool:
    """ZeRO-3 parameter offload: only when the planner puts no weights on the GPU (memory.weightsGib == 0).

    `offload: cpu` always moves the optimizer state to host memory; moving the frozen base weights too costs a
    PCIe transfer of the whole model per pass, so it is done only when the plan says they cannot stay.
    """
    return plan.zero_stage == 3 and plan.offload == "cpu" and plan.memory.weights_gib == 0 and plan.memory.total_gib > 0


def deepspeed_config(plan: Plan, hidden_size: int | None = None, bf16: bool = True) -> dict[str, Any] | None:
    """The DeepSpeed config for `plan`, or None when the plan uses plain data parallelism (ZeRO stage 0)."""
    if plan.zero_stage == 0:
        return None
    bucket = hidden_size * hidden_size if hidden_size else DEFAULT_BUCKET
    zero: dict[str, Any] = {
        "stage": plan.zero_stage,
        "overlap_comm": True,
        "contiguous_gradients": True,
        "reduce_scatter": True,
        "reduce_bucket_size": bucket,
    }
    if plan.zero_stage == 2:
        zero["allgather_partitions"] = True
        zero["allgather_bucket_size"] = bucket
    if plan.zero_stage == 3:
        zero.update(
            {
                "stage3_prefetch_bucket_size": int(0.9 * bucket),
                "stage3_param_persistence_threshold": 10 * hidden_size if hidden_size else 100_000,
                "stage3_max_live_parameters": 1_000_000_000,
                "stage3_max_reuse_distance": 1_000_000_000,
                # The final adapter is gathered into one file on rank 0.
                "stage3_gather_16bit_weights_on_model_save": True,
            }
        )
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": plan.micro_batch_size,
        "gradient_accumulation_steps": plan.gradient_accumulation_steps,
        "train_batch_size": plan.micro_batch_size * plan.gradient_accumulation_steps * plan.world_size,
        "gradient_clipping": "auto",
        "bf16": {"enabled": bf16},
        "fp16": {"enabled": False},
        "zero_optimization": zero,
        "steps_per_print": 1_000_000_000,
        "wall_clock_breakdown": False,
    }
    if plan.offload == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        # DeepSpeed's CPU Adam runs the optimizer step on the host, next to the offloaded state.
        config["optimizer"] = {
            "type": "AdamW",
            "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"},
        }
        if offloads_parameters(plan):
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return config
