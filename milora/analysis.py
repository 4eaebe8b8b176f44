"""What fine-tuning changed: each adapter's update Delta W measured against W's singular subspaces.

A LoRA adapter adds Delta W = s B A to an adapted weight W (out x in); a milora adapter is
saved as the rank-2r update on the original base, s (B A - B0 A0), so the same formula
applies. Let U_k, V_k be W's top-k singular vectors (its principal subspace, where PiSSA
trains), U_-k, V_-k its bottom-k ones (the minor subspace, where MiLoRA trains), k the
adapter's rank unless given. Per weight, in float64:

- ``relative_update``: ||Delta W||_F / ||W||_F.
- ``principal_energy``: ||U_k^T Delta W V_k||_F^2 / ||Delta W||_F^2, the share of the update
  inside W's principal subspace; ``minor_energy`` the same for the minor subspace;
  ``chance_energy`` = k^2 / (out in), their expected value for an update with random directions.
- ``amplification``: ||Delta W||_F / ||U_d^T W V_d||_F with U_d, V_d the top-k singular vectors
  of Delta W (Hu et al. 2021, LoRA, section 7): large when the update amplifies directions
  that W itself barely uses.
- ``principal_rotation``: sine of the largest principal angle between the top-k singular
  subspaces of W and of W + Delta W (max over the left and right sides), and
  ``principal_value_change``: max over the top k of |sigma_i(W + Delta W) - sigma_i(W)| / sigma_i(W).
  Both measure how far fine-tuning moved W's dominant directions, the pretrained knowledge
  MiLoRA aims to leave alone. ``principal_gap`` (per layer) is the relative gap between
  sigma_{k-1} and sigma_k of W: where it is tiny, the top-k subspace is not well defined and
  even a small update can rotate it far.

Delta W is handled through its factors (rank <= 2r): its norm and singular vectors come from
QR factorisations of the factors and an SVD of the small core. W's components come from
`select_components`. An update no larger than the rounding of its factors' product
(||Delta W|| <= 1e-13 ||left|| ||right||, e.g. a milora adapter saved before training) counts
as zero: its relative size and rotation are 0 and the ratios are None.
"""

from __future__ import annotations

import math
import re
from contextlib import closing
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel
from tqdm.auto import tqdm

from milora.constants import ADAPTER_CONFIG
from milora.errors import AdapterError, ModelError
from milora.init import lora_layers, rank_for, weight_matrix
from milora.linalg.decomposition import (
    default_workers,
    map_concurrently,
    principal_angle_sine,
    select_components,
)
from milora.persistence import is_plain_peft_adapter, open_peft_adapter, read_adapter, trainable_config
from milora.report import format_table

ZERO_UPDATE = 1e-13
METRICS = (
    "relative_update", "principal_energy", "minor_energy", "chance_energy", "amplification",
    "principal_rotation", "principal_value_change",
)


def update_metrics(weight: torch.Tensor, left: torch.Tensor, right: torch.Tensor, k: int) -> dict[str, float | None]:
    """The metrics above for W (m x n) and the update Delta W = left @ right (m x R, R x n)."""
    w, left, right = weight.detach().double(), left.detach().double(), right.detach().double()
    m, n = w.shape
    top = select_components(w, k, "pissa")
    q_left, r_left = torch.linalg.qr(left)  # Delta W = q_left (r_left r_right^T) q_right^T
    q_right, r_right = torch.linalg.qr(right.T)
    core_u, core_s, core_vh = torch.linalg.svd(r_left @ r_right.T)
    norm = float(torch.linalg.norm(core_s))
    # a milora adapter saved before training encodes s (B0 A0 - B0 A0): zero up to rounding
    shared = {"chance_energy": k * k / (m * n), "principal_gap": top.boundary_gap}
    if norm <= ZERO_UPDATE * float(torch.linalg.norm(left) * torch.linalg.norm(right)):
        return {**shared, "relative_update": 0.0, "principal_rotation": 0.0, "principal_value_change": 0.0,
                **dict.fromkeys(("principal_energy", "minor_energy", "amplification"))}

    def energy(parts) -> float:
        return float(torch.linalg.norm((parts.U.T @ left) @ (right @ parts.Vh.T))) ** 2 / norm**2

    directions = int((core_s > core_s[0] * core_s.numel() * torch.finfo(torch.float64).eps).sum().clamp(max=k))
    update_u, update_v = q_left @ core_u[:, :directions], q_right @ core_vh[:directions].T
    updated = select_components(w + left @ right, k, "pissa")
    return {
        **shared,
        "relative_update": norm / float(torch.linalg.norm(w)),
        "principal_energy": energy(top),
        "minor_energy": energy(select_components(w, k, "milora")),
        "amplification": _ratio(norm, float(torch.linalg.norm(update_u.T @ w @ update_v))),
        "principal_rotation": max(principal_angle_sine(top.U, updated.U), principal_angle_sine(top.Vh.T, updated.Vh.T)),
        "principal_value_change": float(((updated.S - top.S).abs() / top.S).max()),
    }


