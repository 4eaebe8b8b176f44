"""The training configuration: one YAML file (plus ``key=value`` overrides) describes a run.

`TrainConfig` is a pydantic model: each key's type, default, range and help live in one
declaration, and validation is pydantic's. `load_config` reads and validates everything
before anything is written: an unknown key is an error naming the closest valid key (also
inside ``trainer_args``, checked against transformers' `TrainingArguments`), duplicate YAML
keys are errors, values are checked for type and range, and a local dataset file must exist.
`TrainConfig.to_dict()` is what `milora train` saves next to its outputs (``train_config.yaml``).

Keys named like a `TrainingArguments` field (``learning_rate``, ``warmup_steps``, ...) are
passed to the Trainer as they are; ``trainer_args`` passes any other Trainer option.
Relative paths (``dataset``, ``output_dir``, ...) are relative to the current directory,
not to the YAML file (as with transformers' and torchtune's configs).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from milora.constants import (
    DTYPE_NAMES,
    INIT_MODES,
    PAPER_TARGETS,
    QUANTIZATIONS,
    RESIDUAL_INITS,
    SOLVERS,
    TARGET_SCOPES,
)
from milora.errors import ConfigError, shown
from milora.io import atomic_write_text, load_yaml, read_yaml_mapping
from milora.prompts import TEMPLATE_NAMES
from milora.training.config_checks import check_consistency, check_init_options

FORMAT_CHOICES = ("auto", "alpaca", "llm-adapters", "metamath", "messages", "sharegpt", "llava")
SCHEDULER_CHOICES = (
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup", "inverse_sqrt",
)
LOCAL_SUFFIXES = (".json", ".jsonl", ".parquet")


# ---------------------------------------------------------------- value types (strict, with YAML's quirks)


def _integral(value: Any) -> Any:
    """10.0 -> 10 (YAML and key=value overrides write whole numbers either way)."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _number(value: Any) -> Any:
    """'3e-4' -> 3e-4: YAML 1.1 reads exponent notation without a dot as a string."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _stripped(value: Any) -> Any:
    return value.strip() if isinstance(value, str) else value


def _name_list(value: Any) -> Any:
    """'q_proj, v_proj' -> ['q_proj', 'v_proj']; list items stripped, empty ones dropped."""
    items = value.split(",") if isinstance(value, str) else value
    if isinstance(items, list) and all(isinstance(item, str) for item in items):
        return [item.strip() for item in items if item.strip()]
    return value


Int = Annotated[int, BeforeValidator(_integral), Field(strict=True)]
Float = Annotated[float, BeforeValidator(_number), Field(strict=True, allow_inf_nan=False)]
Bool = Annotated[bool, Field(strict=True)]
Str = Annotated[str, BeforeValidator(_stripped), Field(strict=True, min_length=1)]
Names = Annotated[list[Str], BeforeValidator(_name_list), Field(strict=True, min_length=1)]
Resume = Annotated[Union[Bool, Str], Field(union_mode="left_to_right")]  # noqa: UP007 (pydantic union mode)


def Key(default: Any = None, help: str = "", **constraints: Any) -> Any:  # capitalised: reads as a declaration
    return Field(default, description=help, **constraints)


class TrainConfig(BaseModel):
    """Every key of a training run. ``None`` means "not set" (see each key's help)."""

    model_config = ConfigDict(extra="forbid", validate_default=False, use_attribute_docstrings=False)

    # model and adapter
    model: Str | None = Key(None, "base model: hub id or local directory (default: the embedded SmolLM2-135M-Instruct)")
    dtype: Literal[DTYPE_NAMES] = Key("float32", "dtype the base model is loaded in")
    init: Literal[INIT_MODES] = Key("milora", "adapter initialisation")
    solver: Literal[SOLVERS] = Key("auto", "decomposition solver of the SVD-based inits")
    lora_rank: Int = Key(16, "LoRA rank r", ge=1)
    lora_alpha: Float | None = Key(None, "LoRA alpha (default: r for the inits that change the base, milora/pissa/"
                                         "middle/random/olora/pissa-fast/corda/lora-ga, 2r for lora/dora/eva/mica)",
                                   gt=0)
    lora_dropout: Float = Key(0.05, "dropout on the LoRA input, in [0, 1)", ge=0, lt=1)
    lora_target: Names = Key(list(PAPER_TARGETS), "modules to adapt: comma-separated string or list, or 'all-linear'; "
                                                  "a MoE model's fused expert parameters by name too (gate_up_proj, "
                                                  "down_proj: PEFT target_parameters; needs lora_dropout 0)")
    target_scope: Literal[TARGET_SCOPES] = Key(
        "language_model", "image-text-to-text models: lora_target names match inside the language model only, "
                          "or in the whole model (vision tower and projector too)")
    modules_to_save: Names | None = Key(None, "modules trained in full and saved with the adapter, e.g. "
                                              "multi_modal_projector (LLaVA's projector) for visual instruction tuning")
    use_rslora: Bool = Key(False, "rank-stabilised scaling alpha/sqrt(r)")
    init_from: Str | None = Key(None, "a saved start (adapter directory of milora init or of an earlier run) to begin "
                                      "from instead of decomposing again: checked against the base and the run's "
                                      "init, rank, alpha, targets and seed, its residual rebuilt without any SVD")
    null_space: Literal["zero", "random"] = Key(
        "zero", "start of exactly-zero selected singular values: zero (the paper's; cannot train) or random (B = 0)")
    calibration_batches: Int = Key(8, "training batches (of per_device_train_batch_size, seeded draw) the data "
                                      "starts corda-kpm, corda-ipm, eva, lora-ga compute their start from", ge=1)
    pissa_niter: Int = Key(4, "subspace iterations of pissa-fast's randomised SVD (PEFT's pissa_niter_N)", ge=1)
    quantization: Literal[QUANTIZATIONS] | None = Key(
        None, "QLoRA-style: quantise the frozen base with bitsandbytes after the full-precision init (W - s B0 A0 in "
        "the targets); the saved adapter is still for the full-precision base (default: none)")
    # objective
    objective: Literal["sft", "dpo", "grpo"] = Key(
        "sft", "sft: supervised fine-tuning; dpo: preference pairs through TRL's DPOTrainer; grpo: prompts and reward "
        "functions through TRL's GRPOTrainer (reference = the original model)")
    dpo_beta: Float | None = Key(None, "dpo: KL strength beta (default: TRL's 0.1)", gt=0)
    dpo_loss_type: Str | None = Key(None, "dpo: TRL loss type, e.g. sigmoid, ipo, hinge (default: sigmoid)")
    precompute_ref_log_probs: Bool | None = Key(None, "dpo: compute the reference log-probs once before training")
    grpo_rewards: Names | None = Key(None, "grpo: reward functions, summed: math, format, or module:function / "
                                           "file.py:function (required for grpo)")
    grpo_beta: Float | None = Key(None, "grpo: KL strength to the reference (default: TRL's 0.0, no reference)", ge=0)
    grpo_num_generations: Int | None = Key(None, "grpo: completions sampled per prompt (default: TRL's 8)", ge=2)
    grpo_max_completion_length: Int | None = Key(None, "grpo: tokens per completion (default: TRL's 512)", ge=1)
    # data
    dataset: Str | None = Key(None, "local .json/.jsonl/.parquet file, local dataset directory, or hub dataset name "
                                    "(required)")
    dataset_format: Literal[FORMAT_CHOICES] = Key("auto", "record format "
                                                          "(auto-detected from the first record by default)")
    dataset_config: Str | None = Key(None, "hub dataset configuration (subset) name")
    dataset_split: Str = Key("train", "hub dataset split, slices allowed ('train[:100000]'); local files: 'train'")
    image_folder: Str | None = Key(None, "folder the image paths of image records are relative to (default: the "
                                         "dataset file's folder)")
    template: Literal[TEMPLATE_NAMES] = Key("alpaca", "prompt template for instruction records "
                                                      "('chat' for messages records)")
    chat_template: Str | None = Key(None, "chat template replacing the tokenizer's, for base models without one: "
                                          "'tulu' or a .jinja file (evaluate with the same --chat-template)")
    cutoff_len: Int = Key(512, "maximum tokens per example (prompt + response + EOS)", ge=2)
    overlong: Literal["truncate", "drop"] = Key("truncate",
                                                "examples longer than cutoff_len: truncate them or drop them")
    max_samples: Int | None = Key(None, "use only the first N records", ge=1)
    val_size: Float = Key(0.0, "held-out validation records: a fraction (< 1) or a count (>= 1); 0 = none", ge=0)
    # optimisation (names of TrainingArguments fields are passed to the Trainer as they are)
    learning_rate: Float = Key(3e-4, "peak learning rate", ge=0)
    lr_scheduler: Literal[SCHEDULER_CHOICES] = Key("linear", "learning-rate schedule after warm-up")
    warmup_steps: Int = Key(0, "linear warm-up steps", ge=0)
    num_train_epochs: Float = Key(3.0, "epochs over the training set (ignored when max_steps is set)", ge=0)
    max_steps: Int | None = Key(None, "total optimizer steps (overrides num_train_epochs)", ge=1)
    per_device_train_batch_size: Int = Key(4, "examples per device per micro-batch", ge=1)
    gradient_accumulation_steps: Int = Key(1, "micro-batches per optimizer step", ge=1)
    weight_decay: Float = Key(0.0, "AdamW weight decay", ge=0)
    max_grad_norm: Float = Key(1.0, "gradient clipping norm (0 = off)", ge=0)
    optim: Str = Key("adamw_torch", "transformers optimizer name (adamw_torch, adamw_torch_fused, adafactor, ...)")
    gradient_checkpointing: Bool = Key(False, "recompute activations to save memory")
    bf16: Bool = Key(False, "bfloat16 mixed precision")
    fp16: Bool = Key(False, "float16 mixed precision (GPU only)")
    seed: Int = Key(42, "seed of data order, dropout and the random init")
    trainer_args: dict[str, Any] = Key({}, "any other transformers TrainingArguments option, e.g. {adam_beta2: 0.95}")
    # outputs
    output_dir: Str | None = Key(None, "directory for the adapter, config, metrics, checkpoints and logs (required)")
    overwrite_output_dir: Bool = Key(False, "allow a non-empty output_dir of an earlier milora run "
                                            "(its contents are deleted)")
    logging_steps: Int = Key(10, "log loss and learning rate every N steps", ge=1)
    save_steps: Int = Key(500, "write a checkpoint every N steps", ge=1)
    save_total_limit: Int | None = Key(None, "keep at most N checkpoints (default: all)", ge=1)
    eval_steps: Int | None = Key(None, "validation loss every N steps (needs val_size; default: logging_steps)", ge=1)
    report_to: Literal["tensorboard", "none"] = Key("tensorboard", "where losses are logged besides the metrics file")
    resume_from_checkpoint: Resume | None = Key(None, "checkpoint directory to resume from, "
                                                      "or true for the latest in output_dir")
    deepspeed: Str | None = Key(None, "DeepSpeed JSON config (for torchrun; with accelerate, use its config file)")
    dataloader_num_workers: Int = Key(0, "data-loading worker processes", ge=0)

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML-serialisable values, every key present."""
        return self.model_dump()

    def resolved_alpha(self) -> float:
        """lora_alpha, or the paper's default: r for the inits that move part of W into the adapter
        (`RESIDUAL_INITS`, PiSSA's convention), 2r for those starting at B A = 0 (lora, dora, eva, mica)."""
        if self.lora_alpha is not None:
            return self.lora_alpha
        return float(self.lora_rank if self.init in RESIDUAL_INITS else 2 * self.lora_rank)

    def as_run(self) -> TrainConfig:
        """The config as a run uses and records it (``train_config.yaml``): ``lora_alpha`` resolved."""
        return self.model_copy(update={"lora_alpha": self.resolved_alpha()})

    def is_local_dataset(self) -> bool:
        """True for a local file or directory; otherwise ``dataset`` names a hub dataset."""
        return is_local_path(self.dataset)


# ---------------------------------------------------------------- key descriptions and messages


def is_local_path(dataset: str | None) -> bool:
    return dataset is not None and (dataset.lower().endswith(LOCAL_SUFFIXES) or os.path.exists(dataset))


def valid_keys() -> list[str]:
    return list(TrainConfig.model_fields)


def _kind(annotation: Any) -> tuple[str, bool]:
    """(kind, optional) of a field's annotation (pydantic keeps it without the Annotated metadata):
    int, float, bool, str, strlist, choice, resume or mapping."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Union and type(None) in args:
        return _kind(next(arg for arg in args if arg is not type(None)))[0], True
    if origin is Annotated:
        return _kind(args[0])
    if origin is Union:
        return "resume", False
    if origin is Literal:
        return "choice", False
    return {list: "strlist", dict: "mapping"}.get(origin, getattr(annotation, "__name__", "value")), False


_KIND_WORDS = {
    "str": "a non-empty string", "bool": "true or false", "int": "an integer", "float": "a number",
    "strlist": "a comma-separated string or a list of strings", "resume": "a checkpoint path or true",
    "mapping": "a mapping of keys to values",
}


def _choices(name: str) -> tuple[str, ...] | None:
    annotation = TrainConfig.model_fields[name].annotation
    if get_origin(annotation) is Union:  # an optional choice: Literal[...] | None
        annotation = next(arg for arg in get_args(annotation) if arg is not type(None))
    return get_args(annotation) if get_origin(annotation) is Literal else None


def key_help() -> list[tuple[str, str, Any, str]]:
    """(key, kind, default, help) for every key: `milora train --list-keys` and the table on docs/training.md."""
    rows = []
    for name, info in TrainConfig.model_fields.items():
        kind, optional = _kind(info.annotation)
        choices = _choices(name)
        help_text = info.description + (f" (one of: {', '.join(choices)})" if choices else "")
        rows.append((name, ("str" if kind == "choice" else kind) + ("?" if optional else ""), info.default, help_text))
    return rows


def _closest(key: str, candidates: Sequence[str], hint: str) -> str:
    match = difflib.get_close_matches(key, list(candidates), n=1, cutoff=0.5)
    return f"did you mean '{match[0]}'?" if match else hint


def _message(error: dict) -> str:
    """One pydantic error as milora's message: the key, what it must be, what it got."""
    name, value = str(error["loc"][0]), error.get("input")
    kind, _ = _kind(TrainConfig.model_fields[name].annotation)
    context = error.get("ctx") or {}
    if value is None:
        return f"'{name}' must not be empty (null): give it a value or remove the key for its default."
    if error["type"] == "literal_error" and isinstance(value, str):
        choices = _choices(name)
        match = difflib.get_close_matches(str(value), choices, n=1)
        hint = f" (did you mean '{match[0]}'?)" if match else ""
        return f"'{name}' must be one of {', '.join(choices)}; got {shown(value)}{hint}."
    if error["type"] == "greater_than_equal":
        return f"'{name}' must be at least {context['ge']}, got {shown(value)}."
    if error["type"] == "greater_than":
        return f"'{name}' must be positive, got {shown(value)} (it sets the scaling alpha / r)."
    if error["type"] == "less_than":
        return f"'{name}' must be below {context['lt']}, got {shown(value)}."
    if error["type"] == "too_short" and kind == "strlist":
        return f"'{name}' is empty: list at least one module name, e.g. q_proj,v_proj."
    words = _KIND_WORDS["str" if kind == "choice" else kind]
    return f"'{name}' must be {words}, got {shown(value)} ({type(value).__name__})."


def from_dict(values: Mapping[str, Any]) -> TrainConfig:
    """Validate a mapping of keys to values into a `TrainConfig` (raises `ConfigError`)."""
    if not isinstance(values, Mapping):
        raise ConfigError(f"A training config must be a mapping of keys to values, got {type(values).__name__}.")
    unknown = [key for key in values if key not in TrainConfig.model_fields]
    if unknown:
        hint = "run `milora train --list-keys` for the valid keys"
        raise ConfigError("; ".join(f"unknown key {shown(key)}: {_closest(str(key), valid_keys(), hint)}"
                                    for key in unknown))
    try:
        config = TrainConfig.model_validate(dict(values))
    except ValidationError as error:
        raise ConfigError(" ".join(_message(e) for e in error.errors(include_url=False))) from error
    check_consistency(config)
    check_init_options(config)
    _check_trainer_args(config.trainer_args, config.objective)
    return config


# TrainingArguments that milora sets itself: from keys whose meaning differs from the field of the
# same name (max_steps: None, report_to: "none", eval_steps: only with validation data, ...) or fixed
_SET_BY_MILORA = {
    "output_dir", "max_steps", "report_to", "eval_steps", "resume_from_checkpoint", "gradient_checkpointing",
    "activation_checkpointing", "lr_scheduler_type", "per_device_eval_batch_size", "data_seed", "logging_first_step",
    "save_strategy", "eval_strategy", "remove_unused_columns", "use_cpu", "dataloader_pin_memory",
    "ddp_find_unused_parameters",
}


def trainer_keys() -> list[str]:
    """The keys passed to `TrainingArguments` as they are, under their own name."""
    from transformers import TrainingArguments

    trainer_fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    return sorted((set(TrainConfig.model_fields) & trainer_fields) - _SET_BY_MILORA)


def _check_trainer_args(trainer_args: dict[str, Any], objective: str) -> None:
    """Every ``trainer_args`` key is a field of the objective's arguments class (TrainingArguments, or TRL's
    DPOConfig / GRPOConfig) that milora does not set from its own keys."""
    if not trainer_args:
        return
    from milora.training.objectives import TRL_FIELDS, arguments_class

    trainer_fields = [f.name for f in dataclasses.fields(arguments_class(objective)) if f.init]
    for key in trainer_args:
        if key in TRL_FIELDS:
            raise ConfigError(f"trainer_args.{key}: milora sets this from {TRL_FIELDS[key]}; use that key instead.")
        if key in TrainConfig.model_fields or key in _SET_BY_MILORA:
            raise ConfigError(f"trainer_args.{key}: milora sets this from its own keys; use the top-level key instead.")
        if key not in trainer_fields:
            hint = f"see {arguments_class(objective).__name__} for the valid options"
            raise ConfigError(f"unknown key 'trainer_args.{key}': {_closest(key, trainer_fields, hint)}")


# ---------------------------------------------------------------- files and overrides


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """``["key=value", ...]`` to a dict; values are parsed as YAML (``lora_rank=8`` is an int), with the
    checks of a config file (`milora.io.load_yaml`: no alias bombs, no repeated keys)."""
    parsed = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {shown(item)} is not of the form key=value (e.g. max_steps=100).")
        parsed[key.strip()] = load_yaml(raw, f"override {shown(key.strip())}") if raw.strip() else None
    return parsed


def load_config(source: str | os.PathLike | Mapping[str, Any] | TrainConfig,
                overrides: Sequence[str] = ()) -> TrainConfig:
    """A validated `TrainConfig` from a YAML file, a mapping or a config, with ``key=value`` overrides applied."""
    if isinstance(source, TrainConfig):
        values = source.to_dict()
    elif isinstance(source, Mapping):
        values = dict(source)
    else:
        values = read_yaml_mapping(source, "it needs at least 'dataset' and 'output_dir'")
    values.update(parse_overrides(overrides))
    return from_dict(values)


def save_config(config: TrainConfig, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML (atomically); `load_config` reads it back to the same config."""
    import yaml

    atomic_write_text(path, yaml.safe_dump(config.to_dict(), sort_keys=False))
