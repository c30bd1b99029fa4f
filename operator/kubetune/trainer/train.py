"""Training itself: the model, the TRL trainer (SFT or DPO) with a LoRA adapter, resume, and the final adapter.

Runs in every worker (or in-process for one GPU). The plan decides DeepSpeed, checkpointing, attention, Liger
and torch.compile; the spec decides LoRA and the hyperparameters.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import signal
from pathlib import Path
from typing import Any

import datasets
import torch
from datasets import Dataset
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, Trainer, set_seed
from transformers.trainer_callback import PrinterCallback
from transformers.trainer_callback import ProgressCallback as TqdmCallback

from kubetune.api.v1alpha1 import Method, Plan, TrainerConfig, TrainerRuntime
from kubetune.trainer import adapter, checkpoints
from kubetune.trainer.batching import (
    length_grouped_dpo_trainer,
    packing_report,
    records_share_windows,
    sft_packing_arguments,
    shape_arguments,
)
from kubetune.trainer.callbacks import CheckpointCallback, ProgressCallback, StopOnSignal
from kubetune.trainer.data import load_tokenizer
from kubetune.trainer.deepspeed_config import deepspeed_config
from kubetune.trainer.errors import EXIT_OK, EXIT_TERMINATED
from kubetune.trainer.gpu_cap import CAP_ENV, cap_gpu_memory
from kubetune.trainer.inputs import Inputs
from kubetune.trainer.metrics import TrainerMetrics, metrics_port
from kubetune.trainer.progress import StatusReporter, log_event, status_patch, status_sender
from kubetune.trainer.remote import RemoteOutput

log = logging.getLogger(__name__)

LIGER_KERNELS = {"rope": True, "rms_norm": True, "swiglu": True, "cross_entropy": False}


def attention_implementation(requested: str, single_record_windows: bool = False) -> tuple[str, str]:
    """The attention to load the model with for the plan's `requested` one, and why it differs ("" when it does
    not): flash_attention_2 needs a GPU and the flash-attn package, flex_attention a GPU and packed windows that
    hold several records, else sdpa (which keeps packed records apart too, with a dense mask). auto is sdpa, as in
    the planner."""
    if requested in ("sdpa", "eager"):
        return requested, ""
    if requested not in ("flash_attention_2", "flex_attention"):
        return "sdpa", ""
    if requested == "flex_attention" and single_record_windows:
        # Full-length data: no boundaries to mask, and SDPA's causal flash kernel is the faster one.
        return "sdpa", "no two records fit in one window, so there is no boundary to mask"
    if not torch.cuda.is_available():
        # flex_attention has no backward pass on CPU (torch 2.13); sdpa's dense mask keeps packed records apart.
        return "sdpa", f"{requested} needs a GPU"
    if requested == "flex_attention":
        return "flex_attention", ""
    if importlib.util.find_spec("flash_attn") is None:
        return "sdpa", "the flash-attn package is not installed in this image"
    return "flash_attention_2", ""


def trainer_arguments(config: TrainerConfig, output: Path, hidden_size: int, has_eval: bool) -> Any:
    """SFTConfig or DPOConfig from the spec's hyperparameters and the plan."""
    spec, plan, hp = config.spec, config.plan, config.spec.hyperparameters
    cuda = torch.cuda.is_available()
    if plan.zero_stage and not cuda:
        log.warning("the plan asks for ZeRO-%d, but DeepSpeed needs GPUs: plain data parallel on CPU", plan.zero_stage)
    common: dict[str, Any] = {
        "output_dir": str(output / "checkpoints"),
        "per_device_train_batch_size": plan.micro_batch_size,
        "per_device_eval_batch_size": plan.micro_batch_size,
        "gradient_accumulation_steps": plan.gradient_accumulation_steps,
        "learning_rate": hp.learning_rate,
        "lr_scheduler_type": hp.lr_scheduler,
        "warmup_steps": hp.warmup_ratio,  # a float below 1 is a fraction of the total steps
        "weight_decay": hp.weight_decay,
        "max_steps": hp.max_steps or -1,
        "num_train_epochs": hp.epochs or 1.0,
        "seed": hp.seed,
        "data_seed": hp.seed,
        "max_length": hp.max_seq_length,
        "bf16": cuda,
        "use_cpu": not cuda,
        "ddp_backend": "gloo" if not cuda and int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
        "ddp_find_unused_parameters": False,
        # A rank whose peer is gone gives up after this and exits with the retryable code (never the 30 min default).
        "ddp_timeout": spec.distributed.collective_timeout_seconds,
        "deepspeed": deepspeed_config(plan, hidden_size) if cuda else None,
        "gradient_checkpointing": plan.gradient_checkpointing,
        "use_liger_kernel": plan.liger_kernels and cuda,
        "liger_kernel_config": LIGER_KERNELS if plan.liger_kernels and cuda else None,
        "logging_strategy": "steps",
        "logging_steps": 1,
        "save_strategy": "steps",
        "save_steps": spec.checkpointing.every_steps,
        "save_total_limit": None,  # CheckpointCallback rotates complete checkpoints only
        "eval_strategy": "steps" if has_eval else "no",
        "eval_steps": spec.checkpointing.every_steps,
        "include_num_input_tokens_seen": "non_padding",
        "report_to": "none",
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
    }
    if spec.method == Method.DPO:
        from trl import DPOConfig

        return DPOConfig(**common, beta=hp.beta, **shape_arguments(plan, cuda))
    from trl import SFTConfig

    return SFTConfig(**common, **sft_packing_arguments(plan, hp.max_seq_length), **shape_arguments(plan, cuda))


