"""A sweep never mixes runs made on different data or settings (issue 22, item 3): each run's job.json
records the sha256 of every data file, and each run's job.json / train_config.yaml is checked against
the sweep before anything more runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from milora.comparison.consistency import file_digest
from milora.comparison.runner import SWEEP_FILE, job_for, prepare
from milora.comparison.sweep import load_sweep
from milora.comparison.worker import RECORD
from milora.errors import ConfigError

from conftest import make_model_dir, sweep_values


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return str(make_model_dir(tmp_path_factory.mktemp("model") / "model"))


@pytest.fixture
def values(tmp_path, model):
    return sweep_values(tmp_path, model)


def _finish(sweep) -> None:
    """Prepare the sweep and record its runs as finished (as the worker would, without training)."""
    for job in prepare(sweep):
        Path(job.run_dir, RECORD).write_text(json.dumps({**job.identity.as_record(), "status": "done"}))


def test_every_run_records_the_sha256_of_every_data_file(values, tmp_path):
    sweep = load_sweep(values)
    _finish(sweep)
    recorded = json.loads((sweep.output_dir / "runs" / sweep.runs[0].name / "job.json").read_text())["data_sha256"]
    assert recorded == {"train": file_digest(tmp_path / "train.json"), "validation": file_digest(
        tmp_path / "validation.json"), "test": file_digest(tmp_path / "test.json"),
        "forgetting": file_digest(tmp_path / "text.txt"), "retention": None}
    import hashlib

    assert recorded["test"] == hashlib.sha256((tmp_path / "test.json").read_bytes()).hexdigest()


@pytest.mark.parametrize("role,file", [("test", "test.json"), ("train", "train.json"),
                                       ("validation", "validation.json"), ("forgetting", "text.txt")])
def test_a_data_file_changed_in_place_then_a_seed_added_is_refused(values, tmp_path, role, file):
    _finish(load_sweep(values))
    path = tmp_path / file
    if file.endswith(".json"):
        records = json.loads(path.read_text())
        path.write_text(json.dumps(records[1:] + records[:1]))  # same items, other order: other bytes
    else:
        path.write_text(path.read_text() + " And back.")
    with pytest.raises(ConfigError, match=rf"job\.json: the {role} data .* is not the same file"):
        prepare(load_sweep({**values, "seeds": [0, 1]}))
    assert not (tmp_path / "out" / "runs" / "lora-lr0.01-seed1").exists()  # nothing more was written


def test_deleting_sweep_yaml_and_changing_a_setting_is_refused_by_the_runs_owncommonsense_records(values, tmp_path):
    _finish(load_sweep(values))
    (tmp_path / "out" / SWEEP_FILE).unlink()
    changed = {**values, "seeds": [0, 1], "train": {**values["train"], "lora_rank": 4}}
    with pytest.raises(ConfigError, match=r"lora-lr0\.01-seed0/job\.json: train\.lora_rank was 2, the sweep now "
                                          r"gives 4"):
        prepare(load_sweep(changed))
    prepare(load_sweep({**values, "seeds": [0, 1]}))  # the same settings: the seed is added


def test_a_run_without_its_job_json_is_checked_by_its_train_config(values, tmp_path):
    from milora.training.config import from_dict, save_config

    sweep = load_sweep(values)
    _finish(sweep)
    run_dir = tmp_path / "out" / "runs" / sweep.runs[0].name
    save_config(from_dict(job_for(sweep, sweep.runs[0]).train).as_run(), run_dir / "train" / "train_config.yaml")
    (run_dir / "job.json").unlink()
    (tmp_path / "out" / SWEEP_FILE).unlink()
    with pytest.raises(ConfigError, match=r"train_config\.yaml: lora_rank was 2, the sweep now gives 4"):
        prepare(load_sweep({**values, "train": {**values["train"], "lora_rank": 4}}))
    prepare(load_sweep(values))


def test_runs_not_started_and_the_base_ignore_what_does_not_concern_them(values, tmp_path):
    sweep = load_sweep(values)
    prepare(sweep)  # job.json written, nothing run: a changed setting simply rewrites it
    (tmp_path / "out" / SWEEP_FILE).unlink()
    prepare(load_sweep({**values, "train": {**values["train"], "lora_rank": 4}}))
    base = tmp_path / "out" / "runs" / "base"
    (base / RECORD).write_text(json.dumps({"method": "base", "learning_rate": None, "seed": None, "status": "done"}))
    (tmp_path / "out" / SWEEP_FILE).unlink()
    prepare(load_sweep({**values, "train": {**values["train"], "lora_rank": 8}}))  # the base does not train
    (tmp_path / "test.json").write_text(json.dumps(json.loads((tmp_path / "test.json").read_text())[::-1]))
    (tmp_path / "out" / SWEEP_FILE).unlink()
    with pytest.raises(ConfigError, match=r"base/job\.json: the test data \(eval_data\)"):
        prepare(load_sweep(values))


@pytest.mark.slow
def test_a_real_sweep_accepts_a_new_seed_and_refuses_a_changed_test_set(values, tmp_path):
    """The runs' real job.json and train_config.yaml (written by the worker's training) agree with an
    unchanged sweep: adding a seed runs it; a test set edited in place is then refused."""
    from milora.comparison import compare

    values = {**values, "forgetting": False, "analyze": False, "eval_options": {"scorer": "loglik"},
              "train": {**values["train"], "max_steps": 1, "per_device_train_batch_size": 2, "cutoff_len": 128,
                        "save_steps": 100}}
    compare(values, progress=False)
    summary = compare({**values, "seeds": [0, 1]}, progress=False)
    assert sorted(run["seed"] for run in summary["runs"]) == [0, 1]
    assert all(run["status"] == "done" for run in summary["runs"])
    assert (tmp_path / "out" / "runs" / "lora-lr0.01-seed0" / "train" / "train_config.yaml").is_file()
    records = json.loads((tmp_path / "test.json").read_text())
    (tmp_path / "test.json").write_text(json.dumps(records[::-1]))
    with pytest.raises(ConfigError, match=r"the test data \(eval_data\) is not the same file"):
        compare({**values, "seeds": [0, 1, 2]}, progress=False)
