"""PEFT's starts as milora init modes: PEFT's own factors, recorded, saved for plain PEFT on the original base,
resumed exactly, analysed, and their bad input refused before anything runs."""

import copy

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora.corda import preprocess_corda
from peft.tuners.lora.eva import initialize_lora_eva_weights
from peft.tuners.lora.loraga import preprocess_loraga
from safetensors.torch import load_file

from milora.adapter import load_model, save_adapter
from milora.analysis.adapter import analyze_adapter
from milora.constants import DATA_INITS, PEFT_STARTS, RESIDUAL_INITS
from milora.errors import ModelError
from milora.init import get_model, lora_layers, weight_matrix
from milora.init.peft_starts import peft_lora_config
from milora.training.config import ConfigError
from milora.training.run import train

from conftest import LLAMA_TARGETS, cli_error, run_config, tiny_llama, train_steps

FULL_PRECISION_STARTS = [init for init in PEFT_STARTS if init != "loftq"]
"""PEFT's starts on a full-precision base (loftq needs a quantised one: tests/test_loftq.py)."""


def lora_config() -> LoraConfig:
    return LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, lora_dropout=0.0)


def calibration() -> list[dict]:
    """Two batches of two sequences, the second row of each padded by 3 tokens (labels -100 there)."""
    ids = torch.randint(3, 128, (4, 16), generator=torch.Generator().manual_seed(7))
    mask = torch.ones_like(ids)
    mask[1::2, -3:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return [{"input_ids": ids[i:i + 2], "attention_mask": mask[i:i + 2], "labels": labels[i:i + 2]} for i in (0, 2)]


def peft_reference(init: str, batches: list[dict]) -> PeftModel:
    """The same start made by calling PEFT directly (an independent path to the factors)."""
    model = tiny_llama()
    config = peft_lora_config(lora_config(), init)
    if init.startswith("corda"):
        def run_model():
            for batch in batches:
                for ids, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True):
                    model(input_ids=ids[mask == 1][None])
        preprocess_corda(model, config, run_model=run_model)
    if init == "lora-ga":
        preprocess_loraga(model, config, train_step=lambda: [model(**b).loss.backward() for b in batches])
    peft_model = get_peft_model(model, config)
    if init == "eva":
        initialize_lora_eva_weights(peft_model, dataloader=batches, show_progress_bar=False)
    return peft_model


@pytest.mark.parametrize("init", FULL_PRECISION_STARTS)
def test_start_is_peft_own_recorded_and_saved_for_plain_peft(init, tokens, tmp_path):
    batches = calibration() if init in DATA_INITS else None
    original = tiny_llama()
    torch.manual_seed(5)
    model = get_model(tiny_llama(), lora_config(), init=init, calibration=batches)
    torch.manual_seed(5)
    reference = peft_reference(init, batches)
    record = model.milora_init
    reference_layers = lora_layers(reference)
    originals = {name: weight_matrix(m) for name, m in original.named_modules() if name in reference_layers}
    for name, layer in lora_layers(model).items():
        peft_layer = reference_layers[name]
        for factor in ("lora_A", "lora_B"):  # PEFT's factors, bit for bit
            assert torch.equal(getattr(layer, factor)["default"].weight, getattr(peft_layer, factor)["default"].weight)
        entry = next(e for e in record.report if e["module"] == name)
        assert entry["base_changed"] == (init in RESIDUAL_INITS)
        assert entry["norm_B0"] == pytest.approx(float(layer.lora_B["default"].weight.detach().double().norm()))
        W = originals[name].double()
        W_res = weight_matrix(layer.get_base_layer()).double()
        if init in RESIDUAL_INITS:  # float64 reference: W_res + s B0 A0 = W to one float32 rounding
            A0, B0 = record.initial_factors[name]
            rebuilt = W_res + layer.scaling["default"] * B0.double() @ A0.double()
            assert float((rebuilt - W).norm() / W.norm()) < 2e-7
            peft_res = weight_matrix(peft_layer.get_base_layer()).double()
            assert entry["peft_residual_difference"] == pytest.approx(float((peft_res - W_res).norm() / W.norm()))
            assert entry["peft_residual_difference"] < 1e-6
        else:
            assert torch.equal(W_res, W) and not record.initial_factors
    assert record.measured["function_preserving"] and record.measured["output_relative_error"] < 1e-5
    assert record.measured["base_changed"] == (init in RESIDUAL_INITS)

    train_steps(model, tokens)
    with torch.no_grad():
        trained = model(tokens).logits
    save_adapter(model, tmp_path / "adapter")
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    rank = 8 if init in RESIDUAL_INITS else 4
    assert all(v.shape[0] == rank for k, v in saved.items() if k.endswith("lora_A.weight"))
    assert any(k.endswith("lora_magnitude_vector") for k in saved) == (init == "dora")
    with torch.no_grad():
        plain = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "adapter")).eval()(tokens).logits
        rebuilt = load_model(tiny_llama(), tmp_path / "adapter")(tokens).logits
    assert torch.allclose(plain, trained, rtol=1e-5, atol=1e-5)
    assert torch.equal(rebuilt, trained)
    analysis = analyze_adapter(tiny_llama(), tmp_path / "adapter", progress=False)
    assert analysis["init"] == init and analysis["summary"]["all"]["relative_update"] > 0


