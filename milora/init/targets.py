"""Which modules an adapter covers, and whether each can take an SVD-based start.

`target_modules` resolves a `peft.LoraConfig`'s target selection (names, regex,
``layers_to_transform``, ``exclude_modules``, ``all-linear``) on a model exactly as PEFT will,
and checks every selected module before anything is modified: supported type, floating
weight, finite values, a rank below min(out, in), not quantised, no weight shared by two
targets. `saved_modules` resolves ``modules_to_save`` (modules trained in full and saved with the
adapter, e.g. a vision-language model's projector) as PEFT does. `fingerprint` identifies the
original base weights an adapter belongs to.
"""

from __future__ import annotations

import copy
import hashlib
import math

import torch
from peft import LoraConfig, PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer, check_target_module_exists
from peft.utils.other import get_pattern_key
from transformers.pytorch_utils import Conv1D

from milora.constants import INIT_MODES
from milora.errors import ModelError

_QUANTISED_PACKAGES = ("bitsandbytes", "auto_gptq", "gptqmodel", "awq", "optimum.quanto", "hqq", "torchao", "eetq")


def weight_matrix(module: torch.nn.Module) -> torch.Tensor:
    """The (out x in) weight of a Linear or GPT-2 style Conv1D (stored in x out)."""
    weight = module.weight
    return weight.T if isinstance(module, Conv1D) else weight


def validate_lora_config(lora_config: LoraConfig, init: str) -> None:
    """Reject options that would be silently wrong with an SVD-based start."""
    if not isinstance(lora_config, LoraConfig):
        raise TypeError(f"Expected a peft.LoraConfig, got {type(lora_config).__name__}.")
    if init not in INIT_MODES:
        raise ModelError(f"Unknown init mode {init!r}: choose one of {', '.join(INIT_MODES)}.")
    if init == "lora":
        if lora_config.init_lora_weights not in (True, "gaussian"):
            raise ModelError(
                f"init='lora' uses PEFT's default initialisation, but init_lora_weights="
                f"{lora_config.init_lora_weights!r}; for SVD-based starts use milora's init= instead."
            )
        return
    if lora_config.init_lora_weights is not True:
        raise ModelError(
            f"init={init!r} sets the adapter itself; leave LoraConfig.init_lora_weights at its default "
            f"(got {lora_config.init_lora_weights!r}; PEFT's starts are init modes too, e.g. init='olora')."
        )
    for option, value, default in (("use_dora", lora_config.use_dora, False), ("bias", lora_config.bias, "none")):
        if value != default:
            hint = " (DoRA is init='dora')" if option == "use_dora" else ""
            raise ModelError(f"LoraConfig.{option}={value!r} is not supported with init={init!r}; use {default!r}"
                             f"{hint}.")
    # B = U sqrt(S / s) needs a positive scaling s = alpha / r (or alpha / sqrt(r))
    for option, values in (("r", [lora_config.r, *lora_config.rank_pattern.values()]),
                           ("lora_alpha", [lora_config.lora_alpha, *lora_config.alpha_pattern.values()])):
        bad = [value for value in values if not value > 0]
        if bad:
            raise ModelError(f"LoraConfig.{option} (and its pattern) must be positive for init={init!r}, "
                             f"got {bad[0]!r}.")