def _ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator > 0 else None


def _open_adapter(base_model: torch.nn.Module, adapter_dir: Path) -> tuple[PeftModel, LoraConfig, str]:
    """The adapter on its original base (checked when milora saved it), its trainable config, its init."""
    if is_plain_peft_adapter(adapter_dir):
        try:
            config, init = LoraConfig.from_pretrained(str(adapter_dir)), "peft"
        except (TypeError, ValueError) as error:
            raise AdapterError(f"{adapter_dir} has an unreadable {ADAPTER_CONFIG} ({error}).") from None
        if config.use_dora:
            raise AdapterError(f"{adapter_dir} is a DoRA adapter: its update is not B A; "
                               "milora analyses LoRA adapters.")
    else:
        saved_config, _, metadata = read_adapter(adapter_dir)
        config, init = trainable_config(saved_config, metadata), metadata["init"]
    return open_peft_adapter(base_model, adapter_dir), config, init


def analyze_adapter(
    base_model: torch.nn.Module,
    adapter_dir: str | Path,
    rank: int | None = None,
    label: str | None = None,
    progress: bool = True,
) -> dict:
    """Analyse a saved adapter (milora or plain PEFT LoRA) on its ORIGINAL base model.

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
    tasks = []  # (name, W, s B, A, k)
    with torch.no_grad():
        for name, layer in lora_layers(peft_model).items():
            adapter = layer.active_adapters[0]
            if adapter not in layer.lora_A:
                raise AdapterError(f"{name} is a {type(layer).__name__} LoRA layer; "
                                   "milora analyses Linear and Conv1D layers.")
            weight, k = weight_matrix(layer.get_base_layer()), rank or rank_for(config, name)
            if k >= min(weight.shape):
                raise ModelError(f"Subspace size k={k} is too large for {name} "
                                 f"({weight.shape[0]} x {weight.shape[1]}): it must be below {min(weight.shape)}; "
                                 "pass a smaller rank.")
            left = layer.lora_B[adapter].weight * layer.scaling[adapter]
            tasks.append((name, weight, left, layer.lora_A[adapter].weight, k))
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
    return module.rsplit(".", 1)[-1]


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _summarise(layers: list[dict]) -> dict:
    groups = {"all": layers}
    for kind in sorted({_kind(entry["module"]) for entry in layers}):
        groups[kind] = [entry for entry in layers if _kind(entry["module"]) == kind]
    return {kind: {metric: _mean([entry[metric] for entry in entries]) for metric in METRICS}
            for kind, entries in groups.items()}


def format_analysis(results: list[dict]) -> str:
    """One row per adapter (mean over its layers), then one per module kind."""
    rows = []
    for result in results:
        for kind, means in result["summary"].items():
            name = result["label"] if kind == "all" else f"  {kind}"
            rows.append([name, *("-" if means[m] is None else f"{means[m]:.3g}" for m in METRICS)])
    return format_table(["adapter", *METRICS], rows)


def _layer_index(module: str, position: int) -> int:
    match = re.search(r"\.(\d+)\.", module)
    return int(match.group(1)) if match else position


def plot_analysis(results: list[dict], path: str | Path) -> Path:
    """Per-layer curves (mean over module kinds) of the energies and the principal rotation, one line per adapter."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = ("principal_energy", "minor_energy", "principal_rotation", "relative_update")
    figure, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4))
    for result in results:
        by_layer: dict[int, list[dict]] = {}
        for position, entry in enumerate(result["layers"]):
            by_layer.setdefault(_layer_index(entry["module"], position), []).append(entry)
        indices = sorted(by_layer)
        for axis, metric in zip(axes, panels, strict=True):
            values = [_mean([entry[metric] for entry in by_layer[i]]) for i in indices]
            axis.plot(indices, [math.nan if v is None else v for v in values], marker=".", label=result["label"])
    for axis, metric in zip(axes, panels, strict=True):
        axis.set_title(metric.replace("_", " "))
        axis.set_xlabel("layer")
        if any(value > 0 for line in axis.get_lines() for value in line.get_ydata()):  # else nothing to scale
            axis.set_yscale("log")
    axes[0].legend(fontsize="small")
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