def test_dora_analysis_measures_the_merged_update(tokens, tmp_path):
    """DoRA's Delta W (magnitudes included) against PEFT's own merge, in float64."""
    model = get_model(tiny_llama(), lora_config(), init="dora")
    train_steps(model, tokens)
    save_adapter(model, tmp_path / "dora")
    merged = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "dora")).merge_and_unload()
    base = dict(tiny_llama().named_modules())
    analysis = analyze_adapter(tiny_llama(), tmp_path / "dora", progress=False)
    for layer in analysis["layers"]:
        W = weight_matrix(base[layer["module"]]).double()
        delta = weight_matrix(dict(merged.named_modules())[layer["module"]]).double() - W
        assert layer["relative_update"] == pytest.approx(float(delta.norm() / W.norm()), rel=1e-4)


@pytest.mark.parametrize("init", FULL_PRECISION_STARTS)
def test_resume_matches_uninterrupted(init, tiny, tmp_path):
    from test_training import InterruptAt

    config = {"init": init, "max_steps": 4, "calibration_batches": 2} if init in DATA_INITS else {
        "init": init, "max_steps": 4}
    train(run_config(tiny, tmp_path / "a", **config))
    stopped = train(run_config(tiny, tmp_path / "b", **config), callbacks=[InterruptAt(2)])
    assert stopped.interrupted
    train(run_config(tiny, tmp_path / "b", **config, resume_from_checkpoint=True))
    a = load_file(tmp_path / "a" / "adapter_model.safetensors")
    b = load_file(tmp_path / "b" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_bad_input_is_refused_before_anything_changes(tiny, tmp_path):
    model = tiny_llama()
    before = copy.deepcopy(model.state_dict())
    for kwargs, message in [
        ({"init": "corda-kpm"}, "computes its start from training batches"),
        ({"init": "eva", "calibration": []}, "computes its start from training batches"),
        ({"init": "olora", "calibration": calibration()}, "takes no data"),
        ({"init": "milora", "calibration": calibration()}, "takes no data"),
        ({"init": "dora", "null_space": "random"}, "null_space='random' has no effect on init='dora'"),
        ({"init": "olora", "solver": "lanczos"}, "solver='lanczos' has no effect"),
        ({"init": "mica", "quantization": "nf4"}, "quantization='nf4' has no effect"),
        ({"init": "pissa-fast", "pissa_niter": 0}, "pissa_niter must be a positive integer"),
    ]:
        with pytest.raises(ModelError, match=message):
            get_model(model, lora_config(), **kwargs)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    for extra, message in [({"init": "dora", "null_space": "random"}, "init='dora' ignores 'null_space'"),
                           ({"init": "milora", "calibration_batches": 3}, "ignores 'calibration_batches'"),
                           ({"init": "olora", "pissa_niter": 8}, "ignores 'pissa_niter'")]:
        with pytest.raises(ConfigError, match=message):
            train(run_config(tiny, tmp_path / "out", **extra))
    assert not (tmp_path / "out").exists()
    assert "--pissa-niter is for --init pissa-fast" in cli_error(
        ["init", tiny["model"], "--output", str(tmp_path / "o"), "--init", "olora", "--pissa-niter", "8"])


def test_a_peft_too_old_for_a_start_is_named(monkeypatch):
    from peft.tuners.lora import LoraLayer

    monkeypatch.delattr(LoraLayer, "mica_init")
    with pytest.raises(ModelError, match=r"init=.mica. needs a newer PEFT than the installed .* lacks LoraLayer.mica"):
        get_model(tiny_llama(), lora_config(), init="mica")


def test_cli_init_saves_a_peft_start(tiny, tmp_path, capsys):
    from milora.cli import main

    assert main(["init", tiny["model"], "--output", str(tmp_path / "olora"), "--init", "olora", "--rank", "4"]) == 0
    out = capsys.readouterr().out
    assert "rank-8 LoRA on the original base" in out and '"function_preserving": true' in out
    assert main(["init", tiny["model"], "--output", str(tmp_path / "dora"), "--init", "dora", "--rank", "4"]) == 0
    assert "rank-4 LoRA" in capsys.readouterr().out


@pytest.mark.parametrize(("error", "preserving"), [(0.9e-4, True), (1.1e-4, False)])
def test_function_preserving_is_at_most_1e_4_in_float32_and_a_start_above_warns(error, preserving):
    """docs/baselines.md: `function_preserving` (float32: at most 1e-4) and a warning for a start that is not."""
    import warnings

    from milora.init.peft_starts import _measure_output
    from milora.init.record import InitRecord

    before = torch.zeros(2, 100)
    before[0, 0] = 1.0
    after = before.clone()
    after[1, 0] = error  # relative error exactly `error`
    record = InitRecord(init="olora", solver="peft", seed=0, fingerprint={}, report=[])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _measure_output(record, before, after, "olora", torch.float32)
    assert record.measured["output_relative_error"] == pytest.approx(error, rel=1e-6)
    assert record.measured["function_preserving"] is preserving
    messages = [str(w.message) for w in caught if "function-preserving" in str(w.message)]
    assert len(messages) == (0 if preserving else 1)
    assert all("above 0.0001" in message for message in messages)
