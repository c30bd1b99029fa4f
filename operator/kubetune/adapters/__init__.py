"""Adapters served by a ModelServer while it runs (pure functions).

`checks` decides whether an adapter may be loaded at all (base model, rank, target modules), from what its
FineTuneJob reported or from its own files, and turns vLLM's load errors into reasons; `sync` decides, per
replica, which adapters to load and unload, when a refused load is tried again, and what state each adapter
is in. The HTTP calls live in `kubetune.k8s.vllm`, the calling in `handlers/modelserver.py`.
"""

from kubetune.adapters.checks import Refusal, check_adapter, check_adapter_files, reason_for_load_error
from kubetune.adapters.sync import (
    Action,
    Adapter,
    Failure,
    Replica,
    ReplicaReport,
    adapter_states,
    next_failure,
    next_retry,
    plan_actions,
    retry_delay,
)

__all__ = [
    "Action",
    "Adapter",
    "Failure",
    "Refusal",
    "Replica",
    "ReplicaReport",
    "adapter_states",
    "check_adapter",
    "check_adapter_files",
    "next_failure",
    "next_retry",
    "plan_actions",
    "reason_for_load_error",
    "retry_delay",
]
