"""`milora train`: fine-tune a MiLoRA (or PiSSA, middle, random, LoRA) adapter from one config.

Built on transformers' `Trainer`, subclassed in two places because a MiLoRA adapter's rank-r
factors are only valid on the residual base:

- `MiloraTrainer.save_model` writes checkpoints and the final adapter with
  `milora.save_adapter` (a rank-2r LoRA valid on the ORIGINAL base), gathering sharded
  parameters first under DeepSpeed ZeRO-3 / FSDP;
- `MiloraTrainer._load_from_checkpoint` restores the trainable factors with
  `load_trained_state` into the freshly (and deterministically) initialised model; Trainer
  restores the optimizer, scheduler, RNG and data position as usual.

Layout of ``output_dir``: ``train_config.yaml`` (the resolved config, written at the start),
``checkpoint-N/`` (adapter + optimizer/scheduler/RNG/trainer state), ``runs/`` (TensorBoard),
and at the end the adapter (``adapter_config.json``, ``adapter_model.safetensors``,
``milora_config.json``; load with `milora.load_model(base, output_dir)`) and ``metrics.json``.
Ctrl-C (or SIGTERM) during training saves a checkpoint at the end of the current step and
stops; ``resume_from_checkpoint: true`` continues from the latest checkpoint.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed
from transformers.trainer_utils import get_last_checkpoint

from milora.config import ConfigError, TrainConfig, load_config, save_config
from milora.data import SupervisedCollator, build_datasets

CONFIG_FILE = "train_config.yaml"
METRICS_FILE = "metrics.json"
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json", "milora_config.json")  # moved in this order


@dataclass
class TrainResult:
    """What a run produced. ``adapter_dir`` is None when the run was interrupted (see ``checkpoint``)."""

    output_dir: Path
    adapter_dir: Path | None
    checkpoint: Path | None
    interrupted: bool
    metrics: dict[str, Any]


def write_adapter(peft_model, directory: str | os.PathLike, state_dict: dict | None = None) -> Path:
    """`milora.save_adapter` into ``directory``, which may already hold other files (config, logs).

    The adapter is written complete to a staging directory first, then its files are moved in
    one by one with ``milora_config.json`` last, so a directory that has it has the whole adapter.
    """
    from milora.persistence import save_adapter

    directory = Path(directory)
    if not directory.exists() or not any(directory.iterdir()):
        return save_adapter(peft_model, directory, overwrite=True, state_dict=state_dict)
    staging = directory / ".adapter-staging"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        save_adapter(peft_model, staging, state_dict=state_dict)
        for name in ADAPTER_FILES:
            os.replace(staging / name, directory / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory


class MiloraTrainer(Trainer):
    """`Trainer` whose checkpoints and final output are milora adapters (see module docstring)."""

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        output_dir = output_dir or self.args.output_dir
        state_dict = None
        if self.is_fsdp_enabled:  # collective: every rank takes part, rank 0 gets the full state dict
            state_dict = self.accelerator.get_state_dict(self.model)
        elif self.is_deepspeed_enabled and self.accelerator.state.deepspeed_plugin.zero_stage == 3:
            state_dict = self.accelerator.get_state_dict(self.model_wrapped)
        if self.args.should_save:
            write_adapter(self.accelerator.unwrap_model(self.model), output_dir, state_dict)
        # other ranks write their RNG state into the same checkpoint directory right after this
        self.accelerator.wait_for_everyone()

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: torch.nn.Module | None = None) -> None:
        if self.is_fsdp_enabled:  # FSDP resumes from its own sharded model state, saved beside the adapter
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        from milora.persistence import load_trained_state

        load_trained_state(self.accelerator.unwrap_model(model or self.model), resume_from_checkpoint)


class StopOnSignal(TrainerCallback):
    """After Ctrl-C/SIGTERM (``requested``), save a checkpoint at the end of the step and stop.

    Under torch.distributed the request is all-reduced every step, so all ranks stop together.
    """

    def __init__(self):
        self.requested = False
        self.stopped_at: int | None = None

    def on_step_end(self, args, state, control, **kwargs):
        requested = self.requested
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            flag = torch.tensor([int(requested)], device=args.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            requested = bool(flag.item())
        if requested:
            control.should_save = True
            control.should_training_stop = True
            self.stopped_at = state.global_step
        return control


@contextmanager
def _signals_request_stop(callback: StopOnSignal, announce: bool):
    """First Ctrl-C/SIGTERM asks ``callback`` to checkpoint and stop; a second one aborts at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def handler(signum, frame):
        if callback.requested:
            for sig, old in previous.items():
                signal.signal(sig, old)
            raise KeyboardInterrupt
        callback.requested = True
        if announce:
            print(
                "\nmilora: interrupt received; saving a checkpoint at the end of this step "
                "(interrupt again to abort without saving).",
                file=sys.stderr,
                flush=True,
            )

    for sig in previous:
        signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


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
        if not (output_dir / CONFIG_FILE).is_file():
            raise ConfigError(
                f"overwrite_output_dir is true but {output_dir} is not a milora training directory (no {CONFIG_FILE}); "
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

    from milora.initialization import get_model
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
    except OSError as error:
        raise ConfigError(f"cannot load model {config.model!r}: {error}") from None
    model.config.use_cache = False
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
        save_config(config, output_dir / CONFIG_FILE)
    state.wait_for_everyone()

    stopper = StopOnSignal()
    trainer = MiloraTrainer(
        model=peft_model,
        args=_training_arguments(config, has_eval=val_dataset is not None),
        train_dataset=train_dataset,
        eval_dataset=val_dataset,
        data_collator=SupervisedCollator(tokenizer.pad_token_id, pad_to_multiple_of=8 if torch.cuda.is_available() else None),
        callbacks=[stopper, *callbacks],
    )
    with _signals_request_stop(stopper, announce=main):
        output = trainer.train(resume_from_checkpoint=resume)
    interrupted = stopper.stopped_at is not None and trainer.state.global_step < trainer.state.max_steps
    metrics = {
        "interrupted": interrupted,
        "global_step": trainer.state.global_step,
        "max_steps": trainer.state.max_steps,
        "train": output.metrics,
        "data": stats.as_dict(),
        "eval_examples": len(val_dataset) if val_dataset is not None else 0,
        "init": peft_model.milora_init.summary(),
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
        staging = output_dir / f".{METRICS_FILE}.tmp"
        staging.write_text(json.dumps(metrics, indent=2, default=float) + "\n")
        os.replace(staging, output_dir / METRICS_FILE)
    state.wait_for_everyone()
    return TrainResult(output_dir, output_dir, checkpoint if checkpoint.is_dir() else None, False, metrics)
