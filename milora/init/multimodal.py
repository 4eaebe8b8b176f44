"""Which part of an image-text-to-text model an adapter covers.

An image-text-to-text model (LLaVA, LLaVA-NeXT, Idefics3 / SmolVLM, Qwen2-VL, PaliGemma, ...)
holds a vision tower, a projector and a language model, and a CLIP / SigLIP vision tower has
``q_proj`` / ``k_proj`` / ``v_proj`` too. MiLoRA's targets (the paper's q, k, v, up, down) mean the
*language model's* projections: `scoped_targets` turns module names into a PEFT regex that
matches them inside the language model only (PEFT matches a string ``target_modules`` in full
against each module name), after checking that every name exists there. Scope ``whole_model``
keeps PEFT's own rule (a name matches anywhere, vision tower included), for users who ask for it.
"""

from __future__ import annotations

import re
import warnings

import torch
from transformers.pytorch_utils import Conv1D

from milora.constants import PAPER_TARGETS, TARGET_SCOPES
from milora.errors import ModelError
from milora.models import is_vision_language_model


def language_model_name(model: torch.nn.Module) -> str | None:
    """Module name of the language model inside an image-text-to-text model (transformers'
    ``get_decoder()``: ``model.language_model`` for LLaVA), or None for a text-only model."""
    if not is_vision_language_model(model):
        return None
    decoder = model.get_decoder()
    name = next((name for name, module in model.named_modules() if module is decoder and name), None)
    if name is None:
        raise ModelError(f"cannot find the language model inside {type(model).__name__} (get_decoder() returned the "
                         "model itself): give target_scope whole_model with explicit targets.")
    return name


def scoped_targets(model: torch.nn.Module, names: list[str] | tuple[str, ...], scope: str = "language_model"):
    """PEFT ``target_modules`` for module ``names`` (or ``["all-linear"]``) within ``scope``.

    Text-only model, or ``scope="whole_model"``: the names themselves (PEFT's suffix rule, or
    ``"all-linear"``). Image-text-to-text model with ``scope="language_model"``: a regex matching
    exactly the modules inside the language model whose names end with one of ``names``
    (``all-linear``: every Linear of the language model); a name absent from the language model
    is a `ModelError` naming the modules it has.
    """
    if scope not in TARGET_SCOPES:
        raise ModelError(f"target scope must be one of {', '.join(TARGET_SCOPES)}, got {scope!r}.")
    names = list(names)
    prefix = language_model_name(model) if scope == "language_model" else None
    if prefix is None:
        return "all-linear" if names == ["all-linear"] else names
    inside = [(name, module) for name, module in model.named_modules() if name.startswith(prefix + ".")]
    linear = sorted({name.rsplit(".", 1)[-1] for name, m in inside if isinstance(m, (torch.nn.Linear, Conv1D))})
    if names == ["all-linear"]:
        names = linear
    missing = sorted(t for t in names if not any(n == f"{prefix}.{t}" or n.endswith("." + t) for n, _ in inside))
    if missing:
        raise ModelError(
            f"Target module(s) {missing} not found in the language model ({prefix}) of {type(model).__name__}. "
            f"Its Linear modules: {', '.join(linear)}. To adapt the vision tower or the projector, ask for it: "
            "target_scope whole_model (CLI --target-scope whole_model)."
        )
    return re.escape(prefix) + r"\.(?:.*\.)?(?:" + "|".join(re.escape(n) for n in sorted(set(names))) + ")"


def language_model_targets(model: torch.nn.Module, names: list[str] | tuple[str, ...] = PAPER_TARGETS):
    """``target_modules`` adapting ``names`` (default: the paper's q, k, v, up, down) in the language model
    only, for ``peft.LoraConfig``; for a text-only model the names themselves."""
    return scoped_targets(model, names, "language_model")


def warn_outside_language_model(model: torch.nn.Module, target_names, adapted: dict) -> None:
    """Warn when a list of module names adapts modules of an image-text-to-text model outside its
    language model (vision tower, projector): allowed, but rarely meant."""
    prefix = language_model_name(model)
    if prefix is None or not isinstance(target_names, (list, set, tuple)):
        return
    outside = sorted(name for name in adapted if not name.startswith(prefix + "."))
    if outside:
        warnings.warn(
            f"target_modules {sorted(target_names)} also adapt {len(outside)} module(s) outside the language model "
            f"({prefix}), e.g. {outside[0]}. To adapt the language model only, pass "
            "target_modules=milora.language_model_targets(model, names).",
            stacklevel=3,
        )
