"""QLoRA-style init on a bitsandbytes base (CPU backend): exactness, measured errors, saving, training, bad input.

References are independent of milora's quantisation code: the residual W_res and the factors
come from the same init without quantisation (deterministic), the quantised weights from
bitsandbytes' functional API called directly, all errors recomputed in float64.

Tolerances (float32 models): bitsandbytes' CPU layers multiply by the dequantised weight (int8
layers only in training mode: in eval mode they run LLM.int8, which quantises the inputs too),
so the quantised model at init equals a float32 model holding the dequantised weights plus
s B0 A0 up to float32 summation order: relative error < 1e-5. Dequantisations are bit-identical
to the direct calls (asserted exactly); reported errors match the float64 recomputation to
1e-12 (1e-7 for those relative to ||W||, which milora rebuilds as W_res + s B0 A0). Plain PEFT
on the full-precision base: the update s (B A - B0 A0) to float32 rounding, relative < 1e-5.
"""

from __future__ import annotations

import json
import re

import bitsandbytes.functional as bnbF
import pytest
import torch
import yaml
from peft import LoraConfig, PeftModel
from peft.utils.integrations import dequantize_module_weight
from safetensors.torch import load_file
from test_training import InterruptAt
from transformers import AutoModelForCausalLM, TrainerCallback

import milora
from milora import cli
from milora.errors import ConfigError, ModelError
from milora.init import init_record, lora_layers, weight_matrix
from milora.init.quantize import quantize_model
from milora.training.run import train

from conftest import LLAMA_TARGETS, cli_error, make_model_dir, run_config, tiny_gpt2, tiny_llama, train_steps

METHODS = ("nf4", "fp4", "int8")
OTHER_LINEAR = ("o_proj", "gate_proj")  # the tiny LLaMA's Linear layers outside LLAMA_TARGETS (lm_head stays float)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def config(**overrides) -> LoraConfig:
    return LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": LLAMA_TARGETS, **overrides})


def direct_dequantized(weight: torch.Tensor, method: str) -> torch.Tensor:
    """Q(W) dequantised with bitsandbytes' functional API (milora.init.quantize.bnb_config's settings)."""
    if method == "int8":  # bitsandbytes rounds the weight to float16 first
        codes, scales, _ = bnbF.int8_vectorwise_quant(weight.half())
        return bnbF.int8_vectorwise_dequant(codes, scales)
    packed, state = bnbF.quantize_4bit(weight.float(), blocksize=64, compress_statistics=True, quant_type=method)
    return bnbF.dequantize_4bit(packed, state)


def reference_weights(init: str, **kwargs) -> tuple[dict, dict, dict]:
    """(W_res, s B0 A0, W) per target module, from the same init without quantisation, and W for the others."""
    plain = milora.get_model(tiny_llama(), config(**kwargs), init=init, progress=False)
    factors = init_record(plain).initial_factors  # empty for lora: W_res = W
    residual, initial = {}, {}
    for name, layer in lora_layers(plain).items():
        residual[name] = weight_matrix(layer.get_base_layer()).detach().clone()
        initial[name] = torch.zeros(residual[name].shape, dtype=torch.float64)
        if name in factors:
            A0, B0 = factors[name]
            initial[name] = layer.scaling["default"] * (B0.double() @ A0.double())
    weights = {name: m.weight.detach() for name, m in tiny_llama().named_modules() if isinstance(m, torch.nn.Linear)}
    return residual, initial, weights


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("init", ["milora", "pissa", "lora"])
def test_init_is_the_dequantised_residual_plus_the_adapter(method, init, tokens):
    """Quantised model at init == float model with deq(Q(W_res)) + s B0 A0 in the targets, deq(Q(W)) elsewhere.

    int8 is compared in training mode (no dropout anywhere), where its CPU layers multiply by the
    dequantised weight; in eval mode LLM.int8 also rounds each input row to int8 (checked below).
    """
    quantized = milora.get_model(tiny_llama(), config(), init=init, quantization=method, progress=False)
    residual, initial, weights = reference_weights(init)
    reference = tiny_llama()
    quantized.train(method == "int8")
    with torch.no_grad():
        for name, module in reference.named_modules():
            if name in residual:
                module.weight.copy_((direct_dequantized(residual[name], method).double() + initial[name]).float())
            elif name.endswith(OTHER_LINEAR):
                module.weight.copy_(direct_dequantized(weights[name], method))
        expected = reference(tokens).logits
        found = quantized(tokens).logits
    assert relative_error(found, expected) < 1e-5
    assert relative_error(found, tiny_llama()(tokens).logits.detach()) > 1e-4  # the quantisation really changed it
    if method == "int8":
        with torch.no_grad():
            assert 1e-6 < relative_error(quantized.eval()(tokens).logits, expected) < 1e-2  # inputs rounded to 8 bits
    kinds = {type(layer).__module__ + "." + type(layer).__name__ for layer in lora_layers(quantized).values()}
    assert kinds == {f"peft.tuners.lora.bnb.{'Linear8bitLt' if method == 'int8' else 'Linear4bit'}"}


