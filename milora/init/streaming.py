"""Streaming initialisation: a checkpoint's target weights decomposed one at a time, the model never built.

`stream_init` resolves the targets on the checkpoint's module tree built on the meta device
(`milora.models.meta_model`: PEFT's own name and regex rules, ``rank_pattern`` / ``alpha_pattern``,
Conv1D's fan_in_fan_out, tied weights, a vision-language model's scope, fused MoE expert stacks),
then reads each target weight, or each expert of a stack (`milora.init.checkpoint_experts`), from
the safetensors files (`milora.init.checkpoint`), decomposes it with the same
per-weight step as `get_model` (`weight_start`, `residual_weight`, `fingerprint_sample`), and
keeps only its factors: the factors are those of `get_model` on the same weights bit for bit, and
the base fingerprint is the same value. Peak memory is that of one weight's decomposition (a few
float64 copies of it) plus the factors, whatever the depth.

Every finished weight is written atomically to ``<output>.partial/weights/`` with its report
entry and fingerprint sample; a run killed at any point continues from the finished weights
when started again with the same command (a changed command is refused, naming what changed).
``save_residual`` then writes the residual shards (W - s B0 A0 in the targets, every other tensor
copied) from the stored factors, each shard atomically, in the checkpoint's dtype. The work
directory holds no adapter files, so nothing in it loads as a finished adapter; the caller
(`milora.adapter.save.save_streamed_start`) writes the adapter and removes it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm
from transformers.pytorch_utils import Conv1D

from milora.errors import ModelError, OutputError
from milora.init.checkpoint import DTYPE_CODES, INDEX_FILE, Checkpoint, TensorEntry, open_checkpoint, write_safetensors
from milora.init.checkpoint_experts import ExpertSlice, expert_layers, expert_slices
from milora.init.experts import expert_sample, fused_factors, target_parameters
from milora.init.initialize import (
    check_devices,
    check_init_options,
    release_freed_memory,
    warn_zero_components,
    weight_start,
)
from milora.init.layers import residual_weight
from milora.init.multimodal import warn_outside_language_model
from milora.init.record import ExpertOf, InitRecord, report_entry
from milora.init.targets import (
    check_finite_weight,
    fingerprint_of_samples,
    fingerprint_sample,
    rank_for,
    saved_modules,
    scaling_for,
    target_modules,
)
from milora.linalg.decomposition import default_workers, resolve_solver, select_components_many
from milora.models import refuse_quantized_checkpoint

WORK_SUFFIX = ".partial"
COMMAND_FILE = "command.json"
# PEFT's adapter dtype on float32, bfloat16 and float16 bases (get_peft_model's autocast_adapter_dtype)
ADAPTER_DTYPE = torch.float32
_COPIED_SUFFIXES = (".json", ".txt", ".model", ".jinja")


@dataclass
class Target:
    """One matrix to decompose: the weight of LoRA layer ``name``, its checkpoint tensor ``key``, or expert
    ``expert.expert`` of the fused stack ``expert.parameter`` (of ``experts``); stored (in x out) when
    ``transposed`` (Conv1D, gpt-oss's stacks); ``shape`` (out x in), rank, scaling, and ``index`` among all
    matrices in `get_model`'s order (`milora.init.initialize.target_weights`): its seed offset."""

    name: str
    key: str | None
    transposed: bool
    shape: tuple[int, int]
    rank: int
    scaling: float
    index: int
    expert: ExpertSlice | None = None
    experts: int = 1

    @property
    def stack_shape(self) -> tuple[int, int, int]:
        """The shape of an expert's stack as stored."""
        return (self.experts, *(self.shape[::-1] if self.transposed else self.shape))


@dataclass
class StreamedInit:
    """A finished streaming init: its record, the rank-r config, and the work directory holding the factors
    (``weights/``) and, with save_residual, ``residual/residual_model``."""

    record: InitRecord
    lora_config: LoraConfig
    targets: list[Target]
    saved_tensors: dict[tuple[str, str], torch.Tensor]  # (modules_to_save module, its state-dict key) -> tensor
    work_dir: Path
    residual_dir: Path | None

    def layers(self) -> dict[str, list[Target]]:
        """The targets by LoRA layer, in name order."""
        grouped: dict[str, list[Target]] = {}
        for target in self.targets:
            grouped.setdefault(target.name, []).append(target)
        return grouped

    def layer_factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """A LoRA layer's start A (r E x in), B (out x r E), read from the work directory: E = 1, or a fused
        stack's experts packed as PEFT packs them (`milora.init.experts.fused_factors`)."""
        starts = [_read_start(_start_path(self.work_dir, target))[:2] for target in self.layers()[name]]
        if len(starts) == 1:
            return starts[0]
        return fused_factors(torch.stack([A for A, _ in starts]), torch.stack([B for _, B in starts]))


def work_directory(output: Path) -> Path:
    """Where a streaming init into ``output`` keeps its finished weights until the adapter is written."""
    return output.with_name(output.name + WORK_SUFFIX)


def stream_init(
    model_dir: str | os.PathLike,
    model: torch.nn.Module,
    lora_config: LoraConfig,
    output: str | os.PathLike,
    init: str = "milora",
    solver: str = "auto",
    seed: int = 0,
    null_space: str = "zero",
    workers: int | None = None,
    device: str | None = None,
    dtype: torch.dtype | None = None,
    save_residual: bool = False,
    progress: bool = True,
) -> StreamedInit:
    """Decompose the targets of the checkpoint in ``model_dir`` one weight at a time (see the module docstring).

    ``model``: the checkpoint's `milora.models.meta_model` (its module tree; ``lora_config``'s targets
    are resolved on it as `get_model` resolves them). ``dtype``: the dtype the weights are cast to
    when read, as a model loaded in that dtype holds them (default: each tensor's own); the factors
    do not depend on it for exact casts (bfloat16 to float32), the residual is stored in it.
    """
    check_init_options(lora_config, init, null_space, seed)
    if init == "lora":
        raise ModelError("init='lora' decomposes nothing: there is nothing to stream (use the in-memory init).")
    model_dir, output = Path(model_dir), Path(output)
    checkpoint = open_checkpoint(model_dir)
    refuse_quantized_checkpoint(str(model_dir), "decomposes full-precision weights")
    if output.resolve().is_relative_to(model_dir.resolve()):
        raise OutputError(f"--output {output} is inside the checkpoint {model_dir}: write the adapter elsewhere "
                          "(a checkpoint directory must stay as it was downloaded).")
    saved = saved_modules(model, lora_config)
    modules = target_modules(model, lora_config, check_values=False)
    warn_outside_language_model(model, lora_config.target_modules, modules)
    resolve_solver(solver, init)
    check_devices(solver, workers, device, {"cpu"})
    names = checkpoint_names(model, checkpoint)
    stacks = target_parameters(model, lora_config, check_values=False)
    targets = _resolve_targets(model, modules, lora_config, names, checkpoint,
                               expert_slices(model, checkpoint, stacks) if stacks else {})
    saved_tensors = {(name, key): _read(checkpoint, _checkpoint_key(model, f"{name}.{key}", names, checkpoint), dtype)
                     for name, module in saved.items() for key in module.state_dict()}
    work_dir = work_directory(output)
    command = _command(model_dir, checkpoint, lora_config, targets, init, solver, seed, null_space, device, dtype,
                       save_residual)
    _enter_work_directory(work_dir, command)
    if workers is None:
        workers = default_workers([t.shape for t in targets]) if device is None else 1
    start = time.perf_counter()
    resumed = _decompose(checkpoint, targets, work_dir, init, solver, seed, null_space, workers, device, dtype,
                         progress)
    report, samples, expert_samples = [], {}, {}
    for target in targets:
        _, _, sample, entry = _read_start(_start_path(work_dir, target))
        report.append(entry)
        if target.expert is None:
            samples[target.name] = (target.shape, sample)
        else:  # the stack's fingerprint sample: each expert's share, in expert order
            expert_samples.setdefault(target.expert.parameter, (target.stack_shape, []))[1].append(sample)
    samples.update({name: (shape, torch.cat(parts)) for name, (shape, parts) in expert_samples.items()})
    record = InitRecord(init=init, solver=solver, seed=seed, fingerprint=fingerprint_of_samples(samples),
                        report=report)
    record.measured.update(init_seconds=time.perf_counter() - start, workers=workers, streamed=True,
                           resumed_weights=resumed)
    warn_zero_components(record, null_space)
    residual_dir = None
    if save_residual:
        residual_dir = work_dir / "residual"
        _write_residual_model(checkpoint, targets, work_dir, residual_dir / "residual_model", dtype, progress)
    config = LoraConfig(**{**lora_config.to_dict(), "base_model_name_or_path": str(model_dir)})
    return StreamedInit(record, config, targets, saved_tensors, work_dir, residual_dir)


def _resolve_targets(model: torch.nn.Module, modules: dict[str, torch.nn.Module], lora_config: LoraConfig,
                     names: dict[str, str], checkpoint: Checkpoint, slices: dict[str, list[ExpertSlice]]
                     ) -> list[Target]:
    """The matrices to decompose in `get_model`'s order (its LoRA layers by name, a fused stack's experts in
    expert order), which sets each one's seed; each module weight checked against the checkpoint (a tensor
    present under the module's name or a tied alias, of its shape, floating), the experts by ``slices``."""
    layers = dict.fromkeys(modules) | (expert_layers(model, lora_config) if slices else {})
    headers = {}
    targets = []
    for name in sorted(layers):
        if layers[name] is not None:
            layer = layers[name]
            for piece in slices[layer.parameter]:
                targets.append(Target(name, None, layer.transposed, layer.shape, layer.rank, layer.scaling,
                                      len(targets), piece, len(slices[layer.parameter])))
            continue
        module = modules[name]
        key = _checkpoint_key(model, f"{name}.weight", names, checkpoint)
        shard = checkpoint.weight_map[key]
        entry = (headers.setdefault(shard, checkpoint.header(shard)[0]))[key]
        if entry.shape != list(module.weight.shape):
            raise ModelError(f"{checkpoint.directory}: tensor {key} has shape {entry.shape}, but the checkpoint's "
                             f"config makes {name} {list(module.weight.shape)}; the weights do not belong to this "
                             "config.json.")
        if entry.dtype not in DTYPE_CODES.values():
            raise ModelError(f"{checkpoint.directory}: tensor {key} is stored as {entry.dtype} (quantised?); milora "
                             "decomposes float32, bfloat16 or float16 weights. Give the full-precision checkpoint.")
        conv1d = isinstance(module, Conv1D)
        out_features, in_features = entry.shape[::-1] if conv1d else entry.shape
        targets.append(Target(name, key, conv1d, (out_features, in_features), rank_for(lora_config, name),
                              scaling_for(lora_config, name), len(targets)))
    return targets


def checkpoint_names(model: torch.nn.Module, checkpoint: Checkpoint) -> dict[str, str]:
    """Each parameter name of ``model`` -> the checkpoint's name for it, renamed as transformers renames keys
    on loading (e.g. LLaVA's ``language_model.model.layers`` -> ``model.language_model.layers``); tensors that
    transformers converts (fuses, splits) on loading keep no entry."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    transforms = get_model_conversion_mapping(model)
    renamings = [entry for entry in transforms if isinstance(entry, WeightRenaming)]
    converters = [entry for entry in transforms if isinstance(entry, WeightConverter)]
    meta_state = model.state_dict()
    names = {}
    for key in checkpoint.weight_map:
        renamed, converted = rename_source_key(key, renamings, converters, model.base_model_prefix, meta_state)
        if renamed not in meta_state and key in meta_state:
            renamed, converted = key, None
        if converted is None:
            names.setdefault(renamed, key)
    return names


def _checkpoint_key(model: torch.nn.Module, parameter: str, names: dict[str, str], checkpoint: Checkpoint) -> str:
    """The checkpoint's name for a parameter of ``model`` (``names``: `checkpoint_names`), or that of a
    parameter tied to it."""
    tensor = model.get_parameter(parameter) if parameter.endswith(".weight") else None
    aliases = [parameter, *(name for name, p in model.named_parameters(remove_duplicate=False) if p is tensor)]
    found = next((names[alias] for alias in aliases if alias in names), None)
    if found is None:
        example = next(iter(checkpoint.weight_map))
        raise ModelError(f"{checkpoint.directory} has no tensor {parameter} (nor a tied alias of it), which the "
                         f"targets select; its tensors are named like {example}. The checkpoint does not match its "
                         "config (or uses another naming): load it with transformers and save_pretrained it again, "
                         "or use the in-memory init (--in-memory).")
    return found


def _read(checkpoint: Checkpoint, key: str, dtype: torch.dtype | None) -> torch.Tensor:
    tensor = checkpoint.tensor(key)
    return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor


def _weight(checkpoint: Checkpoint, target: Target, dtype: torch.dtype | None) -> torch.Tensor:
    """A target's (out x in) matrix, as `weight_matrix` (`weight_stack` for an expert) gives it in memory."""
    expert = target.expert
    stored = expert.read(checkpoint, dtype) if expert is not None else _read(checkpoint, target.key, dtype)
    return stored.T if target.transposed else stored


def _sample(target: Target, weight: torch.Tensor) -> torch.Tensor:
    """What `fingerprint` reads of a target: its module's `fingerprint_sample`, or an expert's share of its
    stack's (the stack as stored)."""
    if target.expert is None:
        return fingerprint_sample(weight)
    return expert_sample(weight.T if target.transposed else weight, target.expert.expert, target.experts)


def _command(model_dir: Path, checkpoint: Checkpoint, lora_config: LoraConfig, targets: list[Target], init: str,
             solver: str, seed: int, null_space: str, device, dtype, save_residual: bool) -> dict:
    """Everything a resumed run must share with the run it continues."""
    return {
        "checkpoint": str(model_dir.resolve()),
        "checkpoint_files": checkpoint.files(),
        "init": init, "solver": solver, "seed": seed, "null_space": null_space,
        "device": str(device), "dtype": str(dtype), "save_residual": save_residual,
        "targets": {t.name: [t.rank, t.scaling] for t in targets},
        "use_rslora": lora_config.use_rslora,
    }


def _enter_work_directory(work_dir: Path, command: dict) -> None:
    """Create the work directory, or check that the one there was made by the same command."""
    path = work_dir / COMMAND_FILE
    if path.is_file():
        previous = json.loads(path.read_text())
        changed = sorted(key for key in command.keys() | previous.keys() if command.get(key) != previous.get(key))
        if changed:
            raise ModelError(f"{work_dir} holds an interrupted init made with a different command "
                             f"({', '.join(changed)} changed). Run the original command again to continue it,"
                             " or delete "
                             f"{work_dir} to start over.")
        return
    if work_dir.exists():
        shutil.rmtree(work_dir)  # no command file: created and killed before it was written
    (work_dir / "weights").mkdir(parents=True)
    staging = path.with_name(f".{COMMAND_FILE}.tmp")
    staging.write_text(json.dumps(command, indent=2) + "\n")
    os.replace(staging, path)


def _start_path(work_dir: Path, target: Target) -> Path:
    return work_dir / "weights" / f"{target.index:05d}.safetensors"


def _write_start(path: Path, target: Target, A: torch.Tensor, B: torch.Tensor, sample: torch.Tensor,
                 entry: dict) -> None:
    staging = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file({"A": A.contiguous(), "B": B.contiguous(), "sample": sample}, staging,
              metadata={"module": target.name, "report": json.dumps(entry)})
    os.replace(staging, path)


def _read_start(path: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """A finished weight: A (r x in), B (out x r), its fingerprint sample and report entry."""
    with safe_open(path, framework="pt") as handle:
        report = json.loads(handle.metadata()["report"])
        return handle.get_tensor("A"), handle.get_tensor("B"), handle.get_tensor("sample"), report


def _decompose(checkpoint: Checkpoint, targets: list[Target], work_dir: Path, init: str, solver: str, seed: int,
               null_space: str, workers: int, device, dtype, progress: bool) -> int:
    """Decompose every target not finished yet, writing each result as it comes; returns how many were resumed."""
    todo = [t for t in targets if not _start_path(work_dir, t).is_file()]
    read = deque()

    def tasks():
        for target in todo:
            weight = _weight(checkpoint, target, dtype)
            check_finite_weight(target.name, weight)
            weight = weight.to(device) if device is not None else weight
            read.append(weight)
            yield weight, target.rank, torch.Generator().manual_seed(seed + target.index)

    bar = tqdm(total=len(targets), initial=len(targets) - len(todo), desc=f"{init} init (streaming)", unit="weight",
               disable=not progress)
    with contextlib.closing(select_components_many(tasks(), init, solver, workers)) as results:
        for target, parts in zip(todo, results, strict=True):
            weight = read.popleft()
            start = weight_start(parts, weight, target.scaling, null_space, seed + target.index)
            A, B = start.A.to(ADAPTER_DTYPE), start.B.to(ADAPTER_DTYPE)
            _, error = residual_weight(weight, A, B, target.scaling, keep=False)
            where = None if target.expert is None else ExpertOf(target.expert.parameter, target.expert.expert)
            entry = report_entry(target.name, weight, target.rank, target.scaling, start.ran, start.stats, error, where)
            _write_start(_start_path(work_dir, target), target, A.cpu(), B.cpu(), _sample(target, weight), entry)
            del weight, parts, start, A, B
            release_freed_memory()
            bar.update()
    bar.close()
    return len(targets) - len(todo)


def _write_residual_model(checkpoint: Checkpoint, targets: list[Target], work_dir: Path, directory: Path,
                          dtype: torch.dtype | None, progress: bool) -> None:
    """The residual model: each shard rewritten tensor by tensor (W - s B0 A0 for the targets, every other
    tensor copied, cast to ``dtype`` if given), atomically, skipping shards a killed run finished. A stored
    expert stack is rewritten whole, an expert's part (Qwen3-MoE's ``gate_proj``) as its rows of the expert's
    residual."""
    directory.mkdir(parents=True, exist_ok=True)
    held: dict[str, list[tuple[Target, int]]] = {}  # checkpoint key -> the targets it holds, with its part number
    for target in targets:
        for part, key in enumerate(target.expert.keys if target.expert is not None else [target.key]):
            held.setdefault(key, []).append((target, part))
    headers = {}
    last_expert: dict[int, torch.Tensor] = {}  # an expert's residual, by target index: its parts come in a row

    def residual(target: Target) -> torch.Tensor:
        """A target's residual as stored."""
        A, B, _, _ = _read_start(_start_path(work_dir, target))
        matrix, _ = residual_weight(_weight(checkpoint, target, dtype), A, B, target.scaling)
        return matrix.T if target.transposed else matrix

    def stored_residual(key: str) -> torch.Tensor:
        target, part = held[key][0]
        if target.expert is None:
            return residual(target)
        if target.expert.stacked:
            return torch.stack([residual(t) for t, _ in held[key]])
        if target.index not in last_expert:
            last_expert.clear()
            last_expert[target.index] = residual(target)
        sizes = [headers.setdefault(shard, checkpoint.header(shard)[0])[name].shape[target.expert.dim]
                 for name in target.expert.keys for shard in [checkpoint.weight_map[name]]]
        return torch.split(last_expert[target.index], sizes, dim=target.expert.dim)[part].contiguous()

    total = 0
    for shard in tqdm(checkpoint.shards, desc="residual shards", unit="shard", disable=not progress):
        entries, metadata = checkpoint.header(shard)
        if dtype is not None:
            entries = {name: _cast_entry(entry, dtype) for name, entry in entries.items()}
        total += sum(entry.nbytes for entry in entries.values())
        if (directory / shard).is_file():
            continue

        def tensors(names):
            for name in names:
                if name not in held:
                    yield _read(checkpoint, name, dtype)
                    continue
                yield stored_residual(name)
                release_freed_memory()

        write_safetensors(directory / shard, entries, tensors(list(entries)), metadata)
    if checkpoint.sharded:
        index = {"metadata": {"total_size": total}, "weight_map": checkpoint.weight_map}
        (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    for path in checkpoint.directory.iterdir():
        if path.is_file() and path.suffix in _COPIED_SUFFIXES and path.name != INDEX_FILE:
            shutil.copyfile(path, directory / path.name)


def _cast_entry(entry: TensorEntry, dtype: torch.dtype) -> TensorEntry:
    codes = {code: torch_dtype for torch_dtype, code in DTYPE_CODES.items()}
    if entry.dtype not in codes:
        return entry
    count = entry.nbytes // codes[entry.dtype].itemsize
    return TensorEntry(DTYPE_CODES[dtype], entry.shape, count * dtype.itemsize)
