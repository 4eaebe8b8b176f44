"""`milora train`: fine-tune a MiLoRA (or PiSSA, middle, random, LoRA, or one of PEFT's starts) adapter from one config.

Layout of ``output_dir``: ``train_config.yaml`` (the resolved config, written once the run is
accepted), ``checkpoint-N/`` (adapter + optimizer/scheduler/RNG/trainer state), ``runs/``
(TensorBoard), and at the end the adapter (``adapter_config.json``, ``adapter_model.safetensors``,
``milora_config.json``; load with `milora.load_model(base, output_dir)`) and ``metrics.json``.
Ctrl-C (or SIGTERM) during training saves a checkpoint at the end of the current step and
stops; ``resume_from_checkpoint: true`` continues from the latest checkpoint.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback, TrainingArguments, set_seed

from milora.constants import ADAPTER_FILES, DATA_INITS, METRICS_FILE, MILORA_CONFIG, PEFT_STARTS, TRAIN_CONFIG_FILE
from milora.errors import AdapterError, ConfigError, ModelError, OutputError
from milora.io import LOCK_FILE, RunLock, atomic_write_json, check_output_dir, check_replaceable
from milora.prompts import resolve_chat_template
from milora.training.config import TrainConfig, load_config, save_config, trainer_keys
from milora.training.data import build_datasets, load_records, load_training_records, supervised_collator
from milora.training.objectives import Objective, build_objective_data, objective_for
from milora.training.trainer import StopOnSignal, signals_request_stop


@dataclass
class TrainResult:
    """What a run produced. ``adapter_dir`` is None when the run was interrupted (see ``checkpoint``)."""

    output_dir: Path
    adapter_dir: Path | None
    checkpoint: Path | None
    interrupted: bool
    metrics: dict[str, Any]



# keys a resumed run may change; any other difference from the run's train_config.yaml is refused
# (output_dir: a run directory moved or copied elsewhere resumes where it is now; init_from: load_start only
# accepts this run's own start, the same factors as decomposing again)
RESUMABLE_CHANGES = {
    "output_dir", "max_steps", "num_train_epochs", "logging_steps", "save_steps", "save_total_limit", "eval_steps",
    "report_to", "resume_from_checkpoint", "overwrite_output_dir", "dataloader_num_workers", "deepspeed", "init_from",
}


def _check_output_dir(config: TrainConfig) -> str | None:
    """Validate ``output_dir`` against resuming/overwriting; returns the checkpoint to resume from."""
    output_dir = Path(config.output_dir)
    resume = config.resume_from_checkpoint
    if resume is True:
        checkpoint = latest_complete_checkpoint(output_dir)
        if checkpoint is None:
            raise ConfigError(
                f"resume_from_checkpoint is true but {output_dir} has no checkpoint-N directory (complete ones only): "
                "run without resume_from_checkpoint, or point it at a checkpoint directory."
            )
        return str(checkpoint)
    if resume:
        if not is_complete_checkpoint(Path(resume)):
            raise ConfigError(f"resume_from_checkpoint {resume} is not a complete checkpoint (no trainer_state.json "
                              "or adapter files): point it at a complete checkpoint-N directory.")
        return str(resume)
    if output_dir.exists() and (
        not output_dir.is_dir() or {entry.name for entry in output_dir.iterdir()} - {LOCK_FILE}
    ):
        if not config.overwrite_output_dir:
            raise ConfigError(
                f"output_dir {output_dir} already exists and is not empty: choose a new output_dir, resume with "
                "resume_from_checkpoint=true, or set overwrite_output_dir=true to delete its contents."
            )
        if not (output_dir / TRAIN_CONFIG_FILE).is_file():
            raise ConfigError(
                f"overwrite_output_dir is true but {output_dir} is not a milora training directory "
                f"(no {TRAIN_CONFIG_FILE}); "
                "refusing to delete it: choose a new output_dir."
            )
        try:
            check_replaceable(output_dir)
        except OutputError as error:
            raise ConfigError(f"overwrite_output_dir is true but {error}") from error
    return None


def is_complete_checkpoint(directory: Path) -> bool:
    """A checkpoint Trainer can resume from: its trainer state and a whole milora adapter."""
    return directory.is_dir() and all((directory / name).is_file() for name in ("trainer_state.json", *ADAPTER_FILES))


def latest_complete_checkpoint(output_dir: Path) -> Path | None:
    """The complete ``checkpoint-N`` with the largest N; incomplete ones (a run killed while writing
    one with an older milora) are skipped with a message."""
    if not output_dir.is_dir():
        return None
    found = [p for p in output_dir.iterdir() if re.fullmatch(r"checkpoint-\d+", p.name) and p.is_dir()]
    for checkpoint in sorted(found, key=lambda p: int(p.name.split("-")[1]), reverse=True):
        if is_complete_checkpoint(checkpoint):
            return checkpoint
        print(f"milora: skipping {checkpoint}: incomplete (no trainer_state.json or adapter files)", file=sys.stderr)
    return None


def _check_resume_matches(config: TrainConfig, checkpoint: str) -> None:
    """Refuse to resume with settings the checkpoint was not trained with (before anything is written)."""
    _check_resume_quantization(config, Path(checkpoint))
    run_dir = Path(checkpoint).parent
    saved_path = run_dir / TRAIN_CONFIG_FILE
    if not saved_path.is_file():
        return
    saved = load_config(saved_path).to_dict()
    changed = [
        key for key, value in config.to_dict().items() if key not in RESUMABLE_CHANGES and saved.get(key) != value
    ]
    if changed:
        details = "; ".join(f"{key}={config.to_dict()[key]!r} but the run used {saved.get(key)!r}" for key in changed)
        raise ConfigError(
            f"cannot resume from {checkpoint}: {details} ({saved_path}). Resume with the run's settings "
            f"(only {', '.join(sorted(RESUMABLE_CHANGES - {'resume_from_checkpoint', 'overwrite_output_dir'}))} may "
            "change), or start a new run in another output_dir."
        )


def _check_resume_quantization(config: TrainConfig, checkpoint: Path) -> None:
    """The checkpoint's own record of its base's quantisation (also for a checkpoint outside its run directory)."""
    try:
        metadata = json.loads((checkpoint / MILORA_CONFIG).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ConfigError(f"cannot resume from {checkpoint}: its {MILORA_CONFIG} is unreadable ({error}).") from error
    trained_on = (metadata.get("quantization") or {}).get("method")
    if trained_on != config.quantization:
        raise ConfigError(
            f"cannot resume from {checkpoint}: it was trained on a {trained_on or 'full-precision'} base but "
            f"quantization={config.quantization!r}; resume with quantization: {trained_on or 'null'} (the base must be "
            "the one the adapter was trained on), or start a new run in another output_dir."
        )


def _check_environment(config: TrainConfig) -> None:
    if config.report_to == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError(
            "report_to is 'tensorboard' but tensorboard is not installed: `pip install tensorboard`, "
            "or set report_to: none."
        )
    if config.fp16 and not torch.cuda.is_available():
        raise ConfigError("fp16 mixed precision needs a GPU; on CPU use bf16: true or neither.")
    if config.quantization is not None:
        from milora.init.quantize import check_quantization

        try:
            check_quantization(config.quantization)
        except ModelError as error:
            raise ConfigError(str(error)) from error


def _check_sharding_on_cpu() -> None:
    """FSDP or DeepSpeed asked for (`accelerate launch` with their config) on CPU processes: accelerate builds
    their plugins only for GPUs and other accelerators, and on CPU would silently run plain DDP instead."""
    if not _multi_process_cpu():
        return
    for variable, name in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")):
        if os.environ.get(variable, "false").lower() == "true":
            raise ConfigError(
                f"{name} was asked for on CPU processes, but accelerate shards with {name} only on GPUs (and other "
                "accelerators): here it would run plain data parallel instead. On CPU launch DDP: accelerate launch "
                "--config_file recipes/accelerate/ddp.yaml --num_processes 2 --mixed_precision no -m milora.cli train "
                "RECIPE.yaml (or torchrun --nproc_per_node 2 -m milora.cli train RECIPE.yaml).")


def _multi_process_cpu() -> bool:
    """Launched as several processes without GPUs: accelerate then needs ``cpu=True`` for gloo DDP."""
    return not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1


def _training_arguments(config: TrainConfig, has_eval: bool, objective: Objective) -> TrainingArguments:
    """Keys named like TrainingArguments fields pass as they are (`trainer_keys`), ``trainer_args`` too;
    the rest is milora's meaning of its own keys. ``objective: dpo`` / ``grpo``: TRL's `DPOConfig` /
    `GRPOConfig` with the objective's keys (`milora.training.objectives`)."""
    checkpointing = {}
    if config.gradient_checkpointing:  # renamed activation_checkpointing in transformers 5.x
        fields = TrainingArguments.__dataclass_fields__
        name = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
        checkpointing = {name: True, f"{name}_kwargs": {"use_reentrant": False}}
    return objective.arguments_class(
        **{key: getattr(config, key) for key in trainer_keys()},
        **config.trainer_args,
        **checkpointing,
        output_dir=config.output_dir,
        max_steps=config.max_steps if config.max_steps is not None else -1,
        lr_scheduler_type=config.lr_scheduler,
        per_device_eval_batch_size=config.per_device_train_batch_size,
        data_seed=config.seed,
        logging_first_step=True,
        save_strategy="steps",
        eval_strategy="steps" if has_eval else "no",
        eval_steps=(config.eval_steps or config.logging_steps) if has_eval else None,
        report_to=[] if config.report_to == "none" else [config.report_to],
        dataloader_pin_memory=torch.cuda.is_available(),
        **objective.arguments,
        ddp_find_unused_parameters=False,
        use_cpu=_multi_process_cpu(),
    )


