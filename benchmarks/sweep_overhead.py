"""Where one run of the embedded sweep spends its time, phase by phase, as the worker runs it.

Builds the job of one run of ``recipes/compare_demo.yaml`` (``--method``, the recipe's middle rate,
seed 0) with `milora.comparison.runner.job_for`, then times, in this process, the phases of
`milora.comparison.worker.run_one`: training (`milora.train`, its init included), the base-model
load, the adapter load, validation, test, forgetting, and the start-up of a fresh worker process
(importing what it imports), measured separately in a subprocess. Forgetting is timed both ways,
in the same process: before (each run loads a second base model and runs it beside the adapter)
and after (the base model's side computed once per sweep and stored,
`milora.comparison.reference`; each run finds and reads it), with the scores compared.

    python benchmarks/sweep_overhead.py                      # lora, ~2.5 min on 2 cores
    python benchmarks/sweep_overhead.py --method milora
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def startup_seconds() -> float:
    """A fresh worker process importing what a run imports, to the first line of work."""
    code = ("import milora.comparison.worker, milora.training.run, milora.adapter.load, milora.eval, "
            "milora.models, transformers, peft")
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="lora")
    args = parser.parse_args()

    import os

    os.chdir(REPO)  # the recipe's paths are relative to the repository root
    from milora.adapter.load import load_model
    from milora.comparison.reference import shared_reference
    from milora.comparison.runner import job_for
    from milora.comparison.sweep import load_sweep, write_split
    from milora.comparison.worker import _evaluate
    from milora.eval.tasks.forgetting import forgetting, load_documents
    from milora.models import load_base_model
    from milora.training.run import train

    times: dict[str, float] = {"process start-up (fresh interpreter + imports)": startup_seconds()}
    with tempfile.TemporaryDirectory() as scratch:
        sweep = load_sweep(REPO / "recipes" / "compare_demo.yaml", [f"output_dir={scratch}/sweep"])
        write_split(sweep)
        spec = next(s for s in sweep.runs if s.method == args.method and s.seed == 0
                    and s.learning_rate == sweep.config.rates_for(args.method)[1])
        job = job_for(sweep, spec)

        def timed(label, call):
            start = time.perf_counter()
            value = call()
            times[label] = time.perf_counter() - start
            return value

        result = timed("training (init + 20 steps + save)", lambda: train(
            {**job.train, "overwrite_output_dir": True}))
        base, tokenizer = timed("base model load", lambda: load_base_model(None))
        timed("(once per sweep: the stored reference computed and written)",
              lambda: shared_reference(base, tokenizer, job))
        stored = timed(AFTER[0], lambda: shared_reference(base, tokenizer, job))
        model = timed("adapter load (load_model)", lambda: load_model(base, result.adapter_dir))
        for name, data, limit in (("validation", job.validation_data, None),
                                  ("test", job.eval_data, job.test_limit)):
            timed(f"{name} generation ({name} items)", lambda data=data, limit=limit, name=name: _evaluate(
                model, tokenizer, job.eval_task, data, job.eval_options, limit, job.eval_batch_size, name))
        documents, _ = load_documents(job.forgetting_data)
        window_args = {"max_length": job.forgetting_length, "limit": job.forgetting_windows,
                       "batch_size": job.eval_batch_size, "progress": False}
        reference = timed(BEFORE[0], lambda: load_base_model(None)[0])
        before = timed(BEFORE[1], lambda: forgetting(model, tokenizer, documents, base_model=reference, **window_args))
        after = timed(AFTER[1], lambda: forgetting(model, tokenizer, documents, reference=stored, **window_args))
    shared = [key for key in times if not key.startswith("(") and key not in (*BEFORE, *AFTER)]
    run_before = sum(times[key] for key in (*shared, *BEFORE))
    run_after = sum(times[key] for key in (*shared, *AFTER))
    print(f"method {args.method}, lr {spec.learning_rate:g}, seed 0; the stored reference gives the same scores: "
          f"{before == after} (KL {after[0]['forgetting_loss']:.6g})")
    print(f"{'phase':66s} {'seconds':>8s}")
    for key, value in times.items():
        print(f"{key:66s} {value:8.1f}")
    forgetting_before, forgetting_after = sum(times[k] for k in BEFORE), sum(times[k] for k in AFTER)
    print(f"forgetting per run: {forgetting_before:.1f} s -> {forgetting_after:.1f} s "
          f"(x{forgetting_after / forgetting_before:.2f})")
    print(f"one run as the worker runs it (start-up included): {run_before:.1f} s -> {run_after:.1f} s "
          f"(x{run_after / run_before:.3f}); non-training {run_before - times['training (init + 20 steps + save)']:.1f}"
          f" s -> {run_after - times['training (init + 20 steps + save)']:.1f} s")


BEFORE = ("forgetting before: a second base model load (the reference)",
          "forgetting before: adapter + reference forward passes, KL")
AFTER = ("forgetting after: the stored reference found (windows, digest)",
         "forgetting after: adapter passes + stored reference read, KL")


if __name__ == "__main__":
    main()
