"""Save / reload / plain-PEFT load / merge round trips after real optimizer steps.

Tolerances (float32 models): milora's loader rebuilds the residual with the same float64
arithmetic from the same float32 factors, so it reproduces the trained model bit for bit
(asserted exactly). Plain PEFT on the original base computes W x + s[B|-B0][A;A0] x instead of
W_res x + s B A x, which differs by float32 rounding only: relative error < 1e-5. Merging
folds s B A into W_res in float32: relative error < 1e-5.
"""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, PeftModel

import milora
from milora.adapter.load import load_trained_state

from conftest import GPT2_TARGETS, LLAMA_TARGETS, tiny_gpt2, tiny_llama, train_steps

MODELS = {
    "llama": (tiny_llama, {"target_modules": LLAMA_TARGETS}),
    "gpt2": (tiny_gpt2, {"target_modules": GPT2_TARGETS, "fan_in_fan_out": True}),
}


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("init,options", [
    ("milora", {"r": 4, "lora_alpha": 8}),
    ("pissa", {"r": 4, "lora_alpha": 4}),
    ("milora", {"r": 4, "lora_alpha": 3, "use_rslora": True}),
    ("lora", {"r": 4, "lora_alpha": 8}),
])
def test_round_trips(family, init, options, tokens, tmp_path):
    build, targets = MODELS[family]
    config = LoraConfig(**targets, **options)
    model = milora.get_model(build(), config, init=init, progress=False)
    original = logits(build(), tokens)
    train_steps(model, tokens)
    trained = logits(model, tokens)
    assert relative_error(trained, original) > 1e-3  # the adapter really moved
    milora.save_adapter(model, tmp_path / "adapter")
    saved_config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved_config["r"] == (4 if init == "lora" else 8)

    reloaded = milora.load_model(build(), tmp_path / "adapter")
    assert torch.equal(logits(reloaded, tokens), trained)

    plain = PeftModel.from_pretrained(build(), tmp_path / "adapter")
    assert relative_error(logits(plain, tokens), trained) < 1e-5

    merged = model.merge_and_unload()
    assert relative_error(logits(merged, tokens), trained) < 1e-5


def test_reloaded_model_continues_training_like_the_original(tokens, tmp_path):
    config = LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS)
    model = milora.get_model(tiny_llama(), config, progress=False)
    train_steps(model, tokens)
    milora.save_adapter(model, tmp_path / "adapter")
    reloaded = milora.load_model(tiny_llama(), tmp_path / "adapter", is_trainable=True)
    trainable = {n for n, p in reloaded.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert trainable == {n for n, p in model.named_parameters() if p.requires_grad}
    # the same fresh optimizer steps from the same state give the same model
    train_steps(model, tokens, steps=2)
    train_steps(reloaded, tokens, steps=2)
    assert relative_error(logits(reloaded, tokens), logits(model, tokens)) < 1e-6
    # and a second save/load of the continued model still round-trips exactly
    milora.save_adapter(reloaded, tmp_path / "again")
    assert torch.equal(logits(milora.load_model(tiny_llama(), tmp_path / "again"), tokens), logits(reloaded, tokens))


def test_inference_load_is_frozen(tmp_path):
    model = milora.get_model(tiny_llama(), LoraConfig(r=4, target_modules=LLAMA_TARGETS), progress=False)
    milora.save_adapter(model, tmp_path / "adapter")
    reloaded = milora.load_model(tiny_llama(), tmp_path / "adapter")
    assert not any(p.requires_grad for p in reloaded.parameters())
    assert not reloaded.training


def test_load_trained_state_for_resume(tokens, tmp_path):
    config = LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS)
    model = milora.get_model(tiny_llama(), config, progress=False)
    train_steps(model, tokens)
    milora.save_adapter(model, tmp_path / "checkpoint")
    fresh = milora.get_model(tiny_llama(), config, progress=False)
    load_trained_state(fresh, tmp_path / "checkpoint")
    assert torch.equal(logits(fresh, tokens), logits(model, tokens))
    other_init = milora.get_model(tiny_llama(), config, init="pissa", progress=False)
    with pytest.raises(ValueError, match="init='milora' adapter"):
        load_trained_state(other_init, tmp_path / "checkpoint")
    other_alpha = milora.get_model(tiny_llama(), LoraConfig(r=4, lora_alpha=4, target_modules=LLAMA_TARGETS),
                                   progress=False)
    with pytest.raises(ValueError, match="different initialisation"):
        load_trained_state(other_alpha, tmp_path / "checkpoint")


