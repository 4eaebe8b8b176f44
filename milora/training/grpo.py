"""GRPO on a MiLoRA start, through TRL's `GRPOTrainer` (``objective: grpo``).

milora builds the model (its start) and hands TRL a `PeftModel` with the reward functions named
in ``grpo_rewards`` (`milora.training.rewards`). TRL samples ``grpo_num_generations``
completions per prompt (up to ``grpo_max_completion_length`` tokens, with the model's own
``generate``; vLLM is reachable through ``trainer_args``), scores them, and takes a clipped
policy-gradient step on the group-normalised advantages, plus ``grpo_beta`` times a KL term to
the reference. With ``grpo_beta > 0`` the reference must be the original model: TRL adds a frozen
"ref" adapter copied from the start, and `MiloraGRPOTrainer` refuses to run without it and
checks it on the first batch (`milora.training.reference`). With ``grpo_beta = 0`` (TRL's
default) there is no reference.

Checkpoints and the final adapter are milora adapters (rank 2r, valid on the original base,
through `MiloraTrainer`; the "ref" adapter is never saved; no model card).

Prompt records: ``prompt`` as text (rendered with the run's ``template``) or as chat messages
(rendered by the tokenizer's chat template inside TRL); every other field of a record reaches
the reward functions as a keyword argument (``answer`` for the ``math`` reward).
"""

from __future__ import annotations

from typing import Any

import torch
from trl import GRPOTrainer
from trl.trainer.utils import use_adapter

from milora.errors import ConfigError, DataError
from milora.prompts import render_prompt
from milora.training.data import split_validation
from milora.training.reference import REF_ADAPTER, check_reference, require_reference_adapter
from milora.training.rewards import REQUIRED_FIELDS, completion_text, resolve_reward
from milora.training.trainer import MiloraTrainer, check_private_method


def check_prompt_record(record: Any, index: int, required: tuple[str, ...]) -> dict[str, Any]:
    """The record, checked: a non-empty ``prompt`` (text or {role, content} messages) and the
    ``required`` fields the rewards read; `DataError` naming the record otherwise."""
    if not isinstance(record, dict):
        raise DataError(f"prompt record {index}: expected a mapping with a 'prompt', got {type(record).__name__}.")
    missing = [field for field in ("prompt", *required) if record.get(field) is None]
    if missing:
        raise DataError(f"prompt record {index}: missing field(s) {', '.join(missing)} (objective: grpo needs a "
                        f"prompt, and the rewards in grpo_rewards read {', '.join(required) or 'nothing else'}).")
    prompt = record["prompt"]
    if isinstance(prompt, list):
        if not all(isinstance(m, dict) and "role" in m and "content" in m for m in prompt):
            raise DataError(f"prompt record {index}: 'prompt' must be text or a list of {{role, content}} messages.")
    elif not isinstance(prompt, str):
        raise DataError(f"prompt record {index}: 'prompt' must be text or a list of messages, "
                        f"got {type(prompt).__name__}.")
    if not completion_text(prompt).strip():
        raise DataError(f"prompt record {index}: the prompt is empty.")
    return record


def _prompt_tokens(record: dict[str, Any], tokenizer) -> int:
    prompt = record["prompt"]
    if isinstance(prompt, list):
        prompt = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    return len(tokenizer(prompt, add_special_tokens=False)["input_ids"])


