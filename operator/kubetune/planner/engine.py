"""What vLLM can run for a ModelServer whose base model is known (pure functions).

vLLM refuses a maxModelLen above the model's context and a tensor-parallel size that does not split the
attention heads evenly, but only minutes after the pod started (the image pulled, the weights downloaded). For
the models of planner/models.py (hf:// names, or pvc:// and s3:// paths ending in one) the operator knows both
numbers, so it refuses such a server before any pod exists, saying what would work. Unknown models are left
to vLLM, whose refusal the status names within seconds of the exit (status/engine.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from kubetune.api.v1alpha1.modelserver import TENSOR_PARALLEL_SIZES, ModelServerSpec
from kubetune.planner.models import ModelArchitecture, architecture_for_uri


@dataclass(frozen=True)
class EngineRefusal:
    """Why vLLM would refuse the server: a condition reason and a message that says what would work."""

    reason: str
    message: str


def _splits(arch: ModelArchitecture, size: int) -> bool:
    """Whether vLLM can shard the model over `size` GPUs: the query heads divide evenly, and the key-value heads
    either divide evenly or are replicated evenly."""
    kv = arch.num_kv_heads
    return arch.num_heads % size == 0 and (kv % size == 0 if size <= kv else size % kv == 0)


def context_limit(arch: ModelArchitecture, spec: ModelServerSpec) -> int | None:
    """The longest maxModelLen the server can have: ropeScaling's, else the model's own context (None: unknown)."""
    scaling = spec.rope_scaling
    if scaling is not None:
        return int(scaling.factor * scaling.original_max_position_embeddings)
    return arch.max_position_embeddings


def check_engine(spec: ModelServerSpec) -> EngineRefusal | None:
    """None when vLLM can run the spec's model as asked (or the model is unknown), else why not."""
    arch = architecture_for_uri(spec.base_model.uri)
    if arch is None:
        return None
    name, size = arch.display_name, spec.tensor_parallel_size
    if not _splits(arch, size):
        working = ", ".join(str(s) for s in TENSOR_PARALLEL_SIZES if _splits(arch, s))
        return EngineRefusal(
            "TensorParallelSizeInvalid",
            f"tensorParallelSize {size} does not split the {arch.num_heads} attention heads "
            f"({arch.num_kv_heads} key-value heads) of {name} evenly: use one of {working}",
        )
    limit = context_limit(arch, spec)
    wanted = spec.max_model_len
    if wanted is None or limit is None or wanted <= limit:
        return None
    native = arch.max_position_embeddings or limit
    return EngineRefusal(
        "MaxModelLenTooLarge",
        f"maxModelLen {wanted} is above the {native} tokens {name} was trained for: set maxModelLen to at most "
        f"{native}, or add ropeScaling {{type: yarn, factor: {math.ceil(wanted / native)}, "
        f"originalMaxPositionEmbeddings: {native}}} (YaRN)",
    )


def rope_theta(spec: ModelServerSpec) -> float | None:
    """The RoPE base to pass with ropeScaling: the spec's, else the known model's."""
    if spec.rope_scaling is None:
        return None
    if spec.rope_scaling.rope_theta is not None:
        return spec.rope_scaling.rope_theta
    arch = architecture_for_uri(spec.base_model.uri)
    return arch.rope_theta if arch is not None else None
