"""The evaluation options are declared once (milora/eval/options.py) and every consumer reads that
declaration: the registry's checks and defaults, the `milora eval` flags, the docs table; and the
typed values that replaced dicts read by key (sweep jobs, per-weight init statistics)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from milora.errors import ConfigError, DataError
from milora.eval.options import OPTIONS, TASK_OPTIONS, tasks_taking

# the defaults the task modules hard-coded before the catalogue (behaviour kept)
EARLIER_DEFAULTS = {
    ("gsm8k", "max_new_tokens"): 512, ("math", "max_new_tokens"): 512, ("commonsense", "max_new_tokens"): 32,
    ("ifeval", "max_new_tokens"): 1280, ("alpaca-eval", "max_new_tokens"): 2048, ("humaneval", "max_new_tokens"): 512,
    ("vqa", "max_new_tokens"): 16, ("pope", "max_new_tokens"): 8, ("mcq-image", "max_new_tokens"): 8,
    ("commonsense", "scorer"): "generate", ("forgetting", "max_length"): 1024, ("ifeval", "missing_punkt"): "error",
    ("humaneval", "allow_code_execution"): False, ("humaneval", "samples"): 1, ("humaneval", "seed"): 0,
    ("humaneval", "timeout"): 10.0, ("humaneval", "temperature"): None, ("humaneval", "top_p"): None,
    ("humaneval", "pass_k"): None,
}


def test_the_registry_and_the_catalogue_name_the_same_tasks_and_options():
    from milora.eval import all_tasks

    tasks = all_tasks()
    assert set(tasks) == set(TASK_OPTIONS)  # registration order depends on what was imported first
    for name, task in tasks.items():
        assert list(task.options) == list(TASK_OPTIONS[name]) and all(task.options[o] is OPTIONS[o]
                                                                      for o in task.options)
    assert all(tasks_taking(name) for name in OPTIONS), "an option no task takes"


def test_check_options_fills_each_tasks_default():
    from milora.eval import find_task

    for (task, name), default in EARLIER_DEFAULTS.items():
        spec, _ = find_task(task if not task.endswith(":") else task + "x")
        assert spec.check_options({})[name] == default, (task, name)
        assert spec.check_options({name: None})[name] == default  # None is "not given"
    gsm8k, _ = find_task("gsm8k")
    assert gsm8k.check_options({"max_new_tokens": 7})["max_new_tokens"] == 7


def test_a_generation_option_with_predictions_is_refused_and_others_pass():
    from milora.eval import find_task

    humaneval, _ = find_task("humaneval")
    with pytest.raises(DataError, match="scores the predictions file as it is: samples, seed only apply"):
        humaneval.check_options({"predictions": "p.jsonl", "seed": 3, "samples": 2})
    assert humaneval.check_options({"predictions": "p.jsonl", "timeout": 5.0})["timeout"] == 5.0
    for task in tasks_taking("predictions"):
        with pytest.raises(DataError, match="max_new_tokens only apply"):
            find_task(task)[0].check_options({"predictions": "p.jsonl", "max_new_tokens": 4})


def test_every_flag_reaches_its_option_and_the_help_names_tasks_and_defaults(capsys):
    from milora.cli import build_parser
    from milora.cli.eval import _task_options

    values = {int: "3", float: "2.5", str: "x", None: "x"}
    for option in OPTIONS.values():
        if not option.cli:
            # loaded objects: the CLI's --base-model loads the model; a stored reference is a sweep's
            assert option.name in ("base_model", "base_reference")
            continue
        argv = ["eval", "--task", tasks_taking(option.name)[0], option.flag]
        if option.kind is not bool:
            argv.append(option.choices[0] if option.choices else "1,10" if option.kind == (tuple, list)
                        else values[option.kind])
        chosen = _task_options(build_parser().parse_args(argv))
        expected = (True if option.kind is bool else option.choices[0] if option.choices else (1, 10)
                    if option.kind == (tuple, list) else (option.kind or str)(values[option.kind]))
        assert chosen == {option.name: expected}, option.name
    assert _task_options(build_parser().parse_args(["eval", "--task", "gsm8k"])) == {}
    with pytest.raises(SystemExit):
        build_parser().parse_args(["eval", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "humaneval: completions per problem (default 1)" in text
    assert "(default 512 for gsm8k, math, humaneval; 32 for commonsense; 1280 for ifeval" in text


def test_the_docs_table_lists_every_option():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("hooks", Path(__file__).parents[1] / "docs" / "hooks.py")
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    page = hooks.on_page_markdown("<!-- eval-options -->")
    rows = page.splitlines()[2:]
    assert [row.split("|")[1].strip(" `") for row in rows] == list(OPTIONS)
    assert "| `max_length` | `--max-length` | `forgetting` | 1024 |" in page


OLD_JOB = {  # a job.json as milora wrote it before eval_server and batch axes existed
    "name": "milora-lr0.001-seed0", "run_dir": "/runs/milora-lr0.001-seed0",
    "identity": {"method": "milora", "learning_rate": 0.001, "seed": 0}, "train": {"init": "milora"},
    "eval_task": "gsm8k", "eval_data": "/d/test.json", "eval_options": {}, "validation_data": "/d/v.jsonl",
    "test_limit": None, "eval_batch_size": 16, "forgetting": True, "forgetting_data": None,
    "forgetting_windows": 16, "forgetting_length": 256, "retention_task": None, "retention_data": None,
    "retention_options": {}, "retention_limit": None,
}


def test_a_job_reads_old_job_files_and_writes_the_same_format(tmp_path):
    from milora.comparison.job import Job, read_job

    job = Job.from_json(OLD_JOB)
    assert job.eval_server is None and job.identity.batch_size is None and not job.is_base
    # today's keys, identity unchanged
    assert job.to_json() == {**OLD_JOB, "eval_server": None, "score_test": True, "data_sha256": {}}
    written = Job.from_json({**OLD_JOB, "run_dir": str(tmp_path)}).write()
    assert read_job(written) == Job.from_json({**OLD_JOB, "run_dir": str(tmp_path)})
    batch = Job.from_json({**OLD_JOB, "identity": {**OLD_JOB["identity"], "batch_size": 4}})
    assert batch.identity.as_record() == {"method": "milora", "learning_rate": 0.001, "seed": 0, "batch_size": 4}


@pytest.mark.parametrize("change, drop, message", [
    ({"future_key": 1}, (), "unknown keys future_key"),
    ({"identity": {"method": "lora", "rank": 2}}, (), "unknown keys identity.rank"),
    ({"identity": {}}, (), "missing keys identity.method"),
    ({}, ("name", "train"), "missing keys name, train"),
])
def test_a_job_file_of_another_version_is_a_clear_error(tmp_path, change, drop, message):
    from milora.comparison.job import read_job

    path = tmp_path / "job.json"
    path.write_text(json.dumps({key: value for key, value in {**OLD_JOB, **change}.items() if key not in drop}))
    with pytest.raises(ConfigError, match=f"{message}.*run `milora compare` again"):
        read_job(path)


def test_spectrum_stats_cross_ranks_as_a_tensor_and_report_as_before():
    from milora.init.record import SolverRun, SpectrumStats, report_entry

    stats = SpectrumStats(3.5, 0.25, math.nan, 2)
    back = SpectrumStats.from_tensor(stats.as_tensor())
    assert (back.sigma_max, back.sigma_min, back.zero_components) == (3.5, 0.25, 2) and math.isnan(back.boundary_gap)
    entry = report_entry("q", torch.zeros(6, 4), 2, 0.5, SolverRun("eigh (lanczos failed)", "singular"), back, 1e-7)
    assert entry == {"module": "q", "shape": [6, 4], "rank": 2, "scaling": 0.5, "solver": "eigh (lanczos failed)",
                     "solver_reason": "singular", "sigma_max_selected": 3.5, "sigma_min_selected": 0.25,
                     "boundary_gap": None, "zero_components": 2, "reconstruction_error": 1e-7}
    assert "solver_reason" not in report_entry("q", torch.zeros(6, 4), 2, 0.5, SolverRun("svd"), back, 0.0)


def test_option_names_are_unique():
    """Two declarations of one name would silently keep the last (one task's option overriding another's)."""
    from milora.eval import options

    names = [option.name for option in options._DECLARED]
    assert len(names) == len(set(names)) == len(options.OPTIONS), sorted(n for n in names if names.count(n) > 1)