def build_prompt_datasets(config, records: list, tokenizer, progress: bool = True):
    """(train, validation or None, stats) as `datasets.Dataset` of prompts (and reward fields) for TRL.

    Every record is checked first (`check_prompt_record`); a prompt that alone reaches
    ``cutoff_len`` tokens is an error naming the record (TRL does not truncate GRPO prompts).
    """
    from datasets import Dataset

    if not records or not isinstance(records[0], dict) or "prompt" not in records[0]:
        raise ConfigError(f"objective: grpo needs prompt records (a 'prompt' field, and the fields the rewards read), "
                          f"but the first record of {config.dataset} has none: give a prompt dataset.")
    required = tuple(dict.fromkeys(field for name in config.grpo_rewards for field in REQUIRED_FIELDS.get(name, ())))
    kept = []
    for index, record in enumerate(records):
        record = check_prompt_record(record, index, required)
        if isinstance(record["prompt"], str):
            record = {**record, "prompt": render_prompt(config.template, record["prompt"], "", tokenizer)}
        length = _prompt_tokens(record, tokenizer)
        if length >= config.cutoff_len:
            raise DataError(f"prompt record {index}: its prompt has {length} tokens, at least "
                            f"cutoff_len={config.cutoff_len}: raise cutoff_len or shorten the prompt.")
        kept.append(record)
    train, val = split_validation(kept, config.val_size, config.seed)
    if progress:
        print(f"milora: data: {len(train)} prompts from {len(records)} records", flush=True)
    stats = {"records": len(records), "prompts": len(train)}
    return Dataset.from_list(train), (Dataset.from_list(val) if val else None), stats


def grpo_arguments(config) -> dict[str, Any]:
    """The GRPOConfig fields milora sets from its keys (the rest via ``trainer_args``)."""
    values: dict[str, Any] = {"remove_unused_columns": False}  # the reward functions read the records' fields
    for key, field in (("grpo_beta", "beta"), ("grpo_num_generations", "num_generations"),
                       ("grpo_max_completion_length", "max_completion_length")):
        if getattr(config, key) is not None:
            values[field] = getattr(config, key)
    return values


def reward_functions(config) -> list:
    """The callables ``grpo_rewards`` names, resolved (and imported) before anything is written."""
    return [resolve_reward(name) for name in config.grpo_rewards]


class MiloraGRPOTrainer(MiloraTrainer, GRPOTrainer):
    """TRL's `GRPOTrainer` with milora's saving and resuming (`MiloraTrainer`) and the reference check.

    Overrides TRL's private ``_generate_and_score_completions(self, inputs)`` (TRL 1.16, pinned in
    pyproject.toml); a changed signature fails at construction.
    """

    def __init__(self, *args, **kwargs):
        check_private_method(GRPOTrainer, "_generate_and_score_completions", ("self", "inputs"), "trl>=1.16,<1.17")
        super().__init__(*args, **kwargs)
        if self.beta != 0.0:
            require_reference_adapter(self, "GRPO")
        self._reference_checked = self.beta == 0.0

    def create_model_card(self, *args, **kwargs) -> None:
        """No README.md model card in milora's checkpoints and outputs."""

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        if not self._reference_checked:
            if self.state.global_step == 0:  # resumed runs were checked at their step 0
                self._check_reference(output)
            self._reference_checked = True
        return output

    @torch.no_grad()
    def _check_reference(self, output: dict[str, Any]) -> None:
        """On the first generated batch, before any update: the log-probabilities of its completions under
        the reference TRL uses (``ref_model``, else the "ref" adapter, else disabled adapters) equal the
        start's. Both in eval mode (no dropout), so the two are deterministic."""
        ids = torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1)
        mask = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1)
        keep = output["completion_ids"].size(1)
        peft_model = self.accelerator.unwrap_model(self.model)
        was_training = peft_model.training
        peft_model.eval()
        try:
            policy = self._get_per_token_logps_and_entropies(self.model, ids, mask, keep)[0]
            if self.ref_model is not None:
                ref = self._get_per_token_logps_and_entropies(self.ref_model, ids, mask, keep)[0]
            else:
                adapter = REF_ADAPTER if REF_ADAPTER in peft_model.peft_config else None
                with use_adapter(peft_model, adapter_name=adapter):
                    ref = self._get_per_token_logps_and_entropies(self.model, ids, mask, keep)[0]
        finally:
            peft_model.train(was_training)
        completion = output["completion_mask"].bool()
        check_reference(ref[completion], policy[completion], "GRPO")