def build_lora_config(config: TrainConfig, model=None):
    """The `peft.LoraConfig` of a run (alpha resolved as in `TrainConfig.resolved_alpha`). Given the
    ``model``, an image-text-to-text model's targets are scoped by ``target_scope`` (see
    `milora.init.scoped_targets`); without it the names are PEFT's."""
    from peft import LoraConfig

    from milora.init.experts import TargetSelection, select_targets

    names = config.lora_target
    if model is not None:
        targets = select_targets(model, names, config.target_scope)
    else:
        targets = TargetSelection("all-linear" if names == ["all-linear"] else list(names), None)
    return LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.resolved_alpha(),
        lora_dropout=config.lora_dropout,
        target_modules=targets.modules,
        target_parameters=targets.parameters,
        modules_to_save=config.modules_to_save,
        use_rslora=config.use_rslora,
        bias="none",
        task_type="CAUSAL_LM",
    )


def train(
    config: TrainConfig | Mapping[str, Any] | str | os.PathLike,
    overrides: Sequence[str] = (),
    callbacks: Sequence[TrainerCallback] = (),
) -> TrainResult:
    """Run one training job described by ``config`` (a `TrainConfig`, mapping or YAML path).

    Everything is validated (config, output directory, resume compatibility, model, data)
    before anything is written. The run holds ``output_dir`` for its lifetime (`RunLock`): a
    second run on the same directory is refused, naming the holder. Launch with ``accelerate
    launch`` or ``torchrun`` for DDP/DeepSpeed/FSDP: every rank builds identical adapters, and
    only the main process writes files.
    """
    from accelerate import PartialState

    start = time.perf_counter()
    config = load_config(config, overrides)
    config = config.as_run()
    _check_environment(config)
    _check_sharding_on_cpu()
    state = PartialState(cpu=_multi_process_cpu())  # initialises torch.distributed under torchrun / accelerate launch
    lock = RunLock(config.output_dir, purpose="milora train") if state.is_main_process else None
    created = not Path(config.output_dir).exists()
    if lock is not None:
        check_output_dir(config.output_dir)  # a file there, a read-only mount: before anything is written
        lock.acquire()
    try:
        resume = _check_output_dir(config)
        if resume is not None:
            _check_resume_matches(config, resume)
        built = _build(config, state)
        if state.is_main_process:
            _start_record(config, resume)
        state.wait_for_everyone()
        return _run(config, state, built, callbacks, resume, start)
    finally:
        if lock is not None:
            lock.release()
            output_dir = Path(config.output_dir)
            if created and output_dir.is_dir() and not any(output_dir.iterdir()):
                output_dir.rmdir()  # refused before anything was written: leave no trace


