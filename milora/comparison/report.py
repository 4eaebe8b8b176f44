"""The comparison's report: compare.md (printed too), and its plots.

- ``lr_curves.png``: validation and test accuracy against the learning rate (log axis), one
  line per method (the mean over seeds), each seed a dot, the chosen rate circled (the test set
  scores the chosen runs only unless the sweep set ``test_runs: all``);
- ``accuracy_vs_forgetting.png``: the Pareto plot, test accuracy against forgetting (KL to the
  base) of each method's chosen runs: the mean with its 95 % interval on both axes, each run a
  faint dot, and the Pareto front (the methods no other beats on both) joined by a line;
- ``loss_curves.png``: training loss of the chosen runs (one line per seed).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from milora.report import markdown_table


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _value(value: float | None, scale: float = 1, digits: int = 4) -> str:
    """A number as text; a rounding-sized negative value prints as 0 (no "-0.0000")."""
    if value is None:
        return "-"
    text = f"{scale * value:.{digits}f}"
    return text.lstrip("-") if float(text) == 0 else text


def _interval(mean: float | None, bounds: list[float] | None, scale: float = 100, digits: int = 1) -> str:
    if mean is None:
        return "-"
    text = _value(mean, scale, digits)
    return (text if bounds is None
            else f"{text} [{_value(bounds[0], scale, digits)}, {_value(bounds[1], scale, digits)}]")


def methods_table(summary: dict[str, Any]) -> str:
    header = ["method", "chosen lr", "lr / lora's (published)", "val acc %", "test acc % [95% CI]",
              f"vs {summary['baseline']} (points) [95% CI]",
              "verdict", "forgetting KL [95% CI]", "retention acc %", "trainable params", "train s / run"]
    rows = []
    for m in summary["methods"]:
        if m["status"] != "done":
            rows.append([m["method"], "-", "-", "-", "-", "-", m["selection"], "-", "-", "-", "-"])
            continue
        rows.append([
            m["method"], _chosen(m), _ratio(m), _percent(m["validation_accuracy_mean"]),
            _interval(m["test_accuracy_mean"], m["test_accuracy_ci95"]),
            "(baseline)" if m["method"] == summary["baseline"] else
            _interval(m["difference_to_baseline"], m["difference_ci95"]),
            m["verdict"] or "-", _interval(m["forgetting_kl_mean"], m["forgetting_kl_ci95"], 1, 4),
            _percent(m.get("retention_accuracy_mean")), f"{m['trainable_parameters']:,}",
            f"{m['train_seconds_mean']:.0f}",
        ])
    return markdown_table(header, rows)


def _chosen(m: dict[str, Any]) -> str:
    """The chosen rate (and batch size), marked when it is an end of the method's grid."""
    text = f"{m['selected_learning_rate']:g}"
    if m.get("selected_batch_size") is not None:
        text += f", batch {m['selected_batch_size']}"
    return text + (f" ({m['grid_edge']} of grid!)" if m.get("grid_edge") else "")


def _ratio(m: dict[str, Any]) -> str:
    """LoRA's chosen rate over this method's (how many times lower), next to the published ratio."""
    measured = "-" if not m.get("rate_vs_lora") else f"1/{1 / m['rate_vs_lora']:.3g}"
    published = m.get("published_rate_ratio")
    source = m.get("ratio_source", "")
    return f"{measured} ({'-' if source.startswith('none') else f'1/{published:g}'})"


def runs_table(summary: dict[str, Any]) -> str:
    header = ["method", "lr", "seed", "status", "val acc %", "test acc %", "forgetting KL", "train s"]
    rows = [[r["method"], f"{r['learning_rate']:g}", str(r["seed"]), r["status"] if r["status"] == "done" else
             f"failed: {r.get('reason') or (r.get('error') or '')[:60]}", _percent(r["val_accuracy"]),
             _percent(r["test_accuracy"]), _value(r["forgetting_kl"]),
             "-" if r["train_seconds"] is None else f"{r['train_seconds']:.0f}"] for r in summary["runs"]]
    return markdown_table(header, rows)


