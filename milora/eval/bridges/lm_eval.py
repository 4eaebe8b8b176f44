"""The bridge to EleutherAI's lm-evaluation-harness: ``lm-eval:<task,...>`` on the loaded model.

``data`` is an ``include_path`` of local task YAMLs. Such YAMLs may name Python functions with
lm-eval's ``!function`` tag, which imports ``utils.py`` from that directory: only point it at
task directories you trust (it runs their code, as lm-eval itself does).
"""

from __future__ import annotations

from pathlib import Path

from milora.errors import DataError, DataNotFoundError
from milora.eval.bridges.harness import primary_metric, run_tasks
from milora.eval.registry import Job, TaskResult, register


def _lm_eval_sample(sample: dict) -> dict:
    """Prompt, output and prediction of an lm-eval sample: for multiple choice the option
    log-likelihoods and the index of the best; for generation the text and the filtered answer."""
    arguments = sample.get("arguments") or [("",)]
    prompt = arguments[0][0] if isinstance(arguments[0], (list, tuple)) else arguments[0]
    filtered = sample.get("filtered_resps") or []
    if filtered and all(isinstance(r, (list, tuple)) and isinstance(r[0], float) for r in filtered):
        logliks = [r[0] for r in filtered]
        return {"prompt": prompt, "output": logliks, "prediction": logliks.index(max(logliks))}
    responses = sample.get("resps") or []
    text = responses[0][0] if responses and isinstance(responses[0], (list, tuple)) else responses
    return {"prompt": prompt, "output": text, "prediction": filtered[0] if len(filtered) == 1 else filtered}


def _lm_eval(model, tokenizer, tasks: list[str], include_path, *, limit, batch_size) -> tuple[dict, list[dict], dict]:
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as error:
        raise DataError("lm-eval tasks need the lm-evaluation-harness: `pip install lm-eval`.") from error
    if include_path is not None and not Path(include_path).exists():
        raise DataNotFoundError(f"lm-eval include path {include_path} does not exist.")
    manager = None
    if include_path is not None:  # local tasks alone index much faster than with the built-in catalogue
        manager = TaskManager(include_path=str(include_path), include_defaults=False)
    if manager is None or not set(tasks) <= set(manager.all_tasks):
        manager = TaskManager(include_path=str(include_path) if include_path is not None else None)
    output = run_tasks(simple_evaluate, lambda: HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size),
                       tasks, manager, limit, harness="lm-eval", list_command="lm-eval ls tasks")
    scores, items = {}, []
    for task in tasks:
        primary = primary_metric(output["results"].get(task, {}))
        if primary is None:
            continue
        scores[task] = output["results"][task][primary]
        metric = primary.split(",")[0]
        for sample in output.get("samples", {}).get(task, []):
            items.append({"dataset": task, **_lm_eval_sample(sample), "gold": sample.get("target"),
                          "correct": bool(sample.get(metric)), "doc_id": sample.get("doc_id")})
    return scores, items, output["results"]


@register("lm-eval:", "lm-evaluation-harness tasks (comma-separated), on the loaded model and adapter")
def _run(job: Job) -> TaskResult:
    names = [name.strip() for name in job.argument.split(",") if name.strip()]
    scores, items, raw = _lm_eval(job.model, job.tokenizer, names, job.data, limit=job.limit, batch_size=job.batch_size)
    source = str(job.data) if job.data is not None else "lm-eval"
    average = sum(scores.values()) / len(scores) if scores else None
    return TaskResult(scores, items, source, {"lm_eval_results": raw}, average)
