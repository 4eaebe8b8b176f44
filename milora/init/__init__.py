"""Initialisation: a PEFT LoRA model whose adapters start from selected singular triplets."""

from milora.init.initialize import get_model
from milora.init.layers import PEFT_PREFIX, lora_layers, restore_weight, saved_module_copies, set_adapter_factors
from milora.init.multimodal import language_model_name, language_model_targets, scoped_targets
from milora.init.record import InitRecord, attach_record, find_record, has_residual_base, init_record
from milora.init.targets import (
    fingerprint,
    rank_for,
    saved_modules,
    target_modules,
    validate_lora_config,
    weight_matrix,
)

__all__ = [
    "PEFT_PREFIX", "InitRecord", "attach_record", "find_record", "fingerprint", "get_model", "has_residual_base",
    "init_record", "language_model_name", "language_model_targets", "lora_layers", "rank_for", "restore_weight",
    "saved_module_copies", "saved_modules", "scoped_targets", "set_adapter_factors", "target_modules",
    "validate_lora_config", "weight_matrix",
]
