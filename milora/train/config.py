"""The training configuration: one YAML file (plus ``key=value`` overrides) describes a run.

`load_config` reads and validates everything before anything is written: an unknown key is
an error naming the closest valid key, values are checked for type and range, and a local
dataset file must exist. `TrainConfig` is the validated result; `TrainConfig.to_dict()` is
what `milora train` saves next to its outputs (``train_config.yaml``).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from milora.constants import DTYPE_NAMES, INIT_MODES, PAPER_TARGETS, SOLVERS
from milora.errors import ConfigError
from milora.io import atomic_write_text
from milora.prompts import CHAT_TEMPLATES, TEMPLATE_NAMES

INIT_CHOICES = INIT_MODES
SOLVER_CHOICES = SOLVERS
DTYPE_CHOICES = DTYPE_NAMES
FORMAT_CHOICES = ("auto", "alpaca", "llm-adapters", "metamath", "messages", "sharegpt")
TEMPLATE_CHOICES = TEMPLATE_NAMES
OVERLONG_CHOICES = ("truncate", "drop")
SCHEDULER_CHOICES = (
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup", "inverse_sqrt",
)
REPORT_CHOICES = ("tensorboard", "none")
LOCAL_SUFFIXES = (".json", ".jsonl", ".parquet")


def _key(kind: str, help: str, choices: Sequence[str] | None = None, minimum: float | None = None, **default):
    return field(metadata={"kind": kind, "help": help, "choices": choices, "minimum": minimum}, **default)


@dataclass
class TrainConfig:
    """Every key of a training run. ``None`` means "not set" (see each key's help)."""

    # model and adapter
    model: str | None = _key("str?", "base model: hub id or local directory (default: the embedded SmolLM2-135M-Instruct)", default=None)
    dtype: str = _key("str", "dtype the base model is loaded in", DTYPE_CHOICES, default="float32")
    init: str = _key("str", "adapter initialisation", INIT_CHOICES, default="milora")
    solver: str = _key("str", "decomposition solver of the SVD-based inits", SOLVER_CHOICES, default="auto")
    lora_rank: int = _key("int", "LoRA rank r", minimum=1, default=16)
    lora_alpha: float | None = _key(
        "float?", "LoRA alpha (default: r for milora/pissa/middle/random, 2r for lora, as in the paper)", minimum=0, default=None
    )
    lora_dropout: float = _key("float", "dropout on the LoRA input, in [0, 1)", minimum=0, default=0.05)
    lora_target: list[str] = _key(
        "strlist", "modules to adapt: comma-separated string or list, or 'all-linear'", default_factory=lambda: list(PAPER_TARGETS)
    )
    use_rslora: bool = _key("bool", "rank-stabilised scaling alpha/sqrt(r)", default=False)
    # data
    dataset: str | None = _key("str?", "local .json/.jsonl/.parquet file, local dataset directory, or hub dataset name (required)", default=None)
    dataset_format: str = _key("str", "record format (auto-detected from the first record by default)", FORMAT_CHOICES, default="auto")
    dataset_config: str | None = _key("str?", "hub dataset configuration (subset) name", default=None)
    dataset_split: str = _key("str", "hub dataset split, slices allowed ('train[:100000]'); local files: 'train'", default="train")
    template: str = _key("str", "prompt template for instruction records ('chat' for messages records)", TEMPLATE_CHOICES, default="alpaca")
    chat_template: str | None = _key(
        "str?", "chat template replacing the tokenizer's, for base models without one: 'tulu' or a .jinja file "
        "(evaluate with the same --chat-template)", default=None
    )
    cutoff_len: int = _key("int", "maximum tokens per example (prompt + response + EOS)", minimum=2, default=512)
    overlong: str = _key("str", "examples longer than cutoff_len: truncate them or drop them", OVERLONG_CHOICES, default="truncate")
    max_samples: int | None = _key("int?", "use only the first N records", minimum=1, default=None)
    val_size: float = _key("float", "held-out validation records: a fraction (< 1) or a count (>= 1); 0 = none", minimum=0, default=0.0)
    # optimisation
    learning_rate: float = _key("float", "peak learning rate", minimum=0, default=3e-4)
    lr_scheduler: str = _key("str", "learning-rate schedule after warm-up", SCHEDULER_CHOICES, default="linear")
    warmup_steps: int = _key("int", "linear warm-up steps", minimum=0, default=0)
    num_train_epochs: float = _key("float", "epochs over the training set (ignored when max_steps is set)", minimum=0, default=3.0)
    max_steps: int | None = _key("int?", "total optimizer steps (overrides num_train_epochs)", minimum=1, default=None)
    per_device_train_batch_size: int = _key("int", "examples per device per micro-batch", minimum=1, default=4)
    gradient_accumulation_steps: int = _key("int", "micro-batches per optimizer step", minimum=1, default=1)
    weight_decay: float = _key("float", "AdamW weight decay", minimum=0, default=0.0)
    max_grad_norm: float = _key("float", "gradient clipping norm (0 = off)", minimum=0, default=1.0)
    optim: str = _key("str", "transformers optimizer name (adamw_torch, adamw_torch_fused, adafactor, ...)", default="adamw_torch")
    gradient_checkpointing: bool = _key("bool", "recompute activations to save memory", default=False)
    bf16: bool = _key("bool", "bfloat16 mixed precision", default=False)
    fp16: bool = _key("bool", "float16 mixed precision (GPU only)", default=False)
    seed: int = _key("int", "seed of data order, dropout and the random init", default=42)
    # outputs
    output_dir: str | None = _key("str?", "directory for the adapter, config, metrics, checkpoints and logs (required)", default=None)
    overwrite_output_dir: bool = _key("bool", "allow a non-empty output_dir (its contents are deleted)", default=False)
    logging_steps: int = _key("int", "log loss and learning rate every N steps", minimum=1, default=10)
    save_steps: int = _key("int", "write a checkpoint every N steps", minimum=1, default=500)
    save_total_limit: int | None = _key("int?", "keep at most N checkpoints (default: all)", minimum=1, default=None)
    eval_steps: int | None = _key("int?", "validation loss every N steps (needs val_size; default: logging_steps)", minimum=1, default=None)
    report_to: str = _key("str", "where losses are logged besides the metrics file", REPORT_CHOICES, default="tensorboard")
    resume_from_checkpoint: str | bool | None = _key(
        "resume", "checkpoint directory to resume from, or true for the latest in output_dir", default=None
    )
    deepspeed: str | None = _key("str?", "DeepSpeed JSON config (for torchrun; with accelerate, use its config file)", default=None)
    dataloader_num_workers: int = _key("int", "data-loading worker processes", minimum=0, default=0)

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML-serialisable values, every key present."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def resolved_alpha(self) -> float:
        """lora_alpha, or the paper's default: r for the SVD-based inits, 2r for plain LoRA."""
        if self.lora_alpha is not None:
            return self.lora_alpha
        return float(2 * self.lora_rank if self.init == "lora" else self.lora_rank)

    def is_local_dataset(self) -> bool:
        """True for a local file or directory; otherwise ``dataset`` names a hub dataset."""
        return is_local_path(self.dataset)


def valid_keys() -> list[str]:
    return [f.name for f in dataclasses.fields(TrainConfig)]


def key_help() -> list[tuple[str, str, Any, str]]:
    """(key, kind, default, help) for every key: the table in the README."""
    rows = []
    for f in dataclasses.fields(TrainConfig):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        help_text = f.metadata["help"] + (f" (one of: {', '.join(f.metadata['choices'])})" if f.metadata["choices"] else "")
        rows.append((f.name, f.metadata["kind"], default, help_text))
    return rows


def is_local_path(dataset: str | None) -> bool:
    return dataset is not None and (dataset.lower().endswith(LOCAL_SUFFIXES) or os.path.exists(dataset))


def _closest(key: str) -> str:
    match = difflib.get_close_matches(key, valid_keys(), n=1, cutoff=0.5)
    return f"did you mean '{match[0]}'?" if match else "run `milora train --list-keys` for the valid keys"


def _coerce(name: str, value: Any, kind: str) -> Any:
    """Check ``value`` against ``kind``; YAML-1.1 strings such as '3e-4' are accepted as floats."""
    optional = kind.endswith("?")
    base = kind.rstrip("?")
    if value is None:
        if optional or base == "resume":
            return None
        raise ConfigError(f"'{name}' must not be empty (null): give it a {base} value or remove the key for its default.")
    wrong = ConfigError(f"'{name}' must be {_kind_words(base)}, got {value!r} ({type(value).__name__}).")
    if base == "str":
        if not isinstance(value, str) or not value.strip():
            raise wrong
        return value.strip()
    if base == "bool":
        if not isinstance(value, bool):
            raise wrong
        return value
    if base == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise wrong
        return value
    if base == "float":
        if isinstance(value, bool):
            raise wrong
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise wrong from None
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise wrong
        return float(value)
    if base == "strlist":
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
            raise wrong
        items = [item.strip() for item in items if item.strip()]
        if not items:
            raise ConfigError(f"'{name}' is empty: list at least one module name, e.g. q_proj,v_proj.")
        return items
    if base == "resume":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip():
            return value.strip()
        raise wrong
    raise AssertionError(f"unknown kind {kind}")


def _kind_words(kind: str) -> str:
    return {
        "str": "a non-empty string",
        "bool": "true or false",
        "int": "an integer",
        "float": "a number",
        "strlist": "a comma-separated string or a list of strings",
        "resume": "a checkpoint path or true",
    }[kind]


def from_dict(values: Mapping[str, Any]) -> TrainConfig:
    """Validate a mapping of keys to values into a `TrainConfig` (raises `ConfigError`)."""
    if not isinstance(values, Mapping):
        raise ConfigError(f"A training config must be a mapping of keys to values, got {type(values).__name__}.")
    unknown = [key for key in values if key not in valid_keys()]
    if unknown:
        raise ConfigError("; ".join(f"unknown key '{key}': {_closest(str(key))}" for key in unknown))
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    checked = {}
    for key, value in values.items():
        meta = fields[key].metadata
        value = _coerce(key, value, meta["kind"])
        if value is not None and meta["choices"] and value not in meta["choices"]:
            match = difflib.get_close_matches(value, meta["choices"], n=1)
            hint = f" (did you mean '{match[0]}'?)" if match else ""
            raise ConfigError(f"'{key}' must be one of {', '.join(meta['choices'])}; got {value!r}{hint}.")
        if value is not None and meta["minimum"] is not None and value < meta["minimum"]:
            raise ConfigError(f"'{key}' must be at least {meta['minimum']}, got {value}.")
        checked[key] = value
    config = TrainConfig(**checked)
    _check_consistency(config)
    return config


def _check_consistency(config: TrainConfig) -> None:
    if config.dataset is None:
        raise ConfigError("'dataset' is required: a local .json/.jsonl/.parquet file or a hub dataset name.")
    if config.output_dir is None:
        raise ConfigError("'output_dir' is required: the directory that receives the adapter, config and metrics.")
    if config.lora_alpha is not None and config.lora_alpha <= 0:
        raise ConfigError(f"'lora_alpha' must be positive, got {config.lora_alpha} (it sets the scaling alpha / r).")
    if config.lora_dropout >= 1:
        raise ConfigError(f"'lora_dropout' must be below 1, got {config.lora_dropout}.")
    if config.bf16 and config.fp16:
        raise ConfigError("'bf16' and 'fp16' are both true: choose one mixed-precision mode.")
    if config.max_steps is None and config.num_train_epochs <= 0:
        raise ConfigError("'num_train_epochs' must be positive when 'max_steps' is not set.")
    if config.val_size >= 1 and not float(config.val_size).is_integer():
        raise ConfigError(f"'val_size' must be a fraction below 1 or a whole count, got {config.val_size}.")
    if config.eval_steps is not None and config.val_size == 0:
        raise ConfigError("'eval_steps' is set but 'val_size' is 0: set val_size to hold out validation records.")
    if config.is_local_dataset():
        path = Path(config.dataset)
        if not path.exists():
            raise ConfigError(f"dataset file not found: {path} (give an existing .json/.jsonl/.parquet file or a hub dataset name).")
        if path.is_file() and config.dataset_split != "train":
            raise ConfigError(
                f"'dataset_split' is {config.dataset_split!r} but {path} is a single local file: remove dataset_split "
                "(use max_samples to take the first N records)."
            )
    if config.chat_template is not None and config.chat_template not in CHAT_TEMPLATES and not Path(config.chat_template).is_file():
        raise ConfigError(f"'chat_template' must be one of {', '.join(CHAT_TEMPLATES)} or an existing .jinja file, "
                          f"got {config.chat_template!r}.")
    if config.deepspeed is not None and not Path(config.deepspeed).is_file():
        raise ConfigError(f"DeepSpeed config file not found: {config.deepspeed}.")
    if isinstance(config.resume_from_checkpoint, str) and not Path(config.resume_from_checkpoint).is_dir():
        raise ConfigError(f"'resume_from_checkpoint' directory not found: {config.resume_from_checkpoint}.")


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """``["key=value", ...]`` to a dict; values are parsed as YAML (``lora_rank=8`` is an int)."""
    parsed = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. max_steps=100).")
        try:
            parsed[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as error:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({error}).") from None
    return parsed


def load_config(source: str | os.PathLike | Mapping[str, Any] | TrainConfig, overrides: Sequence[str] = ()) -> TrainConfig:
    """A validated `TrainConfig` from a YAML file, a mapping or a config, with ``key=value`` overrides applied."""
    if isinstance(source, TrainConfig):
        values = source.to_dict()
    elif isinstance(source, Mapping):
        values = dict(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}.")
        try:
            values = yaml.safe_load(path.read_text())
        except yaml.YAMLError as error:
            raise ConfigError(f"{path} is not valid YAML: {error}") from None
        if values is None:
            raise ConfigError(f"{path} is empty: it needs at least 'dataset' and 'output_dir'.")
        if not isinstance(values, dict):
            raise ConfigError(f"{path} must hold a mapping of keys to values, not a {type(values).__name__}.")
    values.update(parse_overrides(overrides))
    return from_dict(values)


def save_config(config: TrainConfig, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML (atomically); `load_config` reads it back to the same config."""
    atomic_write_text(path, yaml.safe_dump(config.to_dict(), sort_keys=False))
