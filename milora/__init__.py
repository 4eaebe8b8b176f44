"""MiLoRA: LoRA fine-tuning that starts from the minor singular components of each weight.

The public API is imported on first use, so that ``import milora`` (and the command line)
start fast; ``milora.get_model`` and the others behave as ordinary attributes.
"""

from __future__ import annotations

import importlib
import logging

from milora.constants import INIT_MODES
from milora.errors import MiloraError

__version__ = "0.1.0"

_PUBLIC = {
    "TrainConfig": "milora.training.config",
    "analyze_adapter": "milora.analysis.adapter",
    "compare": "milora.comparison",
    "evaluate": "milora.eval.runner",
    "get_model": "milora.init",
    "language_model_targets": "milora.init",
    "load_base_model": "milora.models",
    "load_config": "milora.training.config",
    "load_model": "milora.adapter.load",
    "save_adapter": "milora.adapter.save",
    "select_components": "milora.linalg.decomposition",
    "train": "milora.training.run",
}

__all__ = ["INIT_MODES", "MiloraError", *sorted(_PUBLIC)]

# bitsandbytes (imported by PEFT whenever it is installed) logs a warning in every process on CPUs with
# AVX512-BF16 that an optional kernel for its bfloat16 inference shortcut is missing; milora turns that
# shortcut off on the layers it quantises (milora.init.quantize), so the notice is noise for its users.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    lambda record: "gemm_4bit_forward from kernels-community" not in record.getMessage()
)


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'milora' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
