"""`save_adapter`: a trained (or freshly initialised) milora model written in the format of `milora.adapter.format`.

Writes go to a staging directory that is renamed into place, so a failure leaves nothing behind.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel
from peft.utils import get_peft_model_state_dict

from milora.adapter.format import (
    FORMAT_VERSION,
    check_finite_tensor,
    encode_update,
    factor_keys,
    rank_factor,
    saved_config,
    saved_module_key,
    target_list,
    update_checksum,
)
from milora.constants import ADAPTER_CONFIG, ADAPTER_WEIGHTS, MILORA_CONFIG
from milora.errors import AdapterError, OutputExistsError
from milora.init import InitRecord, init_record, lora_layers
from milora.init.checkpoint import TensorEntry, tensor_entry, write_safetensors
from milora.init.experts import expert_count
from milora.init.streaming import ADAPTER_DTYPE, StreamedInit
from milora.io import check_replaceable, staged_directory


def save_adapter(
    peft_model: PeftModel,
    output_dir: str | os.PathLike,
    overwrite: bool = False,
    state_dict: dict[str, torch.Tensor] | None = None,
    save_residual: bool = False,
    adapter_name: str = "default",
) -> Path:
    """Write the adapter in milora's format (`milora.adapter.format`); returns the directory.

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
    residual = ((lambda staging: _save_residual(peft_model, staging, adapter_name, output_dir))
                if save_residual else None)
    experts = {name: expert_count(layer) for name, layer in lora_layers(peft_model).items()}
    return write_adapter(output_dir, AdapterWeights.of(encode_update(weights, record.initial_factors, experts)),
                         trained_config, record, overwrite=overwrite, extra=residual)


@dataclass(frozen=True)
class AdapterWeights:
    """An adapter's tensors in name order (``entries``: each one's dtype, shape and size), made one at a time by
    ``tensors()``, so that a writer need not hold them all (a streaming init's factors)."""

    entries: dict[str, TensorEntry]
    tensors: Callable[[], Iterator[torch.Tensor]]

    @classmethod
    def of(cls, weights: dict[str, torch.Tensor]) -> AdapterWeights:
        names = sorted(weights)
        return cls({name: tensor_entry(weights[name]) for name in names}, lambda: (weights[name] for name in names))


