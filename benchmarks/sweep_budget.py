"""Where a finished `milora compare` sweep spent its time, and what the same sweep costs with the test
set scored for the chosen runs only (``test_runs: chosen``) and with more methods.

Reads the sweep's own records, nothing re-run: each run's ``wall_seconds`` (its worker, start-up
not included) and ``train_seconds``; its test generation, as ``test_seconds`` where the test phase
scored it, else as the time between writing ``validation.json`` and ``test.json`` (the worker scores
validation, then test, and writes each result when it has it); the invocation's own time from
``compare.json`` (``setup.this_invocation_minutes``), whose excess over the workers' time is the
process starts and the driver. The projections scale the measured per-run means: they are
estimates, not runs.

    python benchmarks/sweep_budget.py runs/compare_baselines_demo [--methods 8]
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunTimes:
    """One finished run's seconds: in its worker, in training, in test generation (0 for a run the test
    phase did not score); chosen or not; test scored by the test phase (``deferred``) or in the run."""

    name: str
    wall: float
    train: float
    test: float
    chosen: bool
    deferred: bool


def run_times(output_dir: Path) -> list[RunTimes]:
    summary = json.loads((output_dir / "compare.json").read_text())
    chosen = {(m["method"], m["selected_learning_rate"]) for m in summary["methods"] if m["status"] == "done"}
    times = []
    for record_path in sorted((output_dir / "runs").glob("*/run.json")):
        record, folder = json.loads(record_path.read_text()), record_path.parent
        if folder.name == "base" or record["status"] != "done":
            continue
        deferred = "test" not in record or "test_seconds" in record
        if deferred:
            test = record.get("test_seconds", 0.0)
        else:
            test = (folder / "test.json").stat().st_mtime - (folder / "validation.json").stat().st_mtime
        times.append(RunTimes(folder.name, record["wall_seconds"], record["train_seconds"], test,
                              (record["method"], record["learning_rate"]) in chosen, deferred))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_dir", type=Path)
    parser.add_argument("--methods", type=int, default=8, help="methods of the projected sweep (same rates, seeds)")
    args = parser.parse_args()
    summary = json.loads((args.output_dir / "compare.json").read_text())
    times = run_times(args.output_dir)
    methods = len(summary["methods"])
    invocation = summary["setup"]["this_invocation_minutes"] * 60
    base = json.loads((args.output_dir / "runs" / "base" / "run.json").read_text()).get("wall_seconds", 0.0)
    workers = sum(t.wall + t.test * t.deferred for t in times) + base
    starts = (invocation - workers) / (len(times) + 1)  # per worker process: start-up, imports, driver
    deferrable = sum(t.test for t in times if not t.chosen and not t.deferred)

    def mean(values):
        return statistics.mean(values)

    print(f"{len(times)} finished runs of {methods} methods; invocation {invocation / 60:.1f} min, workers "
          f"{workers / 60:.1f} min, process starts and driver {starts:.1f} s per run")
    tested = [t.test for t in times if t.test]
    print(f"per run (mean): worker {mean(t.wall for t in times):.1f} s, training {mean(t.train for t in times):.1f} s; "
          f"test generation {mean(tested):.1f} s over the {len(tested)} tested runs "
          f"(min {min(tested):.1f}, max {max(tested):.1f})")
    if not any(t.deferred for t in times):
        print(f"test generation at the {sum(not t.chosen for t in times)} non-chosen runs: {deferrable / 60:.1f} min; "
              f"with test_runs: chosen the sweep would take {(invocation - deferrable) / 60:.1f} min "
              f"(x{(invocation - deferrable) / invocation:.3f})")
    per_method = (invocation - deferrable) / methods
    print(f"projected {args.methods} methods, same grid and seeds, test_runs: chosen: "
          f"{args.methods * per_method / 60:.1f} min")


if __name__ == "__main__":
    main()
