"""A fused MoE expert stack read from a safetensors checkpoint one expert at a time (for the streaming init).

In memory, transformers 5 holds a mixture-of-experts layer's experts as one 3-D parameter
(`milora.init.experts`). Checkpoints store them in one of two ways:

- the stack itself under the parameter's name (gpt-oss): expert e is slice ``[e]`` of that tensor,
  read alone with ``safe_open``'s ``get_slice``;
- one tensor per expert and projection (Qwen3-MoE's ``mlp.experts.3.gate_proj.weight`` and
  ``up_proj``, Mixtral's ``block_sparse_moe.experts.3.w1.weight`` and ``w3``), which transformers
  renames and fuses while loading, as its conversion mapping says (``WeightConverter``: stack the
  experts, ``MergeModulelist(dim=0)``, then concatenate the projections, ``Concatenate(dim=1)``).
  Expert e's slice is then its parts concatenated along ``dim - 1``, in the converter's order.

`expert_layers` names the LoRA layers PEFT makes for the stacks (on a meta copy of the model), and
`expert_slices` reads that mapping from transformers itself (the same renamings and converters
`from_pretrained` applies) and checks, from the headers alone, that every expert is there with the
stack's shape; a converter that does anything else (transposes, interleaves, splits) is refused
with the fix, the in-memory init.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass

import torch
from peft import LoraConfig
from safetensors import safe_open

from milora.errors import ModelError
from milora.init.checkpoint import DTYPE_CODES, Checkpoint
from milora.init.experts import parameter_target_name, weight_stack
from milora.init.layers import lora_layers

IN_MEMORY_FIX = "pass --in-memory (transformers builds the stacks while loading the model)"


@dataclass(frozen=True)
class ExpertLayer:
    """A LoRA layer PEFT makes for a fused stack: the ``parameter`` it adapts, each expert's (out x in)
    ``shape``, ``transposed`` when stored (in x out), rank and scaling."""

    parameter: str
    shape: tuple[int, int]
    transposed: bool
    rank: int
    scaling: float


def expert_layers(model: torch.nn.Module, lora_config: LoraConfig) -> dict[str, ExpertLayer]:
    """The LoRA layers of ``lora_config.target_parameters``, named as `lora_layers` names them: PEFT itself wraps
    a copy of the meta model (so the nesting of several stacks of one module, ``experts`` and
    ``experts.base_layer``, is PEFT's)."""
    from peft import get_peft_model
    from peft.tuners.lora import ParamWrapper

    wrapped = get_peft_model(copy.deepcopy(model), copy.deepcopy(lora_config))
    layers = {}
    for name, layer in lora_layers(wrapped).items():
        if isinstance(layer, ParamWrapper):
            stack = weight_stack(layer)
            layers[name] = ExpertLayer(parameter_target_name(name, layer), tuple(stack.shape[1:]),
                                       getattr(layer.get_base_layer(), "is_transposed", False),
                                       layer.r["default"], layer.scaling["default"])
    return layers


@dataclass(frozen=True)
class ExpertSlice:
    """Expert ``expert`` of the fused stack ``parameter`` in a checkpoint: the tensors ``keys`` concatenated along
    ``dim`` (one key and ``stacked``: slice ``[expert]`` of a stored stack), in the stack's own layout."""

    parameter: str
    expert: int
    keys: tuple[str, ...]
    stacked: bool
    dim: int = 0

    def read(self, checkpoint: Checkpoint, dtype: torch.dtype | None) -> torch.Tensor:
        """The expert's 2-D slice of the stack, as the loaded model holds it (cast to ``dtype`` if given)."""
        if self.stacked:
            (key,) = self.keys
            with safe_open(checkpoint.directory / checkpoint.weight_map[key], framework="pt") as handle:
                tensor = handle.get_slice(key)[self.expert]
        else:
            parts = [checkpoint.tensor(key) for key in self.keys]
            tensor = parts[0] if len(parts) == 1 else torch.cat(parts, dim=self.dim)
        return tensor.to(dtype) if dtype is not None else tensor


def expert_slices(model: torch.nn.Module, checkpoint: Checkpoint, stacks: dict[str, torch.nn.Parameter]
                  ) -> dict[str, list[ExpertSlice]]:
    """Where each expert of each fused stack in ``stacks`` (by full name, on ``model``, the checkpoint's meta
    model) lies in ``checkpoint``, in expert order; a `ModelError` naming the fix when a stack or an expert is
    missing, has another shape, is not floating, or is stored in a layout this reader does not rebuild."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, apply_renamings, rename_source_key

    transforms = get_model_conversion_mapping(model)
    renamings = [entry for entry in transforms if isinstance(entry, WeightRenaming)]
    converters = [entry for entry in transforms if isinstance(entry, WeightConverter)]
    meta_state = model.state_dict()
    stored: dict[str, str] = {}
    parts: dict[str, dict[int, dict[int, str]]] = {}  # stack -> expert -> source pattern index -> key
    layouts: dict[str, tuple[WeightConverter, int]] = {}
    for key in checkpoint.weight_map:
        renamed, pattern = rename_source_key(key, renamings, converters, model.base_model_prefix, meta_state)
        if renamed not in stacks:
            continue
        if pattern is None:
            stored[renamed] = key
            continue
        converter = next(c for c in converters if pattern in c.source_patterns)
        layouts[renamed] = (converter, _concatenation_dim(renamed, converter))
        found = re.search(re.escape(pattern).replace(r"\*", r"(\d+)"), apply_renamings(key, renamings))
        if found is None or not found.groups():
            raise ModelError(f"{checkpoint.directory}: tensor {key} feeds the expert stack {renamed}, but names no "
                             f"expert number where transformers' pattern {pattern!r} has one; {IN_MEMORY_FIX}.")
        index = converter.source_patterns.index(pattern)
        parts.setdefault(renamed, {}).setdefault(int(found.group(1)), {})[index] = key
    slices, headers = {}, {}
    for name, stack in stacks.items():
        if name in stored:
            slices[name] = [ExpertSlice(name, expert, (stored[name],), True) for expert in range(stack.shape[0])]
        elif name in parts:
            converter, dim = layouts[name]
            slices[name] = [_expert_parts(name, expert, parts[name].get(expert, {}), converter, dim)
                            for expert in range(stack.shape[0])]
        else:
            raise ModelError(f"{checkpoint.directory} has no tensors for the expert stack {name}, which the targets "
                             f"select; its tensors are named like {next(iter(checkpoint.weight_map))}. The checkpoint "
                             "does not match its config: load it with transformers and save_pretrained it again, or "
                             f"{IN_MEMORY_FIX}.")
        _check_shapes(checkpoint, name, stack, slices[name], headers)
    return slices


def _concatenation_dim(stack: str, converter) -> int:
    """The dimension a converter's parts are concatenated along within one expert: stacking the experts along
    dim 0 (`MergeModulelist(dim=0)`), then, with several parts, `Concatenate` along dim d >= 1 (so d - 1 within
    an expert). Anything else is refused."""
    from transformers.core_model_loading import Concatenate, MergeModulelist

    operations = list(converter.operations)
    merged = len(operations) >= 1 and type(operations[0]) is MergeModulelist and operations[0].dim == 0
    if merged and len(operations) == 1 and len(converter.source_patterns) == 1:
        return 0
    if merged and len(operations) == 2 and type(operations[1]) is Concatenate and operations[1].dim >= 1:
        return operations[1].dim - 1
    raise ModelError(f"The checkpoint stores the experts of {stack} as transformers converts with {operations}; the "
                     f"streaming init reads stacked or concatenated experts only: {IN_MEMORY_FIX}.")


def _expert_parts(stack: str, expert: int, found: dict[int, str], converter, dim: int) -> ExpertSlice:
    missing = [pattern for index, pattern in enumerate(converter.source_patterns) if index not in found]
    if missing:
        raise ModelError(f"The checkpoint has no tensor for expert {expert} of {stack} (pattern "
                         f"{', '.join(missing)}): it is incomplete; download it again.")
    return ExpertSlice(stack, expert, tuple(found[index] for index in range(len(converter.source_patterns))), False,
                       dim)


def _check_shapes(checkpoint: Checkpoint, stack: str, parameter: torch.nn.Parameter, slices: list[ExpertSlice],
                  headers: dict) -> None:
    """Every expert's slice has the stack's (d1, d2) and a floating dtype, from the headers alone (``headers``:
    the shards' headers read so far)."""
    expected = list(parameter.shape[1:])
    for piece in slices:
        entries = [headers.setdefault(shard, checkpoint.header(shard)[0])[key]
                   for key in piece.keys for shard in [checkpoint.weight_map[key]]]
        for key, entry in zip(piece.keys, entries, strict=True):
            if entry.dtype not in DTYPE_CODES.values():
                raise ModelError(f"{checkpoint.directory}: tensor {key} is stored as {entry.dtype} (quantised?); "
                                 "milora decomposes float32, bfloat16 or float16 weights. Give the full-precision "
                                 "checkpoint.")
        if piece.stacked:
            shape = entries[0].shape[1:] if entries[0].shape[0] == parameter.shape[0] else None
        else:
            shape = list(entries[0].shape)
            if all(len(entry.shape) == len(shape) for entry in entries):
                shape[piece.dim] = sum(entry.shape[piece.dim] for entry in entries)
        if shape != expected:
            raise ModelError(f"{checkpoint.directory}: expert {piece.expert} of {stack} is "
                             f"{[entry.shape for entry in entries]} in tensors {list(piece.keys)}, but the "
                             f"checkpoint's config makes each expert {expected} ({parameter.shape[0]} experts); the "
                             "weights do not belong to this config.json.")