def analysis_table(summary: dict[str, Any]) -> str:
    metrics = ("relative_update", "principal_energy", "minor_energy", "chance_energy", "principal_rotation")
    rows = [[entry["method"], *(f"{entry[m]:.3g}" if entry.get(m) is not None else "-" for m in metrics)]
            for entry in summary.get("analysis", [])]
    return markdown_table(["method", *metrics], rows) if rows else ""


def markdown(summary: dict[str, Any]) -> str:
    """The whole report as markdown."""
    setup = summary["setup"]
    parts = [
        "# MiLoRA comparison",
        f"Model {setup['model']}; training data {setup['train_records']} records; {setup['steps']}; rank "
        f"{setup['lora_rank']}; eval task `{setup['eval_task']}` on {setup['test_items']} test items and "
        f"{setup['validation_items']} validation items; seeds {setup['seeds']}; {len(summary['runs'])} runs, "
        f"{setup['wall_minutes']:.1f} min in all.",
        f"Base model (no adapter): test accuracy {_percent(setup['base_test_accuracy'])} %"
        + (f", retention {_percent(setup['base_retention_accuracy'])} %" if setup.get("base_retention_accuracy")
           is not None else "") + ".",
        "## Methods (the chosen learning rate of each)",
        methods_table(summary),
        "## Statistics",
        "\n".join(f"- {sentence}" for sentence in summary["statistics"]),
    ]
    if summary.get("analysis"):
        parts += ["## What the chosen adapters changed (`milora analyze`, mean over seeds and weights)",
                  analysis_table(summary)]
    parts += ["## Every run", runs_table(summary)]
    return "\n\n".join(parts) + "\n"


def plot(summary: dict[str, Any], records: list[dict[str, Any]], output_dir: Path) -> list[Path]:
    """The three figures (see module docstring); returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen = {m["method"]: m["selected_learning_rate"] for m in summary["methods"]}
    colours = {m["method"]: f"C{i}" for i, m in enumerate(summary["methods"])}
    paths = [output_dir / "lr_curves.png", output_dir / "accuracy_vs_forgetting.png", output_dir / "loss_curves.png"]

    figure, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for axis, key in zip(axes, ("val_accuracy", "test_accuracy"), strict=True):
        for method, colour in colours.items():
            rows = [r for r in summary["runs"] if r["method"] == method and r[key] is not None]
            rates = sorted({r["learning_rate"] for r in rows})
            means = [sum(r[key] for r in rows if r["learning_rate"] == rate) /
                     sum(r["learning_rate"] == rate for r in rows) for rate in rates]
            axis.plot(rates, means, marker="o", color=colour, label=method)
            axis.scatter([r["learning_rate"] for r in rows], [r[key] for r in rows], color=colour, alpha=0.35, s=12)
            if chosen[method] in rates:
                axis.scatter([chosen[method]], [means[rates.index(chosen[method])]], s=160, facecolors="none",
                             edgecolors=colour)
        if _has_data(axis, "every run failed: no accuracy to plot"):
            axis.set_xscale("log")
        axis.set_xlabel("learning rate")
        axis.set_title("validation" if key == "val_accuracy" else "test" if _tested_off_choice(summary, chosen)
                       else "test (scored at the chosen rates only)")
    axes[0].set_ylabel("accuracy")
    _legend(axes[0])
    _save(figure, paths[0])

    _pareto(plt, summary, colours, paths[1])

    figure, axis = plt.subplots(figsize=(5, 3.8))
    labelled = set()
    for record in records:
        history = [(e["step"], e["loss"]) for e in record.get("loss_history", []) if "loss" in e]
        if history and record.get("status") == "done" and chosen.get(record["method"]) == record["learning_rate"]:
            label = None if record["method"] in labelled else record["method"]
            labelled.add(record["method"])
            axis.plot(*zip(*history, strict=True), color=colours[record["method"]], alpha=0.7, label=label)
    _has_data(axis, "no finished chosen run: no loss curve")
    axis.set_xlabel("step")
    axis.set_ylabel("training loss")
    _legend(axis)
    _save(figure, paths[2])
    return paths


def _has_data(axis, empty_message: str) -> bool:
    """Whether anything was drawn on ``axis``; if not, say why on it (the figure is still written, so a
    stale figure of an earlier invocation is replaced)."""
    if any(len(line.get_xdata()) for line in axis.lines) or any(len(c.get_offsets()) for c in axis.collections):
        return True
    axis.text(0.5, 0.5, empty_message, ha="center", va="center", transform=axis.transAxes, color="C3")
    return False


def _legend(axis) -> None:
    if axis.get_legend_handles_labels()[0]:
        axis.legend(fontsize="small")


def pareto_front(points: dict[str, tuple[float, float]]) -> list[str]:
    """The methods no other method beats on both axes (accuracy higher or equal, forgetting lower or equal,
    one strictly), ordered by forgetting. ``points``: method -> (forgetting, accuracy)."""
    def beaten(name):
        kl, acc = points[name]
        return any(o_kl <= kl and o_acc >= acc and (o_kl, o_acc) != (kl, acc) for o_kl, o_acc in points.values())

    return sorted((name for name in points if not beaten(name)), key=lambda name: points[name])


def _error_bar(mean: float, bounds: list[float] | None) -> list[list[float]] | None:
    """matplotlib's asymmetric error bar of an interval (none with a single seed)."""
    return None if bounds is None else [[mean - bounds[0]], [bounds[1] - mean]]


def _pareto(plt, summary: dict[str, Any], colours: dict[str, str], path: Path) -> None:
    figure, axis = plt.subplots(figsize=(5.5, 4))
    means = {}
    for m in summary["methods"]:
        if m["status"] != "done" or m["forgetting_kl_mean"] is None:
            continue
        colour = colours[m["method"]]
        x, y = m["forgetting_kl_mean"], m["test_accuracy_mean"]
        means[m["method"]] = (x, y)
        axis.errorbar([x], [y], xerr=_error_bar(x, m["forgetting_kl_ci95"]),
                      yerr=_error_bar(y, m["test_accuracy_ci95"]), fmt="o", color=colour, capsize=3, label=m["method"])
        runs = [r for r in summary["runs"] if r["method"] == m["method"] and r["status"] == "done"
                and r["learning_rate"] == m["selected_learning_rate"] and r["forgetting_kl"] is not None
                and r.get("batch_size") == m.get("selected_batch_size")]
        axis.scatter([r["forgetting_kl"] for r in runs], [r["test_accuracy"] for r in runs], color=colour, alpha=0.3,
                     s=10)
    front = pareto_front(means)
    if len(front) > 1:
        axis.plot(*zip(*(means[name] for name in front), strict=True), color="grey", linestyle="--", linewidth=1,
                  label="Pareto front")
    axis.set_xlabel("forgetting (KL to the base model; lower is better)")
    axis.set_ylabel("test accuracy")
    axis.set_title("chosen runs: mean and 95 % interval", fontsize="small")
    _has_data(axis, "no finished run: nothing to plot")
    _legend(axis)
    _save(figure, path)


def _tested_off_choice(summary: dict[str, Any], chosen: dict[str, float | None]) -> bool:
    """Whether any run away from its method's chosen rate has a test score (a sweep with test_runs: all)."""
    return any(r["test_accuracy"] is not None and r["learning_rate"] != chosen.get(r["method"])
               for r in summary["runs"])


def _save(figure, path: Path) -> None:
    import matplotlib.pyplot as plt

    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
