"""Reading saved adapters back: checked, onto the ORIGINAL base, for inference, training further or resuming.

Every reader checks what `milora.adapter.format` promises before a tensor is used: finite
weights, the checksum, the two configs agreeing, the base's fingerprint, every tensor's shape.
`load_model` rebuilds the residual base W - s B0 A0 from the saved initial factors, without any
SVD; ``load_model(..., quantization=method)`` rebuilds the same quantised residual an adapter
was trained on. Weights are read as safetensors only.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import SafetensorError
from safetensors.torch import load_file

from milora.adapter.format import (
    READABLE_VERSIONS,
    Factors,
    check_configs_agree,
    check_finite,
    check_floating,
    check_metadata,
    decode_factors,
    factor_keys,
    has_initial_factors,
    magnitude_key,
    rank_factor,
    saved_module_key,
    target_list,
    trainable_config,
    weights_checksum,
)
from milora.constants import ADAPTER_CONFIG, ADAPTER_WEIGHTS, DATA_INITS, MILORA_CONFIG
from milora.errors import AdapterError, AdapterNotFoundError
from milora.init import (
    InitRecord,
    attach_record,
    init_record,
    lora_layers,
    saved_module_copies,
    saved_modules,
    set_adapter_factors,
)
from milora.init.experts import Targets, refuse_parameter_targets, resolve_targets
from milora.init.quantize import check_quantizable, quantize_peft_model
from milora.models import peft_wrapping


def read_adapter_weights(adapter_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of any LoRA adapter directory (milora or plain PEFT), checked to be finite.

    safetensors only: a pickled ``adapter_model.bin`` is refused (loading it can run code).
    """
    adapter_dir = Path(adapter_dir)
    path = adapter_dir / ADAPTER_WEIGHTS
    if not path.is_file():
        pickled = " (it has a pickled adapter_model.bin, which milora does not load: convert it to safetensors)" \
            if (adapter_dir / "adapter_model.bin").exists() else ""
        raise AdapterNotFoundError(f"{adapter_dir} has no {ADAPTER_WEIGHTS}{pickled}.")
    try:
        weights = load_file(path)
    except (SafetensorError, OSError) as error:
        raise AdapterError(f"{path} is corrupt ({error}); re-save the adapter.") from error
    check_finite(weights, path)
    check_floating(weights, path)
    return weights


def open_peft_adapter(base_model: torch.nn.Module, adapter_dir: str | os.PathLike) -> PeftModel:
    """Any saved LoRA adapter loaded by PEFT itself onto the ORIGINAL base (for a milora adapter:
    its rank-2r update), after milora's checks: finite weights, and for milora adapters the
    checksum, the two configs agreeing and the base fingerprint. ``base_model`` is wrapped in place."""
    adapter_dir = Path(adapter_dir)
    if is_plain_peft_adapter(adapter_dir):  # nothing tells which base it belongs to
        read_adapter_weights(adapter_dir)
        _refuse_residual_adapter_on_original(base_model, adapter_dir)
    else:  # a milora adapter, or read_adapter's error naming what is missing
        saved_config, _, metadata = read_adapter(adapter_dir)
        check_fingerprint(resolve_targets(base_model, trainable_config(saved_config, metadata)), metadata, adapter_dir)
    try:
        with peft_wrapping():
            return PeftModel.from_pretrained(base_model, str(adapter_dir)).eval()
    except (RuntimeError, ValueError, KeyError) as error:  # e.g. tensor shapes that do not fit its config or this model
        raise AdapterError(f"{adapter_dir} cannot be loaded onto this model: {error}") from error


