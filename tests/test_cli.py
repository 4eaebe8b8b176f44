"""`milora init` and `milora merge` on a tiny model directory."""

from __future__ import annotations

import json
import re

import pytest
import torch
from transformers import AutoModelForCausalLM

import milora
from milora.cli import main

from conftest import cli_error, tiny_gpt2, tiny_llama


@pytest.fixture
def model_dir(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "model")
    return tmp_path / "model"


def test_init_writes_adapter_and_report(model_dir, tmp_path, capsys, tokens):
    assert main(["init", str(model_dir), "--output", str(tmp_path / "out"), "--rank", "8", "--alpha", "16",
                 "--workers", "2", "--in-memory"]) == 0
    printed = capsys.readouterr().out
    summary = json.loads(printed[: printed.rindex("}") + 1])
    assert summary["weights"] == 10 and summary["output_relative_error"] < 1e-5 and summary["workers"] == 2
    # the serve line: rank 8 is saved as rank 16, served under the directory's name
    assert f"--enable-lora --lora-modules out={(tmp_path / 'out').resolve()} --max-lora-rank 16 --port 8000" in printed
    metadata = json.loads((tmp_path / "out" / "milora_config.json").read_text())
    assert metadata["init"] == "milora" and metadata["r"] == 8 and metadata["lora_alpha"] == 16
    assert metadata["measured"]["output_relative_error"] < 1e-5
    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        expected = base(tokens).logits
        assert torch.allclose(milora.load_model(base, tmp_path / "out")(tokens).logits, expected, rtol=1e-4, atol=1e-5)


def test_init_defaults_follow_the_paper(model_dir, tmp_path):
    # tiny model: 32 x 64 k_proj
    assert re.search("Rank 64 is too large", cli_error(["init", str(model_dir), "--output", str(tmp_path / "out")]))
    assert not (tmp_path / "out").exists()


def test_init_refuses_missing_targets_and_existing_output(tmp_path, model_dir):
    tiny_gpt2().save_pretrained(tmp_path / "gpt2")
    assert re.search(r"Target module\(s\) \['down_proj', 'k_proj', 'q_proj', 'up_proj', 'v_proj'\] not found",
                     cli_error(["init", str(tmp_path / "gpt2"), "--output", str(tmp_path / "out"), "--rank", "4"]))
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    assert re.search("already exists and is not empty",
                     cli_error(["init", str(model_dir), "--output", str(tmp_path / "busy"), "--rank", "4"]))
    assert (tmp_path / "busy" / "keep.txt").read_text() == "mine"


def test_init_then_merge(model_dir, tmp_path, tokens):
    """init (paper layout too), a few optimizer steps on the reloaded adapter, then merge: the merged
    model is the trained one (float32: 1e-5), not the base (a merge that saved the base unchanged fails)."""
    assert main(["init", str(model_dir), "--output", str(tmp_path / "adapter"), "--rank", "4", "--init", "pissa",
                 "--save-residual"]) == 0
    assert (tmp_path / "adapter" / "residual_model" / "config.json").exists()
    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tuned = milora.load_model(AutoModelForCausalLM.from_pretrained(model_dir), tmp_path / "adapter", is_trainable=True)
    optimizer = torch.optim.AdamW([p for p in tuned.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        tuned(tokens, labels=tokens).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    milora.save_adapter(tuned.eval(), tmp_path / "trained")
    assert main(["merge", str(tmp_path / "trained"), "--model", str(model_dir),
                 "--output", str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        expected, original = tuned(tokens).logits.double(), base(tokens).logits.double()
        found = merged(tokens).logits.double()
    assert float((found - expected).norm() / expected.norm()) < 1e-5
    assert float((found - original).norm() / original.norm()) > 1e-3
    assert re.search("already exists", cli_error(["merge", str(tmp_path / "trained"), "--model", str(model_dir),
                                                  "--output", str(tmp_path / "merged")]))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_unusable_device_is_a_clear_error(model_dir, tmp_path):
    """Not torch's AssertionError from deep inside the first transfer, and nothing written."""
    for command in (
        ["init", str(model_dir), "--output", str(tmp_path / "out"), "--rank", "4", "--device", "cuda"],
        ["eval", "--model", str(model_dir), "--task", "gsm8k", "--device", "cuda",
         "--output", str(tmp_path / "r.json")],
        ["analyze", str(tmp_path), "--model", str(model_dir), "--device", "cuda", "--output", str(tmp_path / "a.json")],
    ):
        assert re.search("device='cuda' is not usable on this machine", cli_error(command))
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model"]


def test_debug_prints_the_traceback_with_its_cause(tmp_path, capsys, monkeypatch):
    """An error's chained cause (here the YAML parser's) reaches the user with --debug or MILORA_DEBUG=1 only."""
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("model: [unclosed\n")
    assert main(["train", str(recipe)]) == 2
    quiet = capsys.readouterr().err
    assert "is not valid YAML" in quiet and "Traceback" not in quiet
    for argv, env in ((["--debug", "train", str(recipe)], "0"), (["train", str(recipe)], "1")):
        monkeypatch.setenv("MILORA_DEBUG", env)
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "Traceback" in err and "yaml.parser.ParserError" in err
        assert "The above exception was the direct cause of the following exception" in err
        assert err.index("Traceback") < err.index("\nmilora train: error: ")
