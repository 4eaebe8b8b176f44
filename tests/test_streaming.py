"""Streaming `milora init`: the in-memory init's adapter bit for bit, resumable after SIGKILL, bad input refused."""

from __future__ import annotations

import json
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import milora
from milora.adapter.save import save_streamed_start
from milora.cli import main
from milora.errors import AdapterNotFoundError, ModelError
from milora.init.streaming import stream_init, work_directory
from milora.models import meta_model

from conftest import LLAMA_TARGETS, cli_error, make_llava_dir, tiny_gpt2, tiny_llama

ROOT = Path(__file__).resolve().parents[1]


def in_memory(model_dir: Path, config: LoraConfig, output: Path, loader=AutoModelForCausalLM, **options) -> Path:
    model = loader.from_pretrained(model_dir, dtype=torch.float32)
    milora.save_adapter(milora.get_model(model, config, progress=False, **options), output)
    return output


def streamed(model_dir: Path, config: LoraConfig, output: Path, save_residual: bool = False, **options) -> Path:
    result = stream_init(model_dir, meta_model(model_dir), config, output, save_residual=save_residual,
                         progress=False, **options)
    return save_streamed_start(result, output)


def assert_same_adapter(first: Path, second: Path) -> None:
    """Every saved tensor equal bit for bit, the same fingerprint, targets and report (solvers, gaps)."""
    a, b = load_file(first / "adapter_model.safetensors"), load_file(second / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
    meta_a, meta_b = (json.loads((path / "milora_config.json").read_text()) for path in (first, second))
    for key in ("fingerprint", "weights_sha256", "target_modules", "r", "lora_alpha", "rank_pattern", "alpha_pattern"):
        assert meta_a[key] == meta_b[key], key
    for entry_a, entry_b in zip(meta_a["report"], meta_b["report"], strict=True):
        for key in ("module", "shape", "rank", "scaling", "solver", "sigma_min_selected", "boundary_gap"):
            assert entry_a[key] == entry_b[key], key
    assert json.loads((first / "adapter_config.json").read_text())["r"] == \
        json.loads((second / "adapter_config.json").read_text())["r"]


@pytest.mark.parametrize("init", ["milora", "pissa", "random"])
def test_bfloat16_sharded_llama_with_patterns_matches_in_memory(tmp_path, init):
    """A bfloat16 checkpoint in 4 shards, streamed in bfloat16, against the default in-memory init in float32:
    same factors (the weights cast exactly), same fingerprint; rank and alpha patterns, a regex target."""
    tiny_llama(dtype=torch.bfloat16).save_pretrained(tmp_path / "model", max_shard_size="40KB")
    assert (tmp_path / "model" / "model.safetensors.index.json").exists()
    config = LoraConfig(r=4, lora_alpha=8, target_modules=r".*\.(q_proj|v_proj|down_proj)",
                        rank_pattern={"down_proj": 6}, alpha_pattern={"layers.1.self_attn.v_proj": 3})
    options = {"init": init, "solver": "svd" if init == "random" else "auto", "seed": 3}
    assert_same_adapter(in_memory(tmp_path / "model", config, tmp_path / "memory", **options),
                        streamed(tmp_path / "model", config, tmp_path / "stream", **options))
    assert not work_directory(tmp_path / "stream").exists()
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    milora.load_model(base, tmp_path / "stream")  # the base fingerprint check passes


def test_gpt2_conv1d_and_tied_weights(tmp_path, tokens):
    """GPT-2 stores Conv1D weights in x out (fan_in_fan_out); its lm_head is tied to wte and absent from the file."""
    tiny_gpt2().save_pretrained(tmp_path / "gpt2")
    config = LoraConfig(r=4, lora_alpha=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
    assert_same_adapter(in_memory(tmp_path / "gpt2", config, tmp_path / "memory"),
                        streamed(tmp_path / "gpt2", config, tmp_path / "stream", save_residual=True))
    residual = AutoModelForCausalLM.from_pretrained(tmp_path / "stream" / "residual_model")
    paper = PeftModel.from_pretrained(residual, tmp_path / "stream" / "residual_adapter").eval()
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(tmp_path / "gpt2").eval()(tokens).logits
        assert torch.allclose(paper(tokens).logits, expected, rtol=1e-4, atol=1e-5)


def test_vision_language_scope_matches_in_memory(tmp_path):
    """LLaVA: the paper's targets in the language model only (not the CLIP tower's q/k/v), the projector saved."""
    from transformers import AutoModelForImageTextToText

    from milora.init import language_model_targets

    model_dir = make_llava_dir(tmp_path / "llava")
    config = LoraConfig(r=2, lora_alpha=4, target_modules=language_model_targets(meta_model(model_dir), LLAMA_TARGETS),
                        modules_to_save=["multi_modal_projector"])
    stream = streamed(model_dir, config, tmp_path / "stream")
    assert_same_adapter(in_memory(model_dir, config, tmp_path / "memory", loader=AutoModelForImageTextToText), stream)
    report = json.loads((stream / "milora_config.json").read_text())["report"]
    assert report and all("language_model" in entry["module"] for entry in report)


def test_residual_shards_in_the_checkpoint_dtype(tmp_path, tokens):
    """--save-residual: bfloat16 shards with the checkpoint's index; residual + rank-r adapter = the original model
    (to bfloat16 rounding of the residual); every non-target tensor copied unchanged."""
    tiny_llama(dtype=torch.bfloat16).save_pretrained(tmp_path / "model", max_shard_size="40KB")
    assert main(["init", str(tmp_path / "model"), "--output", str(tmp_path / "out"), "--rank", "4",
                 "--save-residual"]) == 0
    residual_dir = tmp_path / "out" / "residual_model"
    index = json.loads((residual_dir / "model.safetensors.index.json").read_text())
    original = json.loads((tmp_path / "model" / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == original["weight_map"]
    for shard in sorted(set(index["weight_map"].values())):
        found, source = load_file(residual_dir / shard), load_file(tmp_path / "model" / shard)
        assert found.keys() == source.keys()
        for key in found:
            assert found[key].dtype == torch.bfloat16
            targeted = any(f".{name}." in key for name in LLAMA_TARGETS)
            assert torch.equal(found[key], source[key]) != targeted, key
    paper = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(residual_dir, dtype=torch.float32),
                                      tmp_path / "out" / "residual_adapter").eval()
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.float32).eval()(tokens).logits
        found = paper(tokens).logits
    assert float((found - expected).norm() / expected.norm()) < 2e-2  # bfloat16 residual


KILLER = """
import os, signal, sys
sys.path.insert(0, {tests!r})
import milora.init.streaming as streaming
from milora.cli import main
write, count = streaming._write_start, [0]
def write_then_die(*args):
    write(*args)
    count[0] += 1
    if count[0] == 3:
        os.kill(os.getpid(), signal.SIGKILL)
streaming._write_start = write_then_die
main(sys.argv[1:])
"""


def test_killed_run_resumes_from_finished_weights(tmp_path):
    """SIGKILL after 3 of 10 weights: nothing loads as an adapter; the same command continues from the 3 (not
    recomputed) and gives the uninterrupted run's adapter bit for bit; a changed command is refused, naming it."""
    tiny_llama().save_pretrained(tmp_path / "model")
    command = ["init", str(tmp_path / "model"), "--output", str(tmp_path / "out"), "--rank", "4", "--seed", "1"]
    script = KILLER.format(tests=str(ROOT / "tests"))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    killed = subprocess.run([sys.executable, "-c", script, *command], env=env, capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr
    work = work_directory(tmp_path / "out")
    assert not (tmp_path / "out").exists() and len(list((work / "weights").glob("*.safetensors"))) == 3
    with pytest.raises(AdapterNotFoundError):
        milora.load_model(tiny_llama(), work)
    message = cli_error([*command[:-1], "2"])
    assert re.search(r"different command \(seed changed\)", message) and str(work) in message
    assert main(command) == 0
    metadata = json.loads((tmp_path / "out" / "milora_config.json").read_text())
    assert metadata["measured"]["resumed_weights"] == 3 and not work.exists()
    assert main([*command[:3], str(tmp_path / "fresh"), *command[4:]]) == 0
    assert_same_adapter(tmp_path / "out", tmp_path / "fresh")


class Exploit:
    def __reduce__(self):
        return (os.system, ("touch unpickled-marker",))


def test_bad_checkpoints_are_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tiny_llama().save_pretrained(tmp_path / "model", max_shard_size="40KB")
    output = ["--output", str(tmp_path / "out"), "--rank", "4"]
    # a pickle-only checkpoint: refused with the fix, never unpickled
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((tmp_path / "model" / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(pickle.dumps(Exploit()))
    message = cli_error(["init", str(pickled), *output])
    assert "holds only pickled weights (pytorch_model.bin)" in message and "save_pretrained" in message
    assert not (tmp_path / "unpickled-marker").exists()
    # an index naming a missing shard
    shards = sorted((tmp_path / "model").glob("model-*.safetensors"))
    shards[1].rename(tmp_path / shards[1].name)
    assert f"names shard(s) ['{shards[1].name}'] that are not in" in cli_error(["init", str(tmp_path / "model"),
                                                                                 *output])
    (tmp_path / shards[1].name).rename(shards[1])
    # a target with no tensor in the checkpoint
    index = json.loads((tmp_path / "model" / "model.safetensors.index.json").read_text())
    key = "model.layers.1.mlp.up_proj.weight"
    shard = tmp_path / "model" / index["weight_map"].pop(key)
    save_file({k: v for k, v in load_file(shard).items() if k != key}, shard, metadata={"format": "pt"})
    (tmp_path / "model" / "model.safetensors.index.json").write_text(json.dumps(index))
    assert f"has no tensor {key}" in cli_error(["init", str(tmp_path / "model"), *output])
    # the output inside the checkpoint
    assert "is inside the checkpoint" in cli_error(["init", str(tmp_path / "model"), "--output",
                                                    str(tmp_path / "model" / "adapter"), "--rank", "4"])
    # a quantised checkpoint (declared by its config)
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (tmp_path / "model" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match=r"quantised checkpoint \(bitsandbytes\)"):
        stream_init(tmp_path / "model", meta_model(pickled), LoraConfig(r=4, target_modules=["q_proj"]),
                    tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and not work_directory(tmp_path / "out").exists()
