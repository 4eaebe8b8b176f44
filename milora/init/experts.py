"""Fused MoE expert parameters as adapter targets, through PEFT's ``target_parameters``.

transformers 5 stores a mixture-of-experts layer's experts as 3-D parameters, one (out x in)
matrix per expert: Qwen3-MoE's and Mixtral's ``gate_up_proj`` (E, 2I, H) and ``down_proj``
(E, H, I); modules marked ``is_transposed`` (gpt-oss) store each expert as (in x out) instead,
``gate_up_proj`` (E, H, 2I). No ``nn.Linear`` holds them, so ``target_modules`` cannot reach them;
PEFT's ``lora.ParamWrapper`` adapts such a parameter with one rank-r LoRA per expert, packed as

    lora_A.weight (r E x in):  expert e's A_e (r x in)  = rows [e r, (e + 1) r)
    lora_B.weight (out x r E): expert e's B_e (out x r) = columns e, e + E, ..., e + (r - 1) E

(`expert_factors` / `fused_factors`), and delta[e] = s B_e A_e in the parameter's own layout.
milora starts each expert from that expert's own singular triplets (`milora.init.initialize`),
so every expert matrix is treated exactly like a Linear weight: `weight_stack` views any LoRA
layer's adapted weight as (E, out, in), E = 1 for Linear and Conv1D.

Target names: `select_targets` sends a name to ``target_parameters`` when a 3-D parameter's name
ends with it (``gate_up_proj``, ``experts.down_proj``), to ``target_modules`` when a module's name
does; one name may do both (Qwen2-MoE's shared expert is a Linear ``down_proj``). `target_parameters`
resolves and checks the parameters as PEFT will match them (name equal, or ending in ``.name``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from peft import LoraConfig
from peft.tuners.lora import LoraLayer, ParamWrapper

from milora.errors import ModelError
from milora.init.multimodal import language_model_name, scoped_targets
from milora.init.targets import (
    check_finite_weight,
    fingerprint,
    quantised_by,
    rank_for,
    sample_indices,
    target_modules,
    weight_matrix,
)

EXPERT_NDIM = 3
"""A fused expert stack: (experts, d1, d2)."""


@dataclass(frozen=True)
class TargetSelection:
    """What a list of target names selects: PEFT's ``target_modules`` and ``target_parameters`` (None: none)."""

    modules: list[str] | str | None
    parameters: list[str] | None


def expert_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Every 3-D floating parameter of ``model`` (a fused expert stack), by its full name."""
    return {name: parameter for name, parameter in model.named_parameters()
            if parameter.ndim == EXPERT_NDIM and parameter.is_floating_point()}


def _matches(name: str, target: str) -> bool:
    """PEFT's rule for names in ``target_modules`` lists and ``target_parameters``."""
    return name == target or name.endswith("." + target)


def select_targets(model: torch.nn.Module, names: list[str] | tuple[str, ...], scope: str = "language_model"
                   ) -> TargetSelection:
    """PEFT's target options for ``names`` (module or fused-expert-parameter names, or ``["all-linear"]``) in
    ``scope`` (`milora.init.multimodal.scoped_targets`): names a 3-D parameter ends with become
    ``target_parameters``, the rest (and names a module also ends with) ``target_modules``. ``all-linear`` keeps
    PEFT's meaning (Linear layers only: name the experts' parameters to adapt them too)."""
    names = list(names)
    if names == ["all-linear"]:
        return TargetSelection(scoped_targets(model, names, scope), None)
    prefix = language_model_name(model) if scope == "language_model" else None
    stacks = [name for name in expert_parameters(model) if prefix is None or name.startswith(prefix + ".")]
    module_names = [name for name, _ in model.named_modules() if name]
    parameters = [name for name in names if any(_matches(stack, name) for stack in stacks)]
    modules = [name for name in names if name not in parameters or any(_matches(m, name) for m in module_names)]
    if parameters and prefix is not None:  # a vision-language model: the language model's stacks, by full name
        parameters = sorted(stack for stack in stacks if any(_matches(stack, name) for name in parameters))
    return TargetSelection(scoped_targets(model, modules, scope) if modules else None, parameters or None)


def check_parameter_options(lora_config: LoraConfig) -> None:
    """LoRA options PEFT's ``ParamWrapper`` cannot apply to a parameter, refused with the fix before anything runs."""
    refused = [("lora_dropout", lora_config.lora_dropout, 0.0, "dropout cannot be applied to a weight's input "
                "inside the experts' computation"),
               ("use_dora", lora_config.use_dora, False, "DoRA is defined for Linear layers"),
               ("fan_in_fan_out", lora_config.fan_in_fan_out, False, "the layout comes from the experts module"),
               ("lora_bias", lora_config.lora_bias, False, "an expert stack has no LoRA bias")]
    for option, value, default, why in refused:
        if value != default:
            raise ModelError(f"target_parameters {sorted(lora_config.target_parameters)} (fused MoE experts) need "
                             f"{option}={default!r}, got {value!r}: {why} (PEFT's lora.ParamWrapper). Set "
                             f"{option} to {default!r}.")


@dataclass(frozen=True)
class Targets:
    """What an adapter covers on a model: target modules (Linear / Conv1D) and fused expert parameters, by name."""

    modules: dict[str, torch.nn.Module]
    parameters: dict[str, torch.nn.Parameter]

    def fingerprint(self) -> dict[str, str]:
        return fingerprint(self.modules, self.parameters)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the first target's weight."""
        first = next(iter(self.modules.values()), None)
        return weight_matrix(first).dtype if first is not None else next(iter(self.parameters.values())).dtype


