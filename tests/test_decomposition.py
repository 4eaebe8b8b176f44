"""Every solver against a float64 numpy SVD on weights with known spectra.

Tolerance on the subspace (sine of the largest principal angle): the solvers work in float64
on Gram matrices, whose eigenvalues carry an absolute error ~eps * sigma_max^2, so the selected
subspace is accurate to about eps * sigma_max^2 / (sigma_r^2 - sigma_{r+1}^2). With
sigma_max = 1 and sigma >= 1e-3 below, we assert 1e-9 / gap (gap = relative boundary gap),
and only where the gap is above 1e-6: inside a cluster the subspace is not unique.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from peft import LoraConfig

import milora
from milora.decomposition import principal_angle_sine, select_components

RNG = np.random.default_rng(0)


def with_spectrum(m: int, n: int, singular_values: np.ndarray) -> torch.Tensor:
    k = min(m, n)
    U = np.linalg.qr(RNG.standard_normal((m, k)))[0]
    V = np.linalg.qr(RNG.standard_normal((n, k)))[0]
    return torch.from_numpy((U * singular_values) @ V.T)


def spectrum(kind: str, k: int) -> np.ndarray:
    if kind == "geometric":
        return np.logspace(0, -3, k)
    if kind == "clustered":  # the 12 smallest within 1e-10 of each other, well apart from the rest
        return np.concatenate([np.logspace(0, -2, k - 12), 1e-3 * (1 + 1e-10 * np.arange(12))[::-1]])
    if kind == "rank_deficient":  # 6 exact zeros
        return np.concatenate([np.logspace(0, -2, k - 6), np.zeros(6)])
    raise ValueError(kind)


SHAPES = [(48, 48), (72, 40), (40, 72)]
SOLVERS = {"milora": ["eigh", "lanczos", "svd"], "pissa": ["eigh", "lanczos", "svd"], "middle": ["eigh", "svd"]}


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("kind", ["geometric", "clustered", "rank_deficient"])
@pytest.mark.parametrize("selection", list(SOLVERS))
@pytest.mark.parametrize("r", [6, 8, 12])
def test_solvers_match_reference(shape, kind, selection, r):
    m, n = shape
    k = min(m, n)
    W = with_spectrum(m, n, spectrum(kind, k))
    U, S, Vh = np.linalg.svd(W.numpy(), full_matrices=False)
    start = {"milora": k - r, "pissa": 0, "middle": (k - r) // 2}[selection]
    block = slice(start, start + r)
    for solver in SOLVERS[selection]:
        parts = select_components(W, r, selection, solver)
        assert parts.U.shape == (m, r) and parts.Vh.shape == (r, n) and parts.S.shape == (r,)
        # orthonormal factors and W v = sigma u for every selected triplet whatever the gap
        # (for sigma = 0 the vectors of the other side are arbitrary: only sigma ~ 0 is checked)
        np.testing.assert_allclose(parts.U.T @ parts.U, np.eye(r), atol=1e-10)
        np.testing.assert_allclose(parts.Vh @ parts.Vh.T, np.eye(r), atol=1e-10)
        nonzero = parts.S > 1e-8
        np.testing.assert_allclose((W @ parts.Vh.T)[:, nonzero].numpy(), (parts.U * parts.S)[:, nonzero].numpy(), atol=1e-10)
        assert torch.all(parts.S[~nonzero] < 1e-12)
        gap = parts.boundary_gap
        if gap > 1e-6:
            tolerance = min(1e-9 / gap, 1e-3)
            reference_part = (U[:, block] * S[block]) @ Vh[block]
            part = ((parts.U * parts.S) @ parts.Vh).numpy()
            assert np.linalg.norm(part - reference_part, 2) <= tolerance * S[block].max() + 1e-12, (solver, gap)
            if S[block].min() > 1e-8:  # the vectors of zero singular values are not unique
                assert principal_angle_sine(parts.Vh.T, torch.from_numpy(Vh[block].T)) < tolerance, (solver, gap)
                assert principal_angle_sine(parts.U, torch.from_numpy(U[:, block])) < tolerance, (solver, gap)
            np.testing.assert_allclose(parts.S.numpy(), S[block], atol=1e-12)
        else:  # the boundary cuts a cluster: the report must say so
            assert kind == "clustered" and selection == "milora" and r < 12


def test_gap_reported_inside_and_outside_cluster():
    W = with_spectrum(48, 48, spectrum("clustered", 48))
    assert select_components(W, 8, "milora", "eigh").boundary_gap < 1e-8
    assert select_components(W, 12, "milora", "eigh").boundary_gap > 0.5


def test_lanczos_falls_back_on_singular_weight():
    W = with_spectrum(48, 48, spectrum("rank_deficient", 48))
    parts = select_components(W, 6, "milora", "lanczos")
    assert parts.solver == "eigh (lanczos failed)"  # LU pivots reveal the singular square weight
    W_rect = with_spectrum(72, 40, spectrum("rank_deficient", 40))
    assert select_components(W_rect, 6, "milora", "lanczos").solver == "eigh (lanczos failed)"


class OneLayer(torch.nn.Module):
    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.proj = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        self.proj.weight.data.copy_(weight)

    def forward(self, x):
        return self.proj(x)


@pytest.mark.parametrize("dtype,unit_roundoff", [(torch.float32, 2.0**-24), (torch.bfloat16, 2.0**-8)])
@pytest.mark.parametrize("solver", ["eigh", "lanczos", "svd"])
@pytest.mark.parametrize("kind", ["geometric", "rank_deficient"])
def test_reconstruction_exact_to_weight_dtype(dtype, unit_roundoff, solver, kind):
    """W_res + s B A = W up to rounding W_res once to the weight's dtype, for every solver."""
    W = with_spectrum(40, 40, spectrum(kind, 40)).to(dtype)
    model = milora.get_model(OneLayer(W), LoraConfig(r=6, lora_alpha=12, target_modules=["proj"]), solver=solver,
                             progress=False)
    layer = model.base_model.model.proj
    residual = layer.base_layer.weight.detach().double()
    product = layer.scaling["default"] * layer.lora_B["default"].weight.double() @ layer.lora_A["default"].weight.double()
    error = (residual + product - W.double()).abs()
    assert torch.all(error <= unit_roundoff * (residual.abs() + product.abs() + W.double().abs()))
