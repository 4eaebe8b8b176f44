"""The evaluation tasks `milora.eval.evaluate` dispatches through.

A task is a function ``run(job) -> TaskResult`` registered under a name with `register`,
in one of the modules listed in ``_TASK_MODULES`` (imported on first lookup). A name ending
in ``:`` is a family taking an argument after the colon (``lm-eval:boolq,piqa``).
The options a task takes beyond ``data``, ``limit`` and ``batch_size`` are declared with their
defaults in `milora.eval.options` (``TASK_OPTIONS``); `evaluate` rejects any other, and a generation
option given with a predictions file, so no option is silently ignored.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from milora.errors import DataError
from milora.eval.options import OPTIONS, TASK_OPTIONS, Option

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
        """``options`` with the defaults filled in (`Option.default_for`; a given ``None`` is not given); an
        option the task does not take, a bad value, or a generation option with a predictions file is an error."""
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            takes = ", ".join(self.options) or "none"
            raise DataError(f"Task {self.name} does not take the option(s) {', '.join(unknown)} "
                            f"(its options: {takes}).")
        for name, value in options.items():
            self.options[name].check(self.name, value)
        given = [name for name, option in self.options.items() if option.generation and options.get(name) is not None]
        if options.get("predictions") is not None and given:
            raise DataError(f"Task {self.name} scores the predictions file as it is: {', '.join(given)} only apply "
                            "when milora generates the answers; drop them or drop the predictions.")
        return {name: option.default_for(self.name) if options.get(name) is None else options[name]
                for name, option in self.options.items()}

    def check_local_data(self, data: Any, options: dict[str, Any]) -> None:
        """Check ``options`` and every record of local ``data`` now (`check_data`), before any work."""
        checked = self.check_options(options)
        if self.check_data is not None:
            self.check_data(data, checked)


_TASKS: dict[str, Task] = {}


def register(name: str, description: str, metric: str = "accuracy", table_scores: tuple[str, ...] = (),
             server: bool = False, check_data: Callable[[Any, dict[str, Any]], None] | None = None) -> Callable:
    """Decorator: register ``run`` as the task ``name``, taking the options `TASK_OPTIONS` lists for it."""
    if name not in TASK_OPTIONS:
        raise KeyError(f"Task {name!r} is not in milora.eval.options.TASK_OPTIONS: list the options it takes there.")

    def decorate(run: Callable[[Job], TaskResult]) -> Callable[[Job], TaskResult]:
        options = {option: OPTIONS[option] for option in TASK_OPTIONS[name]}
        _TASKS[name] = Task(name, run, description, options, metric, table_scores, server, check_data)
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
