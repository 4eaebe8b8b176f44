"""Visual instruction data for image-text-to-text models: records with images, through the model's processor.

Record formats:

- ``llava`` (LLaVA-Instruct): ``image`` (a path, or a list of paths) and ``conversations``, a
  list of ``{"from": "human" | "gpt" | "system", "value": str}`` turns whose human turns hold one
  ``<image>`` placeholder per image, in order; records without ``image`` are text-only;
- ``messages`` with image entries: ``{"role", "content"}`` turns whose content is a string or a
  list of ``{"type": "text", "text"}`` and ``{"type": "image", "image" | "path": path}`` entries;
  an image entry without a path (or an ``<image>`` placeholder in a string) takes the next path of
  the record's ``images`` list.

Image paths are relative to ``image_folder``. `check_records` validates every record and image
in one pass before training (structure, placeholders against images, file present, readable,
of a supported mode), each error naming the record and the file. `VisionDataset` loads images
lazily: item i is read, rendered with the processor's chat template, processed and masked when
the data loader asks for it. Its ``labels`` are -100 on the system and user turns (image tokens
included), the assistant headers and padding: the loss covers the assistant turns (and EOS) only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from milora.errors import DataError
from milora.images import IMAGE_PLACEHOLDER, check_image, load_image, split_placeholders
from milora.training.data import IGNORE_INDEX, chat_segments, special_tokens, split_validation, with_eos

_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass
class Conversation:
    """One record as chat messages whose content lists hold ``{"type": "image"}`` entries, and the
    absolute paths of those images in order."""

    messages: list[dict[str, Any]]
    images: list[Path]


def has_images(record: dict[str, Any]) -> bool:
    """Whether a record of any format carries images (and so needs an image-text-to-text model)."""
    if record.get("image") or record.get("images"):
        return True
    return any(isinstance(turn, dict) and isinstance(turn.get("content"), list)
               and any(isinstance(item, dict) and item.get("type") == "image" for item in turn["content"])
               for turn in record.get("messages") or [])


def _paths(value: Any, index: int, key: str) -> list[str]:
    paths = [value] if isinstance(value, str) else value
    if not isinstance(paths, list) or not all(isinstance(p, str) and p for p in paths):
        raise DataError(f"record {index}: '{key}' must be an image path or a list of image paths, got {value!r}.")
    return paths


def _llava_messages(record: dict[str, Any], index: int) -> tuple[list[dict], list[str]]:
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise DataError(f"record {index}: 'conversations' must be a non-empty list of {{'from', 'value'}} turns.")
    messages = []
    for turn in turns:
        if not isinstance(turn, dict) or turn.get("from") not in _ROLES or not isinstance(turn.get("value"), str):
            raise DataError(f"record {index}: every turn needs 'from' (human, gpt or system) and a string 'value', "
                            f"got {turn!r}.")
        messages.append({"role": _ROLES[turn["from"]], "content": split_placeholders(turn["value"])})
    return messages, _paths(record["image"], index, "image") if record.get("image") else []


def _chat_messages(record: dict[str, Any], index: int) -> tuple[list[dict], list[str]]:
    turns = record.get("messages")
    if not isinstance(turns, list) or not turns:
        raise DataError(f"record {index}: 'messages' must be a non-empty list of {{'role', 'content'}} turns.")
    pool = list(reversed(_paths(record["images"], index, "images"))) if record.get("images") else []
    messages, paths, unnamed = [], [], 0
    for turn in turns:
        content = turn.get("content") if isinstance(turn, dict) else None
        if not isinstance(turn, dict) or not isinstance(turn.get("role"), str) or not isinstance(content, (str, list)):
            raise DataError(f"record {index}: every turn needs a string 'role' and a 'content' string or list, "
                            f"got {turn!r}.")
        items = split_placeholders(content) if isinstance(content, str) and IMAGE_PLACEHOLDER in content else content
        if isinstance(items, list):
            converted = []
            for item in items:
                if not isinstance(item, dict) or item.get("type") not in ("image", "text"):
                    raise DataError(f"record {index}: content entries must be {{'type': 'text' | 'image', ...}}, "
                                    f"got {item!r}.")
                if item["type"] == "text":
                    if not isinstance(item.get("text"), str):
                        raise DataError(f"record {index}: a text entry needs a string 'text', got {item!r}.")
                    converted.append({"type": "text", "text": item["text"]})
                    continue
                own = item.get("image") or item.get("path")
                unnamed += own is None
                paths.append(own if own is not None else (pool.pop() if pool else None))
                converted.append({"type": "image"})
            items = converted
        messages.append({"role": turn["role"], "content": items})
    if None in paths or pool:
        raise DataError(f"record {index}: {unnamed} image entries or <image> placeholders without a path, but "
                        f"{len(_paths(record['images'], index, 'images')) if record.get('images') else 0} paths in "
                        "'images': give one path per placeholder.")
    return messages, paths


def to_conversation(record: dict[str, Any], fmt: str, index: int, image_folder: Path) -> Conversation:
    """A record (``llava`` or ``messages`` format) as a checked `Conversation` (images not opened)."""
    if fmt not in ("llava", "messages"):
        raise DataError(f"image data must be in the 'llava' or 'messages' format, not {fmt!r}.")
    messages, paths = (_llava_messages if fmt == "llava" else _chat_messages)(record, index)
    entries = [item for m in messages if isinstance(m["content"], list) for item in m["content"]]
    placeholders = sum(item["type"] == "image" for item in entries)
    if placeholders != len(paths):
        raise DataError(f"record {index} has {placeholders} {IMAGE_PLACEHOLDER} placeholder(s) but {len(paths)} "
                        "image(s): each image needs exactly one placeholder in a user turn.")
    roles = [m["role"] for m in messages]
    if "assistant" not in roles or roles[0] == "assistant":
        raise DataError(f"record {index}: needs a user turn first and at least one assistant turn to train on.")
    misplaced = next((m["role"] for m in messages if m["role"] != "user" and isinstance(m["content"], list)
                      and any(item["type"] == "image" for item in m["content"])), None)
    if misplaced:
        raise DataError(f"record {index}: its {misplaced} turn holds an image; images belong in the user turns.")
    # multimodal chat templates (llava-hf's, ...) iterate over content entries: text turns become one entry too
    for message in messages:
        if isinstance(message["content"], str):
            message["content"] = [{"type": "text", "text": message["content"]}]
    return Conversation(messages, [image_folder / path for path in paths])


def check_records(records: list[dict], fmt: str, image_folder: Path, progress: bool = True) -> list[Conversation]:
    """Every record as a `Conversation`, every distinct image checked once (`check_image`): one pass, before
    training."""
    conversations, checked = [], set()
    for index, record in enumerate(tqdm(records, desc="checking images", unit="rec", disable=not progress)):
        conversation = to_conversation(record, fmt, index, image_folder)
        for path in conversation.images:
            if path not in checked:
                check_image(path, index)
                checked.add(path)
        conversations.append(conversation)
    return conversations


class VisionDataset(torch.utils.data.Dataset):
    """Conversations with images, encoded on access: item i is ``{"input_ids", "labels"}`` (LongTensors of
    one length) plus the processor's image tensors (``pixel_values``, ...) for its images, if any."""

    def __init__(self, conversations: list[Conversation], processor, cutoff_len: int, indices: list[int]):
        self.conversations, self.indices = conversations, indices
        self.processor, self.cutoff_len = processor, cutoff_len
        self.eos = special_tokens(processor.tokenizer).eos

    def __len__(self) -> int:
        return len(self.conversations)

    def __getitem__(self, position: int) -> dict[str, torch.Tensor]:
        return encode_conversation(self.conversations[position], self.processor, self.cutoff_len, self.eos,
                                   self.indices[position])


