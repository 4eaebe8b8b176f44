"""Fused MoE expert parameters as targets (`milora.init.experts`): every expert of a stack gets its own start,
exact against a float64 SVD of that expert; save, reload, the plain-PEFT export, merge, analyze, init_from and
`milora train` work; options PEFT's ParamWrapper cannot apply are refused before anything changes.

Three families transformers ships with fused experts: Qwen3-MoE and Mixtral ((E, out, in) stacks) and gpt-oss
(``is_transposed``: (E, in, out) stacks, with expert biases); Qwen2-MoE for a name that is both a Linear
(its shared expert's ``down_proj``) and an expert stack.
"""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, PeftModel
from transformers import (
    GptOssConfig,
    GptOssForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

import milora
from milora.errors import ConfigError, ModelError
from milora.init import lora_layers
from milora.init.experts import expert_count, expert_factors, select_targets, weight_stack

from conftest import RECORDS, run_config, tiny_tokenizer

FAMILIES = ("qwen3_moe", "mixtral", "gpt_oss")
EXPERT_TARGETS = ["q_proj", "gate_up_proj", "down_proj"]
RANK = 3
VOCAB = 96
SHAPE = {"vocab_size": VOCAB, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "head_dim": 8}


def tiny_moe(family: str, seed: int = 0, vocab_size: int = VOCAB, **extra) -> torch.nn.Module:
    """A tiny random MoE model of ``family``: 4 experts, 2 active, hidden 32."""
    torch.manual_seed(seed)
    shape = {**SHAPE, "vocab_size": vocab_size, **extra}
    if family == "qwen3_moe":
        config = Qwen3MoeConfig(intermediate_size=48, moe_intermediate_size=24, num_experts=4, num_experts_per_tok=2,
                                **shape)
        return Qwen3MoeForCausalLM(config).eval()
    if family == "mixtral":
        return MixtralForCausalLM(MixtralConfig(intermediate_size=24, num_local_experts=4, num_experts_per_tok=2,
                                                **shape)).eval()
    if family == "gpt_oss":
        config = GptOssConfig(intermediate_size=24, num_local_experts=4, num_experts_per_tok=2, sliding_window=8,
                              layer_types=["sliding_attention", "full_attention"], **shape)
        return GptOssForCausalLM(config).eval()
    config = Qwen2MoeConfig(intermediate_size=24, moe_intermediate_size=16, shared_expert_intermediate_size=24,
                            num_experts=4, num_experts_per_tok=2, **shape)
    return Qwen2MoeForCausalLM(config).eval()


def expert_config(model, names=EXPERT_TARGETS, **extra) -> LoraConfig:
    targets = select_targets(model, names)
    options = {"r": RANK, "lora_alpha": 2 * RANK, "lora_dropout": 0.0, **extra}
    return LoraConfig(target_modules=targets.modules, target_parameters=targets.parameters, **options)


def logits(model, tokens) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits.double()


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture
def moe_tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(5))


def original_stacks(model) -> dict[str, torch.Tensor]:
    """Each target weight of ``model`` as a float64 (E, out, in) stack (a Linear: E = 1), by LoRA-layer name, read
    from the wrapped model's layers BEFORE any init (call on a copy wrapped with lora init)."""
    return {name: weight_stack(layer).detach().double().clone() for name, layer in lora_layers(model).items()}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("init", ["milora", "pissa"])
def test_each_expert_starts_from_its_own_triplets(family, init, moe_tokens):
    """Per expert: s B_e A_e equals the r smallest (milora) / largest (pissa) singular triplets of W_e from a float64
    SVD, and W_res_e + s B_e A_e equals W_e, both within 1e-6 relative (the factors and W_res are rounded to float32,
    6e-8 per entry); the model's output at the start is the base model's within 1e-5 relative."""
    reference = milora.get_model(tiny_moe(family), expert_config(tiny_moe(family)), init="lora", progress=False)
    originals = original_stacks(reference)
    model = tiny_moe(family)
    before = logits(model, moe_tokens)
    peft_model = milora.get_model(model, expert_config(model), init=init, progress=False)
    assert relative(logits(peft_model, moe_tokens), before) < 1e-5
    layers = lora_layers(peft_model)
    assert sum(expert_count(layer) > 1 for layer in layers.values()) == 4  # 2 layers x (gate_up_proj, down_proj)
    selected = slice(-RANK, None) if init == "milora" else slice(0, RANK)
    for name, layer in layers.items():
        A, B = expert_factors(layer.lora_A["default"].weight.detach().double(),
                              layer.lora_B["default"].weight.detach().double(), expert_count(layer))
        scaling = layer.scaling["default"]
        for expert, (W, W_res) in enumerate(zip(originals[name], weight_stack(layer), strict=True)):
            U, S, Vh = torch.linalg.svd(W, full_matrices=False)
            part = (U[:, selected] * S[selected]) @ Vh[selected]
            update = scaling * B[expert] @ A[expert]
            assert relative(update, part) < 1e-6, (name, expert)
            assert relative(W_res.double() + update, W) < 1e-6, (name, expert)
    entries = [entry for entry in peft_model.milora_init.report if "expert" in entry]
    assert len(entries) == 4 * 4 and {entry["expert"] for entry in entries} == {0, 1, 2, 3}
    assert all(entry["parameter"].endswith(("experts.gate_up_proj", "experts.down_proj")) for entry in entries)


