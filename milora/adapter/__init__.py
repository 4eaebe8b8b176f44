"""The adapter format: the one encoder/decoder of saved adapters (`format`), `save_adapter` and the loaders."""

from milora.adapter.load import (
    is_plain_peft_adapter,
    load_model,
    load_trained_state,
    open_peft_adapter,
    read_adapter,
    read_adapter_weights,
)
from milora.adapter.save import save_adapter

__all__ = [
    "is_plain_peft_adapter", "load_model", "load_trained_state", "open_peft_adapter", "read_adapter",
    "read_adapter_weights", "save_adapter",
]
