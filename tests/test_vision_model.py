"""MiLoRA on an image-text-to-text model: a tiny random LLaVA (tiny LLaMA language model, random CLIP
vision tower) built from configs.

Tolerances as in test_persistence.py (float32): the initial model equals the base to a relative
1e-5 (the residual W - sBA is rounded once to float32); milora's reloader reproduces the trained
model bit for bit; plain PEFT (rank-2r update on the original base, projector from
modules_to_save) and merging differ from it by float32 rounding only: relative error < 1e-5. The vision
tower stays bit for bit what it was, at init, after reloading (milora, plain PEFT) and merging.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from peft import LoraConfig, PeftModel
from safetensors.torch import load_file, save_file

import milora
from milora.errors import AdapterError, ModelError
from milora.init import language_model_targets, scoped_targets
from milora.models import is_vision_language_model, load_base_model, load_pretrained_model

from conftest import LLAMA_TARGETS, make_llava_dir, write_images

PROJECTOR = ["multi_modal_projector"]


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    return make_llava_dir(tmp_path_factory.mktemp("vlm") / "llava")


@pytest.fixture(scope="module")
def inputs(llava_dir, tmp_path_factory):
    """A batch of two chat prompts, each with one image (16 image tokens), as the processor makes it."""
    from PIL import Image

    _, processor = load_base_model(str(llava_dir))
    folder = tmp_path_factory.mktemp("images")
    images = [Image.open(folder / name) for name in write_images(folder, 2)]
    texts = [processor.apply_chat_template(
                 [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": t}]}],
                 tokenize=False, add_generation_prompt=True)
             for t in ("what shape?", "colour")]
    return dict(processor(text=texts, images=images, padding=True, add_special_tokens=False, return_tensors="pt"))


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits.double()


def relative_error(a, b) -> float:
    return float((a - b).norm() / b.norm())


def config(model, init="milora", **options) -> LoraConfig:
    return LoraConfig(r=4, lora_alpha=4, target_modules=language_model_targets(model, LLAMA_TARGETS),
                      modules_to_save=PROJECTOR, **options)


def vision_state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "vision_tower" in k}


def test_loads_as_image_text_to_text_with_its_processor(llava_dir):
    model, processor = load_base_model(str(llava_dir))
    assert is_vision_language_model(model) and type(model).__name__ == "LlavaForConditionalGeneration"
    assert type(processor.image_processor).__name__ == "CLIPImageProcessorPil"  # no torchvision needed


def test_default_targets_select_only_the_language_model(llava_dir):
    model = load_pretrained_model(str(llava_dir))
    pattern = language_model_targets(model)
    adapted = [name for name, _ in model.named_modules() if re.fullmatch(pattern, name)]
    assert len(adapted) == 2 * 5 and all(name.startswith("model.language_model.layers.") for name in adapted)
    assert any("vision_tower" in name and name.endswith("q_proj") for name, _ in model.named_modules())
    assert scoped_targets(model, ["q_proj"], "whole_model") == ["q_proj"]  # explicit: PEFT's rule, vision tower too
    assert scoped_targets(model, ["all-linear"], "language_model") == language_model_targets(
        model, ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"])


def test_targets_missing_from_the_language_model_are_an_error(llava_dir):
    model = load_pretrained_model(str(llava_dir))
    with pytest.raises(ModelError,
                       match=r"\['fc1'\] not found in the language model \(model.language_model\).*whole_model"):
        language_model_targets(model, ["q_proj", "fc1"])  # fc1 exists, but only in the CLIP vision tower


@pytest.mark.parametrize("init", ["milora", "pissa", "lora"])
def test_init_equals_the_base_and_leaves_the_vision_tower_alone(llava_dir, inputs, init):
    base = load_pretrained_model(str(llava_dir))
    before, vision = logits(base, inputs), vision_state(base)
    text_only = {"input_ids": inputs["input_ids"][:, -5:]}  # no image tokens
    before_text = logits(base, text_only)
    peft_model = milora.get_model(base, config(base), init=init, progress=False)
    assert relative_error(logits(peft_model, inputs), before) < 1e-5
    assert relative_error(logits(peft_model, text_only), before_text) < 1e-5
    state = peft_model.get_base_model().state_dict()
    assert all(torch.equal(state[key], value) for key, value in vision.items())
    trainable = [name for name, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and not any("vision_tower" in name for name in trainable)
    assert any("multi_modal_projector.modules_to_save" in name for name in trainable)


def perturb(peft_model, seed=1) -> None:
    """Stand-in for training: move every trainable tensor (LoRA factors and the projector copy)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=generator) * (p.abs().mean() + 0.01))