def simulate_training(peft_model, seed: int = 1) -> None:
    """Move every trainable factor by seeded noise, as training would (a trained adapter, not a start)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in peft_model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))


@pytest.mark.parametrize("family", FAMILIES)
def test_saved_expert_adapter_reloads_loads_in_plain_peft_and_merges(family, moe_tokens, tmp_path):
    """The trained model's outputs, within 1e-5 relative, from: milora.load_model on the original base (residual
    rebuilt), plain PEFT on the original base (the rank-2r export in PEFT's expert packing), and the merged model."""
    model = tiny_moe(family)
    peft_model = milora.get_model(model, expert_config(model), init="milora", progress=False)
    simulate_training(peft_model)
    trained = logits(peft_model, moe_tokens)
    milora.save_adapter(peft_model, tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["r"] == 2 * RANK and sorted(saved["target_parameters"]) == ["down_proj", "gate_up_proj"]

    reloaded = milora.load_model(tiny_moe(family), tmp_path / "adapter")
    assert relative(logits(reloaded, moe_tokens), trained) < 1e-5
    for name, layer in lora_layers(reloaded).items():  # the trainable factors come back exactly
        original = dict(lora_layers(peft_model))[name]
        assert torch.equal(layer.lora_A["default"].weight, original.lora_A["default"].weight)
        assert torch.equal(layer.lora_B["default"].weight, original.lora_B["default"].weight)

    plain = PeftModel.from_pretrained(tiny_moe(family), str(tmp_path / "adapter")).eval()
    assert relative(logits(plain, moe_tokens), trained) < 1e-5

    merged = milora.load_model(tiny_moe(family), tmp_path / "adapter").merge_and_unload()
    assert relative(logits(merged, moe_tokens), trained) < 1e-5


def test_reloaded_start_is_bitwise_the_decomposed_one(tmp_path):
    """init_from (`milora.load_start`): a saved expert start rebuilds the same residual stacks and factors, bit for
    bit, without any SVD."""
    from milora.adapter.load import load_start

    model = tiny_moe("qwen3_moe")
    config = expert_config(model)
    fresh = milora.get_model(model, config, init="milora", progress=False)
    milora.save_adapter(fresh, tmp_path / "start")
    rebuilt = load_start(tiny_moe("qwen3_moe"), tmp_path / "start", expert_config(tiny_moe("qwen3_moe")), "milora", 0)
    for (name, a), (_, b) in zip(lora_layers(fresh).items(), lora_layers(rebuilt).items(), strict=True):
        assert torch.equal(weight_stack(a), weight_stack(b)), name
        assert torch.equal(a.lora_A["default"].weight, b.lora_A["default"].weight), name
        assert torch.equal(a.lora_B["default"].weight, b.lora_B["default"].weight), name


def test_analyze_reports_every_expert(tmp_path):
    from milora.analysis import analyze_adapter

    model = tiny_moe("gpt_oss")
    peft_model = milora.get_model(model, expert_config(model), init="milora", progress=False)
    simulate_training(peft_model)
    milora.save_adapter(peft_model, tmp_path / "adapter")
    result = analyze_adapter(tiny_moe("gpt_oss"), tmp_path / "adapter", progress=False)
    names = [layer["module"] for layer in result["layers"]]
    assert "model.layers.1.mlp.experts.gate_up_proj[3]" in names and len(names) == 2 + 2 * 2 * 4
    assert {layer["shape"][0] for layer in result["layers"] if "gate_up_proj" in layer["module"]} == {48}
    assert {"gate_up_proj", "down_proj", "q_proj", "all"} == set(result["summary"])


def test_a_name_can_select_a_linear_and_an_expert_stack():
    """Qwen2-MoE: ``down_proj`` is its shared expert's Linear and its experts' stack; both are adapted."""
    model = tiny_moe("qwen2_moe")
    targets = select_targets(model, ["q_proj", "gate_up_proj", "down_proj"])
    assert targets.modules == ["q_proj", "down_proj"] and targets.parameters == ["gate_up_proj", "down_proj"]
    peft_model = milora.get_model(model, expert_config(model), init="milora", progress=False)
    names = set(lora_layers(peft_model))
    assert "model.layers.0.mlp.shared_expert.down_proj" in names
    assert sum(expert_count(layer) == 4 for layer in lora_layers(peft_model).values()) == 4


def test_options_expert_stacks_cannot_take_are_refused_before_anything_changes():
    model = tiny_moe("qwen3_moe")
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with pytest.raises(ModelError, match=r"lora_dropout=0\.0"):
        milora.get_model(model, expert_config(model, lora_dropout=0.1), init="milora", progress=False)
    with pytest.raises(ModelError, match=r"init='olora' does not support target_parameters.*init milora"):
        milora.get_model(model, expert_config(model), init="olora", progress=False)
    with pytest.raises(ModelError, match=r"match no parameter.*down_proj, gate_up_proj"):
        milora.get_model(model, LoraConfig(r=2, lora_dropout=0.0, target_parameters=["up_proj"]), progress=False)
    with pytest.raises(ModelError, match=r"Qwen3MoeExperts.*gate_up_proj, down_proj.*name them instead"):
        milora.get_model(model, LoraConfig(r=2, target_modules=["experts"]), progress=False)
    with pytest.raises(ModelError, match="Rank 24 is too large for the experts"):
        milora.get_model(model, LoraConfig(r=24, lora_dropout=0.0, target_parameters=["down_proj"]), progress=False)
    assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())
    assert not any(isinstance(module, torch.nn.Module) and hasattr(module, "lora_A") for module in model.modules())


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    """A saved tiny Qwen3-MoE with `tiny_tokenizer` and the RECORDS training file (`run_config`'s ``tiny`` keys)."""
    root = tmp_path_factory.mktemp("moe")
    tokenizer = tiny_tokenizer()
    model = tiny_moe("qwen3_moe", vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(record) + "\n" for record in RECORDS))
    return {"model": str(root / "model"), "dataset": str(data)}


