"""QLoRA-style training on a bitsandbytes base: decompose in full precision, then quantise the residual.

``get_model(..., quantization="nf4")`` decomposes each target weight W in float64 from the
full-precision checkpoint and writes the residual W_res = W - s B0 A0 as without quantisation;
`quantize_peft_model` then quantises the base (W_res in the targets, W in the other Linear
layers) and wraps it again with PEFT, which picks its LoRA layers for bitsandbytes
(`peft.tuners.lora.bnb`) from the base layer's type, and puts the same factors back. The model
at init is therefore

    Q(W_res) + s B0 A0 = W + (Q(W_res) - W_res)

exact but for the quantisation error of the residual, which is measured per weight. This is
PiSSA's "QPiSSA" recipe for every init mode: ``lora`` quantises W itself (QLoRA), ``pissa`` W
minus its principal part, ``milora`` W minus its minor part.

The quantisation is transformers' own bitsandbytes quantizer (what ``from_pretrained(...,
quantization_config=BitsAndBytesConfig(...))`` runs) driven on a model already in memory:
transformers quantises only while loading a checkpoint, and the residual exists only in memory.
Same module replacement, same modules kept in full precision (output embeddings, tied weights),
same parameter construction. bitsandbytes is imported only here, on first use.
"""

from __future__ import annotations

import copy
import importlib.util

import torch
from peft import PeftModel, get_peft_model

from milora.constants import QUANTIZATIONS
from milora.errors import ModelError
from milora.init.layers import lora_layers, restore_weight
from milora.init.record import InitRecord, attach_record
from milora.init.targets import weight_matrix
from milora.models import peft_wrapping


def check_quantization(method: str | None) -> None:
    """A clear error for an unknown method, or bitsandbytes missing; None (full precision) passes."""
    if method is None:
        return
    if method not in QUANTIZATIONS:
        raise ModelError(f"Unknown quantization {method!r}: choose one of {', '.join(QUANTIZATIONS)} (or none).")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelError(f"quantization={method!r} needs bitsandbytes: `pip install 'milora[quantization]'` "
                         "(bitsandbytes>=0.50, which runs on CPU too).")


def bnb_config(method: str, compute_dtype: torch.dtype):
    """The `transformers.BitsAndBytesConfig` of a method.

    nf4 / fp4: QLoRA's 4-bit recipe (blocks of 64 weights with an absmax scale each, the scales
    double-quantised, matmuls in ``compute_dtype``); int8: LLM.int8 with transformers' defaults
    (row-wise absmax weights; at inference the inputs are rounded to int8 row-wise too, except
    columns above 6.0, kept in 16 bits; bitsandbytes' CPU layers train with the dequantised weight).
    """
    from transformers import BitsAndBytesConfig

    if method == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=method, bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype)


def dequantized_weight(module: torch.nn.Module) -> torch.Tensor:
    """The (out x in) weight a bitsandbytes layer multiplies by, dequantised (PEFT's helper)."""
    from peft.utils.integrations import dequantize_module_weight

    return dequantize_module_weight(module).detach()


def _quantizer(model: torch.nn.Module, method: str):
    """transformers' bitsandbytes quantizer for ``model`` in ``method`` (computing in the model's dtype)."""
    from transformers import PreTrainedModel
    from transformers.quantizers import AutoHfQuantizer

    check_quantization(method)
    if not isinstance(model, PreTrainedModel):
        raise ModelError(f"quantization needs a transformers model (PreTrainedModel), got {type(model).__name__}.")
    quantizer = AutoHfQuantizer.from_config(bnb_config(method, model.dtype), pre_quantized=False)
    quantizer.validate_environment(device_map=None)
    return quantizer


def check_quantizable(model: torch.nn.Module, targets, method: str) -> None:
    """Refuse, before anything is modified, target modules that transformers keeps in full precision
    (output embeddings, tied weights, ``_keep_in_fp32_modules``): their adapter would sit on a full-precision base."""
    from transformers.quantizers.quantizers_utils import should_convert_module

    quantizer = _quantizer(model, method)
    kept = quantizer.get_modules_to_not_convert(model, quantizer.quantization_config.llm_int8_skip_modules,
                                                model._keep_in_fp32_modules)
    unquantised = sorted(name for name in targets if not should_convert_module(name, kept))
    if unquantised:
        raise ModelError(
            f"Target module(s) {unquantised[:3]} stay in full precision under bitsandbytes quantisation (transformers "
            f"keeps {sorted(kept)} unquantised): remove them from the targets, or train without quantization."
        )


def quantize_model(model: torch.nn.Module, method: str) -> dict[str, tuple[float, float]]:
    """Quantise, in place, a transformers model's Linear / Conv1D layers holding their current weights.

    Returns ``{module name: (||Q(W) - W||_F, ||W||_F)}`` (float64) for every quantised module,
    W being the weight it held. If anything fails (Ctrl-C included), the original modules are
    put back before the exception propagates.
    """
    quantizer = _quantizer(model, method)
    originals = dict(model.named_modules())
    quantizer.preprocess_model(model, device_map=None)  # replaces the layers by empty bitsandbytes ones (meta)
    replaced = {name: module for name, module in model.named_modules() if originals.get(name, module) is not module}
    quantize = quantizer.get_quantize_ops()
    errors = {}
    try:
        for name, module in replaced.items():
            original, key = originals[name], f"{name}.weight"
            module.weight = quantize.convert({key: original.weight.detach()}, model=model, full_layer_name=key)[key]
            if original.bias is not None:
                module.bias = original.bias
            # bitsandbytes 0.50's CPU inference shortcut (AVX512-BF16 CPUs, eval mode, no gradients) repacks the
            # weight with bfloat16 block scales, 0.3 % off the dequantised weight the layer trains with, and fails
            # for in_features not a multiple of 64: CPU inference stays the computation of training and GPUs
            module.support_avx512bf16_for_cpu = False
            reference = weight_matrix(original).detach().double()
            difference = dequantized_weight(module).double() - reference
            errors[name] = (float(torch.linalg.norm(difference)), float(torch.linalg.norm(reference)))
    except BaseException:
        for name in replaced:
            model.set_submodule(name, originals[name])
        quantizer.remove_quantization_config(model)
        raise
    quantizer.postprocess_model(model)  # sets is_loaded_in_4bit / _8bit, which PEFT reads to pick its layers
    model.hf_quantizer = quantizer  # transformers' Trainer trains adapters on a quantised model only with it
    return errors


