"""`analyze_adapter`: the metrics of `milora.analysis.metrics` for every weight a saved adapter changed."""

from __future__ import annotations

from contextlib import closing
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel
from peft.tuners.lora import ParamWrapper
from tqdm.auto import tqdm

from milora.adapter.format import trainable_config
from milora.adapter.load import is_plain_peft_adapter, open_peft_adapter, read_adapter
from milora.analysis.metrics import METRICS, update_metrics
from milora.constants import ADAPTER_CONFIG
from milora.errors import AdapterError, ModelError
from milora.init import lora_layers, rank_for
from milora.init.experts import expert_count, expert_factors, parameter_target_name, weight_stack
from milora.linalg.decomposition import default_workers, map_concurrently
from milora.report import format_table


def _open_adapter(base_model: torch.nn.Module, adapter_dir: Path) -> tuple[PeftModel, LoraConfig, str]:
    """The adapter on its original base (checked when milora saved it), its trainable config, its init."""
    if is_plain_peft_adapter(adapter_dir):
        try:
            config, init = LoraConfig.from_pretrained(str(adapter_dir)), "peft"
        except (TypeError, ValueError) as error:
            raise AdapterError(f"{adapter_dir} has an unreadable {ADAPTER_CONFIG} ({error}).") from error
    else:
        saved_config, _, metadata = read_adapter(adapter_dir)
        config, init = trainable_config(saved_config, metadata), metadata["init"]
    return open_peft_adapter(base_model, adapter_dir), config, init


def update_factors(layer, adapter: str, weight: torch.Tensor, expert: int = 0, experts: int = 1
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Delta W of one layer (of expert ``expert`` of a fused stack of ``experts``) as left @ right. LoRA: s B @ A.
    DoRA (W' = diag(d) (W + s B A), with d = m / row norms of W + s B A, PEFT's rule):
    Delta W = [diag(d - 1) | diag(d) s B] @ [W ; A], in float64."""
    A, B = expert_factors(layer.lora_A[adapter].weight.double(), layer.lora_B[adapter].weight.double(), experts)
    scaled_B, A = B[expert] * layer.scaling[adapter], A[expert]
    magnitudes = getattr(layer, "lora_magnitude_vector", None)
    if not magnitudes or adapter not in magnitudes:
        return scaled_B, A
    w = weight.detach().double()
    d = magnitudes[adapter].weight.double() / torch.linalg.norm(w + scaled_B @ A, dim=1)
    return torch.cat([torch.diag(d - 1), d[:, None] * scaled_B], dim=1), torch.cat([w, A], dim=0)


def analyze_adapter(
    base_model: torch.nn.Module,
    adapter_dir: str | Path,
    rank: int | None = None,
    label: str | None = None,
    progress: bool = True,
) -> dict:
    """Analyse a saved adapter (milora or plain PEFT LoRA, DoRA included) on its ORIGINAL base model.

    ``rank``: size k of the compared subspaces (default: each layer's adapter rank r). CPU
    weights are analysed several at once, as `milora.get_model` decomposes them.
    ``base_model`` is wrapped in place by PEFT. Returns ``{"label", "adapter", "init",
    "layers": [{"module", "shape", "k", <metrics>}], "summary": {module kind: mean metrics,
    "all": ...}}``.
    """
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ModelError(f"rank must be a positive integer, got {rank!r}.")
    adapter_dir = Path(adapter_dir)
    peft_model, config, init = _open_adapter(base_model, adapter_dir)
    tasks = []  # (name, W, s B, A, k): one per weight matrix, each expert of a fused stack its own
    with torch.no_grad():
        for module, layer in lora_layers(peft_model).items():
            adapter = layer.active_adapters[0]
            if adapter not in layer.lora_A:
                raise AdapterError(f"{module} is a {type(layer).__name__} LoRA layer; "
                                   "milora analyses Linear and Conv1D layers and fused expert stacks.")
            experts = expert_count(layer)
            name = parameter_target_name(module, layer) if isinstance(layer, ParamWrapper) else module
            k = rank or rank_for(config, name)
            for expert, weight in enumerate(weight_stack(layer)):
                weight_name = f"{name}[{expert}]" if isinstance(layer, ParamWrapper) else name
                if k >= min(weight.shape):
                    raise ModelError(f"Subspace size k={k} is too large for {weight_name} "
                                     f"({weight.shape[0]} x {weight.shape[1]}): it must be below {min(weight.shape)}; "
                                     "pass a smaller rank.")
                left, right = update_factors(layer, adapter, weight, expert, experts)
                tasks.append((weight_name, weight, left, right, k))
    on_cpu = all(weight.device.type == "cpu" for _, weight, *_ in tasks)
    workers = default_workers([tuple(weight.shape) for _, weight, *_ in tasks]) if on_cpu else 1
    layers = []
    with closing(map_concurrently(update_metrics, (task[1:] for task in tasks), workers)) as results:
        for (name, weight, _, _, k), metrics in tqdm(zip(tasks, results, strict=True), total=len(tasks),
                                                    desc="analysing", disable=not progress):
            layers.append({"module": name, "shape": list(weight.shape), "k": k, **metrics})
    return {
        "label": label or adapter_dir.name,
        "adapter": str(adapter_dir),
        "init": init,
        "layers": layers,
        "summary": _summarise(layers),
    }


def _kind(module: str) -> str:
    """``q_proj`` for ``model.layers.0.self_attn.q_proj``, ``gate_up_proj`` for ``...experts.gate_up_proj[3]``."""
    return module.rsplit(".", 1)[-1].split("[", 1)[0]


def mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _summarise(layers: list[dict]) -> dict:
    groups = {"all": layers}
    for kind in sorted({_kind(entry["module"]) for entry in layers}):
        groups[kind] = [entry for entry in layers if _kind(entry["module"]) == kind]
    return {kind: {metric: mean([entry[metric] for entry in entries]) for metric in METRICS}
            for kind, entries in groups.items()}


def format_analysis(results: list[dict]) -> str:
    """One row per adapter (mean over its layers), then one per module kind."""
    rows = []
    for result in results:
        for kind, means in result["summary"].items():
            name = result["label"] if kind == "all" else f"  {kind}"
            rows.append([name, *("-" if means[m] is None else f"{means[m]:.3g}" for m in METRICS)])
    return format_table(["adapter", *METRICS], rows)