def _refuse_residual_adapter_on_original(base_model: torch.nn.Module, adapter_dir: Path) -> None:
    """``save_residual``'s ``residual_adapter`` belongs on ``residual_model``: refuse it on a base whose
    fingerprint is the original's (recorded in the milora adapter beside it)."""
    parent = adapter_dir.resolve().parent
    if adapter_dir.resolve().name != "residual_adapter" or not (parent / MILORA_CONFIG).is_file():
        return
    saved_config, _, metadata = read_adapter(parent)
    found = resolve_targets(base_model, trainable_config(saved_config, metadata)).fingerprint()
    original = metadata["fingerprint"]
    if found["float32"] == original["float32"] or found["bfloat16"] == original["bfloat16"]:
        raise AdapterError(f"{adapter_dir} is the paper-layout adapter of the residual model {parent}/residual_model, "
                           f"but this base is the original model: load {parent} instead (milora's rank-2r adapter for "
                           "the original base), or load this adapter onto residual_model.")


def is_plain_peft_adapter(adapter_dir: str | os.PathLike) -> bool:
    """A PEFT adapter directory without milora's metadata (one PEFT itself loads, on any base)."""
    adapter_dir = Path(adapter_dir)
    return (adapter_dir / ADAPTER_CONFIG).is_file() and not (adapter_dir / MILORA_CONFIG).is_file()


def read_adapter(adapter_dir: str | os.PathLike) -> tuple[LoraConfig, dict[str, torch.Tensor], dict]:
    """Read and check a milora adapter directory: (saved LoRA config, weights, milora metadata)."""
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise AdapterNotFoundError(f"Adapter directory {adapter_dir} does not exist.")
    for filename in (ADAPTER_CONFIG, ADAPTER_WEIGHTS, MILORA_CONFIG):
        if not (adapter_dir / filename).is_file():
            hint = (" (a plain PEFT adapter? load it with peft.PeftModel.from_pretrained)"
                    if filename == MILORA_CONFIG else "")
            raise AdapterNotFoundError(
                f"{adapter_dir} has no {filename}: it is not a complete milora adapter directory{hint}. "
                "Save adapters with milora.save_adapter."
            )
    try:
        metadata = json.loads((adapter_dir / MILORA_CONFIG).read_text())
        json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
        config = LoraConfig.from_pretrained(str(adapter_dir))
    except (json.JSONDecodeError, TypeError, ValueError) as error:
        raise AdapterError(f"{adapter_dir} has a corrupt JSON file ({error}); re-save the adapter.") from error
    if isinstance(metadata, dict) and metadata.get("format_version") not in READABLE_VERSIONS:
        raise AdapterError(
            f"{adapter_dir / MILORA_CONFIG} has format_version {metadata.get('format_version')!r}; "
            f"this milora reads versions {', '.join(map(str, READABLE_VERSIONS))}."
        )
    check_metadata(metadata, adapter_dir)
    if not _positive(config.lora_alpha) or not all(_positive(a) for a in config.alpha_pattern.values()):
        raise AdapterError(f"{adapter_dir / ADAPTER_CONFIG}: lora_alpha must be positive (got {config.lora_alpha!r}, "
                           f"alpha_pattern {dict(config.alpha_pattern)!r}): the file was edited; re-save the adapter.")
    weights = read_adapter_weights(adapter_dir)
    if metadata["format_version"] >= 2 and weights_checksum(weights) != metadata.get("weights_sha256"):
        raise AdapterError(
            f"{adapter_dir / ADAPTER_WEIGHTS} does not match the checksum recorded in {MILORA_CONFIG}: the file was "
            "corrupted or replaced after saving. Re-save the adapter (or restore the file from a backup)."
        )
    check_configs_agree(config, metadata, adapter_dir)
    return config, weights, metadata


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


SEEDED_INITS = ("random", "pissa-fast")
"""Residual inits whose start depends on the seed (random triplets, PEFT's randomised SVD)."""


