"""The trainer: what `kubetune train --config FILE` runs inside every training pod.

It reads the `TrainerConfig` the operator renders, checks the dataset, trains a LoRA adapter with TRL (SFT or
DPO), checkpoints and resumes, reports progress to the FineTuneJob's status and writes the final adapter.
Torch, transformers, PEFT, TRL and DeepSpeed are imported only inside this package; the operator never imports it.
"""