def target_modules(model: torch.nn.Module, lora_config: LoraConfig, check_values: bool = True
                   ) -> dict[str, torch.nn.Module]:
    """The modules PEFT will adapt, by name, after checking each one can take an SVD start.

    Raises a ValueError naming the problem (missing target, unsupported or quantised module,
    rank too large, non-finite weight, a weight shared by two targets) before anything is modified.
    ``check_values=False`` skips the one check that reads the weights (finite values), for a model
    built on the meta device whose weights are streamed from a checkpoint (`milora.init.streaming`).
    """
    if isinstance(model, PeftModel) or any(isinstance(module, BaseTunerLayer) for module in model.modules()):
        raise ModelError(
            "The model already holds PEFT adapter layers; milora needs the original base model. Load it again "
            "(or take peft_model.unload() of a plain PEFT model; a milora model's base holds residual weights)."
        )
    if lora_config.target_modules is None and lora_config.target_parameters:
        return {}  # fused expert parameters only (`milora.init.experts.target_parameters`)
    config = _expand_all_linear(model, lora_config)
    matched = {name: module for name, module in model.named_modules()
               if name and check_target_module_exists(config, name)}
    leaf_names = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if _is_matrix_module(m)})
    if isinstance(config.target_modules, (list, set, tuple)):
        names = [name for name, _ in model.named_modules()]  # not only the matched: exclude_modules may drop some
        missing = sorted(t for t in config.target_modules if not any(n == t or n.endswith("." + t) for n in names))
        if missing:
            raise ModelError(
                f"Target module(s) {missing} not found in {type(model).__name__}. "
                f"Linear modules it has: {', '.join(leaf_names)}."
            )
    if not matched:
        raise ModelError(f"No module matches target_modules={config.target_modules!r}. "
                         f"Linear modules: {', '.join(leaf_names)}.")
    for name, module in matched.items():
        _check_module(name, module, rank_for(config, name), check_values)
    shared = {}
    for name, module in matched.items():
        # tied weights share one Parameter; on the meta device every data_ptr is 0, so compare the objects
        key = id(module.weight) if module.weight.is_meta else module.weight.data_ptr()
        first = shared.setdefault(key, name)
        if first != name:
            raise ModelError(
                f"Modules {first} and {name} share one weight tensor (tied weights): the init replaces each adapted "
                "weight by its residual, so a shared weight cannot be adapted twice. Adapt only one of them."
            )
    return matched


def saved_modules(model: torch.nn.Module, lora_config: LoraConfig) -> dict[str, torch.nn.Module]:
    """The modules ``modules_to_save`` selects (PEFT's rule: a module name ending with an entry), by name.

    Each entry must select something, and no selected module may hold (or be) a target module:
    PEFT would silently drop such a target (the module is copied and trained whole instead).
    """
    entries = list(lora_config.modules_to_save or [])
    if not entries:
        return {}
    selected = {name: module for name, module in model.named_modules()
                if name and any(name.endswith(entry) for entry in entries)}
    missing = [entry for entry in entries if not any(name.endswith(entry) for name in selected)]
    if missing:
        parents = sorted({name.split(".")[-1] for name, m in model.named_modules() if name and len(list(m.children()))})
        raise ModelError(f"modules_to_save {missing} not found in {type(model).__name__}; modules with children it "
                         f"has: {', '.join(parents[:40])}.")
    unsaved = copy.copy(_expand_all_linear(model, lora_config))
    unsaved.modules_to_save = None
    targets = [name for name, _ in model.named_modules() if name and check_target_module_exists(unsaved, name)]
    for name in selected:
        inside = sorted(target for target in targets if target == name or target.startswith(name + "."))
        if inside:
            raise ModelError(f"Module {name} is in modules_to_save (trained in full) but holds the target module "
                             f"{inside[0]}, which PEFT would then leave out: remove one of them.")
    return selected


def _expand_all_linear(model: torch.nn.Module, lora_config: LoraConfig) -> LoraConfig:
    if lora_config.target_modules != "all-linear":
        return lora_config
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if _is_matrix_module(m) and m is not output}
    config = copy.copy(lora_config)
    config.target_modules = names
    return config


def _is_matrix_module(module: torch.nn.Module) -> bool:
    return isinstance(module, (torch.nn.Linear, Conv1D)) or quantised_by(module) is not None


def quantised_by(module: torch.nn.Module) -> str | None:
    """The quantisation package a module (or its weight) comes from, judged by class, not dtype."""
    for cls in (type(module), type(getattr(module, "weight", None))):
        for package in _QUANTISED_PACKAGES:
            if cls.__module__.startswith(package):
                return package
    return None


def rank_for(config: LoraConfig, name: str) -> int:
    return config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), name), config.r)


def scaling_for(config: LoraConfig, name: str) -> float:
    """The scaling s PEFT gives module ``name``'s adapter: alpha / r, or alpha / sqrt(r) with rsLoRA
    (alpha and r from their patterns), computed as PEFT computes it (`LoraLayer.update_layer`)."""
    r = rank_for(config, name)
    alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), name), config.lora_alpha)
    return alpha / math.sqrt(r) if config.use_rslora else alpha / r