def quantize_peft_model(
    peft_model: PeftModel, record: InitRecord, method: str, adapter_name: str = "default"
) -> PeftModel:
    """The initialised ``peft_model`` on a quantised base: Q(W_res) with the same factors (see module docstring);
    for ``loftq``, Q(W) (its start s B0 A0 was fitted to W - Q(W), `milora.init.loftq`).

    ``record.quantization`` receives the method, its bitsandbytes config and per target module
    ``quantization_error`` = ||Q(W_res) - W_res||_F / ||W_res||_F, ``quantization_error_vs_weight`` =
    ||Q(W_res) - W_res||_F / ||W||_F (the noise in units of the original weight) and
    ``initial_share`` = ||s B0 A0||_F / ||W||_F (the part the adapter holds; 0 for lora); and the
    mean error of the other quantised modules. Returns a new PeftModel; ``peft_model`` is unloaded.
    Interrupted while quantising, the base model is restored to its original weights (one rounding).
    """
    check_quantization(method)
    config = copy.deepcopy(peft_model.peft_config[adapter_name])
    if config.init_lora_weights == "loftq":  # the factors are copied in below: PEFT must not fit LoftQ again
        config.init_lora_weights, config.loftq_config = True, {}
    layers = lora_layers(peft_model)
    factors = {name: (layer.lora_A[adapter_name].weight.detach().clone(),
                      layer.lora_B[adapter_name].weight.detach().clone()) for name, layer in layers.items()}
    shares = {name: _initial_share(layer, record, name, adapter_name) for name, layer in layers.items()}
    scalings = {name: layer.scaling[adapter_name] for name, layer in layers.items()}
    base = peft_model.unload()
    if record.init == "loftq":  # LoftQ's factors compensate the quantisation of W itself (`milora.init.loftq`)
        _restore_weights(base, record, scalings)
    try:
        errors = quantize_model(base, method)
    except BaseException as error:
        if record.init != "loftq":
            _restore_weights(base, record, scalings)
        error.add_note("milora: quantisation was interrupted; the model was restored to its original weights and "
                       "modules.")
        raise
    with peft_wrapping():
        quantized = get_peft_model(base, config, adapter_name=adapter_name)
    new_layers = lora_layers(quantized)
    if new_layers.keys() != layers.keys():  # PEFT chose other modules on the quantised base: never silently
        differing = sorted(new_layers.keys() ^ layers.keys())
        raise ModelError(f"PEFT adapted other modules on the quantised model: {differing[:3]}.")
    for name, (A, B) in factors.items():
        new_layers[name].lora_A[adapter_name].weight.data.copy_(A)
        new_layers[name].lora_B[adapter_name].weight.data.copy_(B)
    record.quantization = _quantization_report(method, base, errors, shares)
    attach_record(quantized, record)
    return quantized


def _initial_share(layer, record: InitRecord, name: str, adapter: str) -> tuple[float, float]:
    """(||s B0 A0||_F, ||W||_F) with W = W_res + s B0 A0, in float64 (W_res = W for plain LoRA)."""
    residual = weight_matrix(layer.get_base_layer()).detach().double()
    if name not in record.initial_factors:
        return 0.0, float(torch.linalg.norm(residual))
    A0, B0 = record.initial_factors[name]
    initial = (B0.double() @ A0.double()).mul_(layer.scaling[adapter]).to(residual.device)
    return float(torch.linalg.norm(initial)), float(torch.linalg.norm(residual.add_(initial)))


def _restore_weights(base: torch.nn.Module, record: InitRecord, scalings: dict[str, float]) -> None:
    """W = W_res + s B0 A0 back into the (plain again) target modules, rounded once."""
    for name, (A0, B0) in record.initial_factors.items():
        restore_weight(weight_matrix(base.get_submodule(name)), A0, B0, scalings[name])


def _quantization_report(method: str, base, errors: dict, shares: dict) -> dict:
    targets = []
    for name, (initial_norm, weight_norm) in shares.items():
        error_norm, residual_norm = errors[name]
        targets.append({
            "module": name,
            "quantization_error": error_norm / max(residual_norm, 1e-300),
            "quantization_error_vs_weight": error_norm / max(weight_norm, 1e-300),
            "initial_share": initial_norm / max(weight_norm, 1e-300),
        })
    others = [error_norm / max(norm, 1e-300) for name, (error_norm, norm) in errors.items() if name not in shares]
    return {
        "method": method,
        "bnb_config": base.config.quantization_config.to_dict(),
        "targets": targets,
        "other_modules": len(others),
        "other_mean_quantization_error": sum(others) / len(others) if others else None,
    }
