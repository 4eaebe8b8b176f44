"""Initialisation against an independent float64 reference (numpy SVD).

Tolerances: the tiny models' weights are float32 and the reference decomposes exactly those
values in float64, so the only error sources are the solver (~1e-12 / boundary gap) and the
rounding of A and B to float32 (relative 6e-8). We allow 1e-5 on relative errors.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from peft import LoraConfig

import milora
from milora.init import lora_layers, weight_matrix
from milora.linalg import decomposition
from milora.linalg.decomposition import principal_angle_sine

from conftest import GPT2_TARGETS, LLAMA_TARGETS, tiny_gpt2, tiny_llama

TOL = 1e-5


def original_weights(model) -> dict[str, np.ndarray]:
    return {name: weight_matrix(module).detach().double().numpy().copy() for name, module in model.named_modules()
            if hasattr(module, "weight") and module.weight is not None and module.weight.ndim == 2}


def reference_block(weight: np.ndarray, init: str, r: int):
    """Float64 numpy SVD and the selected block for the contiguous modes."""
    U, S, Vh = np.linalg.svd(weight, full_matrices=False)
    k = S.size
    start = {"milora": k - r, "pissa": 0, "middle": (k - r) // 2}[init]
    block = slice(start, start + r)
    return U[:, block], S[block], Vh[block], (U, S, Vh)


def adapter_product(layer) -> np.ndarray:
    """s * B @ A in float64, as (out x in)."""
    A = layer.lora_A["default"].weight.detach().double().numpy()
    B = layer.lora_B["default"].weight.detach().double().numpy()
    return layer.scaling["default"] * B @ A


CASES = [
    pytest.param({"r": 8, "lora_alpha": 8}, id="alpha=r"),
    pytest.param({"r": 8, "lora_alpha": 32}, id="alpha=4r"),
    pytest.param({"r": 8, "lora_alpha": 5, "use_rslora": True}, id="rslora"),
    pytest.param({"r": 8, "lora_alpha": 8, "rank_pattern": {"k_proj": 4}, "alpha_pattern": {"up_proj": 3}},
                 id="patterns"),
    pytest.param({"r": 5, "lora_alpha": 5, "rank_pattern": {"k_proj": 5}}, id="odd-offset"),  # middle: (k - r) // 2 odd
]


@pytest.mark.parametrize("code_path", ["cpu", "device"])
@pytest.mark.parametrize("init", ["milora", "pissa", "middle"])
@pytest.mark.parametrize("options", CASES)
def test_selected_part_matches_float64_reference(init, options, code_path, monkeypatch):
    """code_path "device": the torch solvers a GPU uses (see test_decomposition), on CPU tensors."""
    if code_path == "device":
        monkeypatch.setattr(decomposition, "_on_lapack", lambda w: False)
    model = tiny_llama()
    weights = original_weights(model)
    peft_model = milora.get_model(model, LoraConfig(target_modules=LLAMA_TARGETS, **options), init=init, progress=False)
    layers = lora_layers(peft_model)
    assert len(layers) == 2 * len(LLAMA_TARGETS)
    for name, layer in layers.items():
        r = layer.r["default"]
        k_rank = options.get("rank_pattern", {}).get("k_proj", options["r"])
        expected = k_rank if name.endswith("k_proj") else options["r"]
        assert r == expected, name
        U_sel, S_sel, Vh_sel, _ = reference_block(weights[name], init, r)
        selected = (U_sel * S_sel) @ Vh_sel
        product = adapter_product(layer)
        assert np.linalg.norm(product - selected) / np.linalg.norm(selected) < TOL, name
        B = layer.lora_B["default"].weight.detach()
        A = layer.lora_A["default"].weight.detach()
        assert principal_angle_sine(B, torch.from_numpy(U_sel)) < TOL, name
        assert principal_angle_sine(A.T, torch.from_numpy(Vh_sel.T)) < TOL, name
        # B = U sqrt(S/s), A = sqrt(S/s) V^T: equal column / row norms
        expected = np.sqrt(S_sel / layer.scaling["default"])
        np.testing.assert_allclose(B.double().norm(dim=0).numpy(), expected, rtol=TOL)
        np.testing.assert_allclose(A.double().norm(dim=1).numpy(), expected, rtol=TOL)


@pytest.mark.parametrize("solver", ["eigh", "lanczos", "svd"])
def test_solvers_agree_on_gpt2_conv1d(solver):
    model = tiny_gpt2()
    weights = original_weights(model)
    peft_model = milora.get_model(model, LoraConfig(r=6, lora_alpha=12, target_modules=GPT2_TARGETS,
                                                    fan_in_fan_out=True), solver=solver, progress=False)
    for name, layer in lora_layers(peft_model).items():
        U_sel, S_sel, Vh_sel, _ = reference_block(weights[name], "milora", 6)
        selected = (U_sel * S_sel) @ Vh_sel
        assert np.linalg.norm(adapter_product(layer) - selected) / np.linalg.norm(selected) < TOL, name
        # the residual stored in the Conv1D's (in x out) layout plus the adapter gives W back
        residual = weight_matrix(layer.get_base_layer()).detach().double().numpy()
        np.testing.assert_allclose(residual + adapter_product(layer), weights[name], atol=1e-6)


def test_random_init_picks_true_triplets_and_is_seeded():
    model = tiny_llama()
    weights = original_weights(model)
    peft_model = milora.get_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=LLAMA_TARGETS), init="random",
                                  seed=7, progress=False)
    layers = lora_layers(peft_model)
    for name, layer in layers.items():
        U, S, _ = np.linalg.svd(weights[name], full_matrices=False)
        product_singular_values = np.linalg.svd(adapter_product(layer), compute_uv=False)[:8]
        # each selected singular value is one of W's, and B spans the matching left vectors
        matches = [int(np.argmin(np.abs(S - value))) for value in product_singular_values]
        np.testing.assert_allclose(S[matches], product_singular_values, rtol=TOL)
        assert len(set(matches)) == 8
        B = layer.lora_B["default"].weight.detach()
        assert principal_angle_sine(B, torch.from_numpy(U[:, sorted(matches)])) < TOL
    again = lora_layers(milora.get_model(tiny_llama(), LoraConfig(r=8, lora_alpha=16, target_modules=LLAMA_TARGETS),
                                         init="random", seed=7, progress=False))
    other = lora_layers(milora.get_model(tiny_llama(), LoraConfig(r=8, lora_alpha=16, target_modules=LLAMA_TARGETS),
                                         init="random", seed=8, progress=False))
    name = next(iter(layers))
    assert torch.equal(layers[name].lora_A["default"].weight, again[name].lora_A["default"].weight)
    assert not torch.equal(layers[name].lora_A["default"].weight, other[name].lora_A["default"].weight)


def test_lora_init_keeps_peft_default_and_base_weights():
    model = tiny_llama()
    weights = original_weights(model)
    peft_model = milora.get_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=LLAMA_TARGETS), init="lora")
    for name, layer in lora_layers(peft_model).items():
        assert torch.count_nonzero(layer.lora_B["default"].weight) == 0
        np.testing.assert_array_equal(weight_matrix(layer.get_base_layer()).detach().double().numpy(), weights[name])
    assert peft_model.milora_init.initial_factors == {}


@pytest.mark.parametrize("init", ["milora", "pissa", "middle", "random"])
def test_output_at_init_equals_base_float32(init, tokens):
    model = tiny_llama()
    with torch.no_grad():
        before = model(tokens).logits.double()
    peft_model = milora.get_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=LLAMA_TARGETS), init=init,
                                  progress=False)
    with torch.no_grad():
        after = peft_model(tokens).logits.double()
    assert float((after - before).norm() / before.norm()) < 1e-5
    summary = peft_model.milora_init.summary()
    assert summary["max_reconstruction_error"] < 1e-6
    assert summary["weights"] == 10


def test_bfloat16_reconstruction_bound(tokens):
    """bfloat16 guarantee: each residual element is the float64 value W - sBA rounded to bfloat16,
    so |W_res + sBA - W| <= 2^-8 |W - sBA| <= 2^-8 / (1 - 2^-8) |W_res| elementwise
    (unit roundoff of bfloat16's 8-bit significand). The output error this causes is measured."""
    model = tiny_llama(dtype=torch.bfloat16)
    weights = original_weights(model)
    with torch.no_grad():
        before = model(tokens).logits.double()
    peft_model = milora.get_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=LLAMA_TARGETS), progress=False)
    u = 2.0**-8
    for name, layer in lora_layers(peft_model).items():
        assert layer.lora_A["default"].weight.dtype == torch.float32  # PEFT keeps adapters in float32
        residual = weight_matrix(layer.get_base_layer()).detach().double().numpy()
        error = np.abs(residual + adapter_product(layer) - weights[name])
        assert np.all(error <= u / (1 - u) * np.abs(residual) + 1e-12), name
    with torch.no_grad():
        after = peft_model(tokens).logits.double()
    output_error = float((after - before).norm() / before.norm())
    assert output_error < 2e-2, output_error  # measured 5.9e-3 on this model
    assert peft_model.milora_init.summary()["max_reconstruction_error"] < u


