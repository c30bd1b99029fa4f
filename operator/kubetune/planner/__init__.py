"""The training planner: pure functions from a model's architecture, the GPUs and a FineTuneJob spec to a
`Plan` (ZeRO stage, offload, micro-batch, accumulation, checkpointing, attention, kernels), with the
predicted memory per GPU and throughput. No torch, no I/O besides reading a local config.json."""

from kubetune.planner.plan import Overrides, PlanInfeasible, plan_job, plan_training

__all__ = ["Overrides", "PlanInfeasible", "plan_job", "plan_training"]