def resolve_targets(model: torch.nn.Module, lora_config: LoraConfig, check_values: bool = True) -> Targets:
    """`milora.init.targets.target_modules` and `target_parameters` of ``lora_config`` on ``model``, checked."""
    return Targets(target_modules(model, lora_config, check_values),
                   target_parameters(model, lora_config, check_values))


def refuse_parameter_targets(lora_config: LoraConfig, feature: str, fix: str) -> None:
    """A `ModelError` when ``lora_config`` targets fused expert parameters, which ``feature`` cannot handle."""
    if lora_config.target_parameters:
        raise ModelError(f"{feature} does not support target_parameters {sorted(lora_config.target_parameters)} "
                         f"(fused MoE experts): {fix}.")


def target_parameters(model: torch.nn.Module, lora_config: LoraConfig, check_values: bool = True
                      ) -> dict[str, torch.nn.Parameter]:
    """The fused expert stacks PEFT will adapt for ``lora_config.target_parameters``, by full name, after checking
    each one can take an SVD start per expert (3-D, floating, not quantised, finite, r below every expert
    matrix's min(out, in)); {} without ``target_parameters``. ``check_values=False`` skips the finite check."""
    wanted = sorted(lora_config.target_parameters or [])
    if not wanted:
        return {}
    check_parameter_options(lora_config)
    found = {f"{module_name}.{name}" if module_name else name: (module, parameter)
             for module_name, module in model.named_modules()
             for name, parameter in module.named_parameters(recurse=False)}
    matched = {name: pair for name, pair in found.items() if any(_matches(name, target) for target in wanted)}
    missing = [target for target in wanted if not any(_matches(name, target) for name in matched)]
    if missing:
        stacks = sorted({name.rsplit(".", 1)[-1] for name in expert_parameters(model)})
        raise ModelError(f"target_parameters {missing} match no parameter of {type(model).__name__}; its fused "
                         f"expert parameters: {', '.join(stacks) or 'none (not a mixture-of-experts model)'}.")
    for name, (module, parameter) in matched.items():
        _check_stack(name, module, parameter, rank_for(lora_config, name), check_values)
    return {name: parameter for name, (_, parameter) in sorted(matched.items())}


def _check_stack(name: str, module: torch.nn.Module, parameter: torch.nn.Parameter, rank: int,
                 check_values: bool) -> None:
    package = quantised_by(module)
    if package is not None:
        raise ModelError(f"Parameter {name} is quantised ({package}): milora needs the full-precision experts. "
                         "Load the model without quantisation.")
    if parameter.ndim != EXPERT_NDIM:
        raise ModelError(f"Parameter {name} has shape {tuple(parameter.shape)}: milora's target_parameters are fused "
                         "expert stacks (experts, d1, d2); adapt a 2-D weight through its module (target_modules).")
    if not parameter.is_floating_point():
        raise ModelError(f"Parameter {name} is {parameter.dtype}: load the model in float32, float16 or bfloat16.")
    smaller = min(parameter.shape[1:])
    if not 0 < rank < smaller:
        raise ModelError(f"Rank {rank} is too large for the experts of {name} ({parameter.shape[1]} x "
                         f"{parameter.shape[2]} each): it must be below {smaller}. Lower r or set rank_pattern.")
    if check_values:
        check_finite_weight(name, parameter)


def expert_count(layer: LoraLayer) -> int:
    """How many expert matrices a LoRA layer adapts: E for a fused stack, 1 otherwise."""
    return layer.num_experts if isinstance(layer, ParamWrapper) else 1


def weight_stack(layer: LoraLayer) -> torch.Tensor:
    """The weight a LoRA layer adapts as a view (E, out, in): a Linear's / Conv1D's (1, out, in); a fused stack's
    experts in PEFT's orientation (its delta[e] = s B_e A_e is (out x in), or (in x out) on ``is_transposed``
    modules, so the view transposes those)."""
    if not isinstance(layer, ParamWrapper):
        return weight_matrix(layer.get_base_layer())[None]
    parameter = layer.get_param()
    if parameter.ndim != EXPERT_NDIM:
        return parameter[None]
    return parameter.transpose(1, 2) if getattr(layer.get_base_layer(), "is_transposed", False) else parameter


def parameter_target_name(module_name: str, layer: LoraLayer) -> str:
    """A ParamWrapper's target as a user names it (``...mlp.experts.gate_up_proj``): PEFT nests the wrappers of one
    module's parameters, so the module name may end in ``.base_layer`` parts."""
    while module_name.endswith(".base_layer"):
        module_name = module_name.removesuffix(".base_layer")
    return f"{module_name}.{layer.parameter_name}"


def expert_factors(A: torch.Tensor, B: torch.Tensor, experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's packed factors A (r E x in), B (out x r E) as per-expert views A_e (E, r, in), B_e (E, out, r)."""
    return A.reshape(experts, -1, A.shape[-1]), B.reshape(B.shape[0], -1, experts).permute(2, 0, 1)


def fused_factors(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of `expert_factors`: A_e (E, r, in), B_e (E, out, r) packed as A (r E x in), B (out x r E)."""
    experts, out_features, r = B.shape
    return A.reshape(experts * r, A.shape[-1]), B.permute(1, 2, 0).reshape(out_features, r * experts)


def expert_sample(stored: torch.Tensor, expert: int, experts: int) -> torch.Tensor:
    """The entries of a stack's `fingerprint_sample` that lie in expert ``expert``'s slice ``stored`` (as stored) of
    a stack of ``experts``: the experts' shares, concatenated in expert order, are the stack's sample."""
    size = stored.numel()
    index = sample_indices(size * experts)
    mine = index[(index >= expert * size) & (index < (expert + 1) * size)] - expert * size
    return stored.detach().reshape(-1)[mine.to(stored.device)].float().cpu()
