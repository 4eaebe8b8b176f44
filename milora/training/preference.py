"""DPO on a MiLoRA start, through TRL's `DPOTrainer` (``objective: dpo``).

milora builds the model (its start) and hands TRL a `PeftModel`; TRL then adds a frozen "ref"
adapter copied from the start, so the reference is the ORIGINAL model W_res + s B0 A0 = W, not
the residual base W_res that disabled adapters would give. `MiloraDPOTrainer` refuses to run
without that adapter and checks, on the first batch, the reference's sequence log-probabilities
against the policy's (at step 0 the policy is the original model): `milora.training.reference`.

Checkpoints and the final adapter are milora adapters (rank 2r, valid on the original base)
through `MiloraTrainer` (the "ref" adapter is never saved); TRL's model card is not written.

Preference records: ``prompt`` / ``chosen`` / ``rejected`` as text (the prompt is rendered with
the run's ``template``) or as chat messages (prompt a list of messages, chosen/rejected lists of
assistant messages; rendered by the tokenizer's chat template inside TRL).
"""

from __future__ import annotations

from typing import Any

import torch
from trl import DPOTrainer

from milora.errors import ConfigError, DataError
from milora.prompts import render_prompt
from milora.training.data import split_validation
from milora.training.reference import check_reference, require_reference_adapter
from milora.training.trainer import MiloraTrainer, check_private_method

PREFERENCE_FIELDS = ("prompt", "chosen", "rejected")


def _text(value: Any) -> str:
    """The text of a field: a string, or the concatenated contents of a list of messages."""
    if isinstance(value, str):
        return value
    return "".join(str(message.get("content", "")) for message in value)


def check_preference_record(record: Any, index: int) -> dict[str, Any]:
    """The record's prompt/chosen/rejected (all strings, or all message lists); `DataError` naming it otherwise."""
    if not isinstance(record, dict):
        raise DataError(f"preference record {index}: expected a mapping with {', '.join(PREFERENCE_FIELDS)}, "
                        f"got {type(record).__name__}.")
    missing = [field for field in PREFERENCE_FIELDS if field not in record or record[field] is None]
    if missing:
        raise DataError(f"preference record {index}: missing field(s) {', '.join(missing)} "
                        f"(every record needs {', '.join(PREFERENCE_FIELDS)}).")
    values = {field: record[field] for field in PREFERENCE_FIELDS}
    kinds = {type(value).__name__ for value in values.values()}
    if kinds not in ({"str"}, {"list"}):
        raise DataError(f"preference record {index}: prompt, chosen and rejected must all be text or all be lists "
                        f"of chat messages, got {', '.join(sorted(kinds))}.")
    if kinds == {"list"}:
        for field, messages in values.items():
            if not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
                raise DataError(f"preference record {index}: '{field}' must be a list of {{role, content}} messages.")
    if not _text(values["prompt"]).strip():
        raise DataError(f"preference record {index}: the prompt is empty.")
    for field in ("chosen", "rejected"):
        if not _text(values[field]).strip():
            raise DataError(f"preference record {index}: '{field}' is empty.")
    if values["chosen"] == values["rejected"]:
        raise DataError(f"preference record {index}: chosen equals rejected (a pair needs two different responses).")
    return values


def _conversational(pair: dict[str, Any]) -> bool:
    return isinstance(pair["prompt"], list)


def _rendered(pair: dict[str, Any], template: str, tokenizer) -> dict[str, Any]:
    """Text prompts through milora's template (as supervised data); messages are rendered by TRL."""
    if _conversational(pair):
        return pair
    return {**pair, "prompt": render_prompt(template, pair["prompt"], "", tokenizer)}


def _lengths(pair: dict[str, Any], tokenizer) -> tuple[int, int]:
    """(prompt tokens, longest prompt+response tokens, EOS included)."""
    if _conversational(pair):
        prompt = tokenizer.apply_chat_template(pair["prompt"], tokenize=False, add_generation_prompt=True)
        full = [tokenizer.apply_chat_template(pair["prompt"] + pair[f], tokenize=False) for f in ("chosen", "rejected")]
    else:
        prompt, full = pair["prompt"], [pair["prompt"] + pair[f] for f in ("chosen", "rejected")]
    encode = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return len(encode), max(len(tokenizer(text, add_special_tokens=False)["input_ids"]) + 1 for text in full)


