"""Training data: loading, record formats and tokenisation with prompt masking.

Record formats (``dataset_format``, detected from the first record when ``auto``):

- ``alpaca`` / ``llm-adapters``: ``instruction``, optional ``input``, ``output`` (LLM-Adapters'
  Commonsense170K and math files add ``answer``, which is ignored);
- ``metamath``: ``query``, ``response`` (MetaMathQA);
- ``messages``: ``messages``, a list of ``{"role", "content"}`` turns (OpenAI / Tulu shape,
  e.g. ``allenai/tulu-3-sft-mixture``), rendered with the tokenizer's chat template
  (``template: chat``); every assistant turn is trained on, however many turns there are;
- ``sharegpt``: ``conversations``, a list of ``{"from", "value"}`` turns (ShareGPT / Vicuna shape;
  ``from`` is human/user, gpt/assistant/chatgpt/bing/bard or system), turned into ``messages``;
- ``llava``: LLaVA's visual instruction records (``conversations`` with an ``image``) and ``messages``
  with image entries: `milora.training.vision_data`, for image-text-to-text models.

Prompt templates (``template``) for instruction records: `milora.prompts`. An example is
``prompt + response + EOS``; its ``labels`` are -100 on the prompt and on padding, so the loss
covers the response and EOS only. Examples longer than ``cutoff_len`` are truncated (keeping
the start, losing EOS) or dropped, per ``overlong``; an example whose prompt alone fills
``cutoff_len`` has no response left and is always dropped. Both are counted in `DataStats`.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from milora.errors import DataError
from milora.io import read_records
from milora.prompts import apply_chat_template, join_input, render_prompt

IGNORE_INDEX = -100


@dataclass
class DataStats:
    """What happened to the records: how many became examples, were truncated or dropped."""

    records: int = 0
    examples: int = 0
    truncated: int = 0
    dropped_overlong: int = 0
    dropped_prompt_too_long: int = 0
    tokens: int = 0
    label_tokens: int = 0
    max_length: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    def describe(self, cutoff_len: int) -> str:
        return (
            f"{self.examples} examples from {self.records} records; "
            f"{self.truncated} truncated to cutoff_len={cutoff_len}, "
            f"{self.dropped_overlong} dropped as longer than cutoff_len, "
            f"{self.dropped_prompt_too_long} dropped because the prompt alone fills cutoff_len; "
            f"{self.label_tokens}/{self.tokens} tokens carry loss"
        )


# ---------------------------------------------------------------- loading


def load_records(dataset: str, split: str = "train", config_name: str | None = None) -> list[dict[str, Any]]:
    """All records of a local .json/.jsonl/.parquet file, a local dataset directory or a hub dataset."""
    path = Path(dataset)
    if path.is_file():
        records = read_records(path)
    else:
        records = _load_with_datasets(dataset, split, config_name, local=path.is_dir())
    if not records:
        raise DataError(f"dataset {dataset} has no records: give a file with at least one example.")
    return records


def _load_with_datasets(dataset: str, split: str, config_name: str | None, local: bool) -> list:
    import datasets

    try:
        loaded = datasets.load_dataset(dataset, name=config_name, split=split)
    except Exception as error:  # datasets raises many types (network, missing split, bad config)
        where = "local dataset directory" if local else "Hugging Face hub dataset"
        hint = ("" if local
                else " If this machine is offline, download the data and give the local .json/.jsonl/.parquet path.")
        raise DataError(f"could not load {where} {dataset!r} (split {split!r}): "
                        f"{str(error).rstrip('.')}.{hint}") from error
    return loaded.to_list()


# ---------------------------------------------------------------- formats


def detect_format(record: dict[str, Any]) -> str:
    """The format of one record from its keys (see the module docstring)."""
    if "messages" in record:
        return "messages"
    if "conversations" in record:
        return "llava" if "image" in record else "sharegpt"
    if "query" in record and "response" in record:
        return "metamath"
    if "instruction" in record and "output" in record:
        return "alpaca"
    raise DataError(
        f"cannot tell the format of a record with keys {sorted(record)}: expected 'instruction'/'input'/'output' "
        "(Alpaca, LLM-Adapters), 'query'/'response' (MetaMathQA), 'messages' (chat) or 'conversations' (LLaVA)."
    )


def normalise_record(record: dict[str, Any], fmt: str, index: int) -> dict[str, Any]:
    """``{"instruction", "input", "output"}`` or ``{"messages"}``, with field types checked."""
    fmt = "alpaca" if fmt == "llm-adapters" else fmt
    fields = {"alpaca": ("instruction", "output"), "metamath": ("query", "response"), "messages": ("messages",),
              "sharegpt": ("conversations",)}[fmt]
    missing = [name for name in fields if name not in record]
    if missing:
        raise DataError(f"record {index} lacks {missing} required by the {fmt!r} format (it has {sorted(record)}).")
    if fmt == "messages":
        return {"messages": _check_messages(record["messages"], index)}
    if fmt == "sharegpt":
        return {"messages": _check_messages(_sharegpt_messages(record["conversations"], index), index)}
    instruction, output = (record[name] for name in fields)
    input_text = record.get("input") or ""
    for name, value in ((fields[0], instruction), (fields[1], output), ("input", input_text)):
        if not isinstance(value, str):
            raise DataError(f"record {index}: field {name!r} must be a string, got {type(value).__name__}.")
    if not instruction.strip():
        raise DataError(f"record {index}: field {fields[0]!r} is empty.")
    return {"instruction": instruction, "input": input_text, "output": output}


SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
                  "bing": "assistant", "bard": "assistant", "system": "system"}


def _sharegpt_messages(conversations: Any, index: int) -> list[dict[str, Any]]:
    """ShareGPT ``{"from", "value"}`` turns as ``{"role", "content"}`` messages."""
    if not isinstance(conversations, list) or not conversations:
        raise DataError(f"record {index}: 'conversations' must be a non-empty list of {{'from', 'value'}} turns.")
    messages = []
    for turn in conversations:
        speaker = turn.get("from") if isinstance(turn, dict) else None
        if speaker not in SHAREGPT_ROLES:
            raise DataError(f"record {index}: a ShareGPT turn needs 'from' in {sorted(SHAREGPT_ROLES)}, got {turn!r}.")
        messages.append({"role": SHAREGPT_ROLES[speaker], "content": turn.get("value")})
    return messages


def _check_messages(messages: Any, index: int) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"record {index}: 'messages' must be a non-empty list of {{'role', 'content'}} turns.")
    for turn in messages:
        if (not isinstance(turn, dict) or not isinstance(turn.get("role"), str)
                or not isinstance(turn.get("content"), str)):
            raise DataError(f"record {index}: every turn needs a string 'role' and a string 'content', got {turn!r}.")
    roles = [turn["role"] for turn in messages]
    if "assistant" not in roles:
        raise DataError(f"record {index}: no 'assistant' turn, so there is nothing to train on.")
    if roles[0] == "assistant":
        raise DataError(f"record {index}: the conversation starts with an assistant turn; it needs a prompt before it.")
    return [{"role": turn["role"], "content": turn["content"]} for turn in messages]


# ---------------------------------------------------------------- tokenisation


@dataclass(frozen=True)
class Special:
    prefix: list[int]  # what the tokenizer puts in front of a text (e.g. [BOS]), [] for most chat models
    eos: int


def special_tokens(tokenizer) -> Special:
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no EOS token; set tokenizer.eos_token before training.")
    with_special = tokenizer("a")["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    start = next((i for i in range(len(with_special)) if with_special[i : i + len(plain)] == plain), 0)
    return Special(prefix=list(with_special[:start]), eos=tokenizer.eos_token_id)


def _segments_to_example(segments: Sequence[tuple[list[int], bool]]) -> dict[str, list[int]]:
    """Concatenate token segments; labels copy the trained segments and are -100 elsewhere."""
    input_ids, labels = [], []
    for ids, trained in segments:
        input_ids.extend(ids)
        labels.extend(ids if trained else [IGNORE_INDEX] * len(ids))
    return {"input_ids": input_ids, "labels": labels}


def _instruction_examples(items: list[dict], template: str, tokenizer, special: Special) -> list[dict]:
    prompts = [render_prompt(template, item["instruction"], item["input"]) for item in items]
    full = [prompt + item["output"] for prompt, item in zip(prompts, items, strict=True)]
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    full_ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    examples = []
    for p_ids, f_ids, item in zip(prompt_ids, full_ids, items, strict=True):
        if f_ids[: len(p_ids)] == p_ids:
            response_ids = f_ids[len(p_ids) :]
        else:  # the prompt's last token merged with the response's first: tokenise the parts apart
            response_ids = tokenizer(item["output"], add_special_tokens=False)["input_ids"]
        examples.append(_segments_to_example([(special.prefix + p_ids, False), ([*response_ids, special.eos], True)]))
    return examples


def chat_segments(messages: list[dict], renderer, index: int) -> list[tuple[str, bool]]:
    """The conversation rendered by ``renderer``'s chat template (a tokenizer or a processor), as
    ``(text, trained)`` segments: each assistant turn (with its end-of-turn marker) is trained,
    the text before it (system, user turns, the assistant header) is not."""
    texts, rendered = [], ""
    for k, turn in enumerate(messages):
        if turn["role"] != "assistant":
            continue
        prompt = apply_chat_template(renderer, messages[:k], generation_prompt=True)
        full = apply_chat_template(renderer, messages[: k + 1], generation_prompt=False)
        if not prompt.startswith(rendered) or not full.startswith(prompt):
            raise DataError(
                f"record {index}: the tokenizer's chat template does not render conversations prefix by prefix, so "
                "the assistant turns cannot be located; use instruction records with another template."
            )
        texts += [(prompt[len(rendered) :], False), (full[len(prompt) :], True)]
        rendered = full
    return texts


def with_eos(segment_ids: list[int], trained: bool, eos: int) -> list[int]:
    """A trained segment ends with EOS (appended when the chat template's end-of-turn marker is another token)."""
    return [*segment_ids, eos] if trained and eos not in segment_ids else segment_ids


def _chat_example(messages: list[dict], tokenizer, special: Special, index: int) -> dict:
    """Render turn by turn; assistant turns (with their end-of-turn marker) carry the loss."""
    texts = chat_segments(messages, tokenizer, index)
    ids = tokenizer([text for text, _ in texts], add_special_tokens=False)["input_ids"]
    return _segments_to_example([(with_eos(segment_ids, trained, special.eos), trained)
                                 for segment_ids, (_, trained) in zip(ids, texts, strict=True)])


def encode_records(
    items: list[dict], template: str, tokenizer, cutoff_len: int, overlong: str = "truncate", progress: bool = True
) -> tuple[list[dict[str, list[int]]], DataStats]:
    """Tokenise normalised records into ``{"input_ids", "labels"}`` examples (see module docstring)."""
    if overlong not in ("truncate", "drop"):
        raise DataError(f"overlong must be 'truncate' or 'drop', got {overlong!r}.")
    special = special_tokens(tokenizer)
    stats = DataStats(records=len(items))
    examples = []
    chunk = 1000
    bar = tqdm(total=len(items), desc="tokenising", unit="rec", disable=not progress or len(items) < 5 * chunk)
    for start in range(0, len(items), chunk):
        block = items[start : start + chunk]
        if any("messages" in item for item in block) and template != "chat":
            raise DataError(
                "records in the chat 'messages' format are rendered with the tokenizer's chat template, "
                f"but template is {template!r}: set template: chat."
            )
        if template == "chat":
            encoded = [
                _chat_example(
                    item["messages"] if "messages" in item else _as_messages(item), tokenizer, special, start + i
                )
                for i, item in enumerate(block)
            ]
        else:
            encoded = _instruction_examples(block, template, tokenizer, special)
        for example in encoded:
            _fit(example, cutoff_len, overlong, stats, examples)
        bar.update(len(block))
    bar.close()
    return examples, stats


def _as_messages(item: dict) -> list[dict]:
    return [
        {"role": "user", "content": join_input(item["instruction"], item["input"])},
        {"role": "assistant", "content": item["output"]},
    ]


def _fit(example: dict, cutoff_len: int, overlong: str, stats: DataStats, kept: list) -> None:
    length = len(example["input_ids"])
    if length > cutoff_len:
        if overlong == "drop":
            stats.dropped_overlong += 1
            return
        example = {key: value[:cutoff_len] for key, value in example.items()}
        if all(label == IGNORE_INDEX for label in example["labels"]):
            stats.dropped_prompt_too_long += 1
            return
        stats.truncated += 1
    kept.append(example)
    stats.examples += 1
    stats.tokens += len(example["input_ids"])
    stats.label_tokens += sum(label != IGNORE_INDEX for label in example["labels"])
    stats.max_length = max(stats.max_length, len(example["input_ids"]))


class SupervisedDataset(torch.utils.data.Dataset):
    """Tokenised examples: item i is ``{"input_ids": list[int], "labels": list[int]}`` (same length)."""

    def __init__(self, examples: list[dict[str, list[int]]]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self.examples[index]


def supervised_collator(tokenizer, pad_to_multiple_of: int | None = None):
    """Right-pads a batch of examples to its longest (rounded up to ``pad_to_multiple_of``).

    transformers' `DataCollatorForSeq2Seq` (it also serves decoder-only models): LongTensors
    ``input_ids``, ``labels`` and ``attention_mask`` of shape (batch, length); padding has
    ``attention_mask`` 0 and label -100. The mask comes from the lengths, not from the pad id,
    which is often EOS and also occurs inside examples. Sets the tokenizer to right padding
    (left padding would shift the positions of a causal LM's training examples).
    """
    from transformers import DataCollatorForSeq2Seq

    tokenizer.padding_side = "right"
    return DataCollatorForSeq2Seq(
        tokenizer, padding="longest", label_pad_token_id=IGNORE_INDEX, pad_to_multiple_of=pad_to_multiple_of,
        return_tensors="pt",
    )


def load_training_records(config) -> tuple[list[dict[str, Any]], str]:
    """The records of a `TrainConfig`'s dataset (the first ``max_samples``) and their format."""
    records = load_records(config.dataset, config.dataset_split, config.dataset_config)
    if config.max_samples is not None:
        records = records[: config.max_samples]
    return records, detect_format(records[0]) if config.dataset_format == "auto" else config.dataset_format


def split_validation(items: list, val_size: float, seed: int) -> tuple[list, list]:
    """(train, validation): ``val_size`` (a fraction below 1, or a count) of the items, a seeded random subset."""
    val_count = int(val_size) if val_size >= 1 else round(val_size * len(items))
    if val_count >= len(items):
        raise DataError(f"val_size={val_size} leaves no training records out of {len(items)}: lower it.")
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    val_indices = set(order[:val_count])
    return ([item for i, item in enumerate(items) if i not in val_indices],
            [item for i, item in enumerate(items) if i in val_indices])


def build_datasets(config, tokenizer, progress: bool = True, records: tuple[list, str] | None = None,
                   ) -> tuple[SupervisedDataset, SupervisedDataset | None, DataStats]:
    """Train (and validation, when ``config.val_size``) datasets from a `TrainConfig`.

    ``records``: the ``(records, format)`` of `load_training_records` when already loaded.
    Validation records are a seeded random subset taken before tokenisation; the stats cover
    the training examples.
    """
    records, fmt = records or load_training_records(config)
    items = [normalise_record(record, fmt, index) for index, record in enumerate(records)]
    train_items, val_items = split_validation(items, config.val_size, config.seed)
    train_examples, stats = encode_records(
        train_items, config.template, tokenizer, config.cutoff_len, config.overlong, progress
    )
    if not train_examples:
        raise DataError(
            f"no training examples left: all {len(train_items)} records are longer than cutoff_len={config.cutoff_len} "
            "(or their prompts fill it). Raise cutoff_len or use overlong: truncate."
        )
    val_dataset = None
    if val_items:
        val_examples, _ = encode_records(
            val_items, config.template, tokenizer, config.cutoff_len, config.overlong, progress
        )
        val_dataset = SupervisedDataset(val_examples) if val_examples else None
    return SupervisedDataset(train_examples), val_dataset, stats
