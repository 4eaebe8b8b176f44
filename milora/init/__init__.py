"""Initialisation: a PEFT LoRA model whose adapters start from selected singular triplets."""

from milora.init.initialize import get_model, lora_layers, set_adapter_factors
from milora.init.record import InitRecord, attach_record, find_record, has_residual_base, init_record
from milora.init.targets import fingerprint, rank_for, target_modules, validate_lora_config, weight_matrix

__all__ = [
    "InitRecord", "attach_record", "find_record", "fingerprint", "get_model", "has_residual_base", "init_record",
    "lora_layers", "rank_for", "set_adapter_factors", "target_modules", "validate_lora_config", "weight_matrix",
]
