"""Greedy answers of a model, with or without a trained LoRA adapter, through transformers on the CPU.

The demo shows them side by side when it does not serve the adapters with vLLM, and the tests check with them
that the demo's training teaches what it should. Questions go through the model's chat template as one user turn,
as a chat completion request would send them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

MAX_NEW_TOKENS = 16


def greedy_answers(
    model_dir: Path, questions: list[str], adapter_dir: Path | None = None, max_new_tokens: int = MAX_NEW_TOKENS
) -> list[str]:
    """The greedy answer to each question (special tokens removed, stripped)."""
    import torch
    from transformers import AutoModelForCausalLM

    from kubetune.trainer.data import load_tokenizer, render

    tokenizer = load_tokenizer(model_dir)
    model: Any = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir))
    model.eval()
    answers = []
    for question in questions:
        prompt = render(tokenizer, [{"role": "user", "content": question}], add_generation_prompt=True)
        inputs = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
        with torch.no_grad():
            output = model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        answers.append(str(answer).strip())
    return answers
