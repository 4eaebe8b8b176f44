"""From the runs' records to the comparison: each method's learning rate chosen on validation,
its test accuracy and forgetting over seeds, its paired difference to the baseline.

Selection: for each method, among the learning rates whose runs all finished for every seed,
the one with the highest mean validation accuracy (ties: the smaller rate). The test set never
takes part in the choice. A method whose every run failed (e.g. diverged) is reported as failed;
runs that failed at some rates only leave those rates out of the choice.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

from milora.comparison.stats import CONFIDENCE, Interval, clipped, mean_interval, paired_difference, verdict

RUN_FIELDS = ("method", "learning_rate", "seed", "status", "reason", "error", "val_accuracy", "test_accuracy",
              "forgetting_kl", "retention_accuracy", "train_seconds", "trainable_parameters", "adapter_dir")


def run_row(record: dict[str, Any]) -> dict[str, Any]:
    """The compare.json view of a run record (accuracies as fractions)."""
    def accuracy(name):
        return record.get(name, {}).get("accuracy") if isinstance(record.get(name), dict) else None

    row = {**{key: record.get(key) for key in RUN_FIELDS}, "val_accuracy": accuracy("validation"),
           "test_accuracy": accuracy("test"), "retention_accuracy": accuracy("retention")}
    return row


def select(records: list[dict[str, Any]], method: str) -> tuple[float | None, str]:
    """The chosen learning rate of ``method`` and why (or None and the reason there is none)."""
    by_rate: dict[float, list[dict]] = defaultdict(list)
    for record in records:
        if record["method"] == method:
            by_rate[record["learning_rate"]].append(record)
    if not by_rate:
        return None, "no runs"
    complete = {rate: runs for rate, runs in by_rate.items()
                if all(run["status"] == "done" and run_row(run)["val_accuracy"] is not None for run in runs)}
    if not complete:
        failed = next((run for runs in by_rate.values() for run in runs if run["status"] == "failed"), None)
        reason = failed.get("error", "failed") if failed else "unfinished"
        return None, f"no learning rate finished for every seed ({reason})"
    means = {rate: sum(run_row(run)["val_accuracy"] for run in runs) / len(runs) for rate, runs in complete.items()}
    best = max(sorted(means), key=lambda rate: means[rate])  # sorted + max keeps the smaller rate on ties
    left_out = sorted(set(by_rate) - set(complete))
    note = f"best mean validation accuracy {means[best]:.4f} over {len(complete[best])} seeds"
    if left_out:
        note += f"; rates with failed runs left out: {', '.join(f'{rate:g}' for rate in left_out)}"
    return best, note


def _interval_fields(name: str, interval: Interval | None) -> dict[str, Any]:
    if interval is None:
        return {f"{name}_mean": None, f"{name}_ci95": None}
    return {f"{name}_mean": interval.mean, f"{name}_ci95": interval.as_list()}


def method_summary(records: list[dict], method: str, baseline_runs: list[dict] | None) -> dict[str, Any]:
    rate, note = select(records, method)
    if rate is None:
        return {"method": method, "status": "failed", "selected_learning_rate": None, "selection": note,
                **_interval_fields("test_accuracy", None), **_interval_fields("forgetting_kl", None),
                "difference_to_baseline": None, "difference_ci95": None, "verdict": None}
    runs = sorted((r for r in records if r["method"] == method and r["learning_rate"] == rate), key=lambda r: r["seed"])
    rows = [run_row(run) for run in runs]

    def interval(key):
        values = [row[key] for row in rows if row[key] is not None]
        return clipped(mean_interval(values), 0.0, None if key == "forgetting_kl" else 1.0) if values else None

    summary = {
        "method": method, "status": "done", "selected_learning_rate": rate, "selection": note,
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
    rate, _ = select(records, baseline)
    baseline_runs = [r for r in records if r["method"] == baseline and r["learning_rate"] == rate] if rate else None
    summaries = []
    for method in methods:
        summary = method_summary(records, method, None if method == baseline else baseline_runs)
        summaries.append(summary)
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
        "rate); the test set played no part in the choice, and only the chosen runs' test scores are reported.",
        f"Test accuracy and forgetting: mean over seeds with a two-sided {percent} Student t interval "
        "(n - 1 degrees of freedom), its bounds clipped to the possible values (accuracy [0, 100] %, KL >= 0).",
        f"Differences to {baseline}: per seed, the method's accuracy minus {baseline}'s on the same test items; "
        f"their mean and {percent} Student t interval over seeds (with one seed: a paired bootstrap over test "
        "items, which covers item sampling only). Intervals are not adjusted for the number of methods compared.",
    ]
    for summary in summaries:
        if summary["method"] == baseline or summary["verdict"] is None:
            continue
        low, high = summary["difference_ci95"] or (math.nan, math.nan)
        sentences.append(
            f"{summary['method']} vs {baseline}: {100 * summary['difference_to_baseline']:+.1f} points "
            f"({percent} CI {100 * low:+.1f} to {100 * high:+.1f}): {summary['verdict']}."
        )
    return sentences
