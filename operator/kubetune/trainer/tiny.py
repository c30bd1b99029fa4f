"""A tiny Qwen2 model and tokenizer built locally (nothing downloaded), for tests and the local demo.

Hidden 128, 4 heads of 32 (vLLM's CPU attention needs head_dim >= 32), 2 KV heads, 2 layers, a byte-level BPE
trained on the given text, and a ChatML chat template.

    python -m kubetune.trainer.tiny OUT_DIR [TEXT_FILE ...]
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from pathlib import Path

CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)
PAD_TOKEN = "<|endoftext|>"
SPECIAL_TOKENS = [PAD_TOKEN, "<|im_start|>", "<|im_end|>"]
EOS_TOKEN = "<|im_end|>"

DEFAULT_TEXT = [
    "system user assistant You are a helpful assistant.",
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? The capital of France is Paris.",
    "Kubernetes runs containers in pods on nodes; an operator reconciles custom resources.",
]


def build_tokenizer(text: Iterable[str], vocab_size: int = 512):  # -> PreTrainedTokenizerFast
    """A byte-level BPE trained on `text`, with ChatML special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([*DEFAULT_TEXT, *text], trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN, model_max_length=4096
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def build_tiny_model(
    out_dir: str | Path,
    text: Iterable[str] = (),
    seed: int = 0,
    dtype: str = "float32",
    init_std: float = 0.02,
    heads: tuple[int, int] = (4, 2),
) -> Path:
    """Write a randomly initialised tiny Qwen2 (config, safetensors weights, tokenizer) to `out_dir`. `init_std`
    is the weights' standard deviation: the tied embeddings' scale bounds how confident the trained model's
    answers can be (LoRA adapts the linear layers only). `heads`: attention and key-value heads, of 32 each."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    out = Path(out_dir)
    tokenizer = build_tokenizer(text)
    vocab = -(-len(tokenizer) // 64) * 64
    config = Qwen2Config(
        vocab_size=vocab,
        hidden_size=32 * heads[0],
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=heads[0],
        num_key_value_heads=heads[1],
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=init_std,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).to(getattr(torch, dtype))
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.pad_token_id
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kubetune.trainer.tiny", description=__doc__)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("text_files", nargs="*", type=Path, help="text (e.g. the JSONL data) to train the BPE on")
    args = parser.parse_args(argv)
    text = [line for f in args.text_files for line in f.read_text().splitlines()]
    print(build_tiny_model(args.out_dir, text))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