@pytest.mark.parametrize("method", ["nf4", "int8"])
@pytest.mark.parametrize("init", ["milora", "lora"])
def test_reported_errors_equal_a_direct_computation(method, init):
    quantized = milora.get_model(tiny_llama(), config(), init=init, quantization=method, progress=False)
    residual, initial, weights = reference_weights(init)
    report = init_record(quantized).quantization
    assert report["method"] == method and report["bnb_config"]["quant_method"] == "bitsandbytes"
    layers = lora_layers(quantized)
    assert [entry["module"] for entry in report["targets"]] == list(layers)
    for entry in report["targets"]:
        name = entry["module"]
        dequantized = direct_dequantized(residual[name], method)
        assert torch.equal(dequantize_module_weight(layers[name].get_base_layer()), dequantized)
        error = (dequantized.double() - residual[name].double()).norm()
        weight_norm = weights[name].double().norm()
        assert entry["quantization_error"] == pytest.approx(float(error / residual[name].double().norm()), rel=1e-12)
        # milora rebuilds ||W|| as ||W_res + s B0 A0||, W up to the float32 rounding of W_res
        assert entry["quantization_error_vs_weight"] == pytest.approx(float(error / weight_norm), rel=1e-7)
        assert entry["initial_share"] == pytest.approx(float(initial[name].norm() / weight_norm), rel=1e-9, abs=0)
    others = [relative_error(direct_dequantized(w, method), w) for n, w in weights.items() if n.endswith(OTHER_LINEAR)]
    assert report["other_modules"] == len(others) == 4
    assert report["other_mean_quantization_error"] == pytest.approx(sum(others) / len(others), rel=1e-12)
    # the summary milora init prints (docs/quantized-bases.md "Report"): means and the largest share, from the
    # direct float64 values
    direct = {name: (float((direct_dequantized(residual[name], method).double() - residual[name].double()).norm()),
                     float(residual[name].double().norm()), float(weights[name].double().norm()),
                     float(initial[name].norm())) for name in layers}
    summary = init_record(quantized).summary()
    assert summary["quantization"] == method and len(direct) == 10
    assert summary["mean_quantization_error"] == pytest.approx(
        sum(e / r for e, r, _, _ in direct.values()) / 10, rel=1e-12)
    assert summary["mean_quantization_error_vs_weight"] == pytest.approx(
        sum(e / w for e, _, w, _ in direct.values()) / 10, rel=1e-7)
    shares = [share / w for _, _, w, share in direct.values()]
    assert summary["mean_initial_share"] == pytest.approx(sum(shares) / 10, rel=1e-9, abs=0)
    assert summary["max_initial_share"] == pytest.approx(max(shares), rel=1e-9, abs=0)
    assert summary["other_mean_quantization_error"] == pytest.approx(sum(others) / len(others), rel=1e-12)


def frozen_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" not in k}