def as_dataset(examples: Any) -> Dataset:
    """The examples as a datasets.Dataset: the prepared Arrow files stay memory-mapped, a list is converted."""
    return examples if isinstance(examples, Dataset) else Dataset.from_list(examples)


def single_record_windows(config: TrainerConfig, inputs: Inputs) -> bool:
    """The plan packs, but no two training records fit in one window."""
    max_len = config.spec.hyperparameters.max_seq_length
    return config.plan.packing and not records_share_windows(inputs.data.train, max_len)


def load_model(model_dir: Path, plan: Plan, single_record_windows: bool = False) -> PreTrainedModel:
    """The base model in bf16 on GPUs (fp32 on CPU) with the planned attention kernel."""
    cuda = torch.cuda.is_available()
    # Straight onto this rank's GPU, except under ZeRO-3, which shards the weights while they load.
    device_map = {"": int(os.environ.get("LOCAL_RANK", "0"))} if cuda and plan.zero_stage != 3 else None
    model = AutoModelForCausalLM.from_pretrained(
        str(model_dir),
        dtype=torch.bfloat16 if cuda else torch.float32,
        attn_implementation=attention_implementation(plan.attention, single_record_windows)[0],
        device_map=device_map,
    )
    model.config.use_cache = False
    return model


def report_attention(
    plan: Plan, model: Any, reporter: StatusReporter, uid: str, single_record_windows: bool = False
) -> str:
    """Say which attention the model runs with (an `attention` event and status.trainer.attention), with a
    warning when it is not the plan's. Returns it."""
    chosen, why = attention_implementation(plan.attention, single_record_windows)
    # The loaded model's own setting is the truth: transformers may change what it was given.
    used = str(getattr(model.config, "_attn_implementation", None) or chosen)
    why = why or ("" if used == chosen else "transformers loaded the model with it")
    log_event("attention", planned=plan.attention, used=used, **({"reason": why} if why else {}))
    if why:
        log.warning("the plan asks for %s attention, but the model runs with %s: %s", plan.attention, used, why)
    reporter.submit(status_patch({"trainer": TrainerRuntime(attention=used).to_wire()}, uid))
    return used


def lora_config(config: TrainerConfig) -> Any:
    from peft import LoraConfig

    lora = config.spec.lora
    targets = "all-linear" if lora.target_modules == ["all-linear"] else list(lora.target_modules)
    # alpha may be fractional in the API; PEFT only divides by it.
    shape: dict[str, Any] = {"r": lora.r, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout}
    return LoraConfig(**shape, target_modules=targets, bias="none", task_type="CAUSAL_LM")