@dataclass
class BuiltRun:
    """What a run trains, made before anything is written: the initialised adapter, its
    preprocessor and its data."""

    peft_model: Any
    preprocessor: Any  # the tokenizer, or an image-text-to-text model's processor
    train_dataset: Any
    val_dataset: Any | None
    data_stats: dict[str, Any]  # record / token / truncation counts, as written to metrics.json
    collator: Any
    objective: Objective  # arguments and trainer classes (GRPO's reward functions already imported)


def _build(config: TrainConfig, state) -> BuiltRun:
    """Base model, data (and its collator) and the initialised adapter of a run (nothing written)."""
    from milora.adapter.load import load_start
    from milora.init import get_model
    from milora.models import is_vision_language_model, load_base_model

    set_seed(config.seed)
    try:
        loaded = load_base_model(config.model, dtype=config.dtype)
    except ModelError as error:
        raise ConfigError(f"cannot load model {config.model!r}: {error}") from error
    model, preprocessor = loaded
    text_config = model.config.get_text_config()
    positions = getattr(text_config, "max_position_embeddings", None)
    if positions is not None and config.cutoff_len > positions:
        raise ConfigError(f"cutoff_len={config.cutoff_len} is above the model's max_position_embeddings={positions}: "
                          f"lower cutoff_len to at most {positions}.")
    model.config.use_cache = False
    if config.chat_template is not None:
        loaded.tokenizer.chat_template = resolve_chat_template(config.chat_template)
    train_dataset, val_dataset, stats, collator = _build_data(config, model, preprocessor, state.is_main_process)
    set_seed(config.seed)  # PEFT's random inits (lora, dora, lora-ga's sketch) draw from the global generator
    peft_start = config.init in PEFT_STARTS
    svd_device = state.device if state.device.type != "cpu" and not peft_start else None
    calibration = (calibration_batches(train_dataset, collator, config)
                   if config.init in DATA_INITS and config.init_from is None else None)
    extra = {"calibration": calibration, "pissa_niter": config.pissa_niter} if peft_start else {}
    try:
        if config.init_from is not None:  # decompose once: the saved start's factors, no SVD
            peft_model = load_start(model, config.init_from, build_lora_config(config, model), config.init,
                                    config.seed, null_space=config.null_space, device=svd_device,
                                    quantization=config.quantization)
        else:
            peft_model = get_model(model, build_lora_config(config, model), init=config.init, solver=config.solver,
                                   device=svd_device, seed=config.seed, progress=state.is_main_process,
                                   null_space=config.null_space, quantization=config.quantization, **extra)
    except (ModelError, AdapterError) as error:  # a target the model lacks, a rank too large, another run's start
        raise ConfigError(f"cannot build the adapter: {error}") from error
    if is_vision_language_model(model) and not config.modules_to_save and state.is_main_process:
        print("milora: note: no modules_to_save: the projector stays frozen (visual instruction tuning trains it: "
              "modules_to_save: multi_modal_projector for LLaVA)", file=sys.stderr)
    objective = objective_for(config, preprocessor)
    return BuiltRun(peft_model, preprocessor, train_dataset, val_dataset, stats, collator, objective)


