"""``init="loftq"`` (`milora.init.loftq`): PEFT's LoftQ factors on a quantised base, recorded, saved, reloaded on
the quantised residual, resumed exactly and analysed; its bad input refused before anything runs."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils.integrations import dequantize_module_weight
from test_comparison import setup, sweep_values  # noqa: F401  (setup is a fixture)
from test_quantization import direct_dequantized, relative_error

import milora
from milora.comparison.sweep import load_sweep
from milora.errors import ConfigError, ModelError
from milora.init import init_record, lora_layers, weight_matrix
from milora.init.peft_starts import peft_lora_config
from milora.training.run import train

from conftest import LLAMA_TARGETS, cli_error, run_config, tiny_llama, train_steps


def lora_config(**overrides) -> LoraConfig:
    return LoraConfig(**{"r": 4, "lora_alpha": 4, "target_modules": LLAMA_TARGETS, "lora_dropout": 0.0, **overrides})


@pytest.mark.parametrize("method", ["nf4", "int8"])
def test_loftq_start_is_peft_own_on_the_quantised_residual(method, tokens):
    """PEFT's LoftQ factors bit for bit (PEFT called directly on another copy), the full-precision residual W_res +
    s B0 A0 = W to one float32 rounding, the quantised base bitsandbytes' Q(W), and what LoftQ is for: per target,
    Q(W) + s B0 A0 is closer to W than QLoRA's Q(W) alone."""
    model = milora.get_model(tiny_llama(), lora_config(), init="loftq", quantization=method, progress=False)
    reference = get_peft_model(tiny_llama(), peft_lora_config(lora_config(), "loftq", quantization=method))
    record = init_record(model)
    originals = {name: weight_matrix(m).detach().double() for name, m in tiny_llama().named_modules()
                 if isinstance(m, torch.nn.Linear)}
    reference_layers = lora_layers(reference)
    closer = []
    for name, layer in lora_layers(model).items():
        A0, B0 = record.initial_factors[name]
        for mine, peft in ((layer.lora_A["default"].weight, reference_layers[name].lora_A["default"].weight),
                           (layer.lora_B["default"].weight, reference_layers[name].lora_B["default"].weight)):
            assert torch.equal(mine, peft), name
        assert torch.equal(A0, reference_layers[name].lora_A["default"].weight)
        W, start = originals[name], layer.scaling["default"] * B0.double() @ A0.double()
        entry = next(e for e in record.report if e["module"] == name)
        assert entry["base_changed"] and entry["reconstruction_error"] < 2e-7
        base = dequantize_module_weight(layer.get_base_layer()).double()
        assert torch.equal(base, direct_dequantized(W.float(), method).double()), name
        closer.append(float((base + start - W).norm() / (base - W).norm()))
    assert max(closer) < 1, closer
    assert record.quantization["method"] == method and record.measured["base_changed"]


def test_loftq_saves_reloads_resumes_and_is_analysed(tiny, tokens, tmp_path):
    model = milora.get_model(tiny_llama(), lora_config(), init="loftq", quantization="nf4", progress=False)
    train_steps(model, tokens)
    with torch.no_grad():
        trained = model(tokens).logits
    milora.save_adapter(model, tmp_path / "adapter")
    rebuilt = milora.load_model(tiny_llama(), tmp_path / "adapter", quantization="nf4")
    with torch.no_grad():
        assert torch.allclose(rebuilt(tokens).logits, trained, rtol=1e-5, atol=1e-5)
    # plain PEFT on the original full-precision base: the rank-2r export's update s (B A - B0 A0) per target, and
    # the outputs of milora's full-precision load (W - s B0 A0 + s B A), each to 1e-5 relative (float32 rounding)
    plain = PeftModel.from_pretrained(tiny_llama(), tmp_path / "adapter").eval()
    trained_layers, initial = lora_layers(model), init_record(model).initial_factors
    for name, layer in lora_layers(plain).items():
        mine, (A0, B0) = trained_layers[name], initial[name]
        A, B = mine.lora_A["default"].weight.double(), mine.lora_B["default"].weight.double()
        update = mine.scaling["default"] * (B @ A - B0.double() @ A0.double())
        assert relative_error(layer.get_delta_weight("default"), update) < 1e-5, name
    with torch.no_grad():
        full = milora.load_model(tiny_llama(), tmp_path / "adapter")
        assert relative_error(full(tokens).logits, plain(tokens).logits) < 1e-5
    from milora.analysis.adapter import analyze_adapter

    analysis = analyze_adapter(tiny_llama(), tmp_path / "adapter", progress=False)
    assert analysis["init"] == "loftq" and analysis["summary"]["all"]["relative_update"] > 0

    from test_training import InterruptAt

    config = {"init": "loftq", "quantization": "nf4", "max_steps": 4, "lora_dropout": 0.0}
    train(run_config(tiny, tmp_path / "a", **config))
    assert train(run_config(tiny, tmp_path / "b", **config), callbacks=[InterruptAt(2)]).interrupted
    train(run_config(tiny, tmp_path / "b", **config, resume_from_checkpoint=True))
    from conftest import assert_same_adapter

    assert_same_adapter(tmp_path / "a", tmp_path / "b")


def test_cli_init_loftq(tiny, tmp_path, capsys):
    from milora.cli import main

    assert main(["init", tiny["model"], "--init", "loftq", "--quantize", "nf4", "--rank", "4", "--output",
                 str(tmp_path / "out")]) == 0
    assert '"quantization": "nf4"' in capsys.readouterr().out
    assert (tmp_path / "out" / "milora_config.json").is_file()


def test_loftq_bad_input_is_refused_before_anything_runs(tiny, setup, tmp_path):  # noqa: F811
    model = tiny_llama()
    before = copy.deepcopy(model.state_dict())
    for quantization, options, message in [
            (None, {}, "this base is in full precision: set quantization: nf4"),
            ("fp4", {}, "quantises to nf4 or int8 .* not 'fp4'"),
            ("nf4", {"lora_alpha": 8}, r"needs the LoRA scaling s = 1 .* s = 2: set lora_alpha equal to r")]:
        with pytest.raises(ModelError, match=message):
            milora.get_model(model, lora_config(**options), init="loftq", quantization=quantization)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ConfigError, match="set quantization: nf4"):
        train(run_config(tiny, tmp_path / "out", init="loftq"))
    with pytest.raises(ConfigError, match="ignores 'null_space'"):
        train(run_config(tiny, tmp_path / "out", init="loftq", quantization="nf4", null_space="random"))
    assert not (tmp_path / "out").exists()
    assert "pass --quantize nf4" in cli_error(["init", tiny["model"], "--output", str(tmp_path / "o"),
                                               "--init", "loftq"])
    assert not (tmp_path / "o").exists()
    with pytest.raises(ConfigError, match="init='loftq' fits its start"):
        load_sweep(sweep_values(setup, tmp_path / "sweep", methods=["lora", "loftq"]))
    assert not (tmp_path / "sweep").exists()
