"""The saved adapter's format, in one place: how a start and its trained factors become files, and back.

A directory written by `milora.adapter.save_adapter` holds:

- ``adapter_config.json`` + ``adapter_model.safetensors``: a standard PEFT LoRA for the
  ORIGINAL base model. For SVD-based inits it has rank 2r and encodes the whole update,
      Delta W = s (B A - B0 A0) = s [B | -B0] [A ; A0],
  with alpha doubled (times sqrt(2) with rsLoRA) so that its scaling is still s. Plain
  ``PeftModel.from_pretrained(original_base, dir)``, lm-eval's ``peft=`` and vLLM (with
  ``max_lora_rank >= 2r``) therefore all give the trained model. Rows/columns [0, r) are the
  trainable factors, [r, 2r) the initial ones, which lets `milora.adapter.load_model` rebuild the
  residual base W - s B0 A0 and the rank-r trainable adapter without any SVD. For inits that never
  change the base (``lora``, ``dora``, ``eva``, ``mica``: not in `milora.constants.RESIDUAL_INITS`)
  it is PEFT's own rank-r adapter, DoRA's magnitude vectors included. Modules in ``modules_to_save``
  (e.g. a vision-language model's projector, trained in full) are saved whole, under PEFT's own
  keys, so PEFT loads them too.
- ``milora_config.json``: init mode, rank, alpha, solver, init report and a fingerprint of
  the original base weights; the loader refuses a base that does not match it. For an adapter
  trained on a quantised base (QLoRA-style, see `milora.init.quantize`), ``quantization`` records
  the method, its bitsandbytes config and the quantisation errors; the weights are the same
  full-precision-base LoRA.
- optionally ``residual_model/`` + ``residual_adapter/``: the paper's layout, the residual
  base with the rank-r adapter (valid only together).

This module holds every rule of that encoding: the tensor keys, the rank-2r concatenation and
its inverse, the rank and alpha factors between the trained and the saved config, and the
checksum. `save` and `load` only read and write files through it.
"""

from __future__ import annotations

import copy
import hashlib
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig

from milora.constants import ADAPTER_CONFIG, MILORA_CONFIG, RESIDUAL_INITS
from milora.errors import AdapterError
from milora.init import PEFT_PREFIX

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # version 1 (milora 0.1) lacks the weights checksum and the target list


def factor_keys(module: str) -> tuple[str, str]:
    """The state-dict keys of a module's LoRA factors A and B (``module`` relative to the base model)."""
    return f"{PEFT_PREFIX}{module}.lora_A.weight", f"{PEFT_PREFIX}{module}.lora_B.weight"


def magnitude_key(module: str) -> str:
    """The state-dict key of a DoRA module's magnitude vector m (out,), as PEFT saves it."""
    return f"{PEFT_PREFIX}{module}.lora_magnitude_vector"


def saved_module_key(module: str, key: str) -> str:
    """The state-dict key of tensor ``key`` of a ``modules_to_save`` module's trained copy, as PEFT saves it."""
    return f"{PEFT_PREFIX}{module}.{key}"


def has_initial_factors(init: str) -> bool:
    """Whether an init changes the base (W_res = W - s B0 A0), so that its saved update has rank 2r."""
    return init in RESIDUAL_INITS


def rank_factor(init: str) -> int:
    """Saved rank / trained rank: 2 for SVD-based inits ([trainable | initial]), 1 for plain LoRA."""
    return 2 if has_initial_factors(init) else 1


def alpha_factor(init: str, use_rslora: bool) -> float:
    """Saved alpha / trained alpha, so that the saved rank-2r update keeps the scaling s = alpha / r
    (alpha / sqrt(r) with rsLoRA)."""
    if not has_initial_factors(init):
        return 1
    return math.sqrt(2) if use_rslora else 2


@dataclass
class Factors:
    """One module's factors: the trainable A (r x in), B (out x r), the initial A0, B0 (None when the base is
    unchanged) and DoRA's magnitude vector (out,) (None without DoRA)."""

    A: torch.Tensor
    B: torch.Tensor
    A0: torch.Tensor | None = None
    B0: torch.Tensor | None = None
    magnitude: torch.Tensor | None = None