def test_report_names_solver_and_gap():
    peft_model = milora.get_model(tiny_llama(), LoraConfig(r=8, target_modules=LLAMA_TARGETS), progress=False)
    report = peft_model.milora_init.report
    for entry in report:
        assert entry["solver"] == "eigh", entry  # auto on small weights (the rule: test_decomposition)
        assert 0 < entry["boundary_gap"] < 1 and entry["sigma_min_selected"] <= entry["sigma_max_selected"]
    random_report = milora.get_model(tiny_llama(), LoraConfig(r=8, target_modules=LLAMA_TARGETS), init="random",
                                     progress=False).milora_init
    assert {entry["solver"] for entry in random_report.report} == {"svd"}
    assert all(entry["boundary_gap"] is None for entry in random_report.report)
    assert math.isnan(random_report.summary()["min_boundary_gap"])


def test_report_says_why_lanczos_handed_over():
    """A dead feature (a zero input column) makes W singular: Lanczos hands over to eigh and the
    report names the solver that ran and the reason. On weights this small the dense solver is
    cheaper than any Lanczos run, so the others hand over by the budget, also with a reason."""
    model = tiny_llama()
    q_proj = model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        q_proj.weight[:, 3] = 0
    with pytest.warns(UserWarning, match="rank-deficient"):
        peft_model = milora.get_model(model, LoraConfig(r=4, target_modules=LLAMA_TARGETS), solver="lanczos",
                                      progress=False)
    entries = {entry["module"]: entry for entry in peft_model.milora_init.report}
    dead = entries["model.layers.0.self_attn.q_proj"]
    assert dead["solver"] == "eigh (lanczos failed)" and "singular" in dead["solver_reason"], dead
    others = [entry for name, entry in entries.items() if entry is not dead]
    assert {entry["solver"] for entry in others} == {"eigh (lanczos over budget)"}
    assert all(entry["solver_reason"] for entry in others)
    assert peft_model.milora_init.summary()["max_reconstruction_error"] < 1e-6


