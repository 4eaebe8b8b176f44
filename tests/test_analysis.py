"""`milora.analysis` against an independent float64 reference built from dense numpy SVDs.

Tolerances: random test matrices have well-separated singular values (relative gaps > 1e-2),
so the float64 subspaces are determined to ~1e-13 and every metric is compared to 1e-9
relative. Updates constructed inside one subspace give energies of exactly 1 and 0 up to
rounding (1e-12).
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import scipy.linalg
import torch
from peft import LoraConfig, get_peft_model

import milora
from milora.analysis import METRICS, analyze_adapter, format_analysis, update_metrics
from milora.cli import main
from milora.init import lora_layers, weight_matrix

from conftest import GPT2_TARGETS, LLAMA_TARGETS, cli_error, tiny_gpt2, tiny_llama

RNG = np.random.default_rng(7)


def reference_metrics(w: np.ndarray, update: np.ndarray, k: int) -> dict:
    """The documented formulas on the dense update, with numpy's full SVDs and scipy's angles."""
    U, S, Vt = np.linalg.svd(w, full_matrices=False)
    Ud, _, Vdt = np.linalg.svd(update, full_matrices=False)
    U2, S2, Vt2 = np.linalg.svd(w + update, full_matrices=False)
    norm2 = np.linalg.norm(update) ** 2
    return {
        "relative_update": np.linalg.norm(update) / np.linalg.norm(w),
        "principal_energy": np.linalg.norm(U[:, :k].T @ update @ Vt[:k].T) ** 2 / norm2,
        "minor_energy": np.linalg.norm(U[:, -k:].T @ update @ Vt[-k:].T) ** 2 / norm2,
        "chance_energy": k * k / w.size,
        "amplification": np.linalg.norm(update) / np.linalg.norm(Ud[:, :k].T @ w @ Vdt[:k].T),
        "principal_rotation": max(
            np.sin(scipy.linalg.subspace_angles(U[:, :k], U2[:, :k])).max(),
            np.sin(scipy.linalg.subspace_angles(Vt[:k].T, Vt2[:k].T)).max(),
        ),
        "principal_value_change": np.max(np.abs(S2[:k] - S[:k]) / S[:k]),
        "principal_gap": (S[k - 1] - S[k]) / S[k - 1],
    }


@pytest.mark.parametrize("shape", [(60, 40), (40, 60)])
def test_update_metrics_match_dense_reference(shape):
    w = RNG.standard_normal(shape)
    left, right = RNG.standard_normal((shape[0], 6)) * 0.3, RNG.standard_normal((6, shape[1]))
    found = update_metrics(torch.from_numpy(w), torch.from_numpy(left), torch.from_numpy(right), k=5)
    expected = reference_metrics(w, left @ right, 5)
    assert set(found) == set(expected)
    for name, value in expected.items():
        assert found[name] == pytest.approx(value, rel=1e-9), name


def test_updates_inside_one_subspace():
    """An update built from W's bottom-k triplets lies wholly in the minor subspace (and leaves
    the top-k subspace and values untouched); one built from the top-k ones, in the principal."""
    m, n, k = 50, 30, 4
    U, _ = np.linalg.qr(RNG.standard_normal((m, n)))
    V, _ = np.linalg.qr(RNG.standard_normal((n, n)))
    S = np.linspace(10, 1, n)
    w = torch.from_numpy(U @ np.diag(S) @ V.T)
    scale = np.array([0.3, 0.2, 0.1, 0.05])
    minor = update_metrics(w, torch.from_numpy(U[:, -k:] * scale), torch.from_numpy(V[:, -k:].T), k)
    assert minor["minor_energy"] == pytest.approx(1, abs=1e-12) and minor["principal_energy"] < 1e-24
    assert minor["principal_rotation"] < 1e-12 and minor["principal_value_change"] < 1e-12
    principal = update_metrics(w, torch.from_numpy(U[:, :k] * scale), torch.from_numpy(V[:, :k].T), k)
    assert principal["principal_energy"] == pytest.approx(1, abs=1e-12) and principal["minor_energy"] < 1e-24
    assert principal["principal_rotation"] < 1e-12
    assert principal["principal_value_change"] == pytest.approx(max(scale / S[:k]), rel=1e-10)


def test_zero_update():
    found = update_metrics(torch.randn(20, 12), torch.zeros(20, 3), torch.randn(3, 12), k=3)
    assert found["relative_update"] == 0 and found["principal_rotation"] == 0
    assert found["principal_energy"] is None and found["minor_energy"] is None and found["amplification"] is None


def _perturb_adapter(peft_model, scale=0.05):
    """Stand-in for training: move every trainable factor by a seeded random step."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _name, parameter in peft_model.named_parameters():
            if parameter.requires_grad:
                parameter.add_(scale * torch.randn(parameter.shape, generator=generator))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_analyze_saved_adapter_matches_in_memory_update(family, tmp_path):
    """Saved (rank-2r) adapter on the original base: per layer the metrics of the trained update
    s (B A - B0 A0), taken from the in-memory model and the untouched original weights."""
    build, options = (tiny_llama, {"target_modules": LLAMA_TARGETS}) if family == "llama" else (
        tiny_gpt2, {"target_modules": GPT2_TARGETS, "fan_in_fan_out": True})
    peft_model = milora.get_model(build(), LoraConfig(r=4, lora_alpha=8, **options), progress=False)
    untrained = analyze_adapter(build(), milora.save_adapter(peft_model, tmp_path / "untrained"), progress=False)
    assert all(entry["relative_update"] == 0 for entry in untrained["layers"])
    _perturb_adapter(peft_model)
    milora.save_adapter(peft_model, tmp_path / "trained")
    result = analyze_adapter(build(), tmp_path / "trained", label="MiLoRA", progress=False)
    assert result["init"] == "milora" and result["label"] == "MiLoRA"
    original = {name: weight_matrix(module).detach().double()
                for name, module in build().named_modules() if hasattr(module, "weight")}
    layers = lora_layers(peft_model)
    assert [entry["module"] for entry in result["layers"]] == list(layers)
    for entry in result["layers"]:
        layer = layers[entry["module"]]
        A0, B0 = peft_model.milora_init.initial_factors[entry["module"]]
        A, B = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
        update = layer.scaling["default"] * (B @ A - B0.double() @ A0.double())
        expected = reference_metrics(original[entry["module"]].numpy(), update.detach().numpy(), 4)
        assert entry["k"] == 4 and entry["shape"] == list(original[entry["module"]].shape)
        for name, value in expected.items():
            # same float32 factors, float64 arithmetic on both sides; the boundary gaps of these
            # random weights (> 1e-3) bound the subspace error to ~1e-12
            assert entry[name] == pytest.approx(value, rel=1e-9, abs=1e-14), (entry["module"], name)
    kinds = set(result["summary"]) - {"all"}
    assert kinds == {name.rsplit(".", 1)[-1] for name in layers}
    assert "MiLoRA" in format_analysis([result])


