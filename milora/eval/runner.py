"""`evaluate`: one model on one task, as a result dict with a summary and per-item records."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from milora.errors import DataError
from milora.eval.registry import Job, Task, all_tasks, find_task
from milora.eval.server import ServerModel


def _model_label(model) -> str:
    if isinstance(model, ServerModel):
        return model.name
    path = getattr(getattr(model, "config", None), "_name_or_path", "") or "model"
    return Path(str(path)).name or "model"


def check_common(limit: int | None, batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise DataError(f"batch_size must be at least 1 (got {batch_size!r}).")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise DataError(f"limit must be at least 1 (got {limit!r}).")


def check_server_task(spec: Task, task: str) -> None:
    """A task that cannot generate through a server (`Task.server`) is an error naming those that can."""
    if not spec.server:
        able = ", ".join(name for name, t in all_tasks().items() if t.server)
        raise DataError(f"Task {task} runs on a local model only, not through --server (tasks that can: {able}).")


def evaluate(model, tokenizer, task: str, data: str | Path | None = None, *, limit: int | None = None,
             batch_size: int = 8, label: str | None = None, metadata: dict | None = None, progress: bool = True,
             **options: Any) -> dict:
    """Evaluate ``model`` on ``task``; returns ``{"summary": {...}, "items": [...]}``.

    ``options`` are the task's own (e.g. ``scorer``, ``max_new_tokens`` for commonsense; see
    `milora.eval.all_tasks`); one the task does not take is an error. ``summary["scores"]``
    maps dataset (column) names to accuracies (fractions), or metric names to values;
    ``summary["average"]`` is the mean accuracy over datasets. Each benchmark item has
    ``prompt``, ``output``, ``prediction``, ``gold``, ``correct``. ``model`` and ``tokenizer`` may
    be None for a task scoring a ``predictions`` file, and a `milora.eval.server.ServerModel` (with the
    local tokenizer) for a task that generates through a server (``Task.server``).
    """
    spec, argument = find_task(task)
    check_common(limit, batch_size)
    options = spec.check_options(options)
    if model is None and options.get("predictions") is None:
        raise DataError(f"Task {task} needs a model (or, for tasks that take it, a predictions file).")
    served = isinstance(model, ServerModel)
    if served:
        check_server_task(spec, task)
    local = model is not None and not served
    started = time.time()
    was_training = getattr(model, "training", False)
    if local:
        model.eval()
    try:
        result = spec.run(Job(model, tokenizer, task, argument, data, limit, batch_size, progress, options))
    finally:
        if local:
            model.train(was_training)
    average = result.average
    if average is None and spec.metric == "accuracy" and result.scores:
        average = sum(result.scores.values()) / len(result.scores)
    summary = {
        "task": task, "label": label or _model_label(model), "data": result.source, "n": len(result.items),
        "metric": spec.metric, "scores": result.scores, "average": average,
        **({"table_scores": list(spec.table_scores)} if spec.table_scores else {}),
        **(metadata or {}), "settings": {"batch_size": batch_size, "limit": limit, **result.settings,
                                         **(model.describe() if served else {})},
        "elapsed_s": round(time.time() - started, 2),
    }
    return {"summary": summary, "items": result.items}