def _build_data(config: TrainConfig, model, tokenizer, progress: bool):
    """(train dataset, validation dataset, stats, collator): image records through the model's processor
    (`milora.training.vision_data`), text records through its tokenizer."""
    from milora.models import is_vision_language_model
    from milora.training import vision_data

    if config.objective != "sft":
        records = load_records(config.dataset, config.dataset_split, config.dataset_config)[: config.max_samples]
        return *build_objective_data(config, records, tokenizer, progress), None
    records, fmt = load_training_records(config)
    vision = is_vision_language_model(model)
    if fmt == "llava" or any(vision_data.has_images(record) for record in records):
        if not vision:
            raise ConfigError(f"the dataset {config.dataset} holds images, but the model {config.model or 'SmolLM2'} "
                              f"is a text-only {type(model).__name__}: use an image-text-to-text model (LLaVA, ...).")
        train_dataset, val_dataset, stats = vision_data.build_vision_datasets(config, records, fmt, tokenizer, progress)
        if progress:
            print(f"milora: data: {stats['records']} records, {stats['images']} images checked; encoded lazily",
                  flush=True)
        return train_dataset, val_dataset, stats, vision_data.vision_collator(tokenizer, model.dtype)
    text_tokenizer = tokenizer.tokenizer if vision else tokenizer
    train_dataset, val_dataset, stats = build_datasets(config, text_tokenizer, progress, (records, fmt))
    if progress:
        print(f"milora: data: {stats.describe(config.cutoff_len)}", flush=True)
    collator = supervised_collator(text_tokenizer, pad_to_multiple_of=8 if torch.cuda.is_available() else None)
    return train_dataset, val_dataset, stats.as_dict(), collator


