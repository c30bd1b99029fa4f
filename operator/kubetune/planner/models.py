"""Model architectures the planner understands: the few numbers of a decoder-only config.json that decide
memory and compute, a table of well-known models (so planning needs no download) and the lookup of a
base-model URI or a local directory.

Only Llama-style decoders are modelled (RMSNorm, rotary attention with grouped KV heads, SwiGLU MLP:
Qwen2/2.5/3, Llama 2/3, Mistral); anything else is "unknown" and the planner falls back to a
conservative plan.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

# The decoder linears PEFT can adapt, by name. "all-linear" means all of them (never lm_head).
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SUPPORTED_MODEL_TYPES = ("qwen2", "qwen3", "llama", "mistral")


@dataclass(frozen=True)
class ModelArchitecture:
    """The shape of a decoder-only transformer, as its config.json gives it."""

    name: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    tie_word_embeddings: bool = False
    head_dim: int | None = None
    """Per-head width when it is not hidden_size / num_heads (Qwen3)."""
    attention_bias: bool = False
    """Biases on q, k, v (Qwen2/2.5)."""
    qk_norm: bool = False
    """RMSNorm on each query and key head (Qwen3)."""
    dtype: str = "bfloat16"
    max_position_embeddings: int | None = None
    """The context the model was trained for (config.json), in tokens; None when unknown."""
    rope_theta: float | None = None
    """The RoPE base (config.json's rope_theta); None when unknown."""

    @property
    def head_width(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_width

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_width

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each decoder linear."""
        h, i = self.hidden_size, self.intermediate_size
        return {
            "q_proj": (h, self.q_dim),
            "k_proj": (h, self.kv_dim),
            "v_proj": (h, self.kv_dim),
            "o_proj": (self.q_dim, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    @property
    def layer_params(self) -> int:
        """Parameters of one decoder layer (linears, q/k/v biases, norms)."""
        linears = sum(a * b for a, b in self.linear_shapes().values())
        bias = self.q_dim + 2 * self.kv_dim if self.attention_bias else 0
        norms = 2 * self.hidden_size + (2 * self.head_width if self.qk_norm else 0)
        return linears + bias + norms

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def total_params(self) -> int:
        """All parameters: embeddings, layers, final norm and (if untied) the LM head."""
        head = 0 if self.tie_word_embeddings else self.embedding_params
        return self.embedding_params + self.num_layers * self.layer_params + self.hidden_size + head

    @property
    def matmul_params(self) -> int:
        """Parameters that take part in a matrix multiply per token: layers and the LM head, not the
        embedding lookup (N_base of docs/gpu-baselines.md, 7.07e9 for Qwen2.5-7B)."""
        return self.num_layers * self.layer_params + self.embedding_params

    def lora_targets(self, target_modules: list[str] | tuple[str, ...]) -> tuple[str, ...]:
        """The decoder linears that `target_modules` adapts (PEFT matches by the last name component)."""
        names = {t.rsplit(".", 1)[-1] for t in target_modules}
        if "all-linear" in names:
            return LINEAR_NAMES
        return tuple(n for n in LINEAR_NAMES if n in names)

    def lora_params(self, rank: int, target_modules: list[str] | tuple[str, ...]) -> int:
        """Trainable LoRA parameters: r x (in + out) for each adapted linear of each layer."""
        shapes = self.linear_shapes()
        per_layer = sum(rank * sum(shapes[n]) for n in self.lora_targets(target_modules))
        return self.num_layers * per_layer

    def lora_input_features(self, target_modules: list[str] | tuple[str, ...]) -> int:
        """Sum of the in_features of the adapted linears of one layer (what LoRA caches per token)."""
        shapes = self.linear_shapes()
        return sum(shapes[n][0] for n in self.lora_targets(target_modules))

    @property
    def display_name(self) -> str:
        return self.name.rsplit("/", 1)[-1]


def architecture_from_config(config: dict[str, Any], name: str = "custom") -> ModelArchitecture | None:
    """Read a config.json dict; None when it is not a decoder the planner models."""
    text = config.get("text_config")
    if isinstance(text, dict) and "hidden_size" in text:
        config = {**text, "model_type": text.get("model_type", config.get("model_type"))}
    model_type = str(config.get("model_type", "")).lower()
    if model_type not in SUPPORTED_MODEL_TYPES:
        return None
    try:
        heads = int(config["num_attention_heads"])
        return ModelArchitecture(
            name=name,
            hidden_size=int(config["hidden_size"]),
            intermediate_size=int(config["intermediate_size"]),
            num_layers=int(config["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(config.get("num_key_value_heads") or heads),
            vocab_size=int(config["vocab_size"]),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            head_dim=int(config["head_dim"]) if config.get("head_dim") else None,
            attention_bias=bool(config.get("attention_bias", model_type == "qwen2")),
            qk_norm=model_type == "qwen3",
            dtype=str(config.get("torch_dtype") or config.get("dtype") or "bfloat16"),
            max_position_embeddings=int(config.get("max_position_embeddings") or 0) or None,
            rope_theta=_rope_theta(config),
        )
    except (KeyError, TypeError, ValueError):
        return None


def _rope_theta(config: dict[str, Any]) -> float | None:
    """rope_theta at the top of config.json, or inside rope_parameters (transformers 5)."""
    theta = config.get("rope_theta") or (config.get("rope_parameters") or {}).get("rope_theta")
    return float(theta) if theta else None


def architecture_from_path(path: str | Path) -> ModelArchitecture | None:
    """Read DIR/config.json (or a config.json file); None when absent, unreadable or not supported."""
    p = Path(path)
    file = p / "config.json" if p.is_dir() else p
    try:
        config = json.loads(file.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict):
        return None
    return architecture_from_config(config, name=p.name if p.is_dir() else p.parent.name)


def _qwen25(size: str, h: int, i: int, layers: int, heads: int, kv: int, vocab: int, tied: bool) -> ModelArchitecture:
    return ModelArchitecture(f"Qwen/Qwen2.5-{size}", h, i, layers, heads, kv, vocab, tied, attention_bias=True)


# The context (max_position_embeddings) and RoPE base of the known models' -Instruct configs, by name prefix.
_CONTEXTS = {
    "Qwen/Qwen2.5-": (32768, 1_000_000.0),
    "Qwen/Qwen3-": (40960, 1_000_000.0),
    "meta-llama/Llama-3.1-": (131072, 500_000.0),
    "mistralai/Mistral-7B-v0.3": (32768, 1_000_000.0),
}


def _with_context(arch: ModelArchitecture) -> ModelArchitecture:
    found = next((v for prefix, v in _CONTEXTS.items() if arch.name.startswith(prefix)), None)
    return replace(arch, max_position_embeddings=found[0], rope_theta=found[1]) if found else arch


# From the models' public config.json files.
KNOWN_ARCHITECTURES: dict[str, ModelArchitecture] = {
    a.name.lower(): _with_context(a)
    for a in (
        _qwen25("0.5B", 896, 4864, 24, 14, 2, 151936, True),
        _qwen25("1.5B", 1536, 8960, 28, 12, 2, 151936, True),
        _qwen25("3B", 2048, 11008, 36, 16, 2, 151936, True),
        _qwen25("7B", 3584, 18944, 28, 28, 4, 152064, False),
        _qwen25("14B", 5120, 13824, 48, 40, 8, 152064, False),
        _qwen25("32B", 5120, 27648, 64, 40, 8, 152064, False),
        _qwen25("72B", 8192, 29568, 80, 64, 8, 152064, False),
        ModelArchitecture("Qwen/Qwen3-8B", 4096, 12288, 36, 32, 8, 151936, False, head_dim=128, qk_norm=True),
        ModelArchitecture("meta-llama/Llama-3.1-8B", 4096, 14336, 32, 32, 8, 128256, False),
        ModelArchitecture("meta-llama/Llama-3.1-70B", 8192, 28672, 80, 64, 8, 128256, False),
        ModelArchitecture("mistralai/Mistral-7B-v0.3", 4096, 14336, 32, 32, 8, 32768, False),
    )
}

# Variants with the same architecture as a known base.
_SUFFIXES = ("-instruct", "-chat", "-it")


def known_architecture(name: str) -> ModelArchitecture | None:
    """Look up "ORG/NAME" or "NAME" (case-insensitive; -Instruct variants map to their base)."""
    key = name.strip().strip("/").lower()
    for suffix in _SUFFIXES:
        if key.endswith(suffix):
            key = key[: -len(suffix)]
            break
    if key in KNOWN_ARCHITECTURES:
        return KNOWN_ARCHITECTURES[key]
    base = key.rsplit("/", 1)[-1]
    matches = [a for k, a in KNOWN_ARCHITECTURES.items() if k.rsplit("/", 1)[-1] == base]
    return matches[0] if len(matches) == 1 else None


def architecture_for_uri(uri: str) -> ModelArchitecture | None:
    """The known architecture a base-model URI names: hf://ORG/NAME[@REV], or pvc://CLAIM/PATH and
    s3://BUCKET/PREFIX whose last path component is a known model name. A plain "ORG/NAME" works too."""
    if "://" not in uri:
        return known_architecture(uri)
    scheme, _, rest = uri.partition("://")
    if scheme == "hf":
        return known_architecture(rest.split("@", 1)[0])
    return known_architecture(rest.rstrip("/").rsplit("/", 1)[-1])
