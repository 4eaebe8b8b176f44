"""Every solver against a float64 numpy SVD on weights with known spectra.

Tolerance on the subspace (sine of the largest principal angle): the solvers work in float64
on Gram matrices, whose eigenvalues carry an absolute error ~eps * sigma_max^2, so the selected
subspace is accurate to about eps * sigma_max^2 / (sigma_r^2 - sigma_{r+1}^2). With
sigma_max = 1 and sigma >= 1e-3 below, we assert 1e-9 / gap (gap = relative boundary gap),
and only where the gap is above 1e-6: inside a cluster the subspace is not unique.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from peft import LoraConfig

import milora
from milora.linalg import decomposition, lapack
from milora.linalg.decomposition import (
    default_workers,
    principal_angle_sine,
    select_components,
    select_components_many,
)

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
@pytest.mark.parametrize("r", [6, 7, 8, 12])  # 7: k - r odd, so middle's block starts at an odd offset
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
        np.testing.assert_allclose((W @ parts.Vh.T)[:, nonzero].numpy(), (parts.U * parts.S)[:, nonzero].numpy(),
                                   atol=1e-10)
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


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("kind", ["geometric", "clustered", "rank_deficient"])
@pytest.mark.parametrize("selection", ["milora", "pissa", "middle"])
def test_device_code_path_matches_cpu_path(monkeypatch, shape, kind, selection):
    """The eigh path GPUs take (torch Gram matrix, torch.linalg.eigh, torch thin SVD), run on
    CPU tensors, gives the CPU (milora.linalg.lapack) path's triplets: singular values to 1e-12, the
    selected part U S Vh to the gap-bound tolerance above, and the same boundary gap. (Only
    the transfers to and from a real device are left untested without a GPU.)"""
    W = with_spectrum(*shape, spectrum(kind, min(shape)))
    cpu_path = select_components(W, 8, selection, "eigh")
    monkeypatch.setattr(decomposition, "_on_lapack", lambda w: False)
    device_path = select_components(W, 8, selection, "eigh")
    np.testing.assert_allclose(device_path.S.numpy(), cpu_path.S.numpy(), rtol=0, atol=1e-12)
    # gaps come from Gram eigenvalues, known to about eps (sigma_max / sigma_r)^2 = 2e-10 relative here
    assert device_path.boundary_gap == pytest.approx(cpu_path.boundary_gap, rel=1e-6, abs=1e-9)
    if cpu_path.boundary_gap > 1e-6:
        difference = (device_path.U * device_path.S) @ device_path.Vh - (cpu_path.U * cpu_path.S) @ cpu_path.Vh
        assert float(torch.linalg.matrix_norm(difference, 2)) <= (
            min(1e-9 / cpu_path.boundary_gap, 1e-3) * float(cpu_path.S.max()) + 1e-12)


@pytest.mark.parametrize("shape", [(300, 70), (70, 300)], ids=["tall", "wide"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weight_read_in_blocks_gives_the_whole_float64_products(shape, dtype):
    """`LongSide` (blocks of 7 rows of A here) against the whole float64 copy: the Gram matrix, A @ basis and
    A^T @ vectors to 1e-13 relative (float64 sums in another order), the norm likewise."""
    from milora.linalg.blocks import LongSide

    W = torch.randn(*shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    side = LongSide(W, block_bytes=8 * 70 * 7)
    A = W.double() if shape[0] >= shape[1] else W.double().T
    assert side.rows == 7 and side.long == 300 and side.k == 70
    gram = np.triu(side.gram())
    np.testing.assert_allclose(gram, np.triu((A.T @ A).numpy()), rtol=1e-13, atol=1e-13 * float(A.norm()) ** 2)
    rng = np.random.default_rng(1)
    basis, vectors = rng.standard_normal((70, 4)), rng.standard_normal((300, 4))
    np.testing.assert_allclose(side.times(basis), A.numpy() @ basis, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(side.transpose_times(vectors), A.numpy().T @ vectors, rtol=1e-12, atol=1e-12)
    assert side.norm() == pytest.approx(float(A.norm()), rel=1e-14)


def test_gap_reported_inside_and_outside_cluster():
    W = with_spectrum(48, 48, spectrum("clustered", 48))
    assert select_components(W, 8, "milora", "eigh").boundary_gap < 1e-8
    assert select_components(W, 12, "milora", "eigh").boundary_gap > 0.5


def test_lanczos_falls_back_on_singular_weight():
    W = with_spectrum(48, 48, spectrum("rank_deficient", 48))
    parts = select_components(W, 6, "milora", "lanczos")
    assert parts.solver == "eigh (lanczos failed)"  # the Cholesky factor of G reveals the singular weight
    W_rect = with_spectrum(72, 40, spectrum("rank_deficient", 40))
    assert select_components(W_rect, 6, "milora", "lanczos").solver == "eigh (lanczos failed)"


class OneLayer(torch.nn.Module):
    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.proj = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype)
        self.proj.weight.data.copy_(weight)

    def forward(self, x):
        return self.proj(x)


@pytest.mark.parametrize("dtype,unit_roundoff", [(torch.float32, 2.0**-24), (torch.bfloat16, 2.0**-8)])
@pytest.mark.parametrize("solver", ["eigh", "lanczos", "svd"])
@pytest.mark.parametrize("kind", ["geometric", "rank_deficient"])
def test_reconstruction_exact_to_weight_dtype(dtype, unit_roundoff, solver, kind):
    """W_res + s B A = W up to rounding W_res once to the weight's dtype, for every solver: the
    README's bound |W_res + sBA - W| <= u |W - sBA| (u = 2^-8 for bfloat16, 2^-24 for float32),
    with the layer (and so W_res) held in the weight's own dtype."""
    W = with_spectrum(40, 40, spectrum(kind, 40)).to(dtype)
    model = milora.get_model(OneLayer(W), LoraConfig(r=6, lora_alpha=12, target_modules=["proj"]), solver=solver,
                             progress=False)
    layer = model.base_model.model.proj
    assert layer.base_layer.weight.dtype == dtype
    residual = layer.base_layer.weight.detach().double()
    product = (layer.scaling["default"] * layer.lora_B["default"].weight.double()
               @ layer.lora_A["default"].weight.double())
    error = (residual + product - W.double()).abs()
    assert torch.all(error <= unit_roundoff * (W.double() - product).abs())


