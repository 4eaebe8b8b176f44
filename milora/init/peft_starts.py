"""PEFT's own starts as milora init modes, computed by PEFT's code, recorded and saved as milora's.

| init | PEFT option | data | base changed |
|---|---|---|---|
| ``dora`` | ``use_dora=True`` (LoRA's start, magnitudes m = row norms of W) | no | no |
| ``olora`` | ``init_lora_weights="olora"`` (QR of W) | no | yes |
| ``pissa-fast`` | ``"pissa_niter_N"`` (randomised SVD, N = ``pissa_niter``) | no | yes |
| ``corda-kpm``, ``corda-ipm`` | ``"corda"`` + `preprocess_corda` (knowledge-preserved, instr.-previewed) | yes | yes |
| ``eva`` | ``"eva"`` + `initialize_lora_eva_weights` (A from input SVDs, B = 0) | yes | no |
| ``lora-ga`` | ``"lora_ga"`` + `preprocess_loraga` (gradient SVD) | yes | yes |
| ``mica`` | ``"mica"`` (B from W's minor left singular vectors, frozen; A = 0) | no | no |
| ``loftq`` | ``"loftq"`` + `LoftQConfig` (quantise / fit L R alternately; needs ``quantization``) | no | yes |

"Data" starts take ``calibration``: batches (dicts of ``input_ids``, ``attention_mask``,
``labels``) from the training data. CorDA's covariance hook takes one unpadded sequence per
forward pass, so each batch row is run alone with its padding removed; EVA and LoRA-GA take the
batches as they are (LoRA-GA: one backward pass of the language-modelling loss per batch).

What milora adds to PEFT's start:

- Starts that move part of W into the adapter (`milora.constants.RESIDUAL_INITS`) leave PEFT's
  factors (A0, B0) untouched, but the base is rewritten from the ORIGINAL W as
  W_res = W - s B0 A0 in float64, rounded once (`milora.init.layers.set_adapter_factors`): the
  rounding `milora.load_model` applies, so a reloaded adapter is bit-identical. PEFT's own
  float32 residual differs by its rounding: ``peft_residual_difference`` in the report. The
  adapter is saved as the rank-2r update on the original base, like MiLoRA's.
- Starts that leave the base alone (dora, eva, mica) are checked to leave it bit-identical and
  are saved in PEFT's own format (DoRA's magnitude vectors included).
- The model's output at the start is compared with the base model's on a probe batch
  (``output_relative_error``; a warning when it exceeds `FUNCTION_PRESERVING`).

PEFT's starts run where the weights are (no ``device``, ``solver``, ``workers``, ``null_space``:
those options are refused, as is ``quantization``, which only ``loftq`` takes and needs:
`milora.init.loftq`).
"""

from __future__ import annotations

import copy
import importlib.util
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import peft
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer

from milora.constants import DATA_INITS, PEFT_STARTS, RESIDUAL_INITS
from milora.errors import ModelError
from milora.init.layers import lora_layers, set_adapter_factors
from milora.init.loftq import LOFTQ_BITS, loftq_problem, scaling_problem
from milora.init.record import InitRecord, attach_record
from milora.init.targets import (
    fingerprint,
    saved_modules,
    scaling_for,
    target_modules,
    validate_lora_config,
    weight_matrix,
)
from milora.models import peft_wrapping

FUNCTION_PRESERVING = {torch.float32: 1e-4, torch.float64: 1e-10}
"""Largest relative output change at the start that still counts as function-preserving, by dtype
(lower precisions: 2e-2). MiLoRA's own starts measure ~3e-7 in float32."""


@dataclass(frozen=True)
class PeftStart:
    """How one milora init mode is run by PEFT; ``needs``: the PEFT LoRA-layer method that computes it
    (absent from a PEFT too old for the start)."""

    init_lora_weights: bool | str
    needs: str
    use_dora: bool = False


STARTS = {
    "dora": PeftStart(True, "dora_init", use_dora=True),
    "olora": PeftStart("olora", "olora_init"),
    "pissa-fast": PeftStart("pissa_niter", "pissa_init"),
    "corda-kpm": PeftStart("corda", "corda_init"),
    "corda-ipm": PeftStart("corda", "corda_init"),
    "eva": PeftStart("eva", "eva_init"),
    "lora-ga": PeftStart("lora_ga", "lora_ga_init"),
    "mica": PeftStart("mica", "mica_init"),
    "loftq": PeftStart("loftq", "loftq_init"),
}
assert tuple(STARTS) == PEFT_STARTS


def is_peft_start(init: str) -> bool:
    return init in STARTS