def _check_module(name: str, module: torch.nn.Module, rank: int, check_values: bool = True) -> None:
    package = quantised_by(module)
    if package is not None:
        raise ModelError(
            f"Module {name} is quantised ({package} {type(module).__name__}): milora needs the full-precision weight "
            "(to decompose it, or to rebuild a saved adapter's residual). Load the model without quantisation and "
            "pass quantization='nf4' (fp4, int8; CLI --quantize, config quantization:) to quantise the residual after."
        )
    if not isinstance(module, (torch.nn.Linear, Conv1D)):
        stacks = [key for key, parameter in module.named_parameters(recurse=False) if parameter.ndim == 3]
        hint = (f" Its fused expert parameters ({', '.join(stacks)}) are targets themselves: name them instead "
                "(target_modules / lora_target, which milora passes to PEFT as target_parameters)." if stacks else
                " Remove it from target_modules.")
        raise ModelError(
            f"Module {name} is a {type(module).__name__}; MiLoRA supports torch.nn.Linear and transformers Conv1D."
            + hint
        )
    weight = weight_matrix(module)
    if not weight.is_floating_point():
        raise ModelError(f"Module {name} has a {weight.dtype} weight: load the model in float32, float16 or bfloat16.")
    out_features, in_features = weight.shape
    if not 0 < rank < min(out_features, in_features):
        raise ModelError(
            f"Rank {rank} is too large for {name} ({out_features} x {in_features}): it must be below "
            f"min(out, in) = {min(out_features, in_features)}. Lower r or set rank_pattern for this module."
        )
    if check_values:
        check_finite_weight(name, weight)


def check_finite_weight(name: str, weight: torch.Tensor) -> None:
    if not torch.isfinite(weight).all():
        raise ModelError(f"Module {name} has NaN or Inf in its weight: "
                         "the checkpoint is corrupt or was loaded wrongly.")


def fingerprint(modules: dict[str, torch.nn.Module], parameters: dict[str, torch.Tensor] | None = None
                ) -> dict[str, str]:
    """SHA-256 over names, shapes and an evenly strided sample of each weight, in float32 and bfloat16: each
    target module's (out x in) weight and each target parameter (a fused expert stack) as stored.

    The bfloat16 digest lets a model loaded in a lower precision match an adapter made in float32.
    """
    weights = {name: weight_matrix(module) for name, module in modules.items()}
    weights.update(parameters or {})
    return fingerprint_of_samples({name: (tuple(w.shape), fingerprint_sample(w)) for name, w in weights.items()})


def fingerprint_sample(weight: torch.Tensor, samples: int = 4096) -> torch.Tensor:
    """What `fingerprint` reads of one (out x in) weight: ``samples`` evenly strided entries of its
    row-major flattening, as float32 on CPU (exact for float32, bfloat16 and float16 weights)."""
    flat = weight.detach().reshape(-1)
    return flat[sample_indices(flat.numel(), samples).to(flat.device)].float().cpu()


def sample_indices(numel: int, samples: int = 4096) -> torch.Tensor:
    """The positions `fingerprint_sample` reads in a flattening of ``numel`` entries: evenly strided, both ends."""
    count = min(samples, numel)
    return torch.arange(count) * (numel - 1) // max(count - 1, 1)


def fingerprint_of_samples(samples: dict[str, tuple[tuple[int, ...], torch.Tensor]]) -> dict[str, str]:
    """`fingerprint` from each weight's shape and `fingerprint_sample`, by module name (any order)."""
    digests = {"float32": hashlib.sha256(), "bfloat16": hashlib.sha256()}
    for name in sorted(samples):
        shape, sample = samples[name]
        for dtype, digest in digests.items():
            digest.update(f"{name}:{tuple(shape)}".encode())
            values = sample.to(torch.bfloat16).view(torch.int16) if dtype == "bfloat16" else sample
            digest.update(values.numpy().tobytes())
    return {dtype: digest.hexdigest() for dtype, digest in digests.items()}