def test_default_workers():
    torch_threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert default_workers([(576, 576), (1536, 576)]) == 2
        assert default_workers([(576, 576), (11008, 4096)]) == 1  # one large weight: sequential, all cores each
        torch.set_num_threads(16)
        assert default_workers([(576, 576)]) == 4  # capped: memory grows with workers
    finally:
        torch.set_num_threads(torch_threads)


@pytest.mark.parametrize("shape", [(90, 60), (60, 90), (64, 64)])
def test_lapack_calls_match_numpy(shape):
    """milora.linalg.lapack (scipy's BLAS/LAPACK through ctypes) against numpy: products exact to
    rounding (1e-12 relative), eigenpairs within 1e-12 of numpy's float64 eigh, the Cholesky
    factor to 1e-12 and its solves to 1e-9 (G's condition number is below 1e3 here)."""
    a = RNG.standard_normal(shape)
    k = min(shape)
    reference = a.T @ a if shape[0] >= shape[1] else a @ a.T
    g = lapack.gram(a)
    assert np.allclose(np.triu(g), np.triu(reference), rtol=0, atol=1e-12 * np.abs(reference).max())
    assert not np.tril(g, -1).any()  # documented: upper triangle only
    b = RNG.standard_normal((shape[1], 5))
    c = RNG.standard_normal((shape[0], 3))
    assert np.allclose(lapack.matmul(a, b), a @ b, rtol=0, atol=1e-12 * k)
    assert np.allclose(lapack.matmul(a, c, transpose_a=True), a.T @ c, rtol=0, atol=1e-12 * k)
    values, vectors = lapack.eigh_range(g, 2, 9)
    ref_values = np.linalg.eigvalsh(reference)
    scale = ref_values[-1]
    assert np.allclose(values, ref_values[2:10], rtol=0, atol=1e-12 * scale)
    assert np.allclose(vectors.T @ vectors, np.eye(8), atol=1e-12)
    assert np.allclose(reference @ vectors, vectors * values, rtol=0, atol=1e-12 * scale)
    np.testing.assert_allclose(lapack.matmul(b.T.copy(), a, transpose_b=True), b.T @ a.T, rtol=0, atol=1e-12 * k)
    np.testing.assert_allclose(lapack.matmul(a, c.T.copy(), transpose_a=True, transpose_b=True), a.T @ c, rtol=0,
                               atol=1e-12 * k)
    rows = RNG.standard_normal((4, k))
    np.testing.assert_allclose(lapack.symmetric_times(lapack.gram(a), rows), rows @ reference, rtol=0,
                               atol=1e-12 * scale)
    factor = lapack.cholesky(lapack.gram(a))  # G = R^T R, R upper triangular
    R = np.triu(factor)
    np.testing.assert_allclose(R.T @ R, reference, rtol=0, atol=1e-12 * scale)
    np.testing.assert_allclose(lapack.cholesky_solve(factor, rows) @ reference, rows, rtol=0, atol=1e-9)
    lower = lapack.cholesky(lapack.mirror_upper(lapack.gram(a)), lower=True)  # G = L L^T below, G kept above
    np.testing.assert_allclose(np.tril(lower) @ np.tril(lower).T, reference, rtol=0, atol=1e-12 * scale)
    np.testing.assert_array_equal(np.triu(lower, 1), np.triu(lapack.gram(a), 1))
    np.testing.assert_allclose(lapack.cholesky_solve(lower, rows, lower=True) @ reference, rows, rtol=0, atol=1e-9)
    with pytest.raises(np.linalg.LinAlgError, match="not positive definite"):
        lapack.cholesky(-lapack.gram(a))
    with pytest.raises(ValueError, match="non-empty C-contiguous float64"):
        lapack.gram(a.astype(np.float32))
    with pytest.raises(ValueError, match="first <= last"):
        lapack.eigh_range(lapack.gram(a), 5, k)


