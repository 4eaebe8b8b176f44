"""`milora train`: fine-tune a MiLoRA (or PiSSA, middle, random, LoRA) adapter from one config.

Layout of ``output_dir``: ``train_config.yaml`` (the resolved config, written once the run is
accepted), ``checkpoint-N/`` (adapter + optimizer/scheduler/RNG/trainer state), ``runs/``
(TensorBoard), and at the end the adapter (``adapter_config.json``, ``adapter_model.safetensors``,
``milora_config.json``; load with `milora.load_model(base, output_dir)`) and ``metrics.json``.
Ctrl-C (or SIGTERM) during training saves a checkpoint at the end of the current step and
stops; ``resume_from_checkpoint: true`` continues from the latest checkpoint.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback, TrainingArguments, set_seed
from transformers.trainer_utils import get_last_checkpoint

from milora.constants import METRICS_FILE, TRAIN_CONFIG_FILE
from milora.errors import ConfigError, ModelError
from milora.io import atomic_write_json
from milora.prompts import resolve_chat_template
from milora.train.config import TrainConfig, load_config, save_config
from milora.train.data import build_datasets, supervised_collator
from milora.train.trainer import MiloraTrainer, StopOnSignal, signals_request_stop


@dataclass
class TrainResult:
    """What a run produced. ``adapter_dir`` is None when the run was interrupted (see ``checkpoint``)."""

    output_dir: Path
    adapter_dir: Path | None
    checkpoint: Path | None
    interrupted: bool
    metrics: dict[str, Any]



def _check_output_dir(config: TrainConfig) -> str | None:
    """Validate ``output_dir`` against resuming/overwriting; returns the checkpoint to resume from."""
    output_dir = Path(config.output_dir)
    resume = config.resume_from_checkpoint
    if resume is True:
        checkpoint = get_last_checkpoint(str(output_dir)) if output_dir.is_dir() else None
        if checkpoint is None:
            raise ConfigError(
                f"resume_from_checkpoint is true but {output_dir} has no checkpoint-N directory: "
                "run without resume_from_checkpoint, or point it at a checkpoint directory."
            )
        return checkpoint
    if resume:
        return str(resume)
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())):
        if not config.overwrite_output_dir:
            raise ConfigError(
                f"output_dir {output_dir} already exists and is not empty: choose a new output_dir, resume with "
                "resume_from_checkpoint=true, or set overwrite_output_dir=true to delete its contents."
            )
        if not (output_dir / TRAIN_CONFIG_FILE).is_file():
            raise ConfigError(
                f"overwrite_output_dir is true but {output_dir} is not a milora training directory (no {TRAIN_CONFIG_FILE}); "
                "refusing to delete it: choose a new output_dir."
            )
    return None


def _check_environment(config: TrainConfig) -> None:
    if config.report_to == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("report_to is 'tensorboard' but tensorboard is not installed: `pip install tensorboard`, or set report_to: none.")
    if config.fp16 and not torch.cuda.is_available():
        raise ConfigError("fp16 mixed precision needs a GPU; on CPU use bf16: true or neither.")


def _multi_process_cpu() -> bool:
    """Launched as several processes without GPUs: accelerate then needs ``cpu=True`` for gloo DDP."""
    return not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1


def _training_arguments(config: TrainConfig, has_eval: bool) -> TrainingArguments:
    extra = {}
    if config.gradient_checkpointing:  # renamed activation_checkpointing in transformers 5.x
        name = "activation_checkpointing" if "activation_checkpointing" in TrainingArguments.__dataclass_fields__ else "gradient_checkpointing"
        extra = {name: True, f"{name}_kwargs": {"use_reentrant": False}}
    return TrainingArguments(
        output_dir=config.output_dir,
        per_device_train_batch_size=config.per_device_train_batch_size,
        per_device_eval_batch_size=config.per_device_train_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler,
        warmup_steps=config.warmup_steps,
        num_train_epochs=config.num_train_epochs,
        max_steps=config.max_steps if config.max_steps is not None else -1,
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        optim=config.optim,
        bf16=config.bf16,
        fp16=config.fp16,
        seed=config.seed,
        data_seed=config.seed,
        logging_steps=config.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=config.save_total_limit,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=(config.eval_steps or config.logging_steps) if has_eval else None,
        report_to=[] if config.report_to == "none" else [config.report_to],
        deepspeed=config.deepspeed,
        dataloader_num_workers=config.dataloader_num_workers,
        dataloader_pin_memory=torch.cuda.is_available(),
        remove_unused_columns=False,
        ddp_find_unused_parameters=False,
        use_cpu=_multi_process_cpu(),
        **extra,
    )


def build_lora_config(config: TrainConfig):
    """The `peft.LoraConfig` of a run (alpha resolved as in `TrainConfig.resolved_alpha`)."""
    from peft import LoraConfig

    targets = config.lora_target
    return LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.resolved_alpha(),
        lora_dropout=config.lora_dropout,
        target_modules="all-linear" if targets == ["all-linear"] else list(targets),
        use_rslora=config.use_rslora,
        bias="none",
        task_type="CAUSAL_LM",
    )


def train(
    config: TrainConfig | Mapping[str, Any] | str | os.PathLike, overrides: Sequence[str] = (), callbacks: Sequence[TrainerCallback] = ()
) -> TrainResult:
    """Run one training job described by ``config`` (a `TrainConfig`, mapping or YAML path).

    Everything is validated (config, output directory, data) before anything is written.
    Launch with ``accelerate launch`` or ``torchrun`` for DDP/DeepSpeed/FSDP: every rank
    builds identical adapters, and only the main process writes files.
    """
    from accelerate import PartialState

    from milora.init import get_model, init_record
    from milora.models import load_base_model

    start = time.perf_counter()
    config = load_config(config, overrides)
    config = dataclasses.replace(config, lora_alpha=config.resolved_alpha())
    resume = _check_output_dir(config)
    _check_environment(config)
    state = PartialState(cpu=_multi_process_cpu())  # initialises torch.distributed under torchrun / accelerate launch
    main = state.is_main_process
    set_seed(config.seed)
    try:
        model, tokenizer = load_base_model(config.model, dtype=config.dtype)
    except ModelError as error:
        raise ConfigError(f"cannot load model {config.model!r}: {error}") from None
    model.config.use_cache = False
    if config.chat_template is not None:
        tokenizer.chat_template = resolve_chat_template(config.chat_template)
    train_dataset, val_dataset, stats = build_datasets(config, tokenizer, progress=main)
    if main:
        print(f"milora: data: {stats.describe(config.cutoff_len)}", flush=True)
    set_seed(config.seed)  # PEFT's random init (init: lora) draws from the global generator
    svd_device = state.device if state.device.type != "cpu" else None
    try:
        peft_model = get_model(
            model, build_lora_config(config), init=config.init, solver=config.solver, device=svd_device, seed=config.seed, progress=main
        )
    except ValueError as error:  # e.g. a target module the model lacks, a rank too large for a layer
        raise ConfigError(f"cannot build the adapter: {error}") from None
    output_dir = Path(config.output_dir)
    if main:
        if resume is None and output_dir.exists():
            shutil.rmtree(output_dir) if output_dir.is_dir() else output_dir.unlink()
        output_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, output_dir / TRAIN_CONFIG_FILE)
    state.wait_for_everyone()

    stopper = StopOnSignal()
    trainer = MiloraTrainer(
        model=peft_model,
        args=_training_arguments(config, has_eval=val_dataset is not None),
        train_dataset=train_dataset,
        eval_dataset=val_dataset,
        data_collator=supervised_collator(tokenizer, pad_to_multiple_of=8 if torch.cuda.is_available() else None),
        callbacks=[stopper, *callbacks],
    )
    with signals_request_stop(stopper, announce=main):
        output = trainer.train(resume_from_checkpoint=resume)
    interrupted = stopper.stopped_at is not None and trainer.state.global_step < trainer.state.max_steps
    metrics = {
        "interrupted": interrupted,
        "global_step": trainer.state.global_step,
        "max_steps": trainer.state.max_steps,
        "train": output.metrics,
        "data": stats.as_dict(),
        "eval_examples": len(val_dataset) if val_dataset is not None else 0,
        "init": init_record(peft_model).summary(),
        "loss_history": [
            {key: entry[key] for key in ("step", "loss", "eval_loss", "learning_rate", "grad_norm") if key in entry}
            for entry in trainer.state.log_history
            if "loss" in entry or "eval_loss" in entry
        ],
        "wall_seconds": time.perf_counter() - start,
        "world_size": state.num_processes,
    }
    checkpoint = output_dir / f"checkpoint-{trainer.state.global_step}"
    if interrupted:
        if main:
            print(
                f"milora: stopped at step {trainer.state.global_step}/{trainer.state.max_steps}; checkpoint saved to "
                f"{checkpoint}. Resume with resume_from_checkpoint=true.",
                file=sys.stderr,
                flush=True,
            )
        return TrainResult(output_dir, None, checkpoint, True, metrics)
    trainer.save_model(str(output_dir))
    if main:
        atomic_write_json(output_dir / METRICS_FILE, metrics)
    state.wait_for_everyone()
    return TrainResult(output_dir, output_dir, checkpoint if checkpoint.is_dir() else None, False, metrics)
