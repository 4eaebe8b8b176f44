"""`compare`: run (or finish) a sweep, then choose, compare and report."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from milora.comparison.job import Job
from milora.comparison.report import markdown, plot
from milora.comparison.runner import job_for, prepare, read_record, run_local, run_ray, score_tests_local
from milora.comparison.summary import chosen_runs, summarise
from milora.comparison.sweep import Sweep, load_sweep, validation_records
from milora.errors import MiloraError
from milora.io import RunLock, atomic_write_json, atomic_write_text, read_records

ANALYSIS_METRICS = ("relative_update", "principal_energy", "minor_energy", "chance_energy", "principal_rotation")


def compare(sweep: str | os.PathLike | Mapping[str, Any], overrides: Sequence[str] = (), progress: bool = True) -> dict:
    """Run what is left of the sweep's grid, then its test phase (`untested`), then write and return the
    comparison (compare.json's content).

    Everything is validated before anything runs or is written. The sweep holds its output
    directory for its whole life (one sweep per directory); re-running the same command after
    an interruption continues where it stopped.
    """
    sweep = load_sweep(sweep, overrides)
    started = time.perf_counter()
    with RunLock(sweep.output_dir, purpose="milora compare"):
        jobs = prepare(sweep)
        if jobs:
            run_ray(jobs, sweep) if sweep.config.backend == "ray" else run_local(jobs, progress)
        if to_test := untested(sweep):
            if sweep.config.backend == "ray":
                run_ray(to_test, sweep, test=True)
            else:
                score_tests_local(to_test, progress)
            if still := untested(sweep):
                raise MiloraError(f"the test phase did not score {', '.join(job.name for job in still)} (see the "
                                  "output above); re-run the same command to score them.")
        records = [record for _, record in _finished(sweep)]
        base = read_record(Path(job_for(sweep, None).run_dir))
        summary = summarise(records, sweep.config.methods, sweep.config.baseline)
        summary["setup"] = _setup(sweep, records, base, time.perf_counter() - started)
        if sweep.config.analyze:
            summary["analysis"] = _analysis(sweep, records)
        atomic_write_json(sweep.output_dir / "compare.json", summary)
        report = markdown(summary)
        atomic_write_text(sweep.output_dir / "compare.md", report)
        plot(summary, records, sweep.output_dir)
    if progress:
        print(report)
    return summary


def _finished(sweep: Sweep) -> list[tuple[Job, dict[str, Any]]]:
    """Every run of the grid that has a record (done or failed), with its job."""
    jobs = [job_for(sweep, spec) for spec in sweep.runs]
    return [(job, record) for job in jobs if (record := read_record(Path(job.run_dir)))]


def untested(sweep: Sweep) -> list[Job]:
    """The finished runs the test phase still has to score: each method's chosen runs (chosen on
    validation, so the test set plays no part in the choice), or every done run under ``test_runs: all``."""
    finished = _finished(sweep)
    records = [record for _, record in finished]
    wanted = records if sweep.config.test_runs == "all" else [
        run for method in sweep.config.methods for run in chosen_runs(records, method)]
    wanted_ids = {id(record) for record in wanted}
    return [job for job, record in finished
            if id(record) in wanted_ids and record["status"] == "done" and "test" not in record]


def _setup(sweep: Sweep, records: list[dict], base: dict | None, seconds: float) -> dict[str, Any]:
    train = sweep.train
    steps = f"{train['max_steps']} steps" if train.get("max_steps") else f"{train.get('num_train_epochs', 3)} epochs"
    return {
        "model": train.get("model") or "SmolLM2-135M-Instruct (embedded)",
        "train_records": len(read_records(sweep.train_file)),
        "steps": steps,
        "lora_rank": train.get("lora_rank", 16),
        "eval_task": sweep.config.eval_task,
        "test_items": len(base["test"]["correct"]) if base and base.get("test") else None,
        "validation_items": len(validation_records(sweep)),
        "seeds": sweep.config.seeds,
        "base_test_accuracy": base["test"]["accuracy"] if base and base.get("test") else None,
        "base_retention_accuracy": base["retention"]["accuracy"] if base and base.get("retention") else None,
        "wall_minutes": (sum(r.get("wall_seconds", 0) + r.get("test_seconds", 0) for r in records)
                         + (base or {}).get("wall_seconds", 0)) / 60,
        "this_invocation_minutes": seconds / 60,
        "data_sha256": sweep.data_sha256,
    }


def _analysis(sweep: Sweep, records: list[dict]) -> list[dict[str, Any]]:
    """`milora analyze` of every chosen run's adapter (cached per run), averaged over seeds."""
    from milora.analysis import analyze_adapter
    from milora.models import load_causal_lm

    rows = []
    for method in sweep.config.methods:
        chosen = [r for r in chosen_runs(records, method) if r["status"] == "done"]
        if not chosen:
            continue
        rate = chosen[0]["learning_rate"]
        means = []
        for record in chosen:
            cache = Path(record["adapter_dir"]).parent / "analysis.json"
            if not cache.is_file():
                model = load_causal_lm(sweep.train.get("model"), dtype=sweep.train.get("dtype", "float32"))
                result = analyze_adapter(model, record["adapter_dir"], progress=False)
                atomic_write_json(cache, result["summary"]["all"])
            means.append(read_json(cache))
        rows.append({"method": method, "learning_rate": rate, "adapters": len(means),
                     **{m: _mean([entry.get(m) for entry in means]) for m in ANALYSIS_METRICS}})
    return rows


def read_json(path: Path) -> Any:
    import json

    return json.loads(path.read_text())


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None
