"""PEFT's LoRA layers as milora uses them: finding them, and moving a start between W and the adapter.

For a layer with scaling s, trainable factors (A, B) and initial factors (A0, B0):

    set_adapter_factors:  base weight <- W - s B0 A0 (the residual), adapter <- (A, B)
    restore_layer:        base weight <- W_res + s B0 A0 (the original weight, rounded once)

Both compute in float64 and round once to the weight's dtype, one (out x in) matrix at a time: a
Linear's weight, or each expert of a fused MoE stack (`milora.init.experts`, whose factors are PEFT's
packed ones). Module names are relative to the base model (PEFT's ``base_model.model.`` prefix
removed, `PEFT_PREFIX`).
"""

from __future__ import annotations

import math

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from peft.utils import ModulesToSaveWrapper

from milora.init.experts import expert_count, expert_factors, weight_stack

RESIDUAL_BLOCK_BYTES = 1 << 26  # 64 MiB of float64 rows at a time in `residual_weight`
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
) -> list[float]:
    """Set the trainable factors to (A, B) and the base weight to W - s * B0 @ A0 (`residual_weight`), each
    expert matrix of a fused stack with its own factors (PEFT's packing, `milora.init.experts.expert_factors`).

    Returns, per expert matrix (one for a Linear), the relative reconstruction error of the stored
    (rounded) residual, i.e. how far the initial model is from the original weight.
    """
    stack = weight_stack(layer)
    A0s, B0s = expert_factors(A0, B0, expert_count(layer))
    errors = []
    for weight, A0_e, B0_e in zip(stack, A0s, B0s, strict=True):
        residual, error = residual_weight(weight, A0_e, B0_e, layer.scaling[adapter], device)
        weight.data.copy_(residual.to(weight.device))  # weight is a view (Conv1D, experts), so this writes through
        errors.append(error)
    layer.lora_A[adapter].weight.data.copy_(A)
    layer.lora_B[adapter].weight.data.copy_(B)
    return errors


def residual_weight(weight: torch.Tensor, A0: torch.Tensor, B0: torch.Tensor, scaling: float, device=None,
                    block_bytes: int = RESIDUAL_BLOCK_BYTES, keep: bool = True) -> tuple[torch.Tensor | None, float]:
    """W_res = W - s B0 A0 (``weight``: out x in) in float64, rounded once to the weight's dtype, on ``device``
    (default: the weight's), and its relative error ||W_res - (W - s B0 A0)||_F / ||W||_F.

    Computed in blocks of rows (about ``block_bytes`` of float64 each), so a weight never needs more
    than the rounded residual and a few float64 blocks at once; every element is computed the same
    way wherever the weight comes from (a model in memory, or a checkpoint streamed tensor by tensor).
    ``keep=False``: the error only (the residual is None and never held whole).
    """
    device = device or weight.device
    out_features, in_features = weight.shape
    residual = torch.empty(out_features, in_features, dtype=weight.dtype, device=device) if keep else None
    A0, B0 = A0.to(device, torch.float64), B0.to(device, torch.float64)
    rows = max(1, block_bytes // (8 * in_features))
    mismatch, norm = 0.0, 0.0
    for start in range(0, out_features, rows):
        block = slice(start, start + rows)
        exact = weight[block].detach().to(device=device, dtype=torch.float64)
        norm += float(torch.linalg.norm(exact)) ** 2
        exact.sub_((B0[block] @ A0).mul_(scaling))
        rounded = exact.to(weight.dtype)
        if keep:
            residual[block] = rounded
        mismatch += float(torch.linalg.norm(exact.sub_(rounded.to(torch.float64)))) ** 2
    return residual, math.sqrt(mismatch) / max(math.sqrt(norm), 1e-300)


def restore_layer(layer: LoraLayer, adapter: str, A0: torch.Tensor, B0: torch.Tensor) -> None:
    """Put the original weight back into a LoRA layer whose base holds W_res (`restore_weight`, expert by expert)."""
    for weight, A0_e, B0_e in zip(weight_stack(layer), *expert_factors(A0, B0, expert_count(layer)), strict=True):
        restore_weight(weight, A0_e, B0_e, layer.scaling[adapter])


def restore_weight(weight: torch.Tensor, A0: torch.Tensor, B0: torch.Tensor, scaling: float) -> None:
    """Put the original weight W = W_res + s B0 A0 back into ``weight`` (out x in, holding W_res), in place."""
    with torch.no_grad():
        restored = weight.detach().double() + scaling * (B0.double() @ A0.double()).to(weight.device)
        weight.data.copy_(restored.to(weight.dtype))
