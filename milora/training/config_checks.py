"""The checks across keys of a `TrainConfig` that a single key's declaration cannot make.

`check_consistency` (keys that contradict each other, files that must exist) and
`check_init_options` (keys the chosen init ignores) run in `config.from_dict` after pydantic's
per-key validation (they take the `TrainConfig`; typed `BaseModel` here so that this module
need not import config.py, which imports it); `method_only_keys` also tells a sweep which keys to drop for a method.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from pydantic import BaseModel

from milora.constants import DATA_INITS, PEFT_STARTS
from milora.errors import ConfigError
from milora.prompts import CHAT_TEMPLATES


def method_only_keys(init: str) -> tuple[str, ...]:
    """Keys only some inits read that ``init`` ignores (a sweep drops them from the runs of such a method)."""
    return (*(["calibration_batches"] if init not in DATA_INITS else []),
            *(["pissa_niter"] if init != "pissa-fast" else []))


def check_init_options(config: BaseModel) -> None:
    """Keys the chosen init ignores, set to another value than their default: an error naming them."""
    if config.init == "loftq":
        from milora.init.loftq import loftq_problem

        if problem := loftq_problem(config.quantization):
            raise ConfigError(problem)
    defaults = {key: type(config).model_fields[key].default for key in
                ("solver", "null_space", "quantization", "calibration_batches", "pissa_niter")}
    if config.init in DATA_INITS and config.objective != "sft":
        raise ConfigError(f"init={config.init!r} calibrates on supervised training batches; objective "
                          f"{config.objective!r} has none: use an SVD start (milora, pissa) or PEFT's data-free "
                          "starts (dora, olora, pissa-fast, mica) with it.")
    ignored = []
    if config.init in PEFT_STARTS:
        keys = ("solver", "null_space") if config.init == "loftq" else ("solver", "null_space", "quantization")
        ignored += [key for key in keys if getattr(config, key) != defaults[key]]
    ignored += [key for key in method_only_keys(config.init) if getattr(config, key) != defaults[key]]
    if ignored:
        raise ConfigError(f"init={config.init!r} ignores {', '.join(repr(key) for key in ignored)}: remove "
                          f"{'it' if len(ignored) == 1 else 'them'} (calibration_batches is for the data starts "
                          f"{', '.join(DATA_INITS)}; pissa_niter for pissa-fast; solver and null_space for the SVD "
                          "starts; quantization is not available with PEFT's starts but loftq).")


_OBJECTIVE_KEYS = {
    "dpo": ("dpo_beta", "dpo_loss_type", "precompute_ref_log_probs"),
    "grpo": ("grpo_rewards", "grpo_beta", "grpo_num_generations", "grpo_max_completion_length"),
}


def check_consistency(config: BaseModel) -> None:
    for objective, keys in _OBJECTIVE_KEYS.items():
        given = [key for key in keys if getattr(config, key) is not None]
        if given and config.objective != objective:
            raise ConfigError(f"key(s) {', '.join(given)} belong to objective: {objective}, but objective is "
                              f"{config.objective!r}: remove them or set objective: {objective}.")
    if config.objective != "sft":
        from milora.training.objectives import check_objective

        check_objective(config)
    if config.dataset is None:
        raise ConfigError("'dataset' is required: a local .json/.jsonl/.parquet file or a hub dataset name.")
    if config.output_dir is None:
        raise ConfigError("'output_dir' is required: the directory that receives the adapter, config and metrics.")
    if config.bf16 and config.fp16:
        raise ConfigError("'bf16' and 'fp16' are both true: choose one mixed-precision mode.")
    if config.max_steps is None and config.num_train_epochs <= 0:
        raise ConfigError("'num_train_epochs' must be positive when 'max_steps' is not set.")
    if config.val_size >= 1 and not float(config.val_size).is_integer():
        raise ConfigError(f"'val_size' must be a fraction below 1 or a whole count, got {config.val_size}.")
    if config.eval_steps is not None and config.val_size == 0:
        raise ConfigError("'eval_steps' is set but 'val_size' is 0: set val_size to hold out validation records.")
    if config.learning_rate == 0:
        warnings.warn("learning_rate is 0: the adapter will not change from its initialisation.", stacklevel=3)
    if config.is_local_dataset():
        path = Path(config.dataset)
        if not path.exists():
            raise ConfigError(f"dataset file not found: {path} "
                              "(give an existing .json/.jsonl/.parquet file or a hub dataset name).")
        if path.is_file() and config.dataset_split != "train":
            raise ConfigError(
                f"'dataset_split' is {config.dataset_split!r} but {path} is a single local file: remove dataset_split "
                "(use max_samples to take the first N records)."
            )
    if config.image_folder is not None and not Path(config.image_folder).is_dir():
        raise ConfigError(f"'image_folder' {config.image_folder} is not a directory: "
                          "give the folder holding the images.")
    if config.chat_template is not None and config.chat_template not in CHAT_TEMPLATES and not Path(
            config.chat_template).is_file():
        raise ConfigError(f"'chat_template' must be one of {', '.join(CHAT_TEMPLATES)} or an existing .jinja file, "
                          f"got {config.chat_template!r}.")
    if config.deepspeed is not None and not Path(config.deepspeed).is_file():
        raise ConfigError(f"DeepSpeed config file not found: {config.deepspeed}.")
    if isinstance(config.resume_from_checkpoint, str) and not Path(config.resume_from_checkpoint).is_dir():
        raise ConfigError(f"'resume_from_checkpoint' directory not found: {config.resume_from_checkpoint}.")
