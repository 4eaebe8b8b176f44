"""The evaluation tasks `milora.eval.evaluate` dispatches through.

A task is a function ``run(job) -> TaskResult`` registered under a name with `register`,
in one of the modules listed in ``_TASK_MODULES`` (imported on first lookup). A name ending
in ``:`` is a family taking an argument after the colon (``lm-eval:boolq,piqa``).
Each task declares the options it takes beyond ``data``, ``limit`` and ``batch_size``;
`evaluate` rejects any other, so no option is silently ignored.
"""

from __future__ import annotations

import difflib
import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from milora.errors import DataError, shown

_TASK_MODULES = (
    "milora.eval.tasks.benchmarks", "milora.eval.tasks.forgetting", "milora.eval.tasks.ifeval",
    "milora.eval.tasks.alpacaeval", "milora.eval.tasks.humaneval", "milora.eval.tasks.vision",
    "milora.eval.bridges.lm_eval", "milora.eval.bridges.lmms_eval",
)


@dataclass
class Job:
    """What a task run gets: the model, its tokenizer and the caller's choices."""

    model: Any
    tokenizer: Any
    task: str
    argument: str | None  # the part after the colon of a family name
    data: Any
    limit: int | None
    batch_size: int
    progress: bool
    options: dict[str, Any]


@dataclass
class TaskResult:
    """``scores``: dataset (column) name -> accuracy, or metric name -> value; ``items``: per-item
    records; ``source``: where the data came from; ``settings``: protocol details for the results."""

    scores: dict[str, float]
    items: list[dict]
    source: str
    settings: dict[str, Any] = field(default_factory=dict)
    average: float | None = None


@dataclass(frozen=True)
class Option:
    """A task option: its default (``None``: the task decides), and the checks on a given value.

    ``kind``: the type a value must have (``int`` when ``minimum`` is set and no kind is given;
    ``float`` accepts integers too; ``None``: any value)."""

    default: Any = None
    minimum: float | None = None
    choices: tuple[str, ...] | None = None
    kind: type | tuple[type, ...] | None = None

    def check(self, task: str, name: str, value: Any) -> None:
        if value is None:
            return
        kind = self.kind or (int if self.minimum is not None else None)
        numeric = kind in (int, float)
        wrong_type = ((numeric and (isinstance(value, bool)
                                    or not isinstance(value, int if kind is int else (int, float))))
                      or (not numeric and kind is not None and not isinstance(value, kind)))
        not_finite = numeric and not wrong_type and not math.isfinite(value)  # nan passes `<`, inf overflows
        if wrong_type or not_finite or (self.minimum is not None and value < self.minimum):
            what = {int: "an integer", float: "a finite number", bool: "true or false", str: "a string",
                    (tuple, list): "a list"}.get(kind, str(kind))
            bound = f" of at least {self.minimum}" if self.minimum is not None else ""
            raise DataError(f"{name} must be {what}{bound} (got {shown(value)}) for task {task}.")
        if self.choices is not None and value not in self.choices:
            raise DataError(f"Unknown {name} {shown(value)} for task {task}: choose one of {', '.join(self.choices)}.")


@dataclass(frozen=True)
class Task:
    name: str
    run: Callable[[Job], TaskResult]
    description: str
    options: dict[str, Option]
    metric: str = "accuracy"  # "accuracy" (fractions, averaged), "rate" (fractions, not averaged) or "value"
    table_scores: tuple[str, ...] = ()  # the scores `milora eval --compare` shows (default: all accuracies)
    server: bool = False  # whether it can generate through an OpenAI-compatible server (`milora.eval.server`)
    # reads and checks every record of local data (data, the checked options), raising DataError: run before any
    # model loads or run trains; hub data (not on disk) is left to the task's run
    check_data: Callable[[Any, dict[str, Any]], None] | None = None

    def check_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """``options`` with defaults filled in; an option the task does not take, or a bad value, is an error."""
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            takes = ", ".join(self.options) or "none"
            raise DataError(f"Task {self.name} does not take the option(s) {', '.join(unknown)} "
                            f"(its options: {takes}).")
        for name, value in options.items():
            self.options[name].check(self.name, name, value)
        return {name: options.get(name, option.default) for name, option in self.options.items()}

    def check_local_data(self, data: Any, options: dict[str, Any]) -> None:
        """Check ``options`` and every record of local ``data`` now (`check_data`), before any work."""
        checked = self.check_options(options)
        if self.check_data is not None:
            self.check_data(data, checked)


_TASKS: dict[str, Task] = {}


def register(name: str, description: str, options: dict[str, Option] | None = None, metric: str = "accuracy",
             table_scores: tuple[str, ...] = (), server: bool = False,
             check_data: Callable[[Any, dict[str, Any]], None] | None = None) -> Callable:
    """Decorator: register ``run`` as the task ``name``."""

    def decorate(run: Callable[[Job], TaskResult]) -> Callable[[Job], TaskResult]:
        _TASKS[name] = Task(name, run, description, dict(options or {}), metric, table_scores, server, check_data)
        return run

    return decorate


def all_tasks() -> dict[str, Task]:
    for module in _TASK_MODULES:
        importlib.import_module(module)
    return dict(_TASKS)


def find_task(name: str) -> tuple[Task, str | None]:
    """The task called ``name`` and, for a family (``lm-eval:x,y``), its argument."""
    tasks = all_tasks()
    family, colon, argument = name.partition(":")
    key = family + colon
    if key in tasks and (not colon or argument.strip()):
        return tasks[key], argument.strip() if colon else None
    if key in tasks:
        raise DataError(f"Name the tasks after the colon, e.g. `{key}boolq,piqa`.")
    match = difflib.get_close_matches(name, list(tasks), n=1)
    hint = f" (did you mean {match[0]!r}?)" if match else ""
    names = [f"{task}<name,...>" if task.endswith(":") else task for task in sorted(tasks)]
    raise DataError(f"Unknown task {name!r}{hint}: choose one of {', '.join(names)}.")