def test_minor_start_keeps_the_update_out_of_the_principal_subspace(tmp_path):
    """A small step from a MiLoRA start changes W mostly inside its minor subspace, from a PiSSA
    start inside its principal one: the property the analysis exists to show."""
    energies = {}
    for init in ("milora", "pissa"):
        peft_model = milora.get_model(tiny_llama(), LoraConfig(r=4, lora_alpha=4, target_modules=LLAMA_TARGETS),
                                      init=init, progress=False)
        _perturb_adapter(peft_model, scale=1e-3)
        result = analyze_adapter(tiny_llama(), milora.save_adapter(peft_model, tmp_path / init), progress=False)
        energies[init] = result["summary"]["all"]
    assert energies["milora"]["minor_energy"] > 10 * energies["milora"]["principal_energy"]
    assert energies["pissa"]["principal_energy"] > 10 * energies["pissa"]["minor_energy"]


def test_concurrent_analysis_matches_sequential(tmp_path):
    """With 2 torch threads the layers are analysed 2 at a time: same results (to 1e-12)."""
    peft_model = milora.get_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS),
                                  progress=False)
    _perturb_adapter(peft_model)
    milora.save_adapter(peft_model, tmp_path / "adapter")
    sequential = analyze_adapter(tiny_llama(), tmp_path / "adapter", progress=False)["layers"]
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        concurrent = analyze_adapter(tiny_llama(), tmp_path / "adapter", progress=False)["layers"]
        assert torch.get_num_threads() == 2  # restored after the concurrent section
    finally:
        torch.set_num_threads(threads)
    assert [entry["module"] for entry in concurrent] == [entry["module"] for entry in sequential]
    for one, other in zip(sequential, concurrent, strict=True):
        for name in METRICS:
            assert one[name] == pytest.approx(other[name], rel=1e-12, abs=1e-15), (one["module"], name)