def build_trainer(config: TrainerConfig, inputs: Inputs, callbacks: list[Any]) -> Trainer:
    """The TRL trainer for the spec's method, with its LoRA adapter attached."""
    model_config = AutoConfig.from_pretrained(str(inputs.model_dir))
    args = trainer_arguments(config, inputs.output_dir, model_config.hidden_size, bool(inputs.data.validation))
    set_seed(config.spec.hyperparameters.seed)
    # After the arguments: ZeRO-3 shards the model while it loads.
    model: Any = load_model(inputs.model_dir, config.plan, single_record_windows(config, inputs))
    tokenizer = load_tokenizer(inputs.model_dir)
    train = as_dataset(inputs.data.train)
    evaluation = as_dataset(inputs.data.validation) if inputs.data.validation else None
    peft_config = lora_config(config)
    trainer_class: type[Trainer]
    if config.spec.method == Method.DPO:
        from trl import DPOTrainer

        # One pair per micro-batch pads nothing; larger micro-batches draw pairs of similar length together.
        trainer_class = length_grouped_dpo_trainer() if config.plan.micro_batch_size > 1 else DPOTrainer
        if inputs.init_adapter:
            from peft import PeftModel

            # DPO from the SFT adapter: it is trained further, and a frozen copy of it is the reference.
            model = PeftModel.from_pretrained(model, str(inputs.init_adapter), is_trainable=True)
            peft_config = None
    else:
        from trl import SFTTrainer

        trainer_class = SFTTrainer
    trainer = trainer_class(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=evaluation,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=callbacks,
    )
    for noisy in (PrinterCallback, TqdmCallback):
        trainer.remove_callback(noisy)  # progress goes out as JSON lines
    if config.plan.zero_stage == 3 and torch.cuda.is_available() and trainer.model is not None:
        fetch_decoder_layers_whole(trainer.model)  # before train(): DeepSpeed places its hooks when it starts
    if config.plan.compile and trainer.model is not None:
        compile_decoder_layers(trainer.model)
    return trainer


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList | None:
    """The model's stack of decoder layers (the `layers` ModuleList of HF decoders), or None."""
    layers = next((m for name, m in model.named_modules() if name.endswith(".layers")), None)
    return layers if isinstance(layers, torch.nn.ModuleList) else None


def compile_decoder_layers(model: torch.nn.Module) -> int:
    """torch.compile each decoder layer in place (the layers repeat, so one compiled graph serves all)."""
    layers = decoder_layers(model)
    if layers is None:
        log.warning("no decoder layers found to compile")
        return 0
    for layer in layers:
        layer.compile()
    return len(layers)


def fetch_decoder_layers_whole(model: torch.nn.Module) -> int:
    """Make each decoder layer a ZeRO-3 leaf module: its weights are gathered in one fetch when the layer starts
    and released when it ends, and DeepSpeed places no hooks inside it.

    Without this, ZeRO-3 hooks every submodule, and LoRA multiplies them (each adapted linear adds a wrapper,
    lora_A, lora_B, a dropout and their ModuleDicts); with checkpointing each layer runs three times per
    micro-batch. On Qwen2.5-7B with LoRA on q,k,v,o that made thousands of hook calls per micro-batch whose
    Python work took longer than the GPU's: the recipe ran at 5,503 tokens/s instead of 9,030 on one H200
    (docs/trainer.md, GPU benchmark). A layer is the gathered working set that the planner's memory model already
    counts for ZeRO-3 (docs/planner.md), and peak memory measured the same. Returns the number of layers marked.
    """
    from deepspeed.utils import set_z3_leaf_module

    layers = decoder_layers(model)
    if layers is None:
        log.warning("no decoder layers found: ZeRO-3 fetches weights module by module")
        return 0
    for layer in layers:
        set_z3_leaf_module(layer, True)
    return len(layers)


def lora_shape(model: Any) -> dict[str, Any]:
    """The trained adapter's actual r, alpha, dropout and target modules."""
    peft_config = model.peft_config["default"]
    targets = peft_config.target_modules
    # "all-linear" is resolved by PEFT into module paths; the layer names are what a reader wants.
    names = [targets] if isinstance(targets, str) else sorted({t.rsplit(".", 1)[-1] for t in targets})
    return {
        "r": peft_config.r,
        "alpha": peft_config.lora_alpha,
        "dropout": peft_config.lora_dropout,
        "targetModules": names,
    }


def versions() -> dict[str, str]:
    import peft
    import transformers
    import trl

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "trl": trl.__version__,
    }