def test_training_moves_only_the_factors_and_the_saved_adapter_is_for_the_full_precision_base(tokens, tmp_path):
    model = milora.get_model(tiny_llama(), config(), init="milora", quantization="nf4", progress=False)
    before = frozen_state(model)
    initial = {name: (layer.lora_A["default"].weight.detach().clone(), layer.lora_B["default"].weight.detach().clone())
               for name, layer in lora_layers(model).items()}
    assert {name for name, p in model.named_parameters() if p.requires_grad} == {
        f"base_model.model.{name}.lora_{f}.default.weight" for name in initial for f in "AB"}
    train_steps(model, tokens)
    after = frozen_state(model)
    assert before.keys() == after.keys() and any(k.endswith("weight.absmax") for k in after)
    assert all(torch.equal(before[k], after[k]) for k in before)  # packed 4-bit codes, scales, norms, embeddings
    layers = lora_layers(model)
    assert all(not torch.equal(layers[n].lora_A["default"].weight, A) for n, (A, _) in initial.items())

    milora.save_adapter(model, tmp_path / "adapter")
    metadata = json.loads((tmp_path / "adapter" / "milora_config.json").read_text())
    assert metadata["quantization"]["method"] == "nf4" and len(metadata["quantization"]["targets"]) == len(layers)
    plain = PeftModel.from_pretrained(tiny_llama(), tmp_path / "adapter")
    A0B0 = init_record(model).initial_factors
    for name, layer in lora_layers(plain).items():
        trained, s = layers[name], layers[name].scaling["default"]
        update = s * (trained.lora_B["default"].weight.double() @ trained.lora_A["default"].weight.double()
                      - A0B0[name][1].double() @ A0B0[name][0].double())
        assert relative_error(layer.get_delta_weight("default"), update) < 1e-5, name

    # milora's loader: full precision by default, or the same quantised residual the adapter was trained on
    full = milora.load_model(tiny_llama(), tmp_path / "adapter")
    with torch.no_grad():
        assert relative_error(full(tokens).logits, plain(tokens).logits) < 1e-5
        requantized = milora.load_model(tiny_llama(), tmp_path / "adapter", quantization="nf4")
        assert all(torch.equal(v, after[k]) for k, v in frozen_state(requantized).items())
        assert torch.equal(requantized(tokens).logits, model(tokens).logits)


def test_residual_layout_of_a_quantised_model_is_refused(tiny, tmp_path):
    """The paper's residual layout is a full-precision residual model: not what a quantised base holds."""
    model = milora.get_model(tiny_llama(), config(), quantization="nf4", progress=False)
    with pytest.raises(ValueError, match=r"base is quantised \(nf4\).*quantization='nf4'\) rebuilds the quantised"):
        milora.save_adapter(model, tmp_path / "adapter", save_residual=True)
    message = cli_error(["init", tiny["model"], "--output", str(tmp_path / "a"), "--quantize", "nf4",
                         "--save-residual"])
    assert "cannot be combined with --quantize" in message
    assert not (tmp_path / "adapter").exists() and not (tmp_path / "a").exists()


