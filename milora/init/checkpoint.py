"""A safetensors checkpoint directory read tensor by tensor, and safetensors files written tensor by tensor.

`open_checkpoint` checks a directory before anything is read: safetensors weights (one
``model.safetensors`` or shards listed by ``model.safetensors.index.json``, every listed shard
present), no pickle-only weights (refused, never unpickled), no quantisation. `Checkpoint.tensor`
reads one tensor through `safetensors.safe_open`, which maps the file only while it reads, so a
checkpoint of any size costs the memory of the tensor being read. `write_safetensors` writes a
file in the safetensors layout (an 8-byte little-endian header length, a JSON header padded to 8
bytes, the tensors' bytes in header order) from tensors produced one at a time, so a residual shard
of several GB never has to sit in memory.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from milora.errors import ModelError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
DTYPE_CODES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


@dataclass
class TensorEntry:
    """One tensor of a safetensors header: its dtype code (``BF16``, ...), shape and byte count."""

    dtype: str
    shape: list[int]
    nbytes: int


def tensor_entry(tensor: torch.Tensor) -> TensorEntry:
    """The header entry of a floating tensor, as `write_safetensors` writes it."""
    return TensorEntry(DTYPE_CODES[tensor.dtype], list(tensor.shape), tensor.numel() * tensor.element_size())


@dataclass
class Checkpoint:
    """A checked checkpoint directory; ``weight_map`` maps each tensor name to its shard's file name."""

    directory: Path
    weight_map: dict[str, str]
    sharded: bool

    @property
    def shards(self) -> list[str]:
        return sorted(set(self.weight_map.values()))

    def tensor(self, name: str) -> torch.Tensor:
        """One tensor, read into memory in its stored dtype (the file is unmapped again before returning)."""
        with safe_open(self.directory / self.weight_map[name], framework="pt") as handle:
            return handle.get_tensor(name)

    def header(self, shard: str) -> tuple[dict[str, TensorEntry], dict[str, str]]:
        """A shard's tensors in file order, and its ``__metadata__``."""
        with open(self.directory / shard, "rb") as file:
            (length,) = struct.unpack("<Q", file.read(8))
            header = json.loads(file.read(length))
        metadata = header.pop("__metadata__", None) or {}
        ordered = sorted(header.items(), key=lambda item: item[1]["data_offsets"][0])
        return ({name: TensorEntry(value["dtype"], list(value["shape"]),
                                   value["data_offsets"][1] - value["data_offsets"][0]) for name, value in ordered},
                metadata)

    def files(self) -> dict[str, int]:
        """Every weight file with its size in bytes (what a resumed run checks has not changed)."""
        return {shard: (self.directory / shard).stat().st_size for shard in self.shards}


def open_checkpoint(directory: str | os.PathLike) -> Checkpoint:
    """A checked local checkpoint: safetensors only, every shard of the index present."""
    directory = Path(directory)
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ModelError(f"{index} is not a safetensors index (no weight_map): {error}. "
                             "Restore the file.") from error
        missing = sorted({shard for shard in weight_map.values() if not (directory / shard).is_file()})
        if missing:
            raise ModelError(f"{index} names shard(s) {missing} that are not in {directory}: the download or copy is "
                             "incomplete. Fetch the missing files again.")
        return Checkpoint(directory, dict(weight_map), sharded=True)
    single = directory / SINGLE_FILE
    if single.is_file():
        with safe_open(single, framework="pt") as handle:
            names = list(handle.keys())
        return Checkpoint(directory, dict.fromkeys(names, SINGLE_FILE), sharded=False)
    pickled = sorted(path.name for path in directory.iterdir() if path.suffix in PICKLE_SUFFIXES)
    if pickled:
        raise ModelError(
            f"{directory} holds only pickled weights ({', '.join(pickled[:3])}); milora never unpickles weights "
            "(loading a pickle can run code). Convert the checkpoint to safetensors where you trust it, e.g. "
            "AutoModelForCausalLM.from_pretrained(dir).save_pretrained(new_dir) (safetensors is the default), "
            "and give new_dir."
        )
    raise ModelError(f"{directory} has no {SINGLE_FILE} or {INDEX_FILE}: give a model directory with safetensors "
                     "weights.")


def write_safetensors(path: Path, entries: dict[str, TensorEntry], tensors: Iterable[torch.Tensor],
                      metadata: dict[str, str] | None = None) -> None:
    """Write ``path`` (through a temporary file and a rename) holding ``entries`` in order, whose data
    ``tensors`` yields one at a time (each must have the entry's byte count)."""
    header, offset = {}, 0
    if metadata:
        header["__metadata__"] = metadata
    for name, entry in entries.items():
        header[name] = {"dtype": entry.dtype, "shape": entry.shape, "data_offsets": [offset, offset + entry.nbytes]}
        offset += entry.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    staging = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(staging, "wb") as file:
            file.write(struct.pack("<Q", len(encoded)) + encoded)
            for (name, entry), tensor in zip(entries.items(), tensors, strict=True):
                data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
                if data.nbytes != entry.nbytes:
                    raise ValueError(f"{name}: {data.nbytes} bytes, the header says {entry.nbytes}")
                file.write(memoryview(data))
            file.flush()
            os.fsync(file.fileno())
        os.replace(staging, path)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise
