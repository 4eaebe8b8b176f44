"""From the runs' records to the comparison: each method's learning rate chosen on validation,
its test accuracy and forgetting over seeds, its paired difference to the baseline.

Selection: for each method, among the settings (learning rate, and batch size when the sweep has
a ``batch_sizes`` axis) whose runs all finished for every seed, the one with the highest mean
validation accuracy (ties: the smaller rate, then the smaller batch). The test set never takes
part in the choice. A method whose every run failed (e.g. diverged) is reported as failed;
runs that failed at some settings only leave those out of the choice. Each chosen rate is
reported as a ratio to LoRA's chosen rate, and flagged when it is the lowest or highest rate of
the method's grid (the optimum may lie outside it).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from milora.comparison.grid import at_grid_edge, rate_ratio, ratio_source
from milora.comparison.stats import CONFIDENCE, Interval, clipped, mean_interval, paired_difference, verdict

RUN_FIELDS = ("method", "learning_rate", "batch_size", "seed", "status", "reason", "error", "val_accuracy",
              "test_accuracy", "forgetting_kl", "retention_accuracy", "train_seconds", "trainable_parameters",
              "adapter_dir")


def run_row(record: dict[str, Any]) -> dict[str, Any]:
    """The compare.json view of a run record (accuracies as fractions)."""
    def accuracy(name):
        return record.get(name, {}).get("accuracy") if isinstance(record.get(name), dict) else None

    row = {**{key: record.get(key) for key in RUN_FIELDS}, "val_accuracy": accuracy("validation"),
           "test_accuracy": accuracy("test"), "retention_accuracy": accuracy("retention")}
    return row


@dataclass(frozen=True)
class Setting:
    """What a sweep varies besides the method and seed: the learning rate, and the batch size (None:
    the shared one)."""

    learning_rate: float
    batch_size: int | None = None

    def order(self) -> tuple[float, int]:
        return self.learning_rate, self.batch_size or 0

    def describe(self) -> str:
        return f"{self.learning_rate:g}" + ("" if self.batch_size is None else f" (batch {self.batch_size})")


def setting_of(record: dict[str, Any]) -> Setting:
    return Setting(record["learning_rate"], record.get("batch_size"))


def chosen_runs(records: list[dict[str, Any]], method: str) -> list[dict[str, Any]]:
    """The runs of ``method`` at its chosen setting, by seed (none when no setting finished)."""
    setting, _ = select(records, method)
    return sorted((r for r in records if r["method"] == method and setting_of(r) == setting),
                  key=lambda r: r["seed"]) if setting else []


def select(records: list[dict[str, Any]], method: str) -> tuple[Setting | None, str]:
    """The chosen setting of ``method`` and why (or None and the reason there is none)."""
    by_rate: dict[Setting, list[dict]] = defaultdict(list)
    for record in records:
        if record["method"] == method:
            by_rate[setting_of(record)].append(record)
    if not by_rate:
        return None, "no runs"
    complete = {rate: runs for rate, runs in by_rate.items()
                if all(run["status"] == "done" and run_row(run)["val_accuracy"] is not None for run in runs)}
    if not complete:
        failed = next((run for runs in by_rate.values() for run in runs if run["status"] == "failed"), None)
        reason = failed.get("error", "failed") if failed else "unfinished"
        return None, f"no learning rate finished for every seed ({reason})"
    means = {rate: sum(run_row(run)["val_accuracy"] for run in runs) / len(runs) for rate, runs in complete.items()}
    best = max(sorted(means, key=Setting.order), key=lambda rate: means[rate])  # max keeps the first of ties
    left_out = sorted(set(by_rate) - set(complete), key=Setting.order)
    note = f"best mean validation accuracy {means[best]:.4f} over {len(complete[best])} seeds"
    if left_out:
        note += f"; settings with failed runs left out: {', '.join(rate.describe() for rate in left_out)}"
    return best, note


def _interval_fields(name: str, interval: Interval | None) -> dict[str, Any]:
    if interval is None:
        return {f"{name}_mean": None, f"{name}_ci95": None}
    return {f"{name}_mean": interval.mean, f"{name}_ci95": interval.as_list()}


def method_summary(records: list[dict], method: str, baseline_runs: list[dict] | None) -> dict[str, Any]:
    setting, note = select(records, method)
    if setting is None:
        return {"method": method, "status": "failed", "selected_learning_rate": None, "selection": note,
                **_interval_fields("test_accuracy", None), **_interval_fields("forgetting_kl", None),
                "difference_to_baseline": None, "difference_ci95": None, "verdict": None}
    runs = chosen_runs(records, method)
    rows = [run_row(run) for run in runs]
    grid = sorted({r["learning_rate"] for r in records if r["method"] == method})

    def interval(key):
        values = [row[key] for row in rows if row[key] is not None]
        return clipped(mean_interval(values), 0.0, None if key == "forgetting_kl" else 1.0) if values else None

    summary = {
        "method": method, "status": "done", "selected_learning_rate": setting.learning_rate,
        "selected_batch_size": setting.batch_size, "selection": note, "learning_rate_grid": grid,
        "grid_edge": at_grid_edge(setting.learning_rate, grid), "published_rate_ratio": rate_ratio(method),
        "ratio_source": ratio_source(method), "rate_vs_lora": None,
        "seeds": [row["seed"] for row in rows],
        "validation_accuracy_mean": sum(row["val_accuracy"] for row in rows) / len(rows),
        **_interval_fields("test_accuracy", interval("test_accuracy")),
        **_interval_fields("forgetting_kl", interval("forgetting_kl")),
        **_interval_fields("retention_accuracy", interval("retention_accuracy")),
        "trainable_parameters": rows[0]["trainable_parameters"],
        "train_seconds_mean": sum(row["train_seconds"] for row in rows) / len(rows),
        "difference_to_baseline": None, "difference_ci95": None, "difference_method": None, "verdict": None,
    }
    if baseline_runs:
        difference = paired_difference({r["seed"]: r["test"]["correct"] for r in runs},
                                       {r["seed"]: r["test"]["correct"] for r in baseline_runs})
        summary.update(difference_to_baseline=difference.mean, difference_ci95=difference.as_list(),
                       difference_method=difference.method, verdict=verdict(difference))
    return summary


def summarise(records: list[dict], methods: list[str], baseline: str) -> dict[str, Any]:
    """compare.json's ``runs``, ``methods``, ``baseline`` and ``statistics``."""
    baseline_runs = chosen_runs(records, baseline) or None
    summaries = [method_summary(records, method, None if method == baseline else baseline_runs) for method in methods]
    lora = next((s for s in summaries if s["method"] == "lora" and s["status"] == "done"), None)
    for summary in summaries:
        if lora and summary["status"] == "done":
            summary["rate_vs_lora"] = summary["selected_learning_rate"] / lora["selected_learning_rate"]
    return {
        "runs": [run_row(record)
                 for record in sorted(records, key=lambda r: (r["method"], r["learning_rate"], r["seed"]))],
        "methods": summaries,
        "baseline": baseline,
        "statistics": statements(summaries, baseline),
    }


def statements(summaries: list[dict], baseline: str) -> list[str]:
    """The statistics of the report, one sentence each."""
    percent = f"{CONFIDENCE:.0%}"
    sentences = [
        "Each method's learning rate was chosen by the mean validation accuracy over seeds (ties: the smaller "
        "rate); the test set played no part in the choice: it was scored after the whole grid had finished (for the "
        "chosen runs only, unless the sweep set test_runs: all), and only the chosen runs' test scores are reported.",
        f"Test accuracy and forgetting: mean over seeds with a two-sided {percent} Student t interval "
        "(n - 1 degrees of freedom), its bounds clipped to the possible values (accuracy [0, 100] %, KL >= 0).",
        f"Differences to {baseline}: per seed, the method's accuracy minus {baseline}'s on the same test items; "
        f"their mean and {percent} Student t interval over seeds (with one seed: a paired bootstrap over test "
        "items, which covers item sampling only). Intervals are not adjusted for the number of methods compared.",
    ]
    for summary in summaries:
        if summary.get("grid_edge"):
            sentences.append(
                f"Warning: {summary['method']}'s chosen rate {summary['selected_learning_rate']:g} is the "
                f"{summary['grid_edge']} of its grid ({', '.join(f'{r:g}' for r in summary['learning_rate_grid'])}): "
                f"its best rate may lie outside; extend the grid {'down' if summary['grid_edge'] == 'lowest' else 'up'}"
                " and re-run the same sweep (finished runs are kept).")
    for summary in summaries:
        if summary["method"] == baseline or summary["verdict"] is None:
            continue
        low, high = summary["difference_ci95"] or (math.nan, math.nan)
        sentences.append(
            f"{summary['method']} vs {baseline}: {100 * summary['difference_to_baseline']:+.1f} points "
            f"({percent} CI {100 * low:+.1f} to {100 * high:+.1f}): {summary['verdict']}."
        )
    return sentences