def encode_update(weights: dict[str, torch.Tensor], initial_factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
                  experts: dict[str, int] | None = None) -> dict[str, torch.Tensor]:
    """[A ; A0] and [B | -B0]: the rank-2r LoRA of s (B A - B0 A0) on the original base, from the
    trained state dict ``weights`` and each module's initial ``(A0, B0)``.

    A fused MoE stack of ``experts[module]`` experts (`milora.init.experts`) packs expert e's rows of A in
    block e, its columns of B at e, e + E, ...: its [A ; A0] is stacked block by block ([A_e ; A0_e] for each
    e), while [B | -B0] is already in the packing of rank 2r."""
    converted = dict(weights)
    for name, (A0, B0) in initial_factors.items():
        key_A, key_B = factor_keys(name)
        count, in_features = (experts or {}).get(name, 1), A0.shape[1]
        blocks = [factor.to(weights[key_A].dtype).reshape(count, -1, in_features) for factor in (weights[key_A], A0)]
        converted[key_A] = torch.cat(blocks, dim=1).reshape(-1, in_features).contiguous()
        converted[key_B] = torch.cat([weights[key_B], -B0.to(weights[key_B].dtype)], dim=1).contiguous()
    return converted


def decode_factors(weights: dict[str, torch.Tensor], module: str, r: int, init: str) -> Factors:
    """The inverse of `encode_update` for one module of trained rank ``r`` (its expert count read off the
    shape: [A ; A0] has 2 r rows per expert)."""
    saved_A, saved_B = (weights[key] for key in factor_keys(module))
    if not has_initial_factors(init):
        return Factors(saved_A, saved_B, magnitude=weights.get(magnitude_key(module)))
    blocks = saved_A.reshape(-1, 2 * r, saved_A.shape[1])
    count = blocks.shape[0]
    return Factors(blocks[:, :r].reshape(r * count, -1), saved_B[:, :r * count], blocks[:, r:].reshape(r * count, -1),
                   -saved_B[:, r * count:])


def saved_config(config: LoraConfig, init: str) -> LoraConfig:
    """The PEFT config written beside the weights: for SVD-based inits every rank doubled and every
    alpha scaled to keep each scaling (`rank_factor`, `alpha_factor`)."""
    if not has_initial_factors(init):
        return config
    ranks, alphas = rank_factor(init), alpha_factor(init, config.use_rslora)
    doubled = copy.deepcopy(config)
    doubled.r = ranks * config.r
    doubled.lora_alpha = alphas * config.lora_alpha
    doubled.rank_pattern = {key: ranks * value for key, value in config.rank_pattern.items()}
    doubled.alpha_pattern = {key: alphas * value for key, value in config.alpha_pattern.items()}
    doubled.init_lora_weights = True  # the start is in the saved factors: PEFT must not compute one again
    doubled.corda_config = doubled.lora_ga_config = None
    doubled.loftq_config = {}
    return doubled


def trainable_config(saved: LoraConfig, metadata: dict) -> LoraConfig:
    """The rank-r config the adapter trains with (the saved one is the rank-2r update's for SVD inits)."""
    lora_config = copy.deepcopy(saved)
    if has_initial_factors(metadata["init"]):
        for key in ("r", "lora_alpha", "rank_pattern", "alpha_pattern"):
            setattr(lora_config, key, metadata[key])
    return lora_config


def target_list(targets) -> list[str] | str | None:
    """PEFT's target / modules_to_save value as saved in milora_config.json (sets sorted into lists)."""
    return sorted(targets) if isinstance(targets, (set, list, tuple)) else targets


def check_configs_agree(saved: LoraConfig, metadata: dict, adapter_dir: Path) -> None:
    """adapter_config.json (what PEFT, vLLM and lm-eval read) and milora_config.json (what milora
    reads) must describe the same adapter: rank, alpha, patterns, rsLoRA, targets."""
    init = metadata["init"]
    ranks, alphas = rank_factor(init), alpha_factor(init, saved.use_rslora)
    pairs = [
        ("r", saved.r, ranks * metadata["r"]),
        ("lora_alpha", saved.lora_alpha, alphas * metadata["lora_alpha"]),
        ("use_rslora", saved.use_rslora, metadata["use_rslora"]),
        ("rank_pattern", dict(saved.rank_pattern), {k: ranks * v for k, v in metadata["rank_pattern"].items()}),
        ("alpha_pattern", dict(saved.alpha_pattern), {k: alphas * v for k, v in metadata["alpha_pattern"].items()}),
    ]
    for key in ("target_modules", "modules_to_save", "target_parameters"):
        if key in metadata:
            pairs.append((key, target_list(getattr(saved, key)), metadata[key]))
    for key, in_peft, expected in pairs:
        if not _same(in_peft, expected):
            raise AdapterError(
                f"{adapter_dir}: {ADAPTER_CONFIG} has {key}={in_peft!r} but {MILORA_CONFIG} implies {expected!r}"
                f"{' (the saved update has rank 2r and alpha scaled to keep s)' if has_initial_factors(init) else ''}; "
                "one of the files was edited. Restore the original files or re-save the adapter with "
                "milora.save_adapter."
            )


