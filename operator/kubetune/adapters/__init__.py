"""The adapters a ModelServer serves while it runs: the whole feature, from the spec to vLLM.

In the order of one look (docs/architecture.md draws it):

- `resolution`: which adapters the server serves (spec.adapters, and the Succeeded FineTuneJobs its
  adapterSelector matches), where they are, and which wait or are refused;
- `checks`: whether an adapter may be loaded at all (base model, rank, target modules), from what its
  FineTuneJob reported or from its own files, and what vLLM's refusals mean;
- `sync`: per replica, which adapters to load and unload, when a refused load is tried again, the state of
  each adapter;
- `replicas`: one look carried out on every ready replica through a `ReplicaClient`;
- `http`: the `ReplicaClient` that speaks HTTP to vLLM's runtime LoRA API and to the adapter fetcher.

Everything but `http` is free of I/O (tests/unit/test_layers.py holds it so); the ModelServer controller
(controllers/serving.py) hands `replicas.sync` an `http.HttpReplicas`. The names below are the pure part.
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
    replicas_in_line,
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
    "replicas_in_line",
    "retry_delay",
]