def peft_lora_config(lora_config: LoraConfig, init: str, pissa_niter: int = 4, quantization: str | None = None
                     ) -> LoraConfig:
    """``lora_config`` with PEFT's options for ``init`` (`STARTS`); EVA without rank redistribution
    (rho = 1), so every method trains the same rank; LoftQ with the bits of ``quantization`` and PEFT's
    default of one alternation."""
    from peft import EvaConfig, LoftQConfig, LoraGAConfig  # imported when used: older PEFTs lack them
    from peft.tuners.lora.config import CordaConfig

    start = STARTS[init]
    config = copy.deepcopy(lora_config)
    config.use_dora = start.use_dora
    config.init_lora_weights = f"pissa_niter_{pissa_niter}" if init == "pissa-fast" else start.init_lora_weights
    if init.startswith("corda"):
        config.corda_config = CordaConfig(corda_method=init.removeprefix("corda-"))
    if init == "eva":
        config.eva_config = EvaConfig(rho=1.0)
    if init == "lora-ga":
        config.lora_ga_config = LoraGAConfig()
    if init == "loftq":
        config.loftq_config = vars(LoftQConfig(loftq_bits=LOFTQ_BITS[quantization]))  # as __post_init__ stores it
    return config


def check_peft_start(init: str, calibration, solver: str, workers, device, null_space: str, quantization,
                     pissa_niter: int) -> None:
    """Options a PEFT start ignores or lacks, and a PEFT too old for it, refused before anything is modified."""
    if not _peft_has(STARTS[init].needs):
        raise ModelError(f"init={init!r} needs a newer PEFT than the installed {peft.__version__} (it lacks "
                         f"LoraLayer.{STARTS[init].needs}): `pip install -U peft` (milora is tested with 0.22).")
    if init == "loftq" and (problem := loftq_problem(quantization)):
        raise ModelError(problem)
    ignored = [(name, value) for name, value, default in (
        ("solver", solver, "auto"), ("workers", workers, None), ("device", device, None),
        ("null_space", null_space, "zero"), ("quantization", None if init == "loftq" else quantization, None))
        if value != default]
    if ignored:
        name, value = ignored[0]
        raise ModelError(f"{name}={value!r} has no effect on init={init!r} (PEFT computes this start where the "
                         f"weights are, in their precision): leave {name} at its default.")
    if init in DATA_INITS and not calibration:
        raise ModelError(f"init={init!r} computes its start from training batches: pass calibration= (a list of "
                         "batches; milora train draws calibration_batches of them from the dataset).")
    if init not in DATA_INITS and calibration:
        raise ModelError(f"init={init!r} takes no data: drop calibration= (data starts: {', '.join(DATA_INITS)}).")
    if isinstance(pissa_niter, bool) or not isinstance(pissa_niter, int) or pissa_niter < 1:
        raise ModelError(f"pissa_niter must be a positive integer, got {pissa_niter!r}.")


def _peft_has(method: str) -> bool:
    """Whether the installed PEFT computes a start: DoRA is a layer variant (peft.tuners.lora.dora), EVA
    an initialiser function (peft.tuners.lora.eva), the others LoRA-layer methods."""
    if method in ("dora_init", "eva_init"):
        return importlib.util.find_spec(f"peft.tuners.lora.{method.removesuffix('_init')}") is not None
    return hasattr(LoraLayer, method)


def get_peft_start_model(
    model: torch.nn.Module, lora_config: LoraConfig, init: str, calibration: Sequence[dict] | None = None,
    seed: int = 0, adapter_name: str = "default", pissa_niter: int = 4, quantization: str | None = None,
) -> PeftModel:
    """Wrap ``model`` (in place) in a PEFT LoRA model whose start PEFT computes (module docstring), the base in full
    precision (``quantization``: the one loftq fits its start to; the caller quantises the base after)."""
    validate_lora_config(lora_config, init)
    saved_modules(model, lora_config)
    modules = target_modules(model, lora_config)
    if init == "loftq" and (problem := scaling_problem({name: scaling_for(lora_config, name) for name in modules})):
        raise ModelError(problem)
    record = InitRecord(init=init, solver="peft", seed=seed, fingerprint=fingerprint(modules))
    originals = ({name: weight_matrix(module).detach().clone() for name, module in modules.items()}
                 if init in RESIDUAL_INITS else {})
    probe = _probe(model, calibration)
    with torch.no_grad():
        before = model(**probe).logits.double()
    config = peft_lora_config(lora_config, init, pissa_niter, quantization)
    _preprocess(model, config, init, calibration)
    with peft_wrapping():
        peft_model = get_peft_model(model, config, adapter_name=adapter_name)
    try:
        if init == "eva":
            from peft.tuners.lora.eva import initialize_lora_eva_weights

            initialize_lora_eva_weights(peft_model, dataloader=list(calibration), adapter_name=adapter_name,
                                        show_progress_bar=False)
        _record_start(peft_model, record, originals, adapter_name)
    except BaseException:
        for name, layer in lora_layers(peft_model).items():
            if name in originals:
                weight_matrix(layer.get_base_layer()).data.copy_(originals[name])
        peft_model.unload()
        raise
    with torch.no_grad():
        after = peft_model(**probe).logits.double()
    _measure_output(record, before, after, init, weight_matrix(next(iter(modules.values()))).dtype)
    attach_record(peft_model, record)
    return peft_model


