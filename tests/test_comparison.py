"""`milora compare`: selection on validation, the statistics, resuming, failures, bad input, and a
small sweep end to end on a tiny model with the local and the Ray backends."""

from __future__ import annotations

import importlib.util
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy import stats as scipy_stats

from milora.comparison.stats import mean_interval, paired_difference, verdict
from milora.comparison.summary import select, summarise
from milora.comparison.sweep import load_sweep
from milora.errors import ConfigError

from conftest import QUESTIONS, cli_error, commonsense_records, make_model_dir

# ---------------------------------------------------------------- statistics against a direct computation


def test_mean_interval_is_the_student_t_interval():
    values = [0.61, 0.55, 0.58]
    interval = mean_interval(values)
    direct = scipy_stats.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=scipy_stats.sem(values))
    assert interval.mean == pytest.approx(np.mean(values), abs=1e-15)
    assert (interval.low, interval.high) == pytest.approx(direct, abs=1e-12)
    single = mean_interval([0.5])
    assert single.low is None and single.as_list() is None


def test_paired_difference_pairs_by_seed():
    rng = np.random.default_rng(0)
    method = {seed: list(rng.random(50) < 0.6) for seed in (0, 1, 2)}
    baseline = {seed: list(rng.random(50) < 0.5) for seed in (0, 1, 2, 7)}  # seed 7 has no partner: left out
    difference = paired_difference(method, baseline)
    per_seed = [np.mean(method[s]) - np.mean(baseline[s]) for s in (0, 1, 2)]
    direct = scipy_stats.ttest_rel([np.mean(method[s]) for s in (0, 1, 2)], [np.mean(baseline[s]) for s in (0, 1, 2)])
    low, high = direct.confidence_interval(0.95)
    assert difference.mean == pytest.approx(np.mean(per_seed), abs=1e-15)
    assert (difference.low, difference.high) == pytest.approx((low, high), abs=1e-12)
    assert difference.n == 3 and "Student t over 3 seeds" in difference.method


def test_one_seed_uses_a_paired_bootstrap_over_items():
    method, baseline = [True] * 30 + [False] * 10, [True] * 20 + [False] * 20
    difference = paired_difference({0: method}, {0: baseline})
    assert difference.mean == pytest.approx(0.25)
    assert difference.low < 0.25 < difference.high and "bootstrap" in difference.method
    assert verdict(difference) == "better"
    same = paired_difference({0: method}, {0: method})
    assert (same.mean, same.low, same.high) == (0, 0, 0) and verdict(same) == "no significant difference"


# ---------------------------------------------------------------- selection


def record(method, rate, seed, val, test, status="done", items=40):
    if status == "failed":
        return {"method": method, "learning_rate": rate, "seed": seed, "status": "failed", "error": "failed"}
    correct = [i < round(test * items) for i in range(items)]
    random.Random(hash((method, rate, seed))).shuffle(correct)
    return {"method": method, "learning_rate": rate, "seed": seed, "status": status,
            "validation": {"accuracy": val, "correct": []},
            "test": {"accuracy": sum(correct) / items, "correct": correct},
            "forgetting_kl": 0.01 * rate * 1e3, "train_seconds": 10.0, "trainable_parameters": 1000,
            "loss_history": [], "adapter_dir": f"/x/{method}-{rate}-{seed}"}


def test_selection_uses_validation_not_test():
    """lora: validation prefers 1e-4, test would prefer 1e-3; the report gives 1e-4's test accuracy."""
    records = [record("lora", 1e-4, s, val=0.70, test=0.40) for s in (0, 1, 2)]
    records += [record("lora", 1e-3, s, val=0.60, test=0.90) for s in (0, 1, 2)]
    records += [record("milora", 1e-4, s, val=0.65, test=0.50) for s in (0, 1, 2)]
    summary = summarise(records, ["lora", "milora"], "lora")
    lora = next(m for m in summary["methods"] if m["method"] == "lora")
    assert lora["selected_learning_rate"] == 1e-4 and lora["test_accuracy_mean"] == pytest.approx(0.40)
    milora = next(m for m in summary["methods"] if m["method"] == "milora")
    assert milora["difference_to_baseline"] == pytest.approx(0.10)
    assert len(summary["runs"]) == 9 and summary["baseline"] == "lora"
    assert any("test set played no part" in sentence for sentence in summary["statistics"])


