"""The streaming `milora init` on MoE checkpoints (`milora.init.checkpoint_experts`): each expert read alone from the
checkpoint (its own tensors, or its slice of a stored stack), the in-memory init's adapter bit for bit, the residual
shards in the checkpoint's layout, and incomplete checkpoints refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_moe import expert_config, moe_tokens, tiny_moe  # noqa: F401  (moe_tokens is a fixture)
from test_streaming import assert_same_adapter, in_memory, streamed
from transformers import AutoModelForCausalLM

import milora
from milora.init.checkpoint import open_checkpoint
from milora.init.checkpoint_experts import expert_slices
from milora.init.experts import target_parameters
from milora.models import meta_model

from conftest import cli_error

# how each family's checkpoint stores expert 1 of layer 0's gate_up_proj (save_pretrained reverts transformers' fusing)
STORED = {
    "qwen3_moe": ("model.layers.0.mlp.experts.1.gate_proj.weight", "model.layers.0.mlp.experts.1.up_proj.weight"),
    "mixtral": ("model.layers.0.block_sparse_moe.experts.1.w1.weight",
                "model.layers.0.block_sparse_moe.experts.1.w3.weight"),
    "gpt_oss": ("model.layers.0.mlp.experts.gate_up_proj",),
    "qwen2_moe": ("model.layers.0.mlp.experts.1.gate_proj.weight", "model.layers.0.mlp.experts.1.up_proj.weight"),
}


def save_moe(family: str, directory: Path) -> Path:
    """A tiny random MoE of ``family`` saved in bfloat16, in shards (an expert's parts may lie in two shards)."""
    tiny_moe(family).to(torch.bfloat16).save_pretrained(directory, max_shard_size="20KB")
    return directory


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "gpt_oss", "qwen2_moe"])
def test_streamed_experts_match_the_in_memory_init(family, tmp_path):
    """The experts as the checkpoint stores them: the in-memory init's factors, fingerprint and report bit for bit,
    with the attention targets among them (the seeds follow the same order), and the adapter loads on the base."""
    model_dir = save_moe(family, tmp_path / "model")
    meta = meta_model(model_dir)
    stacks = target_parameters(meta, expert_config(meta), check_values=False)
    slices = expert_slices(meta, open_checkpoint(model_dir), stacks)
    assert slices["model.layers.0.mlp.experts.gate_up_proj"][1].keys == STORED[family]
    for init in ("milora", "random"):
        options = {"init": init, "seed": 2, "solver": "svd" if init == "random" else "auto"}
        assert_same_adapter(in_memory(model_dir, expert_config(meta), tmp_path / f"memory-{init}", **options),
                            streamed(model_dir, expert_config(meta), tmp_path / f"stream-{init}", **options))
    report = json.loads((tmp_path / "stream-milora" / "milora_config.json").read_text())["report"]
    assert sum("expert" in entry for entry in report) == 2 * 2 * 4  # 2 layers x 2 stacks x 4 experts
    milora.load_model(AutoModelForCausalLM.from_pretrained(model_dir), tmp_path / "stream-milora")  # fingerprint


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_residual_experts_in_the_checkpoint_layout(family, tmp_path, moe_tokens):  # noqa: F811
    """--save-residual rewrites each expert's own tensors (Qwen3-MoE) or the stored stack (gpt-oss) in the checkpoint's
    names and dtype; residual model + rank-r adapter = the original model to the residual's bfloat16 rounding."""
    from milora.cli import main

    model_dir = save_moe(family, tmp_path / "model")
    assert main(["init", str(model_dir), "--output", str(tmp_path / "out"), "--rank", "3", "--target-modules",
                 "q_proj,gate_up_proj,down_proj", "--save-residual"]) == 0
    residual_dir = tmp_path / "out" / "residual_model"
    index = json.loads((residual_dir / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == json.loads((model_dir / "model.safetensors.index.json").read_text())["weight_map"]
    for shard in sorted(set(index["weight_map"].values())):
        found, source = load_file(residual_dir / shard), load_file(model_dir / shard)
        for key in found:
            assert found[key].dtype == source[key].dtype == torch.bfloat16
            parts = ("gate_up_proj", "down_proj", "gate_proj.weight", "up_proj.weight", "down_proj.weight")
            targeted = key.endswith("q_proj.weight") or (".experts." in key and key.endswith(parts))
            assert torch.equal(found[key], source[key]) != targeted, key
    residual = AutoModelForCausalLM.from_pretrained(residual_dir, dtype=torch.float32)
    paper = PeftModel.from_pretrained(residual, tmp_path / "out" / "residual_adapter").eval()
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()(moe_tokens).logits
        found = paper(moe_tokens).logits
    assert float((found - expected).norm() / expected.norm()) < 2e-2  # bfloat16 residual


def test_incomplete_or_mismatched_expert_checkpoints_are_refused(tmp_path):
    model_dir = save_moe("qwen3_moe", tmp_path / "model")
    options = ["--output", str(tmp_path / "out"), "--rank", "2", "--target-modules", "gate_up_proj"]
    index_path = model_dir / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    key = "model.layers.1.mlp.experts.2.up_proj.weight"
    shard = model_dir / index["weight_map"][key]
    with safe_open(shard, framework="pt") as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 (safe_open has no iter)
    save_file({name: tensor for name, tensor in tensors.items() if name != key}, shard, metadata={"format": "pt"})
    index["weight_map"].pop(key)
    index_path.write_text(json.dumps(index))
    message = cli_error(["init", str(model_dir), *options])
    assert "no tensor for expert 2 of model.layers.1.mlp.experts.gate_up_proj" in message
    save_file({**tensors, key: tensors[key][:-1]}, shard, metadata={"format": "pt"})  # one row short
    index["weight_map"][key] = shard.name
    index_path.write_text(json.dumps(index))
    message = cli_error(["init", str(model_dir), *options])
    assert "expert 2 of model.layers.1.mlp.experts.gate_up_proj is" in message and "do not belong" in message
    assert not (tmp_path / "out").exists()
