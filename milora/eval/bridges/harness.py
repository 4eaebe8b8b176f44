"""What the lm-eval and lmms-eval bridges share: both harnesses (lmms-eval is a fork of lm-eval)
take a task manager and a model object, and return results keyed ``metric,filter``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from milora.errors import DataError


def run_tasks(simple_evaluate: Callable, make_model: Callable[[], Any], tasks: list[str], manager: Any,
              limit: int | None, *, harness: str, list_command: str) -> dict:
    """``simple_evaluate`` of ``tasks`` with per-sample logs, on the harness model ``make_model()`` (built
    once the names are checked). Unknown task names and unreachable data are clear errors naming the fix
    (``harness``: the tool's name, ``list_command``: how to list its tasks)."""
    unknown = [task for task in tasks if task not in manager.all_tasks]
    if unknown:
        raise DataError(f"Unknown {harness} task(s) {', '.join(unknown)}: check the names with "
                        f"`{list_command}`, or pass the directory of your task YAMLs with --data.")
    try:
        return simple_evaluate(model=make_model(), tasks=tasks, limit=limit, task_manager=manager, log_samples=True)
    except OSError as error:  # includes ConnectionError: the task's data is not reachable
        raise DataError(f"{harness} could not read the data of {', '.join(tasks)} ({type(error).__name__}: "
                        f"{error}); offline, define the task on local files and pass its YAML directory with "
                        "--data.") from error


def primary_metric(metrics: dict[str, Any]) -> str | None:
    """The key of a task's headline score in its results (``acc,none`` when present, else the first
    numeric ``metric,filter`` that is not a standard error), or None when the task reported none."""
    names = [k for k in metrics if "," in k and "_stderr" not in k and isinstance(metrics[k], (int, float))]
    if not names:
        return None
    return "acc,none" if "acc,none" in names else names[0]