def test_failed_rates_are_left_out_and_an_all_failed_method_is_reported():
    records = [record("lora", 1e-4, s, 0.5, 0.5) for s in (0, 1)]
    records += [record("lora", 1e-2, 0, 0.9, 0.9), record("lora", 1e-2, 1, None, None, status="failed")]
    records[-1]["error"] = "AdapterError: diverged"
    setting, note = select(records, "lora")
    assert setting.learning_rate == 1e-4 and setting.batch_size is None and "left out: 0.01" in note
    diverged = [dict(record("pissa", r, s, None, None, status="failed"), error="diverged")
                for r in (1, 2) for s in (0,)]
    summary = summarise(records + diverged, ["lora", "pissa"], "lora")
    pissa = next(m for m in summary["methods"] if m["method"] == "pissa")
    assert pissa["status"] == "failed" and "diverged" in pissa["selection"]


def test_no_significant_difference_is_said_so():
    records = [record("lora", 1e-4, s, 0.5, acc) for s, acc in zip((0, 1, 2), (0.5, 0.55, 0.45), strict=True)]
    records += [record("milora", 1e-4, s, 0.5, acc) for s, acc in zip((0, 1, 2), (0.55, 0.5, 0.5), strict=True)]
    summary = summarise(records, ["lora", "milora"], "lora")
    milora = next(m for m in summary["methods"] if m["method"] == "milora")
    assert milora["verdict"] == "no significant difference"
    assert any("no significant difference" in sentence for sentence in summary["statistics"])


# ---------------------------------------------------------------- a sweep on a tiny model



@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    pairs = QUESTIONS[:]
    random.Random(0).shuffle(pairs)
    (root / "train.json").write_text(json.dumps(commonsense_records(pairs[:80])))
    (root / "test.json").write_text(json.dumps(commonsense_records(pairs[80:104])))
    (root / "text.txt").write_text("The river flows south to the sea, past the mills of the old town. " * 30)
    return {"root": root, "model": str(make_model_dir(root / "model"))}


def sweep_values(setup, output_dir, **extra):
    return {
        "output_dir": str(output_dir),
        "train": {"model": setup["model"], "dataset": str(setup["root"] / "train.json"), "lora_rank": 2,
                  "max_steps": 3, "per_device_train_batch_size": 4, "report_to": "none", "cutoff_len": 128,
                  "save_steps": 100, "logging_steps": 1, "lora_dropout": 0.0},
        "methods": ["lora", "milora"], "learning_rates": [0.01, 0.1], "seeds": [0, 1],
        "eval_task": "commonsense", "eval_data": str(setup["root"] / "test.json"), "eval_options": {"scorer": "loglik"},
        "validation_size": 10, "forgetting_data": str(setup["root"] / "text.txt"), "forgetting_windows": 2,
        "forgetting_length": 32, "analyze": True, **extra,
    }


@pytest.mark.parametrize("change,message", [
    ({"methods": ["lora", "bora"]}, "methods"),
    ({"learning_rates": []}, "learning-rate list of lora is empty"),
    ({"learning_rates": {"lora": [1e-3], "milora": []}}, "learning-rate list of milora is empty"),
    ({"seeds": [0, "one"]}, "seeds"),
    ({"seeds": [0.5]}, "seeds"),
    ({"learning_rat": [1e-3]}, "unknown sweep key 'learning_rat': did you mean 'learning_rates'"),
    ({"test_limit": 5}, "test_limit"),
    ({"validation_size": None}, "exactly one of validation_data"),
    ({"train": {"dataset": "x.json", "learning_rate": 1e-4}}, "set by the sweep"),
    ({"baseline": "pissa"}, "baseline 'pissa' is not among the methods"),
])
def test_bad_sweeps_are_refused_before_anything_is_written(setup, tmp_path, change, message):
    values = sweep_values(setup, tmp_path / "out")
    values.update(change)
    with pytest.raises(ConfigError, match=message):
        load_sweep(values)
    assert not (tmp_path / "out").exists()


