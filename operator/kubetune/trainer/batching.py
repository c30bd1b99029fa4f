"""How records become micro-batches without computing padding: SFT packing and DPO's length-grouped pairs.

SFT with `plan.packing`: TRL packs the tokenized records into windows of maxSeqLength tokens (best-fit
decreasing: no record is split, the records are already truncated to maxSeqLength by data.py) and collates a
micro-batch padding-free: its windows are concatenated into one row whose position ids restart at 0 for every
record. With no attention_mask, transformers derives each token's record from those position ids and masks
attention between records (flex_attention: a block mask whose empty blocks are skipped; sdpa and eager: a dense
block-diagonal mask); the collator masks the label of each record's first token, so no loss crosses a boundary
either. The row is padded to micro-batch x maxSeqLength tokens, so every micro-batch has the same shape and
compiled layers never recompile for new lengths. The loss is TRL's sum over the step's label tokens divided by
their count, as without packing. tests/trainer/test_packing.py holds the proofs.

DPO: TRL 1.16 has no padding-free DPO (its padding_free is disabled), and its collator pads a micro-batch's
sequences to the longest. With micro-batches of several pairs, pairs of similar length are drawn together
(transformers' LengthGroupedSampler on each pair's longer sequence), so little padding is computed. Nothing else
changes: the reference is still the policy at step 0 (loss ln 2).

Unpacked batches on a GPU (DPO, SFT without packing) can be padded to a multiple of SHAPE_MULTIPLE tokens: real
data brings a new sequence length with almost every micro-batch, and a new shape may cost the GPU kernels a set-up
(bench/kernel_floor.py --new-lengths measures SDPA's). Off until bench/trainer_realistic.py has measured it on a
GPU (its dpo-plan-bucketed run sets it).
"""

from __future__ import annotations

from typing import Any

from kubetune.api.v1alpha1 import Plan

SHAPE_MULTIPLE: int | None = None
"""Unpacked micro-batches on a GPU are padded to a multiple of this many tokens (None: to the longest sequence, as
TRL's collators do)."""


def shape_arguments(plan: Plan, cuda: bool) -> dict[str, Any]:
    """SFTConfig/DPOConfig arguments that bound the number of distinct micro-batch shapes (packed windows have
    one shape already)."""
    if plan.packing or not cuda or SHAPE_MULTIPLE is None:
        return {}
    return {"pad_to_multiple_of": SHAPE_MULTIPLE}


def sft_packing_arguments(plan: Plan, max_len: int) -> dict[str, Any]:
    """SFTConfig arguments for the plan's packing."""
    if not plan.packing:
        return {"packing": False}
    return {
        "packing": True,
        "packing_strategy": "bfd",  # whole records only; TRL turns padding-free collation on with it
        "padding_free": True,
        "pad_to_multiple_of": plan.micro_batch_size * max_len,
        # Evaluation batches stay the same records as without packing (each in its own segment of the row), so
        # evalLoss is comparable between runs with and without packing.
        "eval_packing": False,
    }


def records_share_windows(examples: list[dict[str, Any]], max_len: int) -> bool:
    """Whether packing puts two records into one window. Best-fit decreasing does exactly when the two shortest
    records fit in one together (the shorter one then finds room, at the latest, beside the longer)."""
    shortest = sorted(len(e["input_ids"]) for e in examples)[:2]
    return len(shortest) == 2 and sum(shortest) <= max_len


def packing_report(train: Any, max_len: int) -> dict[str, Any]:
    """What packing made of the training records: windows, records per window, the share of window tokens that
    are record tokens (the rest is padding)."""
    lengths = [list(window) for window in train["seq_lengths"]]
    records = sum(len(window) for window in lengths)
    tokens = sum(sum(window) for window in lengths)
    windows = len(lengths)
    return {
        "windows": windows,
        "records": records,
        "recordsPerWindow": round(records / windows, 2) if windows else 0.0,
        "fill": round(tokens / (windows * max_len), 4) if windows else 0.0,
        "maxSeqLength": max_len,
    }


def pair_lengths(train: Any) -> list[int]:
    """Each tokenized preference pair's longer sequence (prompt + the longer answer): what the collator pads to."""
    pairs = zip(train["prompt_ids"], train["chosen_ids"], train["rejected_ids"], strict=True)
    return [len(prompt) + max(len(chosen), len(rejected)) for prompt, chosen, rejected in pairs]


def length_grouped_dpo_trainer() -> Any:
    """TRL's DPOTrainer drawing pairs of similar length into the same micro-batches (and accumulation steps)."""
    from transformers.trainer_pt_utils import LengthGroupedSampler
    from trl import DPOTrainer

    class LengthGroupedDPOTrainer(DPOTrainer):
        def _get_train_sampler(self, train_dataset: Any = None) -> Any:
            dataset = self.train_dataset if train_dataset is None else train_dataset
            # The same sampler as TrainingArguments' group_by_length, which cannot find DPO's lengths by itself.
            batch = self.args.train_batch_size * self.args.gradient_accumulation_steps
            return LengthGroupedSampler(batch, dataset=dataset, lengths=pair_lengths(dataset))

    return LengthGroupedDPOTrainer
