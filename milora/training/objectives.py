"""What each ``objective`` changes in a run: its TRL arguments class, its data, its trainer.

- ``sft``: transformers' `TrainingArguments` and `MiloraTrainer` on supervised examples (`milora.training.data`);
- ``dpo``: TRL's `DPOConfig` / `DPOTrainer` on preference pairs (`milora.training.preference`);
- ``grpo``: TRL's `GRPOConfig` / `GRPOTrainer` on prompts, with reward functions (`milora.training.grpo`).

TRL is imported only for the objective that needs it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from milora.errors import ConfigError

TRL_DEFAULT_NUM_GENERATIONS = 8
# TRL fields milora sets from its objective keys (refused in trainer_args) -> the key to use
TRL_FIELDS = {"beta": "dpo_beta or grpo_beta", "loss_type": "dpo_loss_type", "max_length": "cutoff_len",
              "precompute_ref_log_probs": "precompute_ref_log_probs", "num_generations": "grpo_num_generations",
              "max_completion_length": "grpo_max_completion_length"}


@dataclass
class Objective:
    """The arguments class and trainer class of one objective, and what milora sets in each.

    ``arguments`` are fields of ``arguments_class`` (they override milora's generic values);
    ``trainer_kwargs`` are extra keyword arguments of ``trainer_class``.
    """

    arguments_class: type
    trainer_class: type
    arguments: dict[str, Any] = field(default_factory=dict)
    trainer_kwargs: dict[str, Any] = field(default_factory=dict)


def check_objective(config) -> None:
    """The DPO/GRPO settings that TRL would refuse later, refused while the config is validated."""
    if config.objective != "grpo":
        return
    if not config.grpo_rewards:
        raise ConfigError("objective: grpo needs grpo_rewards: built-in math or format, or module:function.")
    generations = config.grpo_num_generations or TRL_DEFAULT_NUM_GENERATIONS
    batch = config.per_device_train_batch_size * config.gradient_accumulation_steps
    if batch % generations:
        raise ConfigError(f"objective: grpo samples grpo_num_generations={generations} completions per prompt, which "
                          f"must divide per_device_train_batch_size x gradient_accumulation_steps = {batch}: change "
                          "one of them.")


def arguments_class(objective: str) -> type:
    """The dataclass of Trainer options the objective's trainer takes (``trainer_args`` is checked against it)."""
    if objective == "dpo":
        from trl import DPOConfig

        return DPOConfig
    if objective == "grpo":
        from trl import GRPOConfig

        return GRPOConfig
    from transformers import TrainingArguments

    return TrainingArguments


def build_objective_data(config, records: list, tokenizer, progress: bool):
    """(train, validation or None, stats) of the DPO or GRPO objective from the loaded records."""
    if config.objective == "dpo":
        from milora.training.preference import build_preference_datasets

        return build_preference_datasets(config, records, tokenizer, progress)
    from milora.training.grpo import build_prompt_datasets

    return build_prompt_datasets(config, records, tokenizer, progress)


def objective_for(config, preprocessor) -> Objective:
    """The `Objective` of a run; resolves (imports) GRPO's reward functions, so call it before writing."""
    from milora.training.trainer import MiloraTrainer

    if config.objective == "dpo":
        from milora.training.preference import MiloraDPOTrainer, dpo_arguments

        return Objective(arguments_class("dpo"), MiloraDPOTrainer, dpo_arguments(config),
                         {"processing_class": preprocessor})
    if config.objective == "grpo":
        from milora.training.grpo import MiloraGRPOTrainer, grpo_arguments, reward_functions

        return Objective(arguments_class("grpo"), MiloraGRPOTrainer, grpo_arguments(config),
                         {"processing_class": preprocessor, "reward_funcs": reward_functions(config)})
    return Objective(arguments_class("sft"), MiloraTrainer, {"remove_unused_columns": False})
