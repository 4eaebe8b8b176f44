"""Saving, reloading and resuming MiLoRA adapters.

A directory written by `save_adapter` holds:

- ``adapter_config.json`` + ``adapter_model.safetensors``: a standard PEFT LoRA for the
  ORIGINAL base model. For SVD-based inits it has rank 2r and encodes the whole update,
      Delta W = s (B A - B0 A0) = s [B | -B0] [A ; A0],
  with alpha doubled (times sqrt(2) with rsLoRA) so that its scaling is still s. Plain
  ``PeftModel.from_pretrained(original_base, dir)``, lm-eval's ``peft=`` and vLLM (with
  ``max_lora_rank >= 2r``) therefore all give the trained model. Rows/columns [0, r) are the
  trainable factors, [r, 2r) the initial ones, which lets `load_model` rebuild the residual
  base W - s B0 A0 and the rank-r trainable adapter without any SVD. For ``init="lora"``
  it is PEFT's own rank-r adapter (the base was never changed). Modules in ``modules_to_save``
  (e.g. a vision-language model's projector, trained in full) are saved whole, under PEFT's own
  keys, so PEFT loads them too.
- ``milora_config.json``: init mode, rank, alpha, solver, init report and a fingerprint of
  the original base weights; `load_model` refuses a base that does not match it. For an adapter
  trained on a quantised base (QLoRA-style, see `milora.quantization`), ``quantization`` records
  the method, its bitsandbytes config and the quantisation errors; the weights are the same
  full-precision-base LoRA, and ``load_model(..., quantization=method)`` rebuilds the same
  quantised residual to train further.
- optionally ``residual_model/`` + ``residual_adapter/``: the paper's layout, the residual
  base with the rank-r adapter (valid only together).

Writes go to a staging directory that is renamed into place, so a failure leaves nothing behind.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from milora.constants import ADAPTER_CONFIG, ADAPTER_WEIGHTS, MILORA_CONFIG
from milora.errors import AdapterError, AdapterNotFoundError, OutputExistsError
from milora.init import (
    InitRecord,
    attach_record,
    fingerprint,
    init_record,
    lora_layers,
    rank_for,
    saved_module_copies,
    saved_modules,
    set_adapter_factors,
    target_modules,
    weight_matrix,
)
from milora.io import check_replaceable, staged_directory
from milora.quantization import check_quantizable, quantize_peft_model

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # version 1 (milora 0.1) lacks the weights checksum and the target list
_PREFIX = "base_model.model."


def save_adapter(
    peft_model: PeftModel,
    output_dir: str | os.PathLike,
    overwrite: bool = False,
    state_dict: dict[str, torch.Tensor] | None = None,
    save_residual: bool = False,
    adapter_name: str = "default",
) -> Path:
    """Write the adapter in milora's format (see module docstring); returns the directory.

    ``state_dict``: the full model state dict when parameters are sharded (DeepSpeed ZeRO-3,
    FSDP), as transformers' Trainer passes it; by default the model's own parameters.
    """
    record = init_record(peft_model)
    if save_residual and record.quantization:
        raise AdapterError(
            f"save_residual writes the residual model in full precision, but this model's base is quantised "
            f"({record.quantization_method}). Save without it: the adapter loads onto the full-precision base, and "
            f"milora.load_model(base, dir, quantization={record.quantization_method!r}) rebuilds the quantised "
            "residual."
        )
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise OutputExistsError(f"{output_dir} is a file, not a directory: choose another path for the adapter.")
    if output_dir.exists() and any(output_dir.iterdir()):
        if not overwrite:
            raise OutputExistsError(f"{output_dir} already exists and is not empty: choose another directory or pass "
                                    "overwrite=True.")
        check_replaceable(output_dir)  # overwrite replaces only what milora wrote
    trained_config = peft_model.peft_config[adapter_name]
    weights = {k: v.detach().cpu().contiguous()
               for k, v in get_peft_model_state_dict(peft_model, state_dict, adapter_name).items()}
    config = trained_config
    if record.init != "lora":
        weights = _update_as_lora(weights, record)
        config = _doubled_rank_config(trained_config)
    check_finite(weights, output_dir / ADAPTER_WEIGHTS)
    metadata = {
        "format_version": FORMAT_VERSION,
        "weights_sha256": weights_checksum(weights),
        "target_modules": _target_list(trained_config.target_modules),
        "modules_to_save": _target_list(trained_config.modules_to_save),
        "init": record.init,
        "solver": record.solver,
        "seed": record.seed,
        "r": trained_config.r,
        "lora_alpha": trained_config.lora_alpha,
        "use_rslora": trained_config.use_rslora,
        "rank_pattern": dict(trained_config.rank_pattern),
        "alpha_pattern": dict(trained_config.alpha_pattern),
        "fingerprint": record.fingerprint,
        "quantization": record.quantization,
        "layout": "PEFT LoRA on the original base; rank 2r = [trainable | initial] unless init is 'lora'",
        "summary": record.summary(),
        "measured": record.measured,
        "report": record.report,
    }
    with staged_directory(output_dir, replace=overwrite) as staging:
        config.save_pretrained(staging)
        save_file(weights, staging / ADAPTER_WEIGHTS, metadata={"format": "pt"})
        (staging / MILORA_CONFIG).write_text(json.dumps(_json_safe(metadata), indent=2) + "\n")
        if save_residual:
            _save_residual(peft_model, staging, adapter_name)
    return output_dir


def _update_as_lora(weights: dict[str, torch.Tensor], record: InitRecord) -> dict[str, torch.Tensor]:
    """[A ; A0] and [B | -B0]: the rank-2r LoRA of s (B A - B0 A0) on the original base."""
    converted = dict(weights)
    for name, (A0, B0) in record.initial_factors.items():
        key_A, key_B = f"{_PREFIX}{name}.lora_A.weight", f"{_PREFIX}{name}.lora_B.weight"
        converted[key_A] = torch.cat([weights[key_A], A0.to(weights[key_A].dtype)], dim=0).contiguous()
        converted[key_B] = torch.cat([weights[key_B], -B0.to(weights[key_B].dtype)], dim=1).contiguous()
    return converted


def _doubled_rank_config(config: LoraConfig) -> LoraConfig:
    """The config of the rank-2r update: every rank doubled, alphas adjusted to keep each scaling."""
    doubled = copy.deepcopy(config)
    alpha_factor = math.sqrt(2) if config.use_rslora else 2  # s = alpha/sqrt(r) or alpha/r
    doubled.r = 2 * config.r
    doubled.lora_alpha = alpha_factor * config.lora_alpha
    doubled.rank_pattern = {key: 2 * value for key, value in config.rank_pattern.items()}
    doubled.alpha_pattern = {key: alpha_factor * value for key, value in config.alpha_pattern.items()}
    doubled.init_lora_weights = True
    return doubled


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _save_residual(peft_model: PeftModel, directory: Path, adapter_name: str) -> None:
    """The paper's layout: residual base model and the rank-r adapter that goes with it."""
    base = peft_model.get_base_model()
    # modules_to_save: the original module goes into the residual model, the trained copy into the adapter
    residual_state = {k.replace(".base_layer.", ".").replace(".original_module.", "."): v
                      for k, v in base.state_dict().items() if "lora_" not in k and ".modules_to_save." not in k}
    base.save_pretrained(directory / "residual_model", state_dict=residual_state, safe_serialization=True)
    PeftModel.save_pretrained(peft_model, directory / "residual_adapter", selected_adapters=[adapter_name])