def test_concurrent_init_matches_sequential():
    """workers=2 (two weights at once, one BLAS thread each) gives the adapters of workers=1,
    in the same modules, to float32 rounding of identical float64 results (1e-6 relative)."""
    config = LoraConfig(r=8, target_modules=LLAMA_TARGETS)
    one = milora.get_model(tiny_llama(), config, workers=1, progress=False)
    two = milora.get_model(tiny_llama(), config, workers=2, progress=False)
    assert one.milora_init.measured["workers"] == 1 and two.milora_init.measured["workers"] == 2
    state_one, state_two = one.state_dict(), two.state_dict()
    assert state_one.keys() == state_two.keys()
    for name, value in state_one.items():
        assert torch.allclose(value, state_two[name], rtol=1e-6, atol=1e-7), name


def test_failure_mid_init_restores_thread_settings(monkeypatch):
    """An exception in the init loop (here: the third weight) must not leave torch on the
    single thread the concurrent decompositions use."""
    import milora.init.initialize

    calls = []
    original = milora.init.initialize.set_adapter_factors

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(milora.init.initialize, "set_adapter_factors", failing)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        milora.get_model(tiny_llama(), LoraConfig(r=4, target_modules=LLAMA_TARGETS), workers=2, progress=False)
    except KeyboardInterrupt as interrupt:  # the traceback keeps the init's frames alive here, as in a debugger
        assert interrupt.__traceback__ is not None and torch.get_num_threads() == 2
    else:
        pytest.fail("the init should have been interrupted")
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("options,count", [
    ({"target_modules": r".*\.(q_proj|v_proj)"}, 4),  # a regex, matched in full by PEFT
    ({"target_modules": LLAMA_TARGETS, "layers_to_transform": [1]}, 5),
    ({"target_modules": LLAMA_TARGETS, "exclude_modules": ["k_proj"]}, 8),
    ({"target_modules": "all-linear"}, 14),
])
def test_peft_target_selection_options(options, count, tokens):
    """Every way PEFT selects modules gives the modules PEFT adapts, and the base model's output."""
    base = tiny_llama()
    peft_model = milora.get_model(tiny_llama(), LoraConfig(r=4, **options), progress=False)
    assert len(lora_layers(peft_model)) == len(peft_model.milora_init.report) == count
    with torch.no_grad():
        expected = base(tokens).logits.double()
        assert float((peft_model(tokens).logits.double() - expected).norm() / expected.norm()) < TOL