def save_adapter(trainer: Trainer, config: TrainerConfig, inputs: Inputs, metrics: dict[str, Any]) -> dict | None:
    """Save the final adapter (all ranks take part: ZeRO-3 gathers the weights); rank 0 finalizes it."""
    staging = inputs.output_dir / "adapter.staging"
    if trainer.is_world_process_zero():
        shutil.rmtree(staging, ignore_errors=True)
    trainer.save_model(str(staging))
    if not trainer.is_world_process_zero():
        return None
    metadata = adapter.adapter_metadata(
        config, lora_shape(trainer.model), metrics, inputs.data.report.to_dict(), versions()
    )
    metadata = adapter.finalize(staging, inputs.output_dir / "adapter", metadata)
    if (remote := RemoteOutput.of(config.spec.output)) is not None:
        remote.upload_adapter(inputs.output_dir / "adapter")
    return metadata


def single_process_env(cuda: bool) -> None:
    """DeepSpeed wants a process group even on one GPU: describe a world of one."""
    if cuda:
        for key, value in (
            ("RANK", "0"),
            ("LOCAL_RANK", "0"),
            ("WORLD_SIZE", "1"),
            ("MASTER_ADDR", "127.0.0.1"),
            ("MASTER_PORT", "29500"),
        ):
            os.environ.setdefault(key, value)


def run(config: TrainerConfig, inputs: Inputs) -> int:
    """Train (resuming from the latest complete checkpoint), save the adapter, report it. Returns the exit code."""
    datasets.disable_progress_bars()
    rank = int(os.environ.get("RANK", "0"))
    if "RANK" not in os.environ:
        single_process_env(torch.cuda.is_available())
    fraction = cap_gpu_memory(os.environ)  # benchmarks only (trainer/gpu_cap.py)
    if fraction is not None:
        log_event("gpu-memory-cap", rank=rank, gib=float(os.environ[CAP_ENV]), fraction=round(fraction, 4))
    reporter = StatusReporter(status_sender(config.job) if rank == 0 else None, config.progress_interval_seconds)
    exporter = TrainerMetrics(config.job.name) if rank == 0 else None
    port = metrics_port(os.environ)
    if exporter is not None and port:
        exporter.serve(port)
    stop = StopOnSignal()
    previous_handler = stop.install()
    root = inputs.output_dir / "checkpoints"
    progress = ProgressCallback(reporter, config.progress_interval_seconds, config.job.uid, exporter)
    callbacks = [
        progress,
        CheckpointCallback(
            root,
            config.spec.checkpointing.keep,
            config.spec.output.uri,
            progress,
            config.job.uid,
            RemoteOutput.of(config.spec.output),
        ),
        stop,
    ]
    try:
        resume = checkpoints.latest_complete(root)
        trainer = build_trainer(config, inputs, callbacks)
        if rank == 0:
            report_attention(
                config.plan, trainer.model, reporter, config.job.uid, single_record_windows(config, inputs)
            )
            if config.plan.packing:
                max_len = config.spec.hyperparameters.max_seq_length
                log_event("packing", **packing_report(trainer.train_dataset, max_len))
            for c in checkpoints.remove_incomplete(root):
                log_event("checkpoint-discarded", step=c.step, reason="incomplete")
            if resume:
                log_event("resume", step=resume.step, checkpoint=resume.path.name)
        result = trainer.train(resume_from_checkpoint=str(resume.path) if resume else None)
        if stop.stopped_early:
            log_event("stopped", step=trainer.state.global_step, reason="SIGTERM")
            return EXIT_TERMINATED
        metrics = {k: v for k, v in result.metrics.items() if isinstance(v, int | float)}
        if inputs.data.validation:
            metrics.update(trainer.evaluate())
        metrics["global_step"] = trainer.state.global_step
        metadata = save_adapter(trainer, config, inputs, metrics)
        if metadata is not None:
            status = adapter.adapter_status(config, metadata)
            log_event("adapter", **status.to_wire(), metrics=metrics)
            reporter.submit(status_patch({"adapter": status.to_wire()}, config.job.uid))
        return EXIT_OK
    finally:
        reporter.close()
        if exporter is not None:
            exporter.close()
        signal.signal(signal.SIGTERM, previous_handler)