def encode_conversation(conversation: Conversation, processor, cutoff_len: int, eos: int, index: int) -> dict:
    """Token ids, labels and image tensors of one conversation (see `VisionDataset`).

    The conversation is rendered segment by segment (`chat_segments`); segments holding images go
    through the processor (which expands each placeholder into the model's image tokens), the others
    through the tokenizer. The processor's encoding of the whole text must equal the segments'
    concatenation, so the labels line up with what the model sees.
    """
    images = [load_image(path, index) for path in conversation.images]
    segments = chat_segments(conversation.messages, processor, index)
    parts, taken = [], 0
    for text, _ in segments:
        count = text.count(processor.image_token) if images else 0
        if count:
            encoded = processor(text=[text], images=images[taken:taken + count], add_special_tokens=False)
            parts.append(encoded["input_ids"][0])
            taken += count
        else:
            parts.append(processor.tokenizer(text, add_special_tokens=False)["input_ids"])
    whole = processor(text=["".join(text for text, _ in segments)], images=images or None, add_special_tokens=False,
                      return_tensors="pt")
    if whole["input_ids"][0].tolist() != [token for part in parts for token in part]:
        raise DataError(f"record {index}: the processor encodes the conversation differently from its turns, so the "
                        "assistant turns cannot be located for the loss mask.")
    ids, labels = [], []
    for part, (_, trained) in zip(parts, segments, strict=True):
        part = with_eos(list(part), trained, eos)
        ids += part
        labels += part if trained else [IGNORE_INDEX] * len(part)
    example = {key: value for key, value in whole.items() if key not in ("input_ids", "attention_mask")}
    return {**_fit(ids, labels, cutoff_len, processor, index), **example}


