"""Whether an adapter may be loaded, and what vLLM's refusals mean (pure functions).

The operator cannot read adapter files (they sit on volumes or in buckets only the server pods reach). For an
adapter a FineTuneJob produced, the trainer reported its base model, rank and target modules in the job's
status.adapter, and those are checked (`check_adapter`) before anything is sent to vLLM. For a pvc:// or s3://
adapter named by uri, the fetcher beside vLLM returns its adapter_config.json (and kubetune.json, when kubetune
trained it) and the same checks run on those (`check_adapter_files`). What vLLM refuses anyway is mapped to
the same reasons from its error text (`reason_for_load_error`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from kubetune.adapters.sync import Adapter
from kubetune.storage import local_path, parse

# Layer names vLLM can put LoRA on in the decoder models kubetune trains (Llama, Qwen2, Mistral and kin):
# attention and MLP projections, separate or packed. Embedding and lm_head adapters are not served.
SUPPORTED_TARGET_MODULES = frozenset(
    {"q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "gate_proj", "up_proj", "down_proj", "gate_up_proj"}
)


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


def model_names(uri: str) -> set[str]:
    """What an adapter_config.json's base_model_name_or_path may say for the model at `uri`: ORG/NAME for hf://,
    the URI or the path inside the pods for pvc:// and s3://."""
    loc = parse(uri)
    if loc.scheme == "hf":
        return {f"{loc.root}/{loc.path}".rstrip("/")}
    base, _ = model_identity(uri)
    return {base, local_path(base).rstrip("/")}


def check_adapter(adapter: Adapter, base_model_uri: str, max_lora_rank: int) -> Refusal | None:
    """A refusal when what is known of the adapter rules it out for this server; None when it may load."""
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


def check_adapter_files(
    adapter: Adapter,
    adapter_config: dict[str, Any],
    metadata: dict[str, Any] | None,
    base_model_uri: str,
    max_lora_rank: int,
) -> Refusal | None:
    """The checks of `check_adapter` on an adapter's own files: kubetune.json's baseModel.uri when kubetune
    trained it, else adapter_config.json's base_model_name_or_path; the rank (r, and any per-layer rank); the
    target modules (their layer names)."""
    trained_on = str(((metadata or {}).get("baseModel") or {}).get("uri") or "")
    if not trained_on:
        named = str(adapter_config.get("base_model_name_or_path") or "").rstrip("/")
        if named and named not in model_names(base_model_uri):
            return Refusal(
                "AdapterBaseMismatch",
                f"adapter_config.json names the base model {named}, the server serves {base_model_uri}",
            )
    ranks = [adapter_config.get("r") or 0, *(adapter_config.get("rank_pattern") or {}).values()]
    targets = adapter_config.get("target_modules") or ()
    modules = tuple(sorted({str(t).rsplit(".", 1)[-1] for t in targets})) if isinstance(targets, list) else ()
    reported = Adapter(
        adapter.name,
        adapter.uri,
        adapter.source,
        base_model=trained_on,
        rank=max(int(r) for r in ranks),
        target_modules=modules,
    )
    return check_adapter(reported, base_model_uri, max_lora_rank)


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
