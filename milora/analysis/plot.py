"""Per-layer curves of `analyze_adapter` results, one line per adapter."""

from __future__ import annotations

import math
import re
from pathlib import Path

from milora.analysis.adapter import mean


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
            values = [mean([entry[metric] for entry in by_layer[i]]) for i in indices]
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
