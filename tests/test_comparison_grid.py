"""`milora compare` with learning_rates: auto, a batch-size axis, PEFT's starts, the rate ratios to LoRA,
grid-edge warnings and the Pareto plot; the baselines recipe; a tiny sweep of two PEFT starts end to end."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
from test_comparison import record, setup, sweep_values  # noqa: F401  (setup is a fixture)

from milora.comparison.grid import at_grid_edge, auto_grid, rate_ratio
from milora.comparison.report import markdown, pareto_front
from milora.comparison.runner import job_for
from milora.comparison.summary import select, summarise
from milora.comparison.sweep import load_sweep
from milora.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_auto_grid_follows_the_published_ratios():
    assert auto_grid("lora", 3e-4, 3, 3) == [1e-4, 3e-4, 9e-4]
    assert auto_grid("milora", 3.2e-4, 3, 3) == [3.33e-5, 1e-4, 3e-4]  # 3.2x lower
    assert auto_grid("pissa", 1e-3, 3, 1) == [1e-4] and auto_grid("olora", 1.8e-3, 2, 1) == [1e-4]
    assert rate_ratio("lora-ga") == 18 and rate_ratio("pissa-fast") == rate_ratio("pissa") == 10
    assert rate_ratio("dora") == rate_ratio("corda-kpm") == 1
    five = auto_grid("lora", 1e-3, 10, 5)
    assert five[0] == pytest.approx(1e-4) and five[-1] == pytest.approx(1e-2) and five[2] == pytest.approx(1e-3)
    assert all(math.isclose(b / a, math.sqrt(10), rel_tol=1e-2) for a, b in itertools.pairwise(five))
    assert at_grid_edge(1e-4, five) == "lowest" and at_grid_edge(1e-2, five) == "highest"
    assert at_grid_edge(1e-3, five) is None and at_grid_edge(1e-3, [1e-3]) is None


def test_auto_sweep_and_batch_axis(setup, tmp_path):  # noqa: F811
    values = sweep_values(setup, tmp_path / "out", methods=["lora", "milora", "dora"], learning_rates="auto",
                          lora_rate="1e-2", rate_points=2, rate_span=2.0, seeds=[0], batch_sizes=[2, 4])
    values["train"] = {k: v for k, v in values["train"].items() if k != "per_device_train_batch_size"}
    sweep = load_sweep(values)
    assert sweep.config.rates_for("milora") == auto_grid("milora", 1e-2, 2.0, 2)
    assert len(sweep.runs) == 3 * 2 * 2 and sweep.runs[0].name == "lora-lr0.005-bs2-seed0"
    job = job_for(sweep, sweep.runs[1])
    assert job.train["per_device_train_batch_size"] == 4 and job.identity.batch_size == 4
    assert not (tmp_path / "out").exists()
    for change, message in [({"lora_rate": None}, "learning_rates: auto needs lora_rate"),
                            ({"learning_rates": [1e-3]}, "lora_rate is only for learning_rates: auto"),
                            ({"batch_sizes": [2, 2]}, "repeat a size"),
                            ({"train": {**values["train"], "per_device_train_batch_size": 4}}, "set by the sweep")]:
        with pytest.raises(ConfigError, match=message):
            load_sweep({**values, **change})


def test_chosen_rate_ratio_edge_warning_and_batch_choice():
    records = [record("lora", rate, s, val, 0.5) for rate, val in ((1e-3, 0.6), (3e-3, 0.5)) for s in (0, 1)]
    records += [record("milora", rate, s, val, 0.5) for rate, val in ((1e-4, 0.7), (3e-4, 0.5)) for s in (0, 1)]
    records += [dict(record("dora", 1e-3, s, val, 0.5), batch_size=batch)
                for batch, val in ((2, 0.4), (4, 0.6)) for s in (0, 1)]
    summary = summarise(records, ["lora", "milora", "dora"], "lora")
    lora, milora, dora = summary["methods"]
    assert milora["rate_vs_lora"] == pytest.approx(0.1) and lora["rate_vs_lora"] == 1
    assert milora["grid_edge"] == "lowest" and lora["grid_edge"] == "lowest" and dora["grid_edge"] is None
    assert milora["published_rate_ratio"] == 3.2
    assert any("milora's chosen rate 0.0001 is the lowest of its grid" in s for s in summary["statistics"])
    setting, _ = select(records, "dora")
    assert (setting.learning_rate, setting.batch_size) == (1e-3, 4) and dora["selected_batch_size"] == 4
    summary["setup"] = {"model": "m", "train_records": 1, "steps": "3 steps", "lora_rank": 2, "eval_task": "t",
                        "test_items": 40, "validation_items": 10, "seeds": [0, 1], "wall_minutes": 1.0,
                        "base_test_accuracy": 0.1}
    report = markdown(summary)
    assert "0.0001 (lowest of grid!)" in report and "1/10 (1/3.2)" in report and "0.001, batch 4" in report


def test_pareto_front():
    points = {"a": (0.1, 0.5), "b": (0.2, 0.6), "c": (0.3, 0.55), "d": (0.1, 0.4), "e": (0.05, 0.3)}
    assert pareto_front(points) == ["e", "a", "b"]  # c is beaten by b; d by a


def test_the_baselines_recipe_loads(monkeypatch, tmp_path):
    monkeypatch.chdir(REPO)
    sweep = load_sweep(REPO / "recipes" / "compare_baselines_demo.yaml", [f"output_dir={tmp_path / 'out'}"])
    assert len(sweep.config.methods) == 8 and len(sweep.runs) == 72
    assert sweep.config.rates_for("milora") == auto_grid("milora", 1e-3, 3, 3)


@pytest.mark.slow
def test_tiny_sweep_of_peft_starts_end_to_end(setup, tmp_path):  # noqa: F811
    """2 PEFT starts (one of them from data) x 1 rate x 1 seed, as `milora compare` runs the full sweep."""
    from milora.comparison import compare

    values = sweep_values(setup, tmp_path / "out", methods=["dora", "corda-kpm"], baseline="dora",
                          learning_rates="auto", lora_rate=0.01, rate_points=1, seeds=[0], analyze=True)
    values["train"]["calibration_batches"] = 2
    summary = compare(values, progress=False)
    assert [m["status"] for m in summary["methods"]] == ["done", "done"]
    assert {r["learning_rate"] for r in summary["runs"]} == {0.01}
    assert all(r["forgetting_kl"] is not None for r in summary["runs"]) and len(summary["analysis"]) == 2
    assert (tmp_path / "out" / "accuracy_vs_forgetting.png").is_file()
