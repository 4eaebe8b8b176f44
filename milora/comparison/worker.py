"""One run of a sweep, start to finish: train, then score validation, test, forgetting, retention;
and the sweep's test phase, `score_tests`.

A run whose start a finished run of the sweep already computed begins from it
(`milora.comparison.starts`). `run_one(job)` is what every backend executes (the local one in
a fresh process through ``python -m milora.comparison JOB.json``, Ray inside a trial), so both
give the same results. It writes the run's record, ``run.json``, last and atomically: a run with a record is
finished and is never repeated. A failure (a diverged training, an error) is recorded with its
reason instead of stopping the sweep. `run_base` scores the base model once (test accuracy,
retention before fine-tuning). A job without ``score_test`` leaves the test set out; `score_tests`
(``python -m milora.comparison --test JOB.json ...``, one process for them all) scores it later
from the run's saved adapter, once the grid has finished and the chosen runs are known, and adds
it to the record.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import sys
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from milora.comparison.job import RECORD, Job, read_job
from milora.errors import MiloraError, OutputInUseError
from milora.io import atomic_write_json


def _evaluate(model, tokenizer, task: str, data, options: dict, limit, batch_size: int, label: str) -> dict:
    from milora.eval import evaluate

    return evaluate(model, tokenizer, task, data, limit=limit, batch_size=batch_size, label=label, progress=False,
                    **options)


def _accuracy_record(result: dict) -> dict[str, Any]:
    """The average accuracy and the per-item correctness (for paired, item-level statistics)."""
    return {"accuracy": result["summary"]["average"], "correct": [bool(item["correct"]) for item in result["items"]]}


def _scores(job: Job, model, tokenizer, base_model, run_dir: Path, label: str, served=None) -> dict[str, Any]:
    """Validation, test, forgetting and retention of ``model`` (an adapter on the base, or the base);
    ``base_model``: forgetting's reference, the base model or its stored side (`milora.comparison.reference`);
    ``served``: the same model on the sweep's ``eval_server`` (a `ServerModel`), used for validation and test."""
    from milora.report import write_results

    scores: dict[str, Any] = {}
    evals = [("test", job.eval_task, job.eval_data, job.eval_options, job.test_limit, served)] if job.score_test else []
    if job.validation_data:
        evals.insert(0, ("validation", job.eval_task, job.validation_data, job.eval_options, None, served))
    if job.retention_task:
        evals.append(("retention", job.retention_task, job.retention_data, job.retention_options,
                      job.retention_limit, None))
    for name, task, data, options, limit, server_model in evals:
        result = _evaluate(server_model or model, tokenizer, task, data, options, limit, job.eval_batch_size, label)
        write_results(result, run_dir / f"{name}.json")
        scores[name] = _accuracy_record(result)
    if job.forgetting and base_model is not None:
        from milora.eval.tasks.forgetting import ForgettingReference

        side = "base_reference" if isinstance(base_model, ForgettingReference) else "base_model"
        result = _evaluate(model, tokenizer, "forgetting", job.forgetting_data,
                           {side: base_model, "max_length": job.forgetting_length},
                           job.forgetting_windows, job.eval_batch_size, label)
        write_results(result, run_dir / "forgetting.json")
        scores["forgetting_kl"] = result["summary"]["scores"]["forgetting_loss"]
    return scores


def _trainable_parameters(model) -> int:
    """The rank-r factors A and B that training updates (loaded for inference, they are frozen now)."""
    return sum(parameter.numel() for name, parameter in model.named_parameters() if ".lora_" in name)


def _train_and_score(job: Job, run_dir: Path) -> dict[str, Any]:
    from milora.adapter.load import load_model
    from milora.comparison.starts import shared_start
    from milora.models import load_base_model
    from milora.training.run import train

    started = time.perf_counter()
    resume = _latest_checkpoint(run_dir)
    # begin from a finished run's start where one exists (decompose once per distinct start)
    start = shared_start(job) if "init_from" not in job.train else None
    # a killed attempt may have left this run's own training directory: resume it, or start it over
    result = train({**job.train, "resume_from_checkpoint": resume, "overwrite_output_dir": resume is None,
                    **({"init_from": start} if start is not None else {})})
    if result.interrupted:
        raise KeyboardInterrupt
    losses = [entry["loss"] for entry in result.metrics["loss_history"] if "loss" in entry]
    if losses and not math.isfinite(losses[-1]):
        raise FloatingPointError(f"training diverged: the last logged loss is {losses[-1]}")
    train_seconds = time.perf_counter() - started
    base, tokenizer = load_base_model(job.train.get("model"), dtype=job.train.get("dtype", "float32"))
    reference = None
    if job.forgetting:  # computed once per sweep from the base before the adapter is loaded onto it
        from milora.comparison.reference import shared_reference

        reference = shared_reference(base, tokenizer, job) or load_base_model(
            job.train.get("model"), dtype=job.train.get("dtype", "float32"))[0]
    model = load_model(base, result.adapter_dir)
    with _served(job, result.adapter_dir) as served:
        scores = _scores(job, model, tokenizer, reference, run_dir, job.name, served)
    return {"status": "done", "train_seconds": train_seconds, "init_from": start,
            "trainable_parameters": _trainable_parameters(model),
            "loss_history": result.metrics["loss_history"], "adapter_dir": str(result.adapter_dir), **scores}


@contextlib.contextmanager
def _served(job: Job, adapter_dir: str | Path) -> Iterator[Any]:
    """The run's adapter on the sweep's ``eval_server`` for as long as the block runs (None: no server)."""
    if not job.eval_server:
        yield None
        return
    from milora.eval.server import connect, runtime_adapter

    with runtime_adapter(job.eval_server, job.name, str(adapter_dir)) as name:
        yield connect(job.eval_server, served_model=name)


def _latest_checkpoint(run_dir: Path) -> bool | None:
    """Resume a run whose process was killed (it left checkpoints but no record)."""
    from milora.training.run import latest_complete_checkpoint

    return True if latest_complete_checkpoint(run_dir / "train") is not None else None


def run_one(job: Job) -> dict[str, Any]:
    """Run one job of the sweep (see `milora.comparison.runner.job_for`) and write its record."""
    run_dir = Path(job.run_dir)
    started = time.perf_counter()
    try:
        record = _train_and_score(job, run_dir)
    except OutputInUseError:
        raise  # another live process runs it: not this run's failure, and no record
    except (MiloraError, FloatingPointError, RuntimeError, ValueError) as error:
        diverged = "NaN or Inf" in str(error) or isinstance(error, FloatingPointError)
        record = {"status": "failed", "reason": "diverged (NaN/Inf)" if diverged else type(error).__name__,
                  "error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc(limit=-3)}
    record = {**job.identity.as_record(), **record, "wall_seconds": time.perf_counter() - started}
    atomic_write_json(run_dir / RECORD, record)
    return record


def run_base(job: Job) -> dict[str, Any]:
    """Score the base model itself (no adapter): test accuracy and the retention probe before tuning."""
    from milora.models import load_base_model

    run_dir = Path(job.run_dir)
    model, tokenizer = load_base_model(job.train.get("model"), dtype=job.train.get("dtype", "float32"))
    served = None
    if job.eval_server:
        from milora.eval.server import connect

        served = connect(job.eval_server)  # the server's one base model
    scores = _scores(dataclasses.replace(job, forgetting=False, validation_data=None), model, tokenizer, None, run_dir,
                     "base", served)
    record = {**job.identity.as_record(), "status": "done", **scores}
    atomic_write_json(run_dir / RECORD, record)
    return record


def score_tests(jobs: list[Job]) -> None:
    """The test phase: score the test set with each finished run's saved adapter (on a freshly loaded
    base), write ``test.json`` and add ``test`` and ``test_seconds`` to the run's record (rewritten
    atomically: a record has its test score or not, never half of it)."""
    from milora.adapter.load import load_model
    from milora.models import load_base_model
    from milora.report import write_results

    for job in jobs:
        run_dir = Path(job.run_dir)
        record = json.loads((run_dir / RECORD).read_text(encoding="utf-8"))
        started = time.perf_counter()
        base, tokenizer = load_base_model(job.train.get("model"), dtype=job.train.get("dtype", "float32"))
        model = load_model(base, record["adapter_dir"])
        with _served(job, record["adapter_dir"]) as served:
            result = _evaluate(served or model, tokenizer, job.eval_task, job.eval_data, job.eval_options,
                               job.test_limit, job.eval_batch_size, job.name)
        write_results(result, run_dir / "test.json")
        atomic_write_json(run_dir / RECORD, {**record, "test": _accuracy_record(result),
                                             "test_seconds": time.perf_counter() - started})


IN_USE = 3
"""The worker's exit status when another live process holds its run (no record written)."""
STOPPED = 130
"""The worker's exit status when a Ctrl-C / SIGTERM stopped it after its checkpoint (no record written)."""


def main(argv: list[str] | None = None) -> int:
    """``JOB.json``: run the job; ``--test JOB.json ...``: the test phase of those (finished) runs."""
    arguments = argv or sys.argv[1:]
    if arguments[0] == "--test":
        score_tests([read_job(path) for path in arguments[1:]])
        return 0
    job = read_job(Path(arguments[0]))
    try:
        record = (run_base if job.is_base else run_one)(job)
    except OutputInUseError as error:
        print(f"milora compare: {error}", file=sys.stderr)
        return IN_USE
    except KeyboardInterrupt:
        print(f"milora compare: {job.name} stopped; re-running continues it.", file=sys.stderr)
        return STOPPED
    return 0 if record["status"] == "done" else 1


if __name__ == "__main__":
    sys.exit(main())
