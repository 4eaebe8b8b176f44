"""The budgeted block Lanczos solver and the ``auto`` rule, on spectra of each benchmark family.

Spectra are built from seeded singular vectors (deterministic), at k = 600 so every test runs
in well under a second. Exactness is checked against a float64 numpy SVD with the perturbation
bound of a Gram-matrix solver: a backward error of at most C eps ||G|| in G = W^T W moves the
minor subspace by at most C eps sigma_max^2 / (sigma_r^2 - sigma_{r+1}^2); eigh attains it with
C of order 1, Lanczos stops at a residual of 1e-14 ||G|| (C = 45), so we allow C = 1000.
The budget decisions come from a cost model in flops, not timings, so outcomes are
deterministic; the cost model itself is tied to measurements in benchmarks/RESULTS.md. At
k = 600 the dense solver is too cheap for Lanczos to be worth it, so the tests that follow
Lanczos to the end scale the dense solver's predicted cost by 3 (`large_weight_budget`): the
basis then affords about 200 vectors, as a 2048 x 2048 weight's does.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from milora.linalg import decomposition, lanczos
from milora.linalg.decomposition import principal_angle_sine, resolve_solver, select_components

K, R = 600, 16
EPS = np.finfo(np.float64).eps


@pytest.fixture
def large_weight_budget(monkeypatch):
    monkeypatch.setattr(lanczos, "COSTS", lanczos.CostModel(dense_scale=3.0))


def quarter_circle(k: int) -> np.ndarray:
    """Descending quantiles of the quarter-circle law on [0, 2]: a square Gaussian matrix's
    singular values, with their hard edge at 0 (well separated smallest values)."""
    grid = np.linspace(0, 2, 100_001)
    cdf = (grid * np.sqrt(4 - grid**2) / 2 + 2 * np.arcsin(grid / 2)) / np.pi
    return np.interp((np.arange(k) + 0.5) / k, cdf, grid)[::-1]


def spectrum(family: str, k: int = K, r: int = R) -> np.ndarray:
    """Descending singular values of each test family (see benchmarks/spectra.py for the benchmark ones)."""
    if family == "gaussian":  # hard edge plus 4 outliers
        return np.concatenate([[20.0, 12.0, 8.0, 5.0], quarter_circle(k - 4)])
    if family == "power":  # relative gaps 0.6 / k at the bottom
        return 20 * np.arange(1, k + 1) ** -0.6
    if family in ("clustered", "wide_cluster"):  # 8 (or 24) values around the boundary within 1e-4 (1e-3)
        size, width = (8, 1e-4) if family == "clustered" else (24, 1e-3)
        ascending = spectrum("gaussian", k)[::-1].copy()
        lo = r - size // 2
        ascending[lo : lo + size] = ascending[lo] * (1 + width * np.linspace(0, 1, size))
        return ascending[::-1].copy()
    raise ValueError(family)


def weight(family: str, m: int = K, n: int = K, seed: int = 0) -> torch.Tensor:
    """W = U diag(sigma) V^T in float64 with seeded random orthonormal U, V; rank_deficient: the
    gaussian weight with its last input feature (column of the smaller side) set to zero."""
    rng = np.random.default_rng(seed)
    k = min(m, n)
    sigma = spectrum("gaussian" if family == "rank_deficient" else family, k)
    U = np.linalg.qr(rng.standard_normal((m, k)))[0]
    V = np.linalg.qr(rng.standard_normal((n, k)))[0]
    w = (U * sigma) @ V.T
    if family == "rank_deficient":
        w[:, -1] = 0
    return torch.from_numpy(w)


def assert_exact(parts, w: torch.Tensor, r: int = R) -> None:
    """The r minor triplets match a float64 numpy SVD to the Gram-matrix perturbation bound: the
    singular values, the right subspace and the selected part U S Vh (whose left vectors are
    arbitrary where sigma = 0)."""
    U, S, Vh = np.linalg.svd(w.numpy(), full_matrices=False)
    np.testing.assert_allclose(parts.S.numpy(), S[-r:], rtol=0, atol=1e3 * EPS * S[0])
    tolerance = 1e3 * EPS * S[0] ** 2 / (S[-r - 1] ** 2 - S[-r] ** 2)
    assert principal_angle_sine(parts.Vh.T, torch.from_numpy(Vh[-r:].T)) < tolerance
    part = ((parts.U * parts.S) @ parts.Vh).numpy()
    assert np.linalg.norm(part - (U[:, -r:] * S[-r:]) @ Vh[-r:], 2) < tolerance * S[-r:].max()


@pytest.mark.parametrize("family", ["wide_cluster", "power"])
def test_budgeted_lanczos_falls_back_and_stays_exact(large_weight_budget, family):
    """On a crowded minor spectrum Lanczos stops early, says why, and eigh finishes on the same
    Gram matrix: the result is eigh's, bit for bit, and float64-exact."""
    w = weight(family)
    parts = select_components(w, R, "milora", "lanczos")
    assert parts.solver == "eigh (lanczos over budget)"
    assert "basis vectors" in parts.reason
    dense = select_components(w, R, "milora", "eigh")
    assert dense.solver == "eigh" and dense.reason == ""
    assert torch.equal(parts.U, dense.U) and torch.equal(parts.S, dense.S) and torch.equal(parts.Vh, dense.Vh)
    assert_exact(parts, w)


