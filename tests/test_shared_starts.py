"""A sweep decomposes once per distinct start (issue 24, item 2): a run whose start a finished run of the
sweep already holds begins from it (``init_from``), and trains to the same adapter bit for bit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from milora.comparison.job import Job, RunIdentity
from milora.comparison.starts import shared_start, start_waves
from milora.constants import MILORA_CONFIG

from conftest import assert_same_adapter, make_model_dir, sweep_values


def _job(runs: Path, method: str, seed: int, learning_rate: float = 0.01) -> Job:
    name = f"{method}-lr{learning_rate}-seed{seed}"
    return Job(name=name, run_dir=str(runs / name), identity=RunIdentity(method, learning_rate, seed), train={},
               eval_task="commonsense", eval_data=None)


def _finished(runs: Path, method: str, seed: int, status: str = "done", zero_components: int = 0) -> Path:
    """A finished run's record and adapter metadata (what shared_start reads), without training."""
    run_dir = runs / f"{method}-lr0.01-seed{seed}"
    adapter = run_dir / "train" / "adapter"
    adapter.mkdir(parents=True)
    (adapter / MILORA_CONFIG).write_text(json.dumps({"report": [{"module": "q", "zero_components": zero_components}]}))
    (run_dir / "run.json").write_text(json.dumps({"method": method, "learning_rate": 0.01, "seed": seed,
                                                  "status": status, "adapter_dir": str(adapter)}))
    return adapter


def test_a_seed_independent_start_is_shared_across_rates_and_seeds(tmp_path):
    adapter = _finished(tmp_path, "milora", seed=0)
    assert shared_start(_job(tmp_path, "milora", seed=0, learning_rate=0.02)) == str(adapter)
    assert shared_start(_job(tmp_path, "milora", seed=1)) == str(adapter)
    assert shared_start(_job(tmp_path, "pissa", seed=0)) is None  # another method's start


def test_a_seeded_start_is_shared_only_with_its_own_seed(tmp_path):
    adapter = _finished(tmp_path, "random", seed=0)
    assert shared_start(_job(tmp_path, "random", seed=1)) is None
    assert shared_start(_job(tmp_path, "random", seed=0, learning_rate=0.02)) == str(adapter)


def test_a_start_with_zero_components_depends_on_the_seed(tmp_path):
    _finished(tmp_path, "milora", seed=0, zero_components=2)
    assert shared_start(_job(tmp_path, "milora", seed=1)) is None


@pytest.mark.parametrize("method", ["lora", "dora", "corda-kpm"])
def test_starts_that_leave_the_base_or_need_training_batches_are_not_shared(tmp_path, method):
    _finished(tmp_path, method, seed=0)
    assert shared_start(_job(tmp_path, method, seed=0, learning_rate=0.02)) is None


def test_failed_unreadable_or_moved_runs_are_not_starts(tmp_path):
    _finished(tmp_path, "milora", seed=0, status="failed")
    broken = tmp_path / "milora-lr0.03-seed0"
    broken.mkdir()
    (broken / "run.json").write_text("{trunc")
    moved = _finished(tmp_path, "milora", seed=5)
    (moved / MILORA_CONFIG).unlink()
    assert shared_start(_job(tmp_path, "milora", seed=0, learning_rate=0.02)) is None


def test_parallel_runs_go_in_waves_so_each_start_is_decomposed_once(tmp_path):
    """Ray's trials run at once: the first run of each shareable start goes first with everything that shares
    nothing; the runs that reuse a start wait for the second wave."""
    base = Job(name="base", run_dir=str(tmp_path / "base"), identity=RunIdentity("base"), train={})
    grid = [_job(tmp_path, method, seed, rate) for method in ("lora", "milora", "random", "corda-kpm")
            for rate in (0.01, 0.02) for seed in (0, 1)]
    first, later = start_waves([base, *grid])
    assert [job.name for job in first] == [
        "base", "lora-lr0.01-seed0", "lora-lr0.01-seed1", "lora-lr0.02-seed0", "lora-lr0.02-seed1",
        "milora-lr0.01-seed0", "random-lr0.01-seed0", "random-lr0.01-seed1",
        "corda-kpm-lr0.01-seed0", "corda-kpm-lr0.01-seed1", "corda-kpm-lr0.02-seed0", "corda-kpm-lr0.02-seed1"]
    assert [job.name for job in later] == ["milora-lr0.01-seed1", "milora-lr0.02-seed0", "milora-lr0.02-seed1",
                                           "random-lr0.02-seed0", "random-lr0.02-seed1"]
    assert start_waves([]) == ([], [])


def test_a_real_sweep_reuses_the_start_and_trains_the_same_adapter(tmp_path):
    from milora.comparison import compare
    from milora.comparison.runner import prepare
    from milora.comparison.sweep import load_sweep
    from milora.training.run import train

    model = str(make_model_dir(tmp_path / "model"))
    values = {**sweep_values(tmp_path, model), "methods": ["milora"], "baseline": "milora", "seeds": [0, 1],
              "forgetting": False, "analyze": False, "eval_options": {"scorer": "loglik"}}
    values["train"] = {**values["train"], "max_steps": 2, "per_device_train_batch_size": 2, "cutoff_len": 128,
                       "save_steps": 100}
    compare(values, progress=False)
    runs = tmp_path / "out" / "runs"
    first, second = (json.loads((runs / f"milora-lr0.01-seed{seed}" / "run.json").read_text()) for seed in (0, 1))
    assert first["status"] == second["status"] == "done"
    assert first["init_from"] is None and second["init_from"] == first["adapter_dir"]
    # the reused start gives the adapter that decomposing again gives
    job = json.loads((runs / "milora-lr0.01-seed1" / "job.json").read_text())
    again = train({**job["train"], "output_dir": str(tmp_path / "again")})
    assert_same_adapter(Path(second["adapter_dir"]), again.adapter_dir)
    # init_from is not a setting the runs must share: the sweep's runs pass its consistency check
    prepare(load_sweep({**values, "seeds": [0, 1, 2]}))
