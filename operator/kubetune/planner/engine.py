"""What vLLM can run for a ModelServer: its tensor-parallel size and context against the model (pure functions).

vLLM refuses a maxModelLen above the model's context and a tensor-parallel size that does not split the
attention heads evenly, but only minutes after the pod started (the image pulled, the weights downloaded). Two
places know the model's numbers earlier, and both refuse with the same reasons and messages (`refusal`):

- the operator, for the models of planner/models.py (hf:// names, or pvc:// and s3:// paths ending in one):
  `check_engine` refuses such a server before any pod exists;
- the serving pod, for any model: `kubetune engine` (server/engine.py) reads the model's config.json
  (`limits_from_config`) before it starts vLLM, and exits with `refusal_text` as the termination message, which
  status/engine.py reads back (`parsed_refusal`). A server is then named within seconds of its pod's start.

Both only refuse what vLLM would refuse: where a config says something they do not model, they let vLLM decide.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kubetune.api.v1alpha1.modelserver import TENSOR_PARALLEL_SIZES, ModelServerSpec
from kubetune.planner.models import ModelArchitecture, architecture_for_uri

# RoPE types whose max_position_embeddings already is the scaled context (vLLM multiplies the others' factor in).
_SCALED_ALREADY = ("su", "longrope", "llama3", "yarn", "deepseek_yarn", "deepseek_llama_scaling")
_YARN = ("yarn", "deepseek_yarn")
# The termination message of a server pod that `kubetune engine` refused, before the reason and message.
REFUSED = "kubetune engine refused to start vLLM"
_REFUSED_LINE = re.compile(rf"^{re.escape(REFUSED)}: ([A-Z]\w+): (.+)$", re.MULTILINE)


@dataclass(frozen=True)
class EngineRefusal:
    """Why vLLM would refuse the server: a condition reason and a message that says what would work."""

    reason: str
    message: str


@dataclass(frozen=True)
class EngineLimits:
    """What vLLM checks a server's settings against (None: not known, not checked)."""

    name: str
    num_heads: int | None
    num_kv_heads: int | None
    context: int | None
    """The longest maxModelLen, rope scaling included."""
    trained_context: int | None
    """The context before any rope scaling (what a YaRN suggestion scales)."""


def limits_of(arch: ModelArchitecture) -> EngineLimits:
    """A known model's limits (without rope scaling: a ModelServer's ropeScaling is the spec's)."""
    positions = arch.max_position_embeddings
    return EngineLimits(arch.display_name, arch.num_heads, arch.num_kv_heads, positions, positions)


def _number(value: Any) -> int | None:
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) and value > 0 else None


def _rope(config: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The RoPE scaling of a config.json: rope_scaling (transformers 4), else rope_parameters (transformers 5;
    one per layer type when nested)."""
    for key in ("rope_scaling", "rope_parameters"):
        value = config.get(key)
        if isinstance(value, Mapping) and value:
            nested = [v for v in value.values() if isinstance(v, Mapping)]
            return nested[-1] if nested and len(nested) == len(value) else value
    return None


def limits_from_config(config: Mapping[str, Any], name: str) -> EngineLimits:
    """The limits in a model's config.json (its text_config for a multimodal model), as vLLM derives them:
    num_attention_heads, num_key_value_heads, max_position_embeddings times a rope scaling factor that vLLM
    applies to it, or model_max_length when that is larger. `name` is the model's, its architecture added."""
    architectures = config.get("architectures")
    if isinstance(architectures, list) and architectures:
        name = f"{name} ({architectures[0]})"
    text = config.get("text_config")
    if isinstance(text, Mapping) and "num_attention_heads" in text:
        config = text
    heads = _number(config.get("num_attention_heads"))
    # Multi-head latent attention (kv_lora_rank) shards no KV heads; other attention kinds are vLLM's to judge.
    kv = None if config.get("kv_lora_rank") else _number(config.get("num_key_value_heads")) or heads
    trained = _number(config.get("max_position_embeddings"))
    context = trained
    rope = _rope(config)
    if trained is not None and rope is not None:
        kind = str(rope.get("rope_type") or rope.get("type") or "default")
        given = rope.get("factor")
        factor = float(given) if isinstance(given, int | float) else 1.0
        original = _number(rope.get("original_max_position_embeddings"))
        if kind in _YARN:
            # vLLM 0.32 takes max_position_embeddings as already scaled; older ones scaled the original: the larger.
            trained = original or trained
            context = max(context or 0, int(factor * trained))
        elif kind not in _SCALED_ALREADY:
            context = int(trained * factor)
    if context is not None and (longest := _number(config.get("model_max_length"))):
        context = max(context, longest)
    return EngineLimits(name, heads, kv, context, trained)


def _splits(limits: EngineLimits, size: int) -> bool:
    """Whether vLLM can shard the model over `size` GPUs: the query heads divide evenly, and the key-value heads
    either divide evenly or are replicated evenly."""
    heads, kv = limits.num_heads, limits.num_kv_heads
    if heads is None:
        return True
    return heads % size == 0 and (kv is None or (kv % size == 0 if size <= kv else size % kv == 0))


def refusal(
    limits: EngineLimits, tensor_parallel_size: int, max_model_len: int | None, context: int | None
) -> EngineRefusal | None:
    """None when vLLM can shard the model over `tensor_parallel_size` GPUs and serve `max_model_len` tokens of the
    `context` it supports (None: not known), else why not and what would work."""
    name, size = limits.name, tensor_parallel_size
    if not _splits(limits, size):
        working = ", ".join(str(s) for s in TENSOR_PARALLEL_SIZES if _splits(limits, s))
        return EngineRefusal(
            "TensorParallelSizeInvalid",
            f"tensorParallelSize {size} does not split the {limits.num_heads} attention heads "
            f"({limits.num_kv_heads} key-value heads) of {name} evenly: use one of {working}",
        )
    if max_model_len is None or context is None or max_model_len <= context:
        return None
    native = limits.trained_context or context
    if context > native:  # the model's own rope scaling already stretches it
        return EngineRefusal(
            "MaxModelLenTooLarge",
            f"maxModelLen {max_model_len} is above the {context} tokens {name} supports with its rope scaling: "
            f"set maxModelLen to at most {context}",
        )
    return EngineRefusal(
        "MaxModelLenTooLarge",
        f"maxModelLen {max_model_len} is above the {native} tokens {name} was trained for: set maxModelLen to at "
        f"most {native}, or add ropeScaling {{type: yarn, factor: {math.ceil(max_model_len / native)}, "
        f"originalMaxPositionEmbeddings: {native}}} (YaRN)",
    )


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
    return refusal(limits_of(arch), spec.tensor_parallel_size, spec.max_model_len, context_limit(arch, spec))


def refusal_text(refused: EngineRefusal) -> str:
    """The termination message of a server pod whose engine refused to start vLLM."""
    return f"{REFUSED}: {refused.reason}: {refused.message}"


def parsed_refusal(message: str) -> EngineRefusal | None:
    """The refusal in a termination message written by `refusal_text`; None for any other message."""
    found = _REFUSED_LINE.search(message)
    return EngineRefusal(found[1], found[2].strip()) if found else None


def rope_theta(spec: ModelServerSpec) -> float | None:
    """The RoPE base to pass with ropeScaling: the spec's, else the known model's."""
    if spec.rope_scaling is None:
        return None
    if spec.rope_scaling.rope_theta is not None:
        return spec.rope_scaling.rope_theta
    arch = architecture_for_uri(spec.base_model.uri)
    return arch.rope_theta if arch is not None else None