def test_export_reloads_in_plain_peft_and_milora_and_merges(llava_dir, inputs, tmp_path):
    base = load_pretrained_model(str(llava_dir))
    original = logits(base, inputs)
    peft_model = milora.get_model(base, config(base), progress=False)
    perturb(peft_model)
    trained = logits(peft_model, inputs)
    assert relative_error(trained, original) > 1e-3
    milora.save_adapter(peft_model, tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["r"] == 8 and saved["modules_to_save"] == PROJECTOR
    assert json.loads((tmp_path / "adapter" / "milora_config.json").read_text())["modules_to_save"] == PROJECTOR

    plain = PeftModel.from_pretrained(load_pretrained_model(str(llava_dir)), tmp_path / "adapter")
    assert relative_error(logits(plain, inputs), trained) < 1e-5
    reloaded = milora.load_model(load_pretrained_model(str(llava_dir)), tmp_path / "adapter")
    assert torch.equal(logits(reloaded, inputs), trained)
    merged = reloaded.merge_and_unload()
    assert type(merged.model.multi_modal_projector).__name__ == "LlavaMultiModalProjector"
    assert relative_error(logits(merged, inputs), trained) < 1e-5
    # docs/vision.md: the vision tower's weights untouched, bit for bit, after reloading and merging
    from milora.cli import main

    assert main(["merge", str(tmp_path / "adapter"), "--model", str(llava_dir), "--output", str(tmp_path / "m")]) == 0
    merged_by_cli = load_pretrained_model(str(tmp_path / "m"))
    assert relative_error(logits(merged_by_cli, inputs), trained) < 1e-5
    vision = vision_state(load_pretrained_model(str(llava_dir)))
    for model in (plain.get_base_model(), reloaded.get_base_model(), merged, merged_by_cli):
        found = vision_state(model)
        assert found.keys() == vision.keys() and all(torch.equal(found[key], vision[key]) for key in vision)


def test_resume_restores_the_projector(llava_dir, inputs, tmp_path):
    from milora.adapter.load import load_trained_state

    base = load_pretrained_model(str(llava_dir))
    peft_model = milora.get_model(base, config(base), progress=False)
    perturb(peft_model)
    milora.save_adapter(peft_model, tmp_path / "adapter")
    fresh = load_pretrained_model(str(llava_dir))
    resumed = milora.get_model(fresh, config(fresh), progress=False)
    load_trained_state(resumed, tmp_path / "adapter")
    assert torch.equal(logits(resumed, inputs), logits(peft_model, inputs))


def test_save_residual_keeps_the_original_projector(llava_dir, inputs, tmp_path):
    base = load_pretrained_model(str(llava_dir))
    peft_model = milora.get_model(base, config(base), progress=False)
    perturb(peft_model)
    milora.save_adapter(peft_model, tmp_path / "adapter", save_residual=True)
    residual = load_pretrained_model(str(tmp_path / "adapter" / "residual_model"))
    paired = PeftModel.from_pretrained(residual, tmp_path / "adapter" / "residual_adapter")
    assert relative_error(logits(paired, inputs), logits(peft_model, inputs)) < 1e-5


def test_modules_to_save_errors(llava_dir):
    model = load_pretrained_model(str(llava_dir))
    with pytest.raises(ModelError, match=r"modules_to_save \['projector_x'\] not found"):
        milora.get_model(model, LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["projector_x"]),
                         progress=False)
    with pytest.raises(ModelError,
                       match=r"in modules_to_save .* holds the target module model\.language_model\.layers\.0"):
        milora.get_model(model, LoraConfig(r=2, target_modules=language_model_targets(model, ["q_proj"]),
                                           modules_to_save=["language_model"]), progress=False)
    assert not any("lora_" in name for name, _ in model.named_modules())  # refused before anything changed


def test_plain_name_list_reaching_the_vision_tower_warns(llava_dir):
    model = load_pretrained_model(str(llava_dir))
    with pytest.warns(UserWarning, match="outside the language model.*language_model_targets"):
        peft_model = milora.get_model(model, LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj"]), progress=False)
    assert any("vision_tower" in name for name in milora.init.lora_layers(peft_model))


def test_missing_projector_tensor_is_refused(llava_dir, tmp_path):
    base = load_pretrained_model(str(llava_dir))
    milora.save_adapter(milora.get_model(base, config(base), progress=False), tmp_path / "adapter")
    path = tmp_path / "adapter" / "adapter_model.safetensors"
    weights = load_file(path)
    del weights["base_model.model.model.multi_modal_projector.linear_2.bias"]
    save_file(weights, path)
    metadata = json.loads((tmp_path / "adapter" / "milora_config.json").read_text())
    metadata["weights_sha256"] = milora.adapter.format.weights_checksum(weights)
    (tmp_path / "adapter" / "milora_config.json").write_text(json.dumps(metadata))
    with pytest.raises(AdapterError, match=r"modules_to_save tensor .*linear_2\.bias should have shape"):
        milora.load_model(load_pretrained_model(str(llava_dir)), tmp_path / "adapter")
