"""Whether an adapter may be loaded, and what vLLM's refusals mean (pure functions).

The operator cannot read adapter files in a real cluster (they sit on volumes mounted into the server pods).
For an adapter a FineTuneJob produced, the trainer reported its base model, rank and target modules in the
job's status.adapter, and those are checked here before anything is sent to vLLM. For an adapter named by
uri nothing is known in advance: vLLM reads its adapter_config.json when asked to load it, and its error
text is mapped to the same reasons.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from kubetune.adapters.sync import Adapter
from kubetune.storage import parse

# Layer names vLLM can put LoRA on in the decoder models kubetune trains (Llama, Qwen2, Mistral and kin):
# attention and MLP projections, separate or packed. Embedding and lm_head adapters are not served.
SUPPORTED_TARGET_MODULES = frozenset(
    {"q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "gate_proj", "up_proj", "down_proj", "gate_up_proj"}
)
# Where the server pods can read an adapter from while they run.
LOADABLE_SCHEMES = ("pvc", "hf")


@dataclass(frozen=True)
class Refusal:
    """Why an adapter is not loaded: a CamelCase reason and a sentence."""

    reason: str
    message: str


def model_identity(uri: str) -> tuple[str, str | None]:
    """A model URI without its revision and trailing slashes, and the revision (hf:// only)."""
    loc = parse(uri)
    return f"{loc.scheme}://{loc.root}/{loc.path}".rstrip("/"), loc.revision


def same_model(trained_on: str, served: str) -> bool:
    """Same location; revisions must agree only when both name one."""
    (a, rev_a), (b, rev_b) = model_identity(trained_on), model_identity(served)
    return a == b and (rev_a is None or rev_b is None or rev_a == rev_b)


def check_adapter(adapter: Adapter, base_model_uri: str, max_lora_rank: int) -> Refusal | None:
    """A refusal when what is known of the adapter rules it out for this server; None when it may load."""
    scheme = parse(adapter.uri).scheme
    if scheme not in LOADABLE_SCHEMES:
        return Refusal(
            "AdapterStorageUnsupported",
            f"{adapter.uri}: runtime loading supports pvc:// and hf:// adapters; {scheme}:// is not supported yet",
        )
    if adapter.base_model and not same_model(adapter.base_model, base_model_uri):
        return Refusal(
            "AdapterBaseMismatch",
            f"the adapter was trained on {adapter.base_model}, the server serves {base_model_uri}",
        )
    if adapter.rank > max_lora_rank:
        return Refusal(
            "AdapterRankTooLarge",
            f"the adapter's rank {adapter.rank} is above the server's maxLoraRank {max_lora_rank}",
        )
    unsupported = sorted(set(adapter.target_modules) - SUPPORTED_TARGET_MODULES)
    if unsupported:
        return Refusal(
            "AdapterTargetModulesUnsupported",
            f"vLLM cannot serve LoRA on {', '.join(unsupported)} (supported: "
            f"{', '.join(sorted(SUPPORTED_TARGET_MODULES))})",
        )
    return None


_ERROR_REASONS = (
    (re.compile(r"No adapter found|does not exist|No such file", re.I), "AdapterNotFound"),
    (re.compile(r"greater than max_lora_rank", re.I), "AdapterRankTooLarge"),
    (re.compile(r"expected target modules|target modules", re.I), "AdapterTargetModulesUnsupported"),
    # A LoRA for another base model has other shapes (or another vocabulary) than this one's layers.
    (re.compile(r"size of tensor|shape|must match|vocab", re.I), "AdapterBaseMismatch"),
    (re.compile(r"conflicts with a served base model", re.I), "AdapterNameConflict"),
    (re.compile(r"DoRA|bias|modules_to_save|not support", re.I), "AdapterUnsupported"),
)


def reason_for_load_error(status: int, message: str) -> str:
    """The reason for a refused POST /v1/load_lora_adapter, from vLLM's status code and error text."""
    if status == 404:
        return "AdapterNotFound"
    for pattern, reason in _ERROR_REASONS:
        if pattern.search(message):
            return reason
    return "AdapterLoadFailed"