def test_many_with_workers_matches_sequential():
    """Concurrent decomposition (one BLAS thread per worker) gives the sequential results in
    order, to rounding (1e-12), and restores the thread settings."""
    from threadpoolctl import threadpool_info

    weights = [with_spectrum(m, n, spectrum("geometric", min(m, n))) for m, n in SHAPES * 2]
    threads = torch.get_num_threads()
    blas_threads = [pool["num_threads"] for pool in threadpool_info()]
    sequential = list(select_components_many(((w, 6, None) for w in weights), "milora", "eigh", workers=1))
    concurrent = list(select_components_many(((w, 6, None) for w in weights), "milora", "eigh", workers=2))
    assert torch.get_num_threads() == threads and [pool["num_threads"] for pool in threadpool_info()] == blas_threads
    for one, other, weight in zip(sequential, concurrent, weights, strict=True):
        assert one.U.shape == (weight.shape[0], 6)
        assert torch.allclose(one.S, other.S, rtol=1e-12, atol=0)
        assert torch.allclose(one.U @ one.Vh, other.U @ other.Vh, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="workers must be at least 1"):
        list(select_components_many([], workers=0))
    # stopping early (an exception in the caller's loop) and closing restores the settings at once
    torch.set_num_threads(2)
    blas_threads = [pool["num_threads"] for pool in threadpool_info()]
    try:
        with contextlib.closing(select_components_many(((w, 6, None) for w in weights), "milora", "eigh", 2)) as many:
            next(many)
            assert torch.get_num_threads() == 1 and all(pool["num_threads"] == 1 for pool in threadpool_info())
        assert torch.get_num_threads() == 2 and [pool["num_threads"] for pool in threadpool_info()] == blas_threads
    finally:
        torch.set_num_threads(threads)