def load_model(
    base_model: torch.nn.Module,
    adapter_dir: str | os.PathLike,
    is_trainable: bool = False,
    device: str | torch.device | None = None,
    adapter_name: str = "default",
    quantization: str | None = None,
) -> PeftModel:
    """Rebuild a saved adapter on the ORIGINAL base model: residual weights + rank-r adapter.

    The result equals the model that was saved (same outputs to the rounding of the residual)
    and can continue training with ``is_trainable=True``. The base model is modified in place.
    ``quantization`` (nf4, fp4, int8) quantises the rebuilt base with bitsandbytes as
    `milora.get_model` does: with the method in the adapter's ``milora_config.json``
    (``quantization.method``) it is the quantised residual the adapter was trained on.
    """
    adapter_dir = Path(adapter_dir)
    saved_config, weights, metadata = read_adapter(adapter_dir)
    lora_config = trainable_config(saved_config, metadata)
    lora_config.inference_mode = not is_trainable
    peft_model = _rebuild(base_model, lora_config, weights, metadata, adapter_dir, device, adapter_name, quantization,
                          start_only=False)
    if not is_trainable:
        peft_model.eval()
    return peft_model


def load_start(
    base_model: torch.nn.Module,
    adapter_dir: str | os.PathLike,
    lora_config: LoraConfig,
    init: str,
    seed: int,
    null_space: str = "zero",
    device: str | torch.device | None = None,
    quantization: str | None = None,
    adapter_name: str = "default",
) -> PeftModel:
    """A new run's start taken from a saved adapter (of ``milora init`` or of an earlier run) instead of
    decomposing again: the model `milora.get_model(base_model, lora_config, init, seed=seed)` would give,
    rebuilt from the saved initial factors (residual W - s B0 A0, trainable factors = B0, A0) without any SVD.

    The adapter must match the run: the base fingerprint, ``init``, rank and alpha (patterns too), rsLoRA,
    the targets and ``modules_to_save``, and ``seed`` where the start depends on it (random, pissa-fast, or
    rank-deficient weights), ``null_space`` where a weight has zero components (read from the stored A0: the
    zero start leaves those rows 0). ``lora_config``'s other options (dropout) are the run's own.
    """
    if not has_initial_factors(init) or init in DATA_INITS:
        why = ("leaves the base unchanged, so a saved adapter does not hold its start" if not has_initial_factors(init)
               else "is computed from the run's training batches, which a saved start does not record")
        raise AdapterError(f"init {init!r} {why}: drop init_from for this init (it cannot be reused).")
    adapter_dir = Path(adapter_dir)
    saved_config, weights, metadata = read_adapter(adapter_dir)
    saved = trainable_config(saved_config, metadata)
    deficient = [entry for entry in metadata["report"] if entry.get("zero_components")]
    seeded = init in SEEDED_INITS or bool(deficient)
    pairs = [("init", init, metadata["init"]), ("r", lora_config.r, saved.r),
             ("lora_alpha", float(lora_config.lora_alpha), float(saved.lora_alpha)),
             ("use_rslora", lora_config.use_rslora, saved.use_rslora),
             ("rank_pattern", dict(lora_config.rank_pattern), dict(saved.rank_pattern)),
             ("alpha_pattern", {k: float(v) for k, v in lora_config.alpha_pattern.items()},
              {k: float(v) for k, v in saved.alpha_pattern.items()}),
             ("target_modules", target_list(lora_config.target_modules), target_list(saved.target_modules)),
             ("modules_to_save", target_list(lora_config.modules_to_save), target_list(saved.modules_to_save)),
             ("target_parameters", target_list(lora_config.target_parameters), target_list(saved.target_parameters)),
             *([("seed", seed, metadata["seed"])] if seeded else []),
             *([("null_space", null_space, _null_space_of(weights, deficient, init))] if deficient else [])]
    changed = [f"{key} {ours!r} (the start has {theirs!r})" for key, ours, theirs in pairs if ours != theirs]
    if changed:
        raise AdapterError(f"{adapter_dir} is not this run's start: {'; '.join(changed)}. Make the start with the "
                           "run's settings (milora init) or change the run's to the start's.")
    start_config = copy.deepcopy(lora_config)
    start_config.inference_mode = False
    return _rebuild(base_model, start_config, weights, metadata, adapter_dir, device, adapter_name, quantization,
                    start_only=True)


