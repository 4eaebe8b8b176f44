"""Evaluation: the paper's benchmarks, forgetting, and bridges to the field's harnesses.

`evaluate(model, tokenizer, task, data, ...)` dispatches through the task registry
(`milora.eval.registry`); `all_tasks()` lists the tasks and their options.
"""

from milora.eval.registry import all_tasks, find_task
from milora.eval.runner import evaluate

__all__ = ["all_tasks", "evaluate", "find_task"]