def _fit(ids: list[int], labels: list[int], cutoff_len: int, processor, index: int) -> dict[str, torch.Tensor]:
    """Truncate to ``cutoff_len`` tokens, which must keep every image token (their count is fixed by the images)."""
    image_token = getattr(processor, "image_token_id", None)
    if len(ids) > cutoff_len and image_token is not None and image_token in ids[cutoff_len:]:
        raise DataError(f"record {index} has {len(ids)} tokens, and truncating it to cutoff_len={cutoff_len} would cut "
                        "image tokens: raise cutoff_len.")
    return {"input_ids": torch.tensor(ids[:cutoff_len]), "labels": torch.tensor(labels[:cutoff_len])}


def vision_collator(processor, dtype: torch.dtype = torch.float32) -> Callable[[list[dict]], dict[str, torch.Tensor]]:
    """Right-pads ``input_ids`` (pad id), ``labels`` (-100) and builds ``attention_mask`` (batch, length);
    every image tensor is concatenated along its first dimension across the batch, other dimensions
    zero-padded to the largest (as the processors pad several images in one call), floating ones
    cast to the model's ``dtype``."""
    pad = processor.tokenizer.pad_token_id

    def collate(examples: list[dict]) -> dict[str, torch.Tensor]:
        length = max(len(example["input_ids"]) for example in examples)
        batch = {
            "input_ids": torch.full((len(examples), length), pad, dtype=torch.long),
            "labels": torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long),
            "attention_mask": torch.zeros((len(examples), length), dtype=torch.long),
        }
        for row, example in enumerate(examples):
            n = len(example["input_ids"])
            batch["input_ids"][row, :n], batch["labels"][row, :n], batch["attention_mask"][row, :n] = (
                example["input_ids"], example["labels"], 1)
        for key in sorted({key for example in examples for key in example} - set(batch)):
            tensor = _concatenate([example[key] for example in examples if key in example])
            batch[key] = tensor.to(dtype) if tensor.is_floating_point() else tensor
        return batch

    return collate


def _concatenate(tensors: list[torch.Tensor]) -> torch.Tensor:
    shape = [max(sizes) for sizes in zip(*(t.shape[1:] for t in tensors), strict=False)]
    padded = []
    for tensor in tensors:
        pad = [value for size, target in reversed(list(zip(tensor.shape[1:], shape, strict=False)))
               for value in (0, target - size)]
        padded.append(torch.nn.functional.pad(tensor, pad) if any(pad) else tensor)
    return torch.cat(padded)


def build_vision_datasets(config, records: list[dict], fmt: str, processor, progress: bool = True):
    """Train (and validation) `VisionDataset`s of a `TrainConfig`, after `check_records`; and the checked count."""
    if config.template != "chat":
        raise DataError(f"records with images are rendered with the processor's chat template, but template is "
                        f"{config.template!r}: set template: chat.")
    if config.overlong != "truncate":
        raise DataError("overlong: drop is not available for image data (examples are encoded lazily, during "
                        "training): use overlong: truncate and a cutoff_len that holds the image tokens.")
    folder = Path(config.image_folder) if config.image_folder else Path(config.dataset).parent
    conversations = check_records(records, fmt, folder, progress)
    indexed = list(enumerate(conversations))
    train, val = split_validation(indexed, config.val_size, config.seed)

    def dataset(pairs):
        return VisionDataset([c for _, c in pairs], processor, config.cutoff_len, [i for i, _ in pairs])

    images = len({path for conversation in conversations for path in conversation.images})
    return dataset(train), dataset(val) if val else None, {"records": len(records), "images": images}