def build_preference_datasets(config, records: list, tokenizer, progress: bool = True):
    """(train, validation or None, stats) as `datasets.Dataset` of prompt/chosen/rejected for TRL.

    Every record is checked first (`check_preference_record`); a prompt that alone reaches
    ``cutoff_len`` is an error naming the record; a longer pair is truncated by TRL (keep_start,
    ``max_length = cutoff_len``) or dropped (``overlong: drop``), and counted.
    """
    from datasets import Dataset

    if not records or not isinstance(records[0], dict) or not any(f in records[0] for f in PREFERENCE_FIELDS[1:]):
        raise ConfigError(f"objective: dpo needs preference data (records with {', '.join(PREFERENCE_FIELDS)}), but "
                          f"the first record of {config.dataset} does not: give a "
                          "preference dataset, or use objective: sft for supervised data.")
    pairs = [_rendered(check_preference_record(record, i), config.template, tokenizer)
             for i, record in enumerate(records)]
    stats = {"records": len(pairs), "pairs": 0, "truncated": 0, "dropped_overlong": 0}
    kept = []
    for index, pair in enumerate(pairs):
        prompt_len, full_len = _lengths(pair, tokenizer)
        if prompt_len >= config.cutoff_len:
            raise DataError(f"preference record {index}: its prompt has {prompt_len} tokens, at least "
                            f"cutoff_len={config.cutoff_len}: raise cutoff_len or shorten the prompt.")
        if full_len > config.cutoff_len:
            if config.overlong == "drop":
                stats["dropped_overlong"] += 1
                continue
            stats["truncated"] += 1
        kept.append(pair)
    if not kept:
        raise DataError(f"no preference pairs left: all {len(pairs)} are longer than cutoff_len={config.cutoff_len}.")
    train, val = split_validation(kept, config.val_size, config.seed)
    stats["pairs"] = len(train)
    if progress:
        print(f"milora: data: {len(train)} preference pairs from {len(pairs)} records; {stats['truncated']} truncated "
              f"to cutoff_len={config.cutoff_len}, {stats['dropped_overlong']} dropped as longer", flush=True)
    return Dataset.from_list(train), (Dataset.from_list(val) if val else None), stats


def dpo_arguments(config) -> dict[str, Any]:
    """The DPOConfig fields milora sets from its keys (the rest via ``trainer_args``)."""
    values = {"max_length": config.cutoff_len, "remove_unused_columns": True}
    if config.dpo_beta is not None:
        values["beta"] = config.dpo_beta
    if config.dpo_loss_type is not None:
        values["loss_type"] = [config.dpo_loss_type]
    if config.precompute_ref_log_probs is not None:
        values["precompute_ref_log_probs"] = config.precompute_ref_log_probs
    return values


class MiloraDPOTrainer(MiloraTrainer, DPOTrainer):
    """TRL's `DPOTrainer` with milora's saving and resuming (`MiloraTrainer`) and the reference check."""

    def __init__(self, *args, **kwargs):
        check_private_method(DPOTrainer, "_compute_loss", ("self", "model", "inputs", "return_outputs"),
                             "trl>=1.16,<1.17")
        super().__init__(*args, **kwargs)
        require_reference_adapter(self, "DPO")
        self._reference_checked = False

    def create_model_card(self, *args, **kwargs) -> None:
        """No README.md model card in milora's checkpoints and outputs."""

    def _compute_loss(self, model, inputs, return_outputs):
        if not self._reference_checked:
            if self.state.global_step == 0 and self.ld_alpha is None:  # resumed runs were checked at their step 0
                self._check_reference(model, inputs)
            self._reference_checked = True
        return super()._compute_loss(model, inputs, return_outputs)

    @torch.no_grad()
    def _check_reference(self, model, inputs) -> None:
        """On the first batch, before any update: the sequence log-probs of TRL's reference (precomputed, or
        by its `compute_ref_log_probs`: ``ref_model``, else the "ref" adapter, else disabled adapters) equal
        the start's, i.e. the original model's (W_res + s B0 A0 = W). Both in eval mode (no dropout)."""
        keys = {"completion_mask", "ref_chosen_logps", "ref_rejected_logps"}
        labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
        was_training = model.training
        model.eval()
        try:
            if self.precompute_ref_logps:
                ref_logps = torch.cat([inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]])
            else:
                ref_logps = torch.cat(self.compute_ref_log_probs(model, inputs))
            kwargs = {k: v for k, v in inputs.items() if k not in keys}
            per_token = model(**kwargs, labels=labels, use_cache=False, fused_lm_head=True).log_probs
        finally:
            model.train(was_training)
        mask = inputs["completion_mask"][..., 1:]
        check_reference(ref_logps, per_token[:, -mask.size(1):].sum(dim=1), "DPO")