def _null_space_of(weights: dict, deficient: list[dict], init: str) -> str:
    """The null-space start a saved start used: ``zero`` leaves A0's rows of the zero components 0
    (`milora.init.initialize.start_factors`), ``random`` fills them."""
    for entry in deficient:
        A0 = decode_factors(weights, entry["module"], entry["rank"], init).A0
        if "expert" in entry:  # expert e's rows of a fused stack's packed A0
            A0 = A0[entry["expert"] * entry["rank"]:(entry["expert"] + 1) * entry["rank"]]
        if int((A0 == 0).all(dim=1).sum()) < entry["zero_components"]:
            return "random"
    return "zero"


def _rebuild(base_model, lora_config: LoraConfig, weights: dict, metadata: dict, adapter_dir: Path, device,
             adapter_name: str, quantization: str | None, start_only: bool) -> PeftModel:
    """The PEFT model of a read adapter: residual base from the initial factors, the trainable factors the
    saved ones and ``modules_to_save`` loaded (``start_only``: a fresh start, the initial factors and the base's
    own copies of ``modules_to_save``)."""
    targets = resolve_targets(base_model, lora_config)
    check_fingerprint(targets, metadata, adapter_dir)
    saved_shapes = _check_saved_module_shapes(saved_modules(base_model, lora_config), weights, adapter_dir)
    if quantization is not None:
        refuse_parameter_targets(lora_config, f"quantization={quantization!r}", "drop quantization")
        check_quantizable(base_model, targets.modules, quantization)

    with peft_wrapping():
        peft_model = get_peft_model(base_model, lora_config, adapter_name=adapter_name)
    try:  # a fused expert stack's factor shapes are PEFT's: known once it has wrapped the model
        _check_factor_shapes(peft_model, weights, saved_shapes, rank_factor(metadata["init"]), adapter_name,
                             adapter_dir)
    except AdapterError:
        peft_model.unload()
        raise
    record = InitRecord(
        init=metadata["init"], solver=metadata["solver"], seed=metadata["seed"], fingerprint=metadata["fingerprint"],
        report=metadata["report"], measured={**metadata.get("measured", {}),
                                             **({"init_from": str(adapter_dir)} if start_only else {})},
    )
    for name, layer in lora_layers(peft_model).items():
        factors = decode_factors(weights, name, layer.r[adapter_name], record.init)
        if factors.A0 is None:
            _copy_factors(layer, adapter_name, factors)
            continue
        A, B = (factors.A0, factors.B0) if start_only else (factors.A, factors.B)
        set_adapter_factors(layer, adapter_name, A, B, factors.A0, factors.B0, device=device)
        record.initial_factors[name] = (factors.A0.clone(), factors.B0.clone())
    if not start_only:
        _load_saved_modules(peft_model, weights, adapter_name)
    attach_record(peft_model, record)
    if quantization is not None:
        peft_model = quantize_peft_model(peft_model, record, quantization, adapter_name)
    return peft_model


def check_fingerprint(targets: Targets, metadata: dict, adapter_dir) -> None:
    """Refuse base weights other than the original ones the adapter was initialised from."""
    found, expected = targets.fingerprint(), metadata["fingerprint"]
    low_precision = targets.dtype in (torch.bfloat16, torch.float16)
    if found["float32"] == expected["float32"] or (low_precision and found["bfloat16"] == expected["bfloat16"]):
        return
    raise AdapterError(
        f"The adapter in {adapter_dir} was initialised from different base weights (fingerprint "
        f"{expected['float32'][:12]}, this model {found['float32'][:12]}). Load the original base model it was made "
        "from (not a residual or merged model, not another checkpoint)."
    )


def _load_saved_modules(peft_model: PeftModel, weights: dict[str, torch.Tensor], adapter_name: str) -> None:
    """Copy the saved ``modules_to_save`` weights into the model's trainable copies of those modules."""
    for name, module in saved_module_copies(peft_model, adapter_name).items():
        module.load_state_dict({key: weights[saved_module_key(name, key)] for key in module.state_dict()})