@pytest.mark.parametrize("family", ["gaussian", "clustered"])
def test_lanczos_converges_where_the_spectrum_suits_it(large_weight_budget, family):
    """A hard edge, even with 8 values squeezed into 1e-4 around the boundary (fewer than a
    block), converges within budget; float64-exact like eigh."""
    w = weight(family)
    parts = select_components(w, R, "milora", "lanczos")
    assert parts.solver == "lanczos" and parts.reason == ""
    assert_exact(parts, w)


@pytest.mark.slow
def test_lanczos_converges_on_the_smollm2_spectrum(large_weight_budget):
    """docs/init-and-solvers.md's table: on SmolLM2's weight spectra (benchmarks/spectra.py's ``real`` family:
    layer 15's q_proj for a square weight, log-interpolated to k values, random singular vectors) `auto`
    runs Lanczos to the end, as on the Gaussian hard edge; float64-exact like eigh."""
    from milora.models import load_causal_lm

    real = load_causal_lm(None).model.layers[15].self_attn.q_proj.weight.detach().double().numpy()
    s = np.linalg.svd(real, compute_uv=False)
    sigma = np.exp(np.interp(np.linspace(0, 1, K), np.linspace(0, 1, s.size), np.log(s)))
    rng = np.random.default_rng(0)
    U, V = (np.linalg.qr(rng.standard_normal((K, K)))[0] for _ in range(2))
    w = torch.from_numpy((U * sigma) @ V.T)
    parts = select_components(w, R, "milora", "lanczos")
    assert parts.solver == "lanczos" and parts.reason == ""
    assert_exact(parts, w)


def test_lanczos_hands_over_on_a_dead_feature():
    """A zero column makes W singular: found on the Gram diagonal before any factorisation."""
    w = weight("rank_deficient")
    parts = select_components(w, R, "milora", "lanczos")
    assert parts.solver == "eigh (lanczos failed)" and "singular" in parts.reason
    assert_exact(parts, w)


@pytest.mark.parametrize("family,solver", [
    ("gaussian", "lanczos"),
    ("clustered", "lanczos"),
    ("power", "eigh (lanczos over budget)"),
    ("wide_cluster", "eigh (lanczos over budget)"),
    ("rank_deficient", "eigh (lanczos failed)"),
])
def test_auto_per_family(monkeypatch, large_weight_budget, family, solver):
    """What ``auto`` ends up running on each family (README's Solvers table), with the size
    threshold lowered so a 600 x 600 weight qualifies: the shape says try Lanczos, the spectrum
    decides whether it finishes."""
    monkeypatch.setattr(decomposition, "LARGE_SIDE", 256)
    assert resolve_solver("auto", "milora", "cpu", (K, K), R) == "lanczos"
    assert select_components(weight(family), R, "milora", "auto").solver == solver


