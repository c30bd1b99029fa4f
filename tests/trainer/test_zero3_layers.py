"""ZeRO-3 fetches each decoder layer whole: the layers (and nothing else) are DeepSpeed leaf modules."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("deepspeed", reason="needs the trainer extra: hack/setup.sh trainer")

from deepspeed.utils import z3_leaf_module
from peft import LoraConfig, get_peft_model
from transformers import Qwen2Config, Qwen2ForCausalLM

from kubetune.trainer.train import decoder_layers, fetch_decoder_layers_whole

pytestmark = pytest.mark.trainer


def tiny_lora_model(layers: int = 3) -> torch.nn.Module:
    config = Qwen2Config(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
    )
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    return get_peft_model(Qwen2ForCausalLM(config), lora)


def test_each_decoder_layer_of_the_peft_model_is_one_fetch() -> None:
    model = tiny_lora_model(layers=3)
    assert fetch_decoder_layers_whole(model) == 3
    leaves = [name for name, module in model.named_modules() if z3_leaf_module(module)]
    assert leaves == [f"base_model.model.model.layers.{i}" for i in range(3)]
    # LoRA's modules inside a layer get no hooks of their own: DeepSpeed stops at the leaf.
    layers = decoder_layers(model)
    assert layers is not None
    assert not any(z3_leaf_module(m) for m in layers[0].modules() if m is not layers[0])


def test_a_model_without_decoder_layers_is_left_alone() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    assert decoder_layers(model) is None
    assert fetch_decoder_layers_whole(model) == 0
    assert not any(z3_leaf_module(m) for m in model.modules())