def weights_checksum(weights: dict[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in name order (not over the file,
    whose header layout is the writer's business)."""
    digest = hashlib.sha256()
    for name in sorted(weights):
        tensor = weights[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def check_finite(weights: dict[str, torch.Tensor], where: str | os.PathLike) -> None:
    """Refuse NaN / Inf in adapter weights, naming the first such tensor."""
    for name in sorted(weights):
        if weights[name].is_floating_point() and not torch.isfinite(weights[name]).all():
            raise AdapterError(
                f"{where}: tensor {name} holds NaN or Inf values; the adapter is corrupt or its training diverged "
                "(re-save it from a good checkpoint, or retrain with a lower learning rate)."
            )


def _target_list(targets) -> list[str] | str | None:
    return sorted(targets) if isinstance(targets, (set, list, tuple)) else targets


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
    return weights


def open_peft_adapter(base_model: torch.nn.Module, adapter_dir: str | os.PathLike) -> PeftModel:
    """Any saved LoRA adapter loaded by PEFT itself onto the ORIGINAL base (for a milora adapter:
    its rank-2r update), after milora's checks: finite weights, and for milora adapters the
    checksum, the two configs agreeing and the base fingerprint. ``base_model`` is wrapped in place."""
    adapter_dir = Path(adapter_dir)
    if is_plain_peft_adapter(adapter_dir):  # nothing tells which base it belongs to
        read_adapter_weights(adapter_dir)
    else:  # a milora adapter, or read_adapter's error naming what is missing
        saved_config, _, metadata = read_adapter(adapter_dir)
        check_fingerprint(target_modules(base_model, trainable_config(saved_config, metadata)), metadata, adapter_dir)
    try:
        return PeftModel.from_pretrained(base_model, str(adapter_dir)).eval()
    except (RuntimeError, ValueError, KeyError) as error:  # e.g. tensor shapes that do not fit its config or this model
        raise AdapterError(f"{adapter_dir} cannot be loaded onto this model: {error}") from None


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
    if metadata.get("format_version") not in READABLE_VERSIONS:
        raise AdapterError(
            f"{adapter_dir / MILORA_CONFIG} has format_version {metadata.get('format_version')!r}; "
            f"this milora reads versions {', '.join(map(str, READABLE_VERSIONS))}."
        )
    weights = read_adapter_weights(adapter_dir)
    if metadata["format_version"] >= 2 and weights_checksum(weights) != metadata.get("weights_sha256"):
        raise AdapterError(
            f"{adapter_dir / ADAPTER_WEIGHTS} does not match the checksum recorded in {MILORA_CONFIG}: the file was "
            "corrupted or replaced after saving. Re-save the adapter (or restore the file from a backup)."
        )
    _check_configs_agree(config, metadata, adapter_dir)
    return config, weights, metadata


def _check_configs_agree(saved: LoraConfig, metadata: dict, adapter_dir: Path) -> None:
    """adapter_config.json (what PEFT, vLLM and lm-eval read) and milora_config.json (what milora
    reads) must describe the same adapter: rank, alpha, patterns, rsLoRA, targets."""
    svd = metadata["init"] != "lora"
    alpha_factor = (math.sqrt(2) if saved.use_rslora else 2) if svd else 1
    rank_factor = 2 if svd else 1
    pairs = [
        ("r", saved.r, rank_factor * metadata["r"]),
        ("lora_alpha", saved.lora_alpha, alpha_factor * metadata["lora_alpha"]),
        ("use_rslora", saved.use_rslora, metadata["use_rslora"]),
        ("rank_pattern", dict(saved.rank_pattern), {k: rank_factor * v for k, v in metadata["rank_pattern"].items()}),
        ("alpha_pattern", dict(saved.alpha_pattern),
         {k: alpha_factor * v for k, v in metadata["alpha_pattern"].items()}),
    ]
    for key in ("target_modules", "modules_to_save"):
        if key in metadata:
            pairs.append((key, _target_list(getattr(saved, key)), metadata[key]))
    for key, in_peft, expected in pairs:
        if not _same(in_peft, expected):
            raise AdapterError(
                f"{adapter_dir}: {ADAPTER_CONFIG} has {key}={in_peft!r} but {MILORA_CONFIG} implies {expected!r}"
                f"{' (the saved update has rank 2r and alpha scaled to keep s)' if svd else ''}; one of the files was "
                "edited. Restore the original files or re-save the adapter with milora.save_adapter."
            )


def _same(a, b) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(a, b, rel_tol=1e-12)
    return a == b


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
    modules = target_modules(base_model, lora_config)
    check_fingerprint(modules, metadata, adapter_dir)
    _check_weight_shapes(modules, saved_modules(base_model, lora_config), weights, lora_config, metadata,
                         adapter_dir)
    if quantization is not None:
        check_quantizable(base_model, modules, quantization)

    peft_model = get_peft_model(base_model, lora_config, adapter_name=adapter_name)
    record = InitRecord(
        init=metadata["init"], solver=metadata["solver"], seed=metadata["seed"], fingerprint=metadata["fingerprint"],
        report=metadata["report"], measured=metadata.get("measured", {}),
    )
    for name, layer in lora_layers(peft_model).items():
        saved_A, saved_B = weights[f"{_PREFIX}{name}.lora_A.weight"], weights[f"{_PREFIX}{name}.lora_B.weight"]
        r = layer.r[adapter_name]
        if record.init == "lora":
            layer.lora_A[adapter_name].weight.data.copy_(saved_A)
            layer.lora_B[adapter_name].weight.data.copy_(saved_B)
            continue
        A, A0, B, B0 = saved_A[:r], saved_A[r:], saved_B[:, :r], -saved_B[:, r:]
        set_adapter_factors(layer, adapter_name, A, B, A0, B0, device=device)
        record.initial_factors[name] = (A0.clone(), B0.clone())
    _load_saved_modules(peft_model, weights, adapter_name)
    attach_record(peft_model, record)
    if quantization is not None:
        peft_model = quantize_peft_model(peft_model, record, quantization, adapter_name)
    if not is_trainable:
        peft_model.eval()
    return peft_model


def trainable_config(saved_config: LoraConfig, metadata: dict) -> LoraConfig:
    """The rank-r config the adapter trains with (the saved one is the rank-2r update's for SVD inits)."""
    lora_config = copy.deepcopy(saved_config)
    if metadata["init"] != "lora":
        for key in ("r", "lora_alpha", "rank_pattern", "alpha_pattern"):
            setattr(lora_config, key, metadata[key])
    return lora_config


def check_fingerprint(modules: dict, metadata: dict, adapter_dir) -> None:
    """Refuse base modules other than the original ones the adapter was initialised from."""
    found, expected = fingerprint(modules), metadata["fingerprint"]
    low_precision = weight_matrix(next(iter(modules.values()))).dtype in (torch.bfloat16, torch.float16)
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
        module.load_state_dict({key: weights[f"{_PREFIX}{name}.{key}"] for key in module.state_dict()})


def _check_weight_shapes(modules: dict, saved: dict, weights: dict, lora_config: LoraConfig, metadata: dict,
                         adapter_dir) -> None:
    """Every LoRA factor and ``modules_to_save`` tensor present with its shape, and nothing else."""
    factor = 1 if metadata["init"] == "lora" else 2
    expected = {f"{_PREFIX}{name}.{key}": tuple(value.shape) for name, module in saved.items()
                for key, value in module.state_dict().items()}
    for key, shape in expected.items():
        if key not in weights or tuple(weights[key].shape) != shape:
            found = tuple(weights[key].shape) if key in weights else "nothing"
            raise AdapterError(f"{adapter_dir / ADAPTER_WEIGHTS}: the modules_to_save tensor {key} should have shape "
                               f"{shape}, found {found}; the file is incomplete or belongs to another model.")
    expected_keys = set(expected)
    for name, module in modules.items():
        out_features, in_features = weight_matrix(module).shape
        saved_rank = factor * rank_for(lora_config, name)
        for suffix, shape in (("lora_A.weight", (saved_rank, in_features)),
                              ("lora_B.weight", (out_features, saved_rank))):
            key = f"{_PREFIX}{name}.{suffix}"
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
        saved_A, saved_B = weights[f"{_PREFIX}{name}.lora_A.weight"], weights[f"{_PREFIX}{name}.lora_B.weight"]
        r = layer.r[adapter_name]
        if record.init != "lora":
            A0, B0 = record.initial_factors[name]
            if not (torch.equal(saved_A[r:], A0.to(saved_A.dtype))
                    and torch.equal(-saved_B[:, r:], B0.to(saved_B.dtype))):
                raise AdapterError(
                    f"{adapter_dir} was trained from a different initialisation than this model (module {name}); "
                    "build the model with the same base, config and init before resuming."
                )
        layer.lora_A[adapter_name].weight.data.copy_(saved_A[:r])
        layer.lora_B[adapter_name].weight.data.copy_(saved_B[:, :r])
    _load_saved_modules(peft_model, weights, adapter_name)