def _check_saved_module_shapes(saved: dict, weights: dict, adapter_dir) -> set[str]:
    """Every ``modules_to_save`` tensor present with its shape; returns their keys."""
    expected = {saved_module_key(name, key): tuple(value.shape) for name, module in saved.items()
                for key, value in module.state_dict().items()}
    for key, shape in expected.items():
        if key not in weights or tuple(weights[key].shape) != shape:
            found = tuple(weights[key].shape) if key in weights else "nothing"
            raise AdapterError(f"{adapter_dir / ADAPTER_WEIGHTS}: the modules_to_save tensor {key} should have shape "
                               f"{shape}, found {found}; the file is incomplete or belongs to another model.")
    return set(expected)


def _check_factor_shapes(peft_model: PeftModel, weights: dict, saved_keys: set[str], factor: int, adapter_name: str,
                         adapter_dir) -> None:
    """Every LoRA factor present with the shape of the model's layer (``factor`` times its rank: 2 for a rank-2r
    update), DoRA's magnitude too, and no tensor beyond them and the ``modules_to_save`` ones (``saved_keys``)."""
    expected_keys = set(saved_keys)
    for name, layer in lora_layers(peft_model).items():
        A, B = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
        keys, shapes = list(factor_keys(name)), [(factor * A.shape[0], A.shape[1]), (B.shape[0], factor * B.shape[1])]
        if layer.use_dora.get(adapter_name):
            keys, shapes = [*keys, magnitude_key(name)], [*shapes, (B.shape[0],)]
        for key, shape in zip(keys, shapes, strict=True):
            expected_keys.add(key)
            if key not in weights:
                raise AdapterError(f"{adapter_dir / ADAPTER_WEIGHTS} lacks {key}: the file is incomplete; "
                                   "re-save the adapter.")
            if tuple(weights[key].shape) != shape:
                raise AdapterError(
                    f"{adapter_dir / ADAPTER_WEIGHTS}: {key} has shape {tuple(weights[key].shape)}, expected {shape}; "
                    "the file does not belong to this configuration."
                )
    unexpected = sorted(set(weights) - expected_keys)
    if unexpected:
        raise AdapterError(f"{adapter_dir / ADAPTER_WEIGHTS} has unexpected tensors {unexpected[:3]}: "
                           "this milora cannot load them.")


def load_trained_state(peft_model: PeftModel, adapter_dir: str | os.PathLike, adapter_name: str = "default") -> None:
    """Copy the trainable factors saved in ``adapter_dir`` into an initialised model (resuming).

    The checkpoint's initial factors must equal the model's, so the residual base matches.
    """
    record = init_record(peft_model)
    _, weights, metadata = read_adapter(adapter_dir)
    if metadata["init"] != record.init:
        raise AdapterError(f"{adapter_dir} holds an init={metadata['init']!r} adapter, "
                           f"the model is init={record.init!r}.")
    trained_on = (metadata.get("quantization") or {}).get("method")
    if trained_on != record.quantization_method:
        raise AdapterError(
            f"{adapter_dir} was trained on a {trained_on or 'full-precision'} base, this model's base is "
            f"{record.quantization_method or 'full-precision'}: build the model with quantization={trained_on!r}."
        )
    for name, layer in lora_layers(peft_model).items():
        factors = decode_factors(weights, name, layer.r[adapter_name], record.init)
        if factors.A0 is not None:
            A0, B0 = record.initial_factors[name]
            if not (torch.equal(factors.A0, A0.to(factors.A0.dtype))
                    and torch.equal(factors.B0, B0.to(factors.B0.dtype))):
                raise AdapterError(
                    f"{adapter_dir} was trained from a different initialisation than this model (module {name}); "
                    "build the model with the same base, config and init before resuming."
                )
        _copy_factors(layer, adapter_name, factors)
    _load_saved_modules(peft_model, weights, adapter_name)


def _copy_factors(layer, adapter_name: str, factors: Factors) -> None:
    """The trainable factors (and DoRA's magnitude vector) into a LoRA layer."""
    layer.lora_A[adapter_name].weight.data.copy_(factors.A)
    layer.lora_B[adapter_name].weight.data.copy_(factors.B)
    if factors.magnitude is not None:
        layer.lora_magnitude_vector[adapter_name].weight.data.copy_(factors.magnitude)