def _same(a, b) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(a, b, rel_tol=1e-12)
    return a == b


def weights_checksum(weights: dict[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in name order (not over the file,
    whose header layout is the writer's business)."""
    digest = hashlib.sha256()
    for name in sorted(weights):
        update_checksum(digest, name, weights[name])
    return digest.hexdigest()


def update_checksum(digest, name: str, tensor: torch.Tensor) -> None:
    """`weights_checksum`'s step for one tensor: fed in name order, the same digest from tensors made one at a time."""
    tensor = tensor.detach().cpu().contiguous()
    digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
    digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")


def check_finite(weights: dict[str, torch.Tensor], where: str | os.PathLike) -> None:
    """Refuse NaN / Inf in adapter weights, naming the first such tensor."""
    for name in sorted(weights):
        check_finite_tensor(name, weights[name], where)


def check_finite_tensor(name: str, tensor: torch.Tensor, where: str | os.PathLike) -> None:
    """`check_finite` for one tensor."""
    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
        raise AdapterError(
            f"{where}: tensor {name} holds NaN or Inf values; the adapter is corrupt or its training diverged "
            "(re-save it from a good checkpoint, or retrain with a lower learning rate)."
        )


def _positive_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


# milora_config.json keys every reader uses, and what each must be
_METADATA_CHECKS = {
    "init": (lambda v: isinstance(v, str), "a string"),
    "solver": (lambda v: v is None or isinstance(v, str), "a string"),
    "r": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0, "a positive integer"),
    "lora_alpha": (_positive_number, "a positive number"),
    "use_rslora": (lambda v: isinstance(v, bool), "true or false"),
    "rank_pattern": (lambda v: isinstance(v, dict) and all(isinstance(x, int) and x > 0 for x in v.values()),
                     "a mapping to positive integers"),
    "alpha_pattern": (lambda v: isinstance(v, dict) and all(_positive_number(x) for x in v.values()),
                      "a mapping to positive numbers"),
    "fingerprint": (lambda v: isinstance(v, dict) and all(isinstance(v.get(k), str) for k in ("float32", "bfloat16")),
                    "a mapping with float32 and bfloat16 digests"),
    "report": (lambda v: isinstance(v, list), "a list"),
}


def check_metadata(metadata, path: str | os.PathLike) -> None:
    """Refuse a milora_config.json that is not what `save_adapter` writes (not a mapping, a key
    missing or of the wrong type, alpha <= 0), naming the key: a "corrupt milora_config.json"."""
    if not isinstance(metadata, dict):
        raise AdapterError(f"corrupt {MILORA_CONFIG} in {path}: it holds a {type(metadata).__name__}, not a mapping; "
                           "re-save the adapter.")
    for key, (valid, what) in _METADATA_CHECKS.items():
        if key not in metadata:
            raise AdapterError(f"corrupt {MILORA_CONFIG} in {path}: it lacks {key!r}; re-save the adapter.")
        if not valid(metadata[key]):
            shown = repr(metadata[key])
            raise AdapterError(f"corrupt {MILORA_CONFIG} in {path}: {key} must be {what}, got "
                               f"{shown[:80] + '...' if len(shown) > 80 else shown}; re-save the adapter.")


def check_floating(weights: dict[str, torch.Tensor], where: str | os.PathLike) -> None:
    """Refuse adapter tensors that are not floating point (an int32 factor is not a LoRA factor)."""
    for name in sorted(weights):
        if not weights[name].is_floating_point():
            raise AdapterError(f"{where}: tensor {name} has dtype {weights[name].dtype}; adapter weights are floating "
                               "point (float32, bfloat16, float16): the file was edited or belongs to something else.")