def test_gpt2_conv1d_layers_are_quantised_as_transformers_does(tokens):
    """GPT-2's Conv1D (stored in x out) quantised in the (out x in) layout transformers uses: the model at init
    equals a float GPT-2 holding deq(Q(W_res^T))^T + s B0 A0 in the targets and deq(Q(W^T))^T in both c_proj
    (float32 summation order: relative < 1e-5), each dequantisation bit-identical to the direct call."""
    from transformers.pytorch_utils import Conv1D

    lora = LoraConfig(r=4, lora_alpha=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
    model = milora.get_model(tiny_gpt2(), lora, quantization="nf4", progress=False)
    plain = milora.get_model(tiny_gpt2(), lora, progress=False)  # the same init, not quantised
    factors, layers = init_record(plain).initial_factors, lora_layers(model)
    reference = tiny_gpt2()
    with torch.no_grad():
        for name, module in reference.named_modules():
            if not isinstance(module, Conv1D):
                continue
            if name in factors:
                residual = weight_matrix(lora_layers(plain)[name].get_base_layer()).detach()
                dequantized = direct_dequantized(residual, "nf4")
                assert torch.equal(dequantize_module_weight(layers[name].get_base_layer()), dequantized), name
                (A0, B0), scaling = factors[name], lora_layers(plain)[name].scaling["default"]
                weight = dequantized.double() + scaling * (B0.double() @ A0.double())
            else:  # c_proj: quantised, not adapted
                dequantized = direct_dequantized(module.weight.detach().T, "nf4")
                assert torch.equal(dequantize_module_weight(model.get_submodule(f"base_model.model.{name}")),
                                   dequantized), name
                weight = dequantized.double()
            module.weight.copy_(weight.T.float())
        expected, found = reference(tokens).logits, model(tokens).logits
        original = tiny_gpt2()(tokens).logits
    assert len(factors) == 4 and relative_error(found, expected) < 1e-5
    assert relative_error(found, original) > 1e-4  # the quantisation really changed it
    assert init_record(model).quantization["other_modules"] == 4  # both c_proj of each block (lm_head stays float)


class Capture(TrainerCallback):
    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.model = model


def quantized_config(tiny, output_dir, **extra) -> dict:
    """A short NF4 run (checkpoints every 2 steps, for resuming); ``extra`` keys override."""
    return run_config(tiny, output_dir, **{"max_steps": 4, "save_steps": 2, "quantization": "nf4", **extra})


def test_train_with_quantization_and_resume(tiny, tmp_path):
    """`quantization: nf4` trains only A, B on the quantised residual; resuming rebuilds the same base."""
    from milora.models import load_causal_lm
    from milora.training.run import build_lora_config

    capture = Capture()
    whole = train(quantized_config(tiny, tmp_path / "whole"), callbacks=[capture])
    cfg = milora.load_config(quantized_config(tiny, tmp_path / "x"))
    fresh = milora.get_model(load_causal_lm(tiny["model"]), build_lora_config(cfg), quantization="nf4", progress=False)
    trained_state = frozen_state(capture.model)
    assert all(torch.equal(v, trained_state[k]) for k, v in frozen_state(fresh).items())
    assert json.loads((whole.adapter_dir / "milora_config.json").read_text())["quantization"]["method"] == "nf4"
    assert whole.metrics["init"]["quantization"] == "nf4"

    assert train(quantized_config(tiny, tmp_path / "split"), callbacks=[InterruptAt(3)]).interrupted
    train(quantized_config(tiny, tmp_path / "split", resume_from_checkpoint=True))
    whole_weights = load_file(tmp_path / "whole" / "adapter_model.safetensors")
    split_weights = load_file(tmp_path / "split" / "adapter_model.safetensors")
    assert whole_weights.keys() == split_weights.keys()
    assert all(torch.equal(whole_weights[k], split_weights[k]) for k in whole_weights)  # same seed, same CPU: bitwise


@pytest.mark.parametrize("saved,resumed", [("nf4", None), ("nf4", "int8"), (None, "nf4")])
def test_resume_with_another_quantization_is_refused_before_writing(tiny, tmp_path, saved, resumed):
    out = tmp_path / "run"
    train(quantized_config(tiny, out, max_steps=2, quantization=saved))
    record = (out / "train_config.yaml").read_text()
    path = tmp_path / "resume.yaml"
    path.write_text(yaml.safe_dump(quantized_config(tiny, out, quantization=resumed, resume_from_checkpoint=True)))
    message = cli_error(["train", str(path)])
    assert re.search(rf"trained on a {saved or 'full-precision'} base but quantization={resumed!r}", message)
    assert (out / "train_config.yaml").read_text() == record and not (out / "checkpoint-4").exists()
    # a checkpoint moved out of its run directory (no train_config.yaml beside it) is checked from its own record
    moved = tmp_path / "moved"
    (out / "checkpoint-2").rename(moved)
    with pytest.raises(ConfigError, match="trained on a"):
        train(quantized_config(tiny, tmp_path / "other", quantization=resumed, resume_from_checkpoint=str(moved)))


def test_loading_a_quantised_adapter_state_into_another_base_is_refused(tokens, tmp_path):
    from milora.adapter.load import load_trained_state

    milora.save_adapter(milora.get_model(tiny_llama(), config(), quantization="nf4", progress=False), tmp_path / "a")
    with pytest.raises(ValueError, match="trained on a nf4 base, this model's base is full-precision"):
        load_trained_state(milora.get_model(tiny_llama(), config(), progress=False), tmp_path / "a")


# ---------------------------------------------------------------- bad input: clear errors, nothing modified or written


def test_an_already_quantised_model_is_refused():
    model = tiny_llama()
    quantize_model(model, "nf4")
    with pytest.raises(ModelError, match=r"q_proj is quantised \(bitsandbytes Linear4bit\).*full-precision weight"):
        milora.get_model(model, config(), quantization="nf4", progress=False)


@pytest.mark.parametrize("call", ["get_model", "load_model"])
def test_bad_quantization_settings_leave_the_model_untouched(call, tmp_path):
    model, reference = tiny_llama(), tiny_llama().state_dict()
    cases = [("nf5", config(), "Unknown quantization 'nf5': choose one of nf4, fp4, int8")]
    if call == "get_model":  # (milora saves no adapter on an output embedding)
        cases.append(("nf4", config(target_modules=["q_proj", "lm_head"]), r"\['lm_head'\] stay in full precision"))
    for quantization, lora, message in cases:
        with pytest.raises(ModelError, match=message):
            if call == "get_model":
                milora.get_model(model, lora, progress=False, quantization=quantization)
            else:
                saved = milora.get_model(tiny_llama(), lora, progress=False)
                milora.save_adapter(saved, tmp_path / "a", overwrite=True)
                milora.load_model(model, tmp_path / "a", quantization=quantization)
        assert all(torch.equal(v, reference[k]) for k, v in model.state_dict().items())
        assert not any("lora_" in name for name, _ in model.named_parameters())


def test_config_and_cli_refuse_bad_quantization(tiny, tmp_path):
    with pytest.raises(ConfigError, match=r"'quantization' must be one of nf4, fp4, int8; got 'nf5' \(did you mean"):
        milora.load_config(quantized_config(tiny, tmp_path / "out", quantization="nf5"))
    with pytest.raises(SystemExit):
        cli.main(["init", tiny["model"], "--output", str(tmp_path / "a"), "--quantize", "nf5"])
    assert not (tmp_path / "a").exists() and not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def quantised_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("quantised") / "model"
    model = AutoModelForCausalLM.from_pretrained(make_model_dir(path.parent / "full"))
    quantize_model(model, "nf4")
    model.save_pretrained(path)
    return path


def test_quantised_checkpoint_refused_by_init_and_merge(tiny, tmp_path, quantised_checkpoint):
    message = cli_error(["init", str(quantised_checkpoint), "--output", str(tmp_path / "a"), "--rank", "4"])
    assert "is a quantised checkpoint (bitsandbytes), but milora decomposes full-precision weights" in message
    assert not (tmp_path / "a").exists()
    adapter = tmp_path / "adapter"
    assert cli.main(["init", tiny["model"], "--output", str(adapter), "--rank", "4", "--quantize", "nf4"]) == 0
    message = cli_error(["merge", str(adapter), "--model", str(quantised_checkpoint), "--output", str(tmp_path / "m")])
    assert "merge needs the full-precision base the adapter belongs to" in message
    assert not (tmp_path / "m").exists()


def test_cli_init_reports_quantization_and_merge_uses_the_full_precision_base(tiny, tmp_path, capsys):
    adapter = tmp_path / "adapter"
    assert cli.main(["init", tiny["model"], "--output", str(adapter), "--rank", "4", "--quantize", "nf4"]) == 0
    summary = json.loads(capsys.readouterr().out.split("\nadapter saved")[0])
    assert summary["quantization"] == "nf4" and summary["mean_quantization_error"] > 1e-3
    assert 0 < summary["output_relative_error"] < 1  # against the full-precision model: the quantisation noise
    metadata = json.loads((adapter / "milora_config.json").read_text())
    assert metadata["quantization"]["bnb_config"]["bnb_4bit_quant_type"] == "nf4"
    assert cli.main(["merge", str(adapter), "--model", tiny["model"], "--output", str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    original = AutoModelForCausalLM.from_pretrained(tiny["model"])
    # an untrained adapter merges back into the original weights: s (B0 A0 - B0 A0) = 0 up to float32 rounding
    for (name, w), w0 in zip(merged.state_dict().items(), original.state_dict().values(), strict=True):
        assert torch.allclose(w, w0, rtol=0, atol=1e-6), name


def test_interrupted_quantisation_restores_the_model(monkeypatch, tokens):
    import milora.init.quantize

    calls, original = [], milora.init.quantize.dequantized_weight

    def interrupted(module):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return original(module)

    monkeypatch.setattr(milora.init.quantize, "dequantized_weight", interrupted)
    model, reference = tiny_llama(), tiny_llama()
    with pytest.raises(KeyboardInterrupt) as caught:
        milora.get_model(model, config(), quantization="nf4", progress=False)
    assert any("restored to its original weights" in note for note in caught.value.__notes__)
    assert not getattr(model, "is_quantized", False) and not any("lora_" in n for n, _ in model.named_parameters())
    assert all(type(m) in (torch.nn.Linear,) for n, m in model.named_modules() if n.endswith(("_proj", "lm_head")))
    for (name, restored), weight in zip(model.state_dict().items(), reference.state_dict().values(), strict=True):
        assert torch.allclose(restored, weight, rtol=0, atol=1e-6 * float(weight.abs().max())), name


@pytest.mark.slow
def test_smollm2_nf4_report_matches_the_spectrum_and_a_direct_quantisation():
    """The real model (widths 576, 1536, 192): one v_proj's report against its float64 spectrum and bitsandbytes."""
    from milora.constants import PAPER_TARGETS

    model, tokenizer = milora.load_base_model()
    name = "model.layers.3.self_attn.v_proj"
    weight = model.get_submodule(name).weight.detach().clone()
    S = torch.linalg.svdvals(weight.double())
    tokens = tokenizer(["MiLoRA adapts the minor singular components of each weight."], return_tensors="pt").input_ids
    with torch.no_grad():
        original = model(tokens).logits
    quantized = milora.get_model(model, LoraConfig(r=16, lora_alpha=16, target_modules=list(PAPER_TARGETS)),
                                 quantization="nf4", progress=False)
    record = init_record(quantized)
    entry = next(e for e in record.quantization["targets"] if e["module"] == name)
    assert entry["initial_share"] == pytest.approx(float(S[-16:].norm() / S.norm()), rel=1e-6)  # the 16 smallest
    A0, B0 = record.initial_factors[name]
    residual = (weight.double() - (B0.double() @ A0.double())).float()  # s = 1: W_res as get_model rounds it
    dequantized = direct_dequantized(residual, "nf4")
    assert torch.equal(dequantize_module_weight(lora_layers(quantized)[name].get_base_layer()), dequantized)
    assert entry["quantization_error"] == pytest.approx(relative_error(dequantized, residual), rel=1e-12)
    summary = record.summary()
    assert len(record.quantization["targets"]) == 150 and 0.05 < summary["mean_quantization_error"] < 0.15
    with torch.no_grad():
        assert 1e-3 < relative_error(quantized(tokens).logits, original) < 1  # NF4 noise, not a broken model


def test_bitsandbytes_kernel_notice_is_filtered(caplog):
    """The notice about an optional kernel for the AVX512-BF16 shortcut (off in milora) is dropped;
    other bitsandbytes warnings still reach the user."""
    import logging

    import milora  # noqa: F401  (installs the filter)

    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING):
        logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s.", "no module")
        logger.warning("something else")
    assert [record.getMessage() for record in caplog.records] == ["something else"]