def test_auto_rule_from_shapes():
    """Lanczos is tried where its typical cost is well under the dense solver's (large k, small r)."""
    assert resolve_solver("auto", "milora", "cpu", (4096, 4096), 64) == "lanczos"
    assert resolve_solver("auto", "milora", "cpu", (11008, 4096), 128) == "lanczos"
    assert resolve_solver("auto", "milora", "cpu", (2048, 2048), 16) == "lanczos"
    assert resolve_solver("auto", "milora", "cpu", (2048, 2048), 64) == "eigh"  # a typical run costs near eigh's
    assert resolve_solver("auto", "milora", "cpu", (1024, 1024), 8) == "eigh"  # below LARGE_SIDE
    assert resolve_solver("auto", "pissa", "cpu", (4096, 11008), 8) == "lanczos"
    assert resolve_solver("auto", "middle", "cpu", (4096, 4096), 8) == "eigh"
    assert resolve_solver("auto", "random", "cpu", (4096, 4096), 8) == "svd"
    assert resolve_solver("auto", "milora", "cuda", (4096, 4096), 8) == "eigh"


def test_over_budget_rule():
    """The stopping rule on synthetic residual histories (k = 4096, 65 eigenpairs, blocks of 32)."""
    k, want, block = 4096, 65, 32
    budget = lanczos.COSTS.dense(k, want) - lanczos.COSTS.cholesky(k)
    affordable = lanczos.affordable_dim(k, block, want, budget)
    assert lanczos.over_budget([(128, 0.4), (160, 0.4)], k, block, want, budget) is None  # two points: no verdict
    # halving per block: about 192 + 32 log2(2e13) = 1600 vectors needed, within SLACK x affordable
    assert lanczos.over_budget([(128, 0.4), (160, 0.2), (192, 0.1)], k, block, want, budget) is None
    # 10 % per block: about 9000 needed
    assert "extrapolated" in lanczos.over_budget([(128, 0.4), (160, 0.36), (192, 0.32)], k, block, want, budget)
    assert "extrapolated" in lanczos.over_budget([(128, 0.4), (160, 0.3), (192, 0.5)], k, block, want, budget)
    last = affordable // block * block
    history = [(last - 2 * block, 1e-2), (last - block, 1e-3), (last, 1e-6)]
    assert "the most the budget affords" in lanczos.over_budget(history, k, block, want, budget)
    assert math.isclose(lanczos.COSTS.steps(k, 0, 2 * block, block, want),
                        lanczos.COSTS.step(k, block, block, want) + lanczos.COSTS.step(k, 2 * block, block, want))


def test_block_lanczos_on_a_known_operator():
    """largest_eigenpairs on a diagonal operator with known eigenvalues: exact pairs (1e-12) and
    a clear error when the operator is indefinite."""
    k, want = 300, 10
    values = np.concatenate([np.linspace(0, 0.1, k - want), 2.0 ** np.arange(want)])  # separated top: fast
    def apply(rows):
        return rows * values  # rows @ diag(values)
    found, vectors = lanczos.largest_eigenpairs(apply, k, want, 8, budget=math.inf)
    np.testing.assert_allclose(found, values[-want:], rtol=1e-12)
    np.testing.assert_allclose(np.abs(vectors), np.eye(k)[-want:], atol=1e-7)
    with pytest.raises(np.linalg.LinAlgError, match="not positive semi-definite"):
        indefinite = np.where(np.arange(k) < k // 2, -values, values)
        lanczos.largest_eigenpairs(lambda rows: rows * indefinite, k, want, 8, budget=math.inf)
