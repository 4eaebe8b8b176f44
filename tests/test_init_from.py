"""`init_from`: a run starting from a saved start (no SVD) ends where a run that decomposed again ends."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from milora.cli import main
from milora.errors import AdapterError, ConfigError
from milora.training.run import train

from conftest import run_config


@pytest.fixture(scope="module")
def start(tiny, tmp_path_factory):
    """The streaming `milora init` of the tiny model with the runs' rank (4) and alpha (4)."""
    path = tmp_path_factory.mktemp("start") / "start"
    assert main(["init", tiny["model"], "--output", str(path), "--rank", "4"]) == 0
    return path


def adapter(directory) -> dict[str, torch.Tensor]:
    return load_file(directory / "adapter_model.safetensors")


def test_a_saved_start_trains_like_a_fresh_init(tiny, tmp_path, start):
    """Same final adapter bit for bit, from milora init's start and from an earlier run's (trained) adapter,
    whose trained factors are not taken: only its initial ones."""
    common = {"lora_dropout": 0.1, "max_steps": 3}
    fresh = tmp_path / "fresh"
    train(run_config(tiny, fresh, **common))
    train(run_config(tiny, tmp_path / "from-init", init_from=str(start), **common))
    train(run_config(tiny, tmp_path / "from-run", init_from=str(fresh), **common))
    expected = adapter(fresh)
    for name in ("from-init", "from-run"):
        found = adapter(tmp_path / name)
        assert found.keys() == expected.keys() and all(torch.equal(found[k], expected[k]) for k in found), name
        metrics = json.loads((tmp_path / name / "metrics.json").read_text())
        assert metrics["init"]["init_from"] in (str(start), str(fresh))
    assert not all(torch.equal(adapter(start)[k], expected[k]) for k in expected)  # training moved it


def test_a_start_of_other_settings_is_refused(tiny, tmp_path, start):
    for extra, message in (({"lora_rank": 2}, r"r 2 \(the start has 4\)"),
                           ({"init": "pissa"}, r"init 'pissa' \(the start has 'milora'\)"),
                           ({"lora_alpha": 8}, r"lora_alpha 8.0 \(the start has 4.0\)"),
                           ({"lora_target": "q_proj,v_proj"}, r"target_modules \['q_proj', 'v_proj'\]"),
                           ({"init": "lora"}, "init 'lora' leaves the base unchanged")):
        with pytest.raises(ConfigError, match=message) as caught:
            train(run_config(tiny, tmp_path / "out", init_from=str(start), **extra))
        assert isinstance(caught.value.__cause__, AdapterError)
    shutil.copytree(tiny["model"], tmp_path / "other")  # the tokenizer too
    other = AutoModelForCausalLM.from_pretrained(tiny["model"])
    with torch.no_grad():
        other.model.layers[0].self_attn.q_proj.weight.mul_(1.5)
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(ConfigError, match="initialised from different base weights"):
        train(run_config(tiny, tmp_path / "out", init_from=str(start), model=str(tmp_path / "other")))
    assert not (tmp_path / "out").exists()