def write_adapter(output_dir: Path, weights: AdapterWeights, trained_config: LoraConfig, record: InitRecord,
                  overwrite: bool = False, extra: Callable[[Path], None] | None = None) -> Path:
    """Write an adapter directory from its saved (encoded, `encode_update`) ``weights``, the rank-r
    ``trained_config`` and the init ``record``: the one writer behind `save_adapter` and the streaming
    ``milora init``. Each tensor is checked finite and enters the checksum as it is written. ``extra(staging)``
    adds files (the residual layout) before the directory is renamed into place; the caller has checked that
    ``output_dir`` may be written (or replaced, ``overwrite``)."""
    config = saved_config(trained_config, record.init)
    digest = hashlib.sha256()

    def checked() -> Iterator[torch.Tensor]:
        for name, tensor in zip(weights.entries, weights.tensors(), strict=True):
            check_finite_tensor(name, tensor, output_dir / ADAPTER_WEIGHTS)
            update_checksum(digest, name, tensor)
            yield tensor

    with staged_directory(output_dir, replace=overwrite) as staging:
        config.save_pretrained(staging)
        write_safetensors(staging / ADAPTER_WEIGHTS, weights.entries, checked(), metadata={"format": "pt"})
        metadata = {
            "format_version": FORMAT_VERSION,
            "weights_sha256": digest.hexdigest(),
            "target_modules": target_list(trained_config.target_modules),
            "modules_to_save": target_list(trained_config.modules_to_save),
            "target_parameters": target_list(trained_config.target_parameters),
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
        (staging / MILORA_CONFIG).write_text(json.dumps(_json_safe(metadata), indent=2) + "\n")
        if extra is not None:
            extra(staging)
    return output_dir


def save_streamed_start(streamed: StreamedInit, output_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write the adapter of a streaming init (`milora.init.streaming.stream_init`) and remove its work
    directory; the residual layout too when the init wrote a residual model.

    The factors are read from the work directory one layer at a time as they are written, so memory
    holds one layer's factors, not the adapter's, whatever the depth.
    """
    output_dir = Path(output_dir)
    saved = {saved_module_key(module, key): tensor for (module, key), tensor in streamed.saved_tensors.items()}
    extra = None
    if streamed.residual_dir is not None:
        adapter_dir = streamed.residual_dir / "residual_adapter"
        adapter_dir.mkdir(exist_ok=True)
        config = copy.deepcopy(streamed.lora_config)
        config.inference_mode = True
        config.base_model_name_or_path = residual_model_path(output_dir)  # never the original base
        config.save_pretrained(adapter_dir)
        trained = _streamed_weights(streamed, saved, encoded=False)
        write_safetensors(adapter_dir / ADAPTER_WEIGHTS, trained.entries, trained.tensors(), {"format": "pt"})

        def extra(staging: Path) -> None:
            for part in ("residual_model", "residual_adapter"):
                os.replace(streamed.residual_dir / part, staging / part)

    write_adapter(output_dir, _streamed_weights(streamed, saved, encoded=True), streamed.lora_config,
                  streamed.record, overwrite=overwrite, extra=extra)
    shutil.rmtree(streamed.work_dir)
    return output_dir


def _streamed_weights(streamed: StreamedInit, saved: dict[str, torch.Tensor], encoded: bool) -> AdapterWeights:
    """A streaming init's adapter tensors: ``saved`` (modules_to_save) and each layer's factors, read when its
    first key comes (its A and B are neighbours in name order), as trained (rank r) or ``encoded`` for the
    original base (`encode_update`: rank 2r)."""
    factor = rank_factor(streamed.record.init) if encoded else 1
    layers = {}  # each factor key -> its layer
    entries = {key: tensor_entry(tensor) for key, tensor in saved.items()}
    for name, targets in streamed.layers().items():
        rank = factor * sum(target.rank for target in targets)  # a fused stack's experts packed side by side
        (out_features, in_features), key_A, key_B = targets[0].shape, *factor_keys(name)
        entries[key_A] = tensor_entry(torch.empty(rank, in_features, dtype=ADAPTER_DTYPE, device="meta"))
        entries[key_B] = tensor_entry(torch.empty(out_features, rank, dtype=ADAPTER_DTYPE, device="meta"))
        layers.update({key_A: (name, len(targets)), key_B: (name, len(targets))})
    entries = dict(sorted(entries.items()))

    def tensors() -> Iterator[torch.Tensor]:
        read: dict[str, dict[str, torch.Tensor]] = {}  # a layer's tensors not yet written
        for key in entries:
            if key in saved:
                yield saved[key]
                continue
            name, experts = layers[key]
            if name not in read:
                A, B = streamed.layer_factors(name)
                factors = dict(zip(factor_keys(name), (A, B), strict=True))
                read[name] = encode_update(factors, {name: (A, B)}, {name: experts}) if encoded else factors
            yield read[name].pop(key)
            if not read[name]:
                del read[name]

    return AdapterWeights(entries, tensors)


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def residual_model_path(adapter_dir: str | os.PathLike) -> str:
    """The ``base_model_name_or_path`` of a paper-layout ``residual_adapter``: the residual model saved beside
    it in ``adapter_dir`` (absolute), the base it belongs on."""
    return str(Path(adapter_dir).resolve() / "residual_model")


def _save_residual(peft_model: PeftModel, directory: Path, adapter_name: str, final_dir: Path) -> None:
    """The paper's layout: residual base model and the rank-r adapter that goes with it; the
    adapter's ``base_model_name_or_path`` names the residual model (``final_dir/residual_model``),
    never the original base it must not be loaded on."""
    base = peft_model.get_base_model()
    # modules_to_save: the original module goes into the residual model, the trained copy into the adapter
    residual_state = {k.replace(".base_layer.", ".").replace(".original_module.", "."): v
                      for k, v in base.state_dict().items() if "lora_" not in k and ".modules_to_save." not in k}
    base.save_pretrained(directory / "residual_model", state_dict=residual_state, safe_serialization=True)
    PeftModel.save_pretrained(peft_model, directory / "residual_adapter", selected_adapters=[adapter_name])
    config_path = directory / "residual_adapter" / ADAPTER_CONFIG
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = residual_model_path(final_dir)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