def _probe(model: torch.nn.Module, calibration: Sequence[dict] | None) -> dict:
    """The batch the start's output is measured on: the first calibration batch, else seeded random tokens."""
    device = next(model.parameters()).device
    if calibration:
        return {key: calibration[0][key].to(device) for key in ("input_ids", "attention_mask")}
    vocab = model.config.get_text_config().vocab_size
    return {"input_ids": torch.randint(0, vocab, (2, 32), generator=torch.Generator().manual_seed(0)).to(device)}


def _preprocess(model: torch.nn.Module, config: LoraConfig, init: str, calibration: Sequence[dict] | None) -> None:
    """CorDA's covariances and LoRA-GA's gradients, attached by PEFT to the target modules."""
    device = next(model.parameters()).device
    if init.startswith("corda"):
        from peft.tuners.lora.corda import preprocess_corda

        def run_model() -> None:
            for batch in calibration:
                for ids, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True):
                    model(input_ids=ids[mask.bool()][None].to(device))

        was_training = model.training
        preprocess_corda(model, config, run_model=run_model)
        model.train(was_training)
    elif init == "lora-ga":
        from peft.tuners.lora.loraga import preprocess_loraga

        def train_step() -> None:
            for batch in calibration:
                model(**{key: value.to(device) for key, value in batch.items()}).loss.backward()

        preprocess_loraga(model, config, train_step=train_step)


def _record_start(peft_model: PeftModel, record: InitRecord, originals: dict[str, torch.Tensor], adapter: str) -> None:
    """Each layer's start (A0, B0 norms, base changed or not); residual starts get their float64 residual."""
    for name, layer in lora_layers(peft_model).items():
        A0 = layer.lora_A[adapter].weight.detach().clone()
        B0 = layer.lora_B[adapter].weight.detach().clone()
        weight = weight_matrix(layer.get_base_layer())
        entry = {"module": name, "shape": list(weight.shape), "rank": layer.r[adapter],
                 "scaling": layer.scaling[adapter], "solver": "peft", "boundary_gap": None, "zero_components": 0,
                 "norm_A0": float(A0.double().norm()), "norm_B0": float(B0.double().norm())}
        if name in originals:
            original = originals[name]
            peft_residual = weight.detach().clone()
            entry["base_changed"] = not torch.equal(peft_residual, original)
            weight.data.copy_(original)
            entry["reconstruction_error"] = max(set_adapter_factors(layer, adapter, A0, B0, A0, B0))
            entry["peft_residual_difference"] = float((peft_residual.double() - weight.detach().double()).norm()
                                                      / original.double().norm().clamp_min(1e-300))
            record.initial_factors[name] = (A0.cpu(), B0.cpu())
        else:
            entry["base_changed"] = False
            entry["reconstruction_error"] = 0.0
        record.report.append(entry)
    if not originals:
        found = fingerprint({name: layer.get_base_layer() for name, layer in lora_layers(peft_model).items()})
        if found != record.fingerprint:
            raise ModelError(f"init={record.init!r} changed the base weights, which milora saves as PEFT's own "
                             "adapter on the unchanged base: this PEFT version's start is not the one milora knows.")


def _measure_output(record: InitRecord, before: torch.Tensor, after: torch.Tensor, init: str,
                    dtype: torch.dtype) -> None:
    error = float((after - before).norm() / before.norm())
    tolerance = FUNCTION_PRESERVING.get(dtype, 2e-2)
    record.measured["output_relative_error"] = error
    record.measured["function_preserving"] = error <= tolerance
    record.measured["base_changed"] = any(entry["base_changed"] for entry in record.report)
    if error > tolerance:
        warnings.warn(f"init={init!r} is not function-preserving here: the output at the start differs from the base "
                      f"model's by {error:.3g} (relative), above {tolerance:g}.", stacklevel=3)