def test_metadata_records_init(tmp_path):
    model = milora.get_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS), progress=False)
    milora.save_adapter(model, tmp_path / "adapter")
    metadata = json.loads((tmp_path / "adapter" / "milora_config.json").read_text())
    assert metadata["init"] == "milora" and metadata["r"] == 4 and metadata["lora_alpha"] == 8
    assert metadata["solver"] == "auto" and len(metadata["report"]) == 10
    assert set(metadata["fingerprint"]) == {"float32", "bfloat16"}


def test_save_residual_layout(tokens, tmp_path):
    model = milora.get_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS), progress=False)
    train_steps(model, tokens)
    trained = logits(model, tokens)
    milora.save_adapter(model, tmp_path / "adapter", save_residual=True)
    from transformers import AutoModelForCausalLM

    residual = AutoModelForCausalLM.from_pretrained(tmp_path / "adapter" / "residual_model").eval()
    paper_layout = PeftModel.from_pretrained(residual, tmp_path / "adapter" / "residual_adapter")
    assert torch.equal(logits(paper_layout, tokens), trained)


def test_bfloat16_base_matches_float32_fingerprint(tmp_path, tokens):
    """A float32-trained adapter on the same base in bfloat16 gives the trained model's logits to bfloat16
    precision: relative error < 2e-2 (about 5 u, u = 2^-8; measured 5e-3) against the trained float32
    model evaluated in float64, while training moved the logits by ~0.76 (asserted > 0.3)."""
    model = milora.get_model(tiny_llama(), LoraConfig(r=4, target_modules=LLAMA_TARGETS), progress=False)
    train_steps(model, tokens)
    milora.save_adapter(model, tmp_path / "adapter")
    reloaded = milora.load_model(tiny_llama(dtype=torch.bfloat16), tmp_path / "adapter")
    found = logits(reloaded, tokens)
    assert found.dtype == torch.bfloat16
    expected = logits(model.double(), tokens)
    assert relative_error(found, expected) < 2e-2
    assert relative_error(expected, logits(tiny_llama().double(), tokens)) > 0.3  # the update is in the reference


@pytest.mark.parametrize("rslora", [False, True])
def test_rank_2r_export_with_rank_and_alpha_patterns(rslora, tokens, tmp_path):
    """Per-module ranks and alphas survive the rank-2r export: plain PEFT (what lm-eval and vLLM
    use) gets each module's scaling right, after training (float32: relative error < 1e-5)."""
    config = LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, use_rslora=rslora,
                        rank_pattern={"v_proj": 2, "down_proj": 6}, alpha_pattern={"k_proj": 3, "down_proj": 12})
    model = milora.get_model(tiny_llama(), config, progress=False)
    train_steps(model, tokens)
    trained = logits(model, tokens)
    milora.save_adapter(model, tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    factor = 2 ** 0.5 if rslora else 2
    assert saved["rank_pattern"] == {"v_proj": 4, "down_proj": 12}
    assert saved["alpha_pattern"] == pytest.approx({"k_proj": 3 * factor, "down_proj": 12 * factor})
    plain = PeftModel.from_pretrained(tiny_llama(), tmp_path / "adapter").eval()
    assert relative_error(logits(plain, tokens), trained) < 1e-5
    assert relative_error(logits(plain, tokens), logits(tiny_llama(), tokens)) > 1e-3  # the update is there


def test_a_bfloat16_base_of_another_model_is_refused(tmp_path, tokens):
    """The bfloat16 fingerprint admits the same weights in bfloat16, not any bfloat16 model."""
    model = milora.get_model(tiny_llama(), LoraConfig(r=4, target_modules=LLAMA_TARGETS), progress=False)
    milora.save_adapter(model, tmp_path / "adapter")
    milora.load_model(tiny_llama(seed=0, dtype=torch.bfloat16), tmp_path / "adapter")
    with pytest.raises(ValueError, match="initialised from different base weights"):
        milora.load_model(tiny_llama(seed=1, dtype=torch.bfloat16), tmp_path / "adapter")


def test_an_adapter_saved_by_milora_0_1_loads_bit_identically():
    """tests/fixtures/adapter_v1: format 1, written by milora 0.1 (commit 412c2a0) after three AdamW
    steps, with the logits its own load_model gave; today's loader gives the same logits
    to float32 rounding (1e-6 absolute)."""
    from pathlib import Path

    from safetensors.torch import load_file

    fixture = Path(__file__).parent / "fixtures" / "adapter_v1"
    expected = load_file(fixture / "expected_logits.safetensors")
    assert json.loads((fixture / "adapter" / "milora_config.json").read_text())["format_version"] == 1
    with torch.no_grad():
        found = milora.load_model(tiny_llama(), fixture / "adapter")(expected["tokens"]).logits
    # the logits may move by float32 rounding when the
    # installed torch/transformers change their kernels (1.8e-7 on the 2026-12-04 install): a few ulps
    torch.testing.assert_close(found, expected["logits"], rtol=0, atol=1e-6)