def test_validation_overlapping_the_test_set_is_refused(setup, tmp_path):
    with pytest.raises(ConfigError, match="also appear in the test set"):
        load_sweep(sweep_values(setup, tmp_path / "out", validation_size=None,
                                validation_data=str(setup["root"] / "test.json")))
    small = tmp_path / "small.json"
    small.write_text(json.dumps(commonsense_records(QUESTIONS[:10])))
    with pytest.raises(ConfigError, match="the test set has 10 items: at least 20"):
        load_sweep(sweep_values(setup, tmp_path / "out", eval_data=str(small)))


def test_ray_backend_without_ray_is_refused(setup, tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    with pytest.raises(ConfigError, match="backend: ray needs Ray"):
        load_sweep(sweep_values(setup, tmp_path / "out", backend="ray"))


@pytest.fixture(scope="module")
def local_sweep(setup, tmp_path_factory):
    """The 2 methods x 2 rates x 2 seeds sweep, local backend, with a third lora rate at which AdamW diverges."""
    from milora.comparison import compare

    output = tmp_path_factory.mktemp("local") / "out"
    values = sweep_values(setup, output, learning_rates={"lora": [0.01, 0.1, 1e30], "milora": [0.01, 0.1]})
    return output, values, compare(values, progress=False)


@pytest.mark.slow
def test_local_sweep_end_to_end(local_sweep):
    output, values, summary = local_sweep
    assert {p.name for p in output.iterdir()} >= {"compare.md", "compare.json", "sweep.yaml", "lr_curves.png",
                                                  "accuracy_vs_forgetting.png", "loss_curves.png", "runs", "data"}
    assert json.loads((output / "compare.json").read_text())["methods"] == summary["methods"]
    runs = {(r["method"], r["learning_rate"], r["seed"]): r for r in summary["runs"]}
    assert len(runs) == 10
    diverged = [r for key, r in runs.items() if key[1] == 1e30]
    # and the sweep went on
    assert all(r["status"] == "failed" and r["reason"] == "diverged (NaN/Inf)" for r in diverged)
    # the runs differ (a random tiny model's loglik answers hardly depend on the question: KL does)
    assert len({round(r["forgetting_kl"], 6) for r in runs.values() if r["status"] == "done"}) == 8
    for method in summary["methods"]:
        assert method["status"] == "done" and method["selected_learning_rate"] in (0.01, 0.1)
        assert 0 <= method["test_accuracy_mean"] <= 1 and method["forgetting_kl_mean"] >= 0
    assert summary["methods"][1]["difference_ci95"] is not None and len(summary["analysis"]) == 2
    assert summary["setup"]["test_items"] == 24 and summary["setup"]["validation_items"] == 10
    # the test phase scored exactly each method's chosen runs, after the grid (test_runs: chosen)
    chosen = {m["method"]: m["selected_learning_rate"] for m in summary["methods"]}
    for (method, rate, seed), run in runs.items():
        at_choice = run["status"] == "done" and rate == chosen[method]
        assert (run["test_accuracy"] is not None) == at_choice
        assert (output / "runs" / f"{method}-lr{rate:g}-seed{seed}" / "test.json").is_file() == at_choice
    # forgetting read the base model's side stored once for the sweep: a second base model gives the same score
    assert len(list((output / "reference").glob("forgetting-*/reference.json"))) == 1
    from milora.adapter.load import load_model
    from milora.eval.tasks.forgetting import forgetting, load_documents
    from milora.models import load_base_model

    run = next(r for r in summary["runs"] if r["method"] == "milora" and r["status"] == "done")
    config, model_path = load_sweep(values).config, values["train"]["model"]
    base, tokenizer = load_base_model(model_path)
    scores, _ = forgetting(load_model(base, run["adapter_dir"]), tokenizer, load_documents(config.forgetting_data)[0],
                           base_model=load_base_model(model_path)[0], max_length=config.forgetting_length,
                           limit=config.forgetting_windows, batch_size=config.eval_batch_size, progress=False)
    assert scores["forgetting_loss"] == run["forgetting_kl"]
    # and the deferred test score is the adapter's own: scored again here, in this process, it is the same
    from milora.eval import evaluate

    run = next(r for r in summary["runs"] if r["method"] == "milora" and r["test_accuracy"] is not None)
    result = evaluate(load_model(load_base_model(model_path)[0], run["adapter_dir"]), tokenizer, config.eval_task,
                      config.eval_data, batch_size=config.eval_batch_size, progress=False, **config.eval_options)
    name = f"milora-lr{run['learning_rate']:g}-seed{run['seed']}"
    record = json.loads((output / "runs" / name / "run.json").read_text())
    assert record["test"]["correct"] == [bool(item["correct"]) for item in result["items"]]
    assert record["test_seconds"] > 0


@pytest.mark.slow
def test_resume_skips_finished_runs_and_refuses_a_changed_sweep(local_sweep):
    from milora.comparison import compare

    output, values, first = local_sweep
    records = sorted(output.glob("runs/*/run.json"))
    stamps = {path: path.stat().st_mtime_ns for path in records}
    again = compare(values, progress=False)  # nothing left to run: the same report
    assert {path: path.stat().st_mtime_ns for path in records} == stamps
    assert again["methods"] == first["methods"]
    # test_runs may change on a sweep with runs: `all` scores the test set of the other done runs only
    tested = {path for path in records if "test" in json.loads(path.read_text())}
    every = compare({**values, "test_runs": "all"}, progress=False)
    changed_records = {path for path in records if path.stat().st_mtime_ns != stamps[path]}
    done = {path for path in records if json.loads(path.read_text())["status"] == "done"}
    assert changed_records == done - tested and tested < done
    assert all(r["test_accuracy"] is not None for r in every["runs"] if r["status"] == "done")
    assert every["methods"] == first["methods"]
    changed = {**values, "train": {**values["train"], "lora_rank": 4}}
    with pytest.raises(ConfigError, match=r"train.lora_rank changed"):
        compare(changed, progress=False)
    assert "train.lora_rank changed" in cli_error(["compare", str(_write(output.parent / "s.yaml", changed))])


def test_retry_failed_reruns_exactly_the_failed_runs(setup, tmp_path):
    """docs/compare.md: a finished run "is never repeated" and "retry_failed: true re-runs failed runs" (and
    may be set on a sweep with runs). Records written here: the base and seven runs done, one failed."""
    from milora.comparison.runner import job_for, pending, prepare
    from milora.comparison.worker import RECORD

    values = sweep_values(setup, tmp_path / "out")
    sweep = load_sweep(values)
    jobs = prepare(sweep)
    assert len(jobs) == 1 + 8  # nothing recorded yet: the base scores and the 2 x 2 x 2 grid
    failed = next(spec for spec in sweep.runs if (spec.method, spec.learning_rate, spec.seed) == ("milora", 0.1, 1))
    for spec in [None, *sweep.runs]:
        job = job_for(sweep, spec)
        status = "failed" if spec is failed else "done"
        (Path(job.run_dir) / RECORD).write_text(json.dumps({**job.identity.as_record(), "status": status}))
    assert pending(sweep) == []
    retried = load_sweep({**values, "retry_failed": True})
    assert [job.run_dir for job in prepare(retried)] == [job_for(retried, failed).run_dir]


def test_the_test_phase_scores_exactly_the_chosen_runs_without_a_test_score(setup, tmp_path):
    """Records written here (validation only): lora is best on validation at 0.1, milora at 0.01, and one
    chosen milora run already has its test score; `test_runs: all` wants every done run's instead."""
    from milora.comparison.driver import untested
    from milora.comparison.runner import job_for, prepare
    from milora.comparison.worker import RECORD

    values = sweep_values(setup, tmp_path / "out")
    sweep = load_sweep(values)
    prepare(sweep)
    best = {"lora": 0.1, "milora": 0.01}
    for spec in sweep.runs:
        job = job_for(sweep, spec)
        validation = {"accuracy": 0.8 if spec.learning_rate == best[spec.method] else 0.5, "correct": [True]}
        record = {**job.identity.as_record(), "status": "done", "validation": validation}
        if (spec.method, spec.learning_rate, spec.seed) == ("milora", 0.01, 0):
            record["test"] = {"accuracy": 1.0, "correct": [True]}
        (Path(job.run_dir) / RECORD).write_text(json.dumps(record))
    names = [job.name for job in untested(sweep)]
    assert sorted(names) == ["lora-lr0.1-seed0", "lora-lr0.1-seed1", "milora-lr0.01-seed1"]
    assert len(untested(load_sweep({**values, "test_runs": "all"}))) == 8 - 1


def _write(path: Path, values: dict) -> Path:
    path.write_text(yaml.safe_dump(values))
    return path


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="optional extra milora[ray] not installed")
def test_ray_backend_gives_the_local_results(local_sweep, tmp_path):
    """Same sweep (without the diverging rate) as Ray Tune trials on a local 2-CPU instance. Same seeds
    give the same adapters up to float rounding (Ray runs each trial on one thread): accuracies agree
    within one test item, forgetting to 1e-3 relative."""
    from milora.comparison import compare

    _output, values, local = local_sweep
    values = {**values, "output_dir": str(tmp_path / "ray"), "backend": "ray", "cpus_per_run": 1,
              "learning_rates": {"lora": [0.01, 0.1], "milora": [0.01, 0.1]}}
    remote = compare(values, progress=False)
    local_runs = {(r["method"], r["learning_rate"], r["seed"]): r for r in local["runs"]}
    assert len(remote["runs"]) >= 4  # 2 methods x 2 learning rates, each seed
    assert {(r["method"], r["learning_rate"], r["seed"]) for r in remote["runs"]} <= set(local_runs)
    for run in remote["runs"]:
        twin = local_runs[(run["method"], run["learning_rate"], run["seed"])]
        assert run["status"] == twin["status"] == "done"
        if run["test_accuracy"] is not None and twin["test_accuracy"] is not None:  # both chose this rate
            assert abs(run["test_accuracy"] - twin["test_accuracy"]) <= 1 / 24 + 1e-12
        assert math.isclose(run["forgetting_kl"], twin["forgetting_kl"], rel_tol=1e-3)
    assert all(m["status"] == "done" and m["test_accuracy_mean"] is not None for m in remote["methods"])
    # the trials ran in two waves: milora's start (seed-independent) was decomposed by one run, reused by the rest
    records = [json.loads(path.read_text()) for path in (tmp_path / "ray" / "runs").glob("milora-*/run.json")]
    assert len(records) == 4 and sum(record["init_from"] is None for record in records) == 1


REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("recipe", ["compare_math.yaml", "compare_commonsense.yaml"])
def test_paper_scale_sweep_recipes_are_valid(recipe, tmp_path, monkeypatch):
    """Keys, grid and shared train keys as milora checks them (their data is not here: a stand-in file)."""
    from milora.comparison.grid import rate_ratio
    from milora.comparison.sweep import _grid, _shared_train_keys, _validate
    from milora.io import read_yaml_mapping

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "commonsense_170k.json").write_text("[]")
    config = _validate(read_yaml_mapping(REPO / "recipes" / recipe))
    _shared_train_keys(config)
    runs = _grid(config)
    assert config.learning_rates == "auto" and len(config.methods) == 11 and len(runs) == 99
    for method in config.methods:  # each grid spans 9x around lora_rate / the method's published ratio
        rates = config.rates_for(method)
        assert max(rates) / min(rates) == pytest.approx(9, rel=1e-2)
        assert rates[1] == pytest.approx(3e-4 / rate_ratio(method), rel=1e-2)


def test_the_embedded_sweep_recipe_loads(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # the recipe's paths are relative to the repository root
    output = tmp_path / "out"  # not the recipe's runs/compare_demo, which a sweep run here has written
    sweep = load_sweep(REPO / "recipes" / "compare_demo.yaml", [f"output_dir={output}"])
    assert len(sweep.runs) == 27 and sweep.config.validation_size >= 200
    for method in sweep.config.methods:
        rates = sweep.config.rates_for(method)
        assert len(rates) >= 3 and max(rates) / min(rates) >= 10 - 1e-9
    assert not Path(sweep.config.output_dir).exists()  # loading writes nothing