def test_plain_peft_adapter_and_wrong_base(tmp_path):
    peft_model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS))
    _perturb_adapter(peft_model)
    peft_model.save_pretrained(tmp_path / "plain")
    result = analyze_adapter(tiny_llama(), tmp_path / "plain", progress=False)
    assert result["init"] == "peft" and all(entry["relative_update"] > 0 for entry in result["layers"])
    milora_model = milora.get_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS),
                                    progress=False)
    milora.save_adapter(milora_model, tmp_path / "milora")
    with pytest.raises(ValueError, match="different base weights"):
        analyze_adapter(tiny_llama(seed=1), tmp_path / "milora", progress=False)
    with pytest.raises(FileNotFoundError, match=r"has no adapter_config\.json"):
        analyze_adapter(tiny_llama(), tmp_path, progress=False)
    with pytest.raises(ValueError, match=r"k=40 is too large for model.layers.0.self_attn.k_proj \(32 x 64\)"):
        analyze_adapter(tiny_llama(), tmp_path / "plain", rank=40, progress=False)
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        analyze_adapter(tiny_llama(), tmp_path / "plain", rank=0, progress=False)


def test_cli_analyze_compares_adapters(tmp_path, capsys):
    tiny_llama().save_pretrained(tmp_path / "model")
    for init in ("milora", "pissa"):
        assert main(["init", str(tmp_path / "model"), "--output", str(tmp_path / init), "--rank", "4",
                     "--init", init]) == 0
    capsys.readouterr()
    assert re.search("use one of the extensions", cli_error(["analyze", str(tmp_path / "milora"),
                                                             "--model", str(tmp_path / "model"),
                                                             "--plot", str(tmp_path / "a.xyz")]))
    assert re.search("does not exist", cli_error(["analyze", str(tmp_path / "nowhere"),
                                                  "--model", str(tmp_path / "model")]))
    assert re.search("--labels has 1 names for 2 adapters", cli_error(["analyze", str(tmp_path / "milora"),
                                                                       str(tmp_path / "pissa"), "--labels", "MiLoRA"]))
    assert main(["analyze", str(tmp_path / "milora"), str(tmp_path / "pissa"), "--model", str(tmp_path / "model"),
                 "--rank", "2", "--output", str(tmp_path / "a.json"), "--plot", str(tmp_path / "a.png"),
                 "--labels", "MiLoRA,PiSSA"]) == 0
    assert "MiLoRA" in capsys.readouterr().out and (tmp_path / "a.png").stat().st_size > 0
    results = json.loads((tmp_path / "a.json").read_text())
    assert [r["init"] for r in results] == ["milora", "pissa"] and [r["label"] for r in results] == ["MiLoRA", "PiSSA"]
    assert all(entry["k"] == 2 and entry["relative_update"] == 0 for r in results for entry in r["layers"])
