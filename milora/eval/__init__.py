"""Evaluation: the paper's benchmarks, forgetting, and bridges to the field's harnesses.

`evaluate(model, tokenizer, task, data, ...)` dispatches through the task registry
(`milora.eval.registry`); `all_tasks()` lists the tasks and their options (declared in
`milora.eval.options`). The names are imported on first use, so that the torch-free option
catalogue (read by `milora eval --help`) comes without the registry and the runner.
"""

import importlib

_NAMES = {"all_tasks": "milora.eval.registry", "find_task": "milora.eval.registry", "evaluate": "milora.eval.runner"}
__all__ = ["all_tasks", "evaluate", "find_task"]


def __getattr__(name: str):
    if name in _NAMES:
        return getattr(importlib.import_module(_NAMES[name]), name)
    raise AttributeError(f"module 'milora.eval' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_NAMES))
