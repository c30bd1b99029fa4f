"""The DeepSpeed configuration built from the plan (no torch or DeepSpeed needed)."""

from __future__ import annotations

from kubetune.api.v1alpha1 import Plan
from kubetune.api.v1alpha1.finetunejob import MemoryEstimate
from kubetune.trainer.deepspeed_config import DEFAULT_BUCKET, deepspeed_config, offloads_parameters


def test_stage_0_means_no_deepspeed() -> None:
    assert deepspeed_config(Plan(zero_stage=0)) is None


def test_zero2_batches_and_buckets_from_the_plan() -> None:
    plan = Plan(zero_stage=2, micro_batch_size=2, gradient_accumulation_steps=8, world_size=4)
    config = deepspeed_config(plan, hidden_size=3584)
    assert config is not None
    assert config["train_micro_batch_size_per_gpu"] == 2
    assert config["gradient_accumulation_steps"] == 8
    assert config["train_batch_size"] == 64
    assert config["bf16"] == {"enabled": True} and config["fp16"] == {"enabled": False}
    zero = config["zero_optimization"]
    assert zero["stage"] == 2
    assert zero["reduce_bucket_size"] == zero["allgather_bucket_size"] == 3584 * 3584
    assert zero["overlap_comm"] and zero["contiguous_gradients"]
    assert "offload_optimizer" not in zero and "optimizer" not in config
    assert not any(key.startswith("stage3_") for key in zero)


def test_zero3_with_cpu_offload_of_the_optimizer() -> None:
    plan = Plan(zero_stage=3, offload="cpu", micro_batch_size=1, gradient_accumulation_steps=8, world_size=1)
    config = deepspeed_config(plan, hidden_size=1024)
    assert config is not None
    zero = config["zero_optimization"]
    assert zero["stage"] == 3
    assert zero["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert "offload_param" not in zero  # the planner left the weights on the GPU
    assert zero["stage3_prefetch_bucket_size"] == int(0.9 * 1024 * 1024)
    assert zero["stage3_param_persistence_threshold"] == 10 * 1024
    assert zero["stage3_gather_16bit_weights_on_model_save"] is True
    assert config["optimizer"]["type"] == "AdamW"
    assert config["optimizer"]["params"]["lr"] == "auto"
    assert config["train_batch_size"] == 8


def test_zero3_offloads_parameters_when_no_weights_stay_on_the_gpu() -> None:
    memory = MemoryEstimate(weights_gib=0.0, total_gib=30.0)
    plan = Plan(zero_stage=3, offload="cpu", memory=memory)
    assert offloads_parameters(plan)
    config = deepspeed_config(plan)
    assert config is not None
    assert config["zero_optimization"]["offload_param"] == {"device": "cpu", "pin_memory": True}
    assert config["zero_optimization"]["reduce_bucket_size"] == DEFAULT_BUCKET


def test_precision_follows_the_caller() -> None:
    config = deepspeed_config(Plan(zero_stage=2), bf16=False)
    assert config is not None and config["bf16"] == {"enabled": False}