def test_milora_init_command_on_a_moe_checkpoint(moe_dir, tmp_path, capsys):
    """`milora init --in-memory` starts the experts (and says vLLM has not served such an adapter); the streaming
    default gives the same adapter (`tests/test_streaming_experts.py`)."""
    from test_streaming import assert_same_adapter

    from milora.cli import main

    targets = "q_proj,gate_up_proj,down_proj"
    assert main(["init", moe_dir["model"], "--output", str(tmp_path / "adapter"), "--rank", "2", "--target-modules",
                 targets, "--in-memory"]) == 0
    assert "fused MoE expert parameters (PEFT target_parameters); milora has not served" in capsys.readouterr().out
    assert main(["init", moe_dir["model"], "--output", str(tmp_path / "streamed"), "--rank", "2",
                 "--target-modules", targets]) == 0
    assert_same_adapter(tmp_path / "adapter", tmp_path / "streamed")
    metadata = json.loads((tmp_path / "adapter" / "milora_config.json").read_text())
    assert metadata["target_parameters"] == ["down_proj", "gate_up_proj"]
    assert metadata["summary"]["output_relative_error"] < 1e-5
    assert sum("expert" in entry for entry in metadata["report"]) == 2 * 2 * 4


@pytest.mark.slow
def test_milora_train_on_expert_stacks_and_resume(moe_dir, tmp_path):
    """`milora train` with expert targets: every expert stack's factors move, the saved adapter loads on the original
    base, and a run stopped by Ctrl-C at step 3 and resumed ends bitwise where the uninterrupted run ends."""
    from test_training import InterruptAt

    from milora.training.run import train

    from conftest import assert_same_adapter

    common = {"lora_target": EXPERT_TARGETS, "lora_dropout": 0.0, "lora_rank": 2, "max_steps": 5}
    with pytest.raises(ConfigError, match=r"lora_dropout=0\.0"):
        train(run_config(moe_dir, tmp_path / "dropout", **{**common, "lora_dropout": 0.05}))
    straight = train(run_config(moe_dir, tmp_path / "run", **common))
    assert straight.metrics["global_step"] == 5
    start = milora.get_model(milora.load_base_model(moe_dir["model"])[0],
                             LoraConfig(r=2, lora_alpha=2, lora_dropout=0.0, target_modules=["q_proj"],
                                        target_parameters=["gate_up_proj", "down_proj"]), progress=False)
    trained = milora.load_model(milora.load_base_model(moe_dir["model"])[0], tmp_path / "run")
    start_layers = lora_layers(start)
    for name, layer in lora_layers(trained).items():
        moved = layer.lora_A["default"].weight - start_layers[name].lora_A["default"].weight
        assert float(moved.detach().abs().max()) > 1e-4, name
    stopped = train(run_config(moe_dir, tmp_path / "resumed", **common), callbacks=[InterruptAt(3)])
    assert stopped.interrupted
    train(run_config(moe_dir, tmp_path / "resumed", **common, resume_from_checkpoint=True))
    assert_same_adapter(tmp_path / "run", tmp_path / "resumed")
