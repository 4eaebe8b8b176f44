"""Where one run of the embedded sweep spends its time, phase by phase, as the worker runs it.

Builds the job of one run of ``recipes/compare_demo.yaml`` (``--method``, the recipe's middle rate,
seed 0) with `milora.comparison.runner.job_for`, then times, in this process, the phases of
`milora.comparison.worker.run_one`: training (`milora.train`, its init included), the base-model
load, the adapter load, validation, test, forgetting, and the start-up of a fresh worker process
(importing what it imports), measured separately in a subprocess. What computing the
forgetting reference once per sweep could save is bounded by the second base-model load plus
the reference's forward passes (half of a forgetting pass of the base against itself).

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
            {**job["train"], "overwrite_output_dir": True}))
        base, tokenizer = timed("base model load", lambda: load_base_model(None))
        model = timed("adapter load (load_model)", lambda: load_model(base, result.adapter_dir))
        for name, data, limit in (("validation", job["validation_data"], None),
                                  ("test", job["eval_data"], job["test_limit"])):
            timed(f"{name} generation ({name} items)", lambda data=data, limit=limit, name=name: _evaluate(
                model, tokenizer, job["eval_task"], data, job["eval_options"], limit, job["eval_batch_size"], name))
        documents, _ = load_documents(job["forgetting_data"])
        window_args = {"max_length": job["forgetting_length"], "limit": job["forgetting_windows"],
                       "batch_size": job["eval_batch_size"], "progress": False}
        reference = timed("forgetting reference: a second base model load", lambda: load_base_model(None)[0])
        timed("forgetting (adapter and reference forward passes, KL)", lambda: forgetting(
            model, tokenizer, documents, base_model=reference, **window_args))
        both = timed("(base against itself: two reference passes)", lambda: forgetting(
            reference, tokenizer, documents, base_model=reference, **window_args))
    per_run = sum(value for key, value in times.items() if not key.startswith("("))
    print(f"method {args.method}, lr {spec.learning_rate:g}, seed 0; "
          f"KL of the base to itself {both[0]['forgetting_loss']:.2g}")
    print(f"{'phase':60s} {'seconds':>8s}")
    for key, value in times.items():
        print(f"{key:60s} {value:8.1f}")
    print(f"{'one run as the worker runs it (sum, start-up included)':60s} {per_run:8.1f}")
    bound = (times["forgetting reference: a second base model load"]
             + times["(base against itself: two reference passes)"] / 2)
    print(f"a reference computed once per sweep saves at most {bound:.1f} s per run ({bound / per_run:.1%})")

if __name__ == "__main__":
    main()