def calibration_batches(train_dataset, collator, config: TrainConfig) -> list[dict]:
    """The data starts' batches: ``calibration_batches`` collated batches of ``per_device_train_batch_size``
    training examples, drawn without replacement in a ``seed``-ed order (the same on every rank and resume)."""
    size = config.per_device_train_batch_size
    order = torch.randperm(len(train_dataset), generator=torch.Generator().manual_seed(config.seed)).tolist()
    count = min(config.calibration_batches * size, len(order))
    return [dict(collator([train_dataset[i] for i in order[start:start + size]])) for start in range(0, count, size)]


def _start_record(config: TrainConfig, resume: str | None) -> None:
    """The run is accepted: clear an overwritten directory (keeping the lock) and write its config."""
    output_dir = Path(config.output_dir)
    if resume is None:
        for entry in output_dir.iterdir():
            if entry.name != LOCK_FILE:
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    save_config(config, output_dir / TRAIN_CONFIG_FILE)


def _run(config: TrainConfig, state, built: BuiltRun, callbacks: Sequence[TrainerCallback], resume: str | None,
         start: float) -> TrainResult:
    stopper = StopOnSignal()
    trainer = built.objective.trainer_class(
        model=built.peft_model,
        **built.objective.trainer_kwargs,
        args=_training_arguments(config, built.val_dataset is not None, built.objective),
        train_dataset=built.train_dataset,
        eval_dataset=built.val_dataset,
        **({"data_collator": built.collator} if built.collator is not None else {}),  # TRL's own otherwise
        callbacks=[stopper, *callbacks],
    )
    with signals_request_stop(stopper, announce=state.is_main_process):
        output = trainer.train(resume_from_checkpoint=resume)
    interrupted = stopper.stopped_at is not None and trainer.state.global_step < trainer.state.max_steps
    metrics = _metrics(trainer, output, built, interrupted, start, state.num_processes)
    output_dir = Path(config.output_dir)
    checkpoint = output_dir / f"checkpoint-{trainer.state.global_step}"
    if interrupted:
        if state.is_main_process:
            print(f"milora: stopped at step {trainer.state.global_step}/{trainer.state.max_steps}; checkpoint saved to "
                  f"{checkpoint}. Resume with resume_from_checkpoint=true.", file=sys.stderr, flush=True)
        return TrainResult(output_dir, None, checkpoint, True, metrics)
    trainer.save_model(str(output_dir))
    if state.is_main_process:
        atomic_write_json(output_dir / METRICS_FILE, metrics)
    state.wait_for_everyone()
    return TrainResult(output_dir, output_dir, checkpoint if checkpoint.is_dir() else None, False, metrics)


def _metrics(trainer, output, built: BuiltRun, interrupted: bool, start: float, world_size: int) -> dict[str, Any]:
    from milora.init import init_record

    return {
        "interrupted": interrupted,
        "global_step": trainer.state.global_step,
        "max_steps": trainer.state.max_steps,
        "train": output.metrics,
        "data": built.data_stats,
        "eval_examples": len(built.val_dataset) if built.val_dataset is not None else 0,
        "init": init_record(trainer.model).summary(),
        "loss_history": [
            {key: entry[key] for key in ("step", "loss", "eval_loss", "learning_rate", "grad_norm") if key in entry}
            for entry in trainer.state.log_history
            if "loss" in entry or "eval_loss" in entry
        ],
        "wall_seconds": time.perf_counter() - start,
        "world_size": world_size,
    }
