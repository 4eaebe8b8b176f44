"""Result files and tables: what `milora eval`, `analyze` and `compare` write and print.

A result file is JSON ``{"summary": {...}, "items": [...]}`` (see `milora.eval`). Its summary's
``scores`` are accuracies (fractions, shown in %, averaged) when ``summary["metric"]`` is
``"accuracy"``, rates (fractions shown in %, e.g. a win rate; not averaged) for ``"rate"``, else
plain values (forgetting loss, perplexity). ``summary["table_scores"]``, when present, names the
scores `results_table` shows (default: every accuracy; forgetting loss and perplexity).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from milora.errors import DataError
from milora.io import atomic_write_json

PAPER_COLUMNS = {
    "boolq": "BoolQ", "piqa": "PIQA", "social_i_qa": "SIQA", "siqa": "SIQA", "hellaswag": "HellaSwag",
    "winogrande": "WinoGrande", "ARC-Easy": "ARC-e", "ARC-Challenge": "ARC-c", "openbookqa": "OBQA",
    "gsm8k": "GSM8K", "math": "MATH", "humaneval_pass@1": "HumanEval", "win_rate": "AlpacaEval",
    "lc_win_rate": "AlpacaEval-LC", "ifeval_prompt_strict": "IFEval-P-strict", "ifeval_prompt_loose": "IFEval-P-loose",
    "ifeval_inst_strict": "IFEval-I-strict", "ifeval_inst_loose": "IFEval-I-loose",
}
"""Column names of the paper's tables, in the paper's order."""


def write_results(result, path: str | os.PathLike) -> Path:
    """Write a result (any JSON value) atomically: a reader never sees half a file."""
    return atomic_write_json(path, result)


def format_table(header: list[str], rows: list[list[str]]) -> str:
    """Aligned text table: first column left-aligned, the others right-aligned, a rule under the header."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                       for i, (cell, w) in enumerate(zip(row, widths, strict=False)))
             for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def metric_kind(summary: dict) -> str:
    """``accuracy``, ``rate`` or ``value`` (result files before the ``metric`` key: all but forgetting are
    accuracies)."""
    return summary.get("metric", "value" if summary.get("task") == "forgetting" else "accuracy")


def is_accuracy(summary: dict) -> bool:
    return metric_kind(summary) == "accuracy"


def format_score(value: float | None, percent: bool) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.1f}" if percent else f"{value:.4f}"


def format_summary(result: dict) -> str:
    """A one-run table: one row per dataset or metric, the average last (accuracies in %)."""
    summary = result["summary"]
    kind = metric_kind(summary)
    rows = [[PAPER_COLUMNS.get(name, name), f"{value:g}" if _is_count(name) else format_score(value, kind != "value")]
            for name, value in summary["scores"].items()]
    if kind == "accuracy" and summary.get("average") is not None and len(summary["scores"]) > 1:
        rows.append(["Avg.", format_score(summary["average"], True)])
    unit = {"accuracy": "accuracy %", "rate": "%"}.get(kind, "value")
    header = [f"{summary['label']} · {summary['task']} (n={summary['n']})", unit]
    return format_table(header, rows)


def _is_count(name: str) -> bool:
    """Scores that are counts or lengths, not fractions, in a rate or accuracy result."""
    return name.startswith(("n_", "avg_"))


def _tabled_scores(summary: dict) -> dict[str, float]:
    keys = summary.get("table_scores")
    if keys is None:
        if is_accuracy(summary):
            return summary["scores"]
        keys = ("forgetting_loss", "perplexity")
    return {key: value for key, value in summary["scores"].items() if key in keys}


def results_table(result_files: list[str | os.PathLike]) -> str:
    """The paper's table layout for several result files: one row per method (``summary.label``),
    one column per dataset (plus tabled values such as forgetting loss), the average accuracy last."""
    rows: dict[str, dict[str, float]] = {}
    column_kinds: dict[str, str] = {}
    origin: dict[tuple[str, str], Path] = {}
    for file in map(Path, result_files):
        try:
            summary = json.loads(file.read_text(encoding="utf-8"))["summary"]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as error:
            raise DataError(f"{file} is not a milora eval result ({error}).") from error
        for column, value in _tabled_scores(summary).items():
            key = (summary["label"], column)
            if key in origin:
                raise DataError(f"{origin[key]} and {file} both hold {column} for {summary['label']!r}: "
                                "give the runs different names with --label.")
            origin[key] = file
            rows.setdefault(summary["label"], {})[column] = value
            column_kinds[column] = metric_kind(summary)
    paper_order = list(PAPER_COLUMNS)
    kind_order = {"accuracy": 0, "rate": 1, "value": 2}
    columns = sorted(column_kinds, key=lambda c: (kind_order.get(column_kinds[c], 2),
                                                  paper_order.index(c) if c in paper_order else len(paper_order)))
    header = ["Method"] + [PAPER_COLUMNS.get(c, c) for c in columns] + ["Avg."]
    table = []
    for label, values in rows.items():
        accuracies = [values[c] for c in columns if column_kinds[c] == "accuracy" and c in values]
        average = sum(accuracies) / len(accuracies) if accuracies else None
        table.append([label] + [format_score(values.get(c), column_kinds[c] != "value") for c in columns]
                     + [format_score(average, True)])
    return format_table(header, table)
