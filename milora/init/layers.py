"""PEFT's LoRA layers as milora uses them: finding them, and moving a start between W and the adapter.

For a layer with scaling s, trainable factors (A, B) and initial factors (A0, B0):

    set_adapter_factors:  base weight <- W - s B0 A0 (the residual), adapter <- (A, B)
    restore_weight:       base weight <- W_res + s B0 A0 (the original weight, rounded once)

Both compute in float64 and round once to the weight's dtype. Module names are relative to the
base model (PEFT's ``base_model.model.`` prefix removed, `PEFT_PREFIX`).
"""

from __future__ import annotations

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from peft.utils import ModulesToSaveWrapper

from milora.init.targets import weight_matrix

PEFT_PREFIX = "base_model.model."
"""What PEFT puts before a base model's module names, in its module tree and its saved state dicts."""


def lora_layers(peft_model: PeftModel) -> dict[str, LoraLayer]:
    """The LoRA layers of a PEFT model, keyed by module name relative to the base model, sorted."""
    layers = {name.removeprefix(PEFT_PREFIX): m for name, m in peft_model.named_modules() if isinstance(m, LoraLayer)}
    return dict(sorted(layers.items()))


def saved_module_copies(peft_model: PeftModel, adapter: str = "default") -> dict[str, torch.nn.Module]:
    """The trainable copies of the ``modules_to_save`` modules, keyed by module name relative to the base model."""
    return {name.removeprefix(PEFT_PREFIX): m.modules_to_save[adapter] for name, m in peft_model.named_modules()
            if isinstance(m, ModulesToSaveWrapper) and adapter in m.modules_to_save}


def set_adapter_factors(
    layer: LoraLayer, adapter: str, A: torch.Tensor, B: torch.Tensor, A0: torch.Tensor, B0: torch.Tensor, device=None
) -> float:
    """Set the trainable factors to (A, B) and the base weight to W - s * B0 @ A0 (float64 math).

    Returns the relative reconstruction error ||W_res + s B0 A0 - W||_F / ||W||_F of the stored
    (rounded) residual, i.e. how far the initial model is from the original weight.
    """
    base = layer.get_base_layer()
    weight = weight_matrix(base)
    device = device or weight.device
    scaling = layer.scaling[adapter]
    original = weight.detach().to(device=device, dtype=torch.float64)
    initial_part = (B0.to(device, torch.float64) @ A0.to(device, torch.float64)).mul_(scaling)
    residual = torch.sub(original, initial_part).to(weight.dtype)
    weight.data.copy_(residual.to(weight.device))  # weight is a view for Conv1D, so this writes through
    layer.lora_A[adapter].weight.data.copy_(A)
    layer.lora_B[adapter].weight.data.copy_(B)
    # in place: at most three float64 copies of the weight alive at once
    mismatch = residual.to(torch.float64).add_(initial_part).sub_(original)
    return float(torch.linalg.norm(mismatch) / torch.linalg.norm(original).clamp_min(1e-300))


def restore_weight(weight: torch.Tensor, A0: torch.Tensor, B0: torch.Tensor, scaling: float) -> None:
    """Put the original weight W = W_res + s B0 A0 back into ``weight`` (out x in, holding W_res), in place."""
    with torch.no_grad():
        restored = weight.detach().double() + scaling * (B0.double() @ A0.double()).to(weight.device)
        weight.data.copy_(restored.to(weight.dtype))
