"""Block Lanczos for the largest eigenpairs of a positive semi-definite operator, within a work budget.

The operator A (k x k) is given as ``apply(X) = X @ A`` for a block of p row vectors. The
basis grows one block per step (no restarts) and is fully re-orthogonalised (classical
Gram-Schmidt, twice), so every step is level-3 BLAS: applying A to a block of p vectors
through a k x k factor reads the factor once, where single-vector Lanczos (ARPACK) reads it
once per vector (the per-vector times are in benchmarks/RESULTS.md). After each step
Rayleigh-Ritz on the basis gives the wanted eigenpairs and their residuals ||A x - theta x||
(from the next block's QR factor, at no extra cost).

Budget: the caller says what the iteration may cost in all (`CostModel` units, flops weighted
by kernel), normally what the dense eigensolver would cost instead. The iteration stops with
`OverBudget` when its next step would exceed that, or when the basis it needs, extrapolated
from its last three residuals, is far beyond what the budget affords (`over_budget`). Both are
pure functions of shapes and residuals: the decision is deterministic and independent of
machine load.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import scipy.linalg

from milora.linalg import lapack

# Relative residual ||A x - theta x|| / theta at which a Ritz pair counts as converged. For
# A = G^-1 it bounds the backward error of the pair as an eigenpair of G by TOL * ||G||.
# Rounding in the solves leaves a floor of 1e-15 to 2e-14 (k = 2048-4096, r = 16-128): a
# residual below FLOOR that no longer halves per step has reached it and counts as converged.
TOL, FLOOR = 1e-14, 1e-13
# Residual for the pairs the caller needs only the eigenvalue of (the selected block's
# neighbour, for the boundary gap): the value is then exact to about VALUE_TOL relative. Its
# vector would need the neighbour separated from the rest of the spectrum, which is where it
# crowds (the bulk's edge under a few outliers, for pissa).
VALUE_TOL = 1e-6
# Block steps after the first estimate that the spectra which suit Lanczos typically need (the
# gaussian, clustered and real families; the recorded counts are in benchmarks/RESULTS.md).
TYPICAL_STEPS = 14
# Try Lanczos only where its typical cost is below this fraction of the dense solver's: where
# it fails it has cost its setup and a few steps, a small fraction of the dense cost.
TRY_FRACTION = 0.8


@dataclass(frozen=True)
class CostModel:
    """Predicted CPU time of the dense and block-Lanczos kernels, in units of one flop of a large
    Gram product (dsyrk), the fastest level-3 kernel.

    Each kernel's weight is its measured time per flop over dsyrk's (one thread, CPU time,
    k = 2048 and 4096; the measurements are in benchmarks/RESULTS.md): the dense eigensolver's tridiagonal reduction is
    half level-2 BLAS and slows as G outgrows the caches (2.1 at k = 2048, 2.7 at 4096);
    triangular solves with a block of p vectors run at 1 + 18 / p; thin products at 1.4; a
    Householder QR of a k x p block at 7; and Rayleigh-Ritz on the small projected matrix is
    dominated, up to d = 1000, by its eigenvectors (inverse iteration in one cluster, d want^2).
    ``dense_scale`` multiplies the dense solver's cost: a machine whose memory is slower relative
    to its arithmetic favours Lanczos more (the tests raise it to give a 600 x 600 weight the
    budget of a large one).
    """

    dense_scale: float = 1.0

    def dense(self, k: int, want: int) -> float:
        """Index-range eigensolver (dsyevr) for ``want`` eigenpairs of a k x k matrix."""
        per_flop = max(1.0, 1.5 + 0.6 * math.log2(k / 1024))
        return self.dense_scale * (per_flop * 4 / 3 * k**3 + 12 * k**2 * want)

    def cholesky(self, k: int) -> float:
        return 1.15 * k**3 / 3

    def rayleigh_ritz(self, dim: int, want: int) -> float:
        """The ``want`` largest eigenpairs of the dim x dim projected matrix (dsyevr)."""
        return 190 * dim * want**2 + 13 * dim**2 * want + 2.3 * dim**3

    def step(self, k: int, dim: int, block: int, want: int) -> float:
        """One block step that brings the basis to ``dim`` vectors: apply (two triangular solves or
        one symmetric product), re-orthogonalisation (two passes) and QR, and Rayleigh-Ritz once
        the basis can hold a first estimate."""
        apply = (1 + 18 / block) * 2 * k**2 * block
        orthogonalise = 1.4 * 8 * k * dim * block + 7 * 4 * k * block**2
        return apply + orthogonalise + (self.rayleigh_ritz(dim, want) if dim >= want + block else 0.0)

    def steps(self, k: int, start: int, stop: int, block: int, want: int) -> float:
        """Steps that grow the basis from ``start`` to ``stop`` vectors."""
        return sum(self.step(k, dim, block, want) for dim in range(start + block, stop + 1, block))


COSTS = CostModel()
# The extrapolated basis size may exceed the affordable one by this factor before the iteration
# gives up: extrapolating from the third residual on overestimates the basis needed by up to
# 3x, because Krylov convergence accelerates; 2 separated every recorded history (the families
# and sizes are in benchmarks/RESULTS.md).
SLACK = 2.0


def block_size(want: int) -> int:
    """Block size for ``want`` eigenpairs: half the wanted block, between 8 and 32 vectors."""
    return min(32, max(8, (want + 1) // 2))


def worth_trying(k: int, want: int, setup: float, costs: CostModel | None = None) -> bool:
    """Whether Lanczos, converging in TYPICAL_STEPS after its first estimate and after ``setup``
    (e.g. a factorisation), would cost at most TRY_FRACTION of the dense solver."""
    costs = costs or COSTS
    block = block_size(want)
    first = -(-(want + block) // block) * block  # basis of the first estimate
    typical = min(first + TYPICAL_STEPS * block, k // block * block)
    return setup + costs.steps(k, 0, typical, block, want) <= TRY_FRACTION * costs.dense(k, want)


class OverBudget(Exception):
    """The iteration stopped because finishing it was predicted to cost more than the dense solver."""


def affordable_dim(k: int, block: int, want: int, budget: float, costs: CostModel | None = None) -> int:
    """The largest basis (a multiple of ``block``, at most k) whose steps cost at most ``budget``."""
    costs = costs or COSTS
    dim, spent = 0, 0.0
    while dim + block <= k and spent + costs.step(k, dim + block, block, want) <= budget:
        dim += block
        spent += costs.step(k, dim, block, want)
    return dim


def over_budget(history: list[tuple[int, float]], k: int, block: int, want: int, budget: float,
                costs: CostModel | None = None, tol: float = TOL) -> str | None:
    """Why the iteration should stop now (a sentence), or None to go on.

    ``history``: (basis size, worst relative residual) after each Rayleigh-Ritz step so far;
    ``budget``: what the iteration may cost in all (`CostModel` units). Stops when the next step
    would exceed the budget, or, from the third residual on, when the basis needed, extrapolated
    log-linearly from the last three residuals, exceeds SLACK times the affordable basis (the
    first step after a random start can stall, so two residuals are not enough to judge).
    """
    dim, residual = history[-1]
    affordable = affordable_dim(k, block, want, budget, costs)
    if dim + block > affordable:
        return f"residual {residual:.1e} with {dim} basis vectors, the most the budget affords"
    if len(history) < 3:
        return None
    previous_dim, previous = history[-3]
    rate = math.log(previous / residual) / (dim - previous_dim)  # log-residual decrease per basis vector
    needed = math.inf if rate <= 0 else dim + math.log(residual / tol) / rate
    if needed > SLACK * affordable:
        return (f"residual {residual:.1e} with {dim} basis vectors; extrapolated to need {needed:.0f}, "
                f"more than {SLACK:g} x the {affordable} the budget affords")
    return None


def largest_eigenpairs(
    apply: Callable[[np.ndarray], np.ndarray], k: int, want: int, block: int, budget: float, values_only: int = 0,
    seed: int = 0, costs: CostModel | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The ``want`` largest eigenpairs of a positive semi-definite k x k operator: eigenvalues
    ascending, eigenvectors as the rows of a want x k array. ``budget``: what the iteration may
    cost in all (`CostModel` units), typically the dense solver's cost. The ``values_only``
    smallest of them converge to VALUE_TOL only: their vectors are not accurate.

    Raises `OverBudget` (see `over_budget`) when the dense solver would be cheaper, and
    LinAlgError when the Rayleigh quotient shows a clearly negative eigenvalue (the operator is
    not what it claims, e.g. the inverse of a numerically singular matrix).
    """
    capacity = affordable_dim(k, block, want, budget, costs)
    if want + block > capacity:
        raise OverBudget(f"the budget affords {capacity} basis vectors, fewer than a first estimate's {want + block}")
    basis = np.empty((capacity, k))  # orthonormal rows
    projected = np.zeros((capacity, capacity))  # basis A basis^T
    new = _orthonormal_rows(np.random.default_rng(seed).standard_normal((block, k)))[0]
    dim, history = 0, []
    while True:
        basis[dim : dim + block] = new
        dim += block
        new, coupling = _next_block(apply, basis[:dim], block, projected)
        if dim < want + block:
            continue
        values, ritz = lapack.eigh_range(projected[:dim, :dim].copy(), dim - want, dim - 1)
        ritz = np.ascontiguousarray(ritz)  # dim x want
        # A x - theta x = new^T (coupling @ ritz[last block]) for the Ritz vectors x = basis^T ritz
        residuals = np.linalg.norm(lapack.matmul(coupling, ritz[dim - block :]), axis=0) / np.abs(values)
        residuals[:values_only] *= TOL / VALUE_TOL  # on the scale of TOL, so one number tracks progress
        history.append((dim, float(residuals.max())))
        if _converged(history) or dim == k:  # or the basis spans everything: Rayleigh-Ritz is exact
            break
        reason = over_budget(history, k, block, want, budget, costs)
        if reason is not None:
            raise OverBudget(reason)
    # A Rayleigh quotient below -1e-8 of the largest means the operator is not positive semi-definite
    shifted = projected[:dim, :dim] + 1e-8 * abs(values[-1]) * np.eye(dim)
    try:
        lapack.cholesky(shifted)
    except np.linalg.LinAlgError as error:
        message = f"the operator is not positive semi-definite (largest Ritz value {values[-1]:.1e})"
        raise np.linalg.LinAlgError(message) from error
    if not np.all(np.isfinite(values)):
        raise np.linalg.LinAlgError("non-finite Ritz values")
    return values, lapack.matmul(ritz, basis[:dim], transpose_a=True)


def _converged(history: list[tuple[int, float]]) -> bool:
    """Residual below TOL, or below FLOOR and no longer halving (the rounding floor)."""
    residual = history[-1][1]
    return residual <= TOL or (residual <= FLOOR and len(history) > 1 and history[-2][1] < 2 * residual)


def _next_block(
    apply: Callable[[np.ndarray], np.ndarray], basis: np.ndarray, block: int, projected: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Apply A to the basis' last block L, write basis A L^T into ``projected`` (both triangles),
    and return the next block N (orthonormal rows, orthogonal to the basis) with the coupling B:
    A L^T = basis^T C + N^T B."""
    dim = basis.shape[0]
    applied = apply(basis[dim - block :])
    coefficients = np.zeros((block, dim))
    for _ in range(2):  # classical Gram-Schmidt twice: orthogonal to rounding unless the block collapses
        correction = lapack.matmul(applied, basis, transpose_b=True)
        applied -= lapack.matmul(correction, basis)
        coefficients += correction
    projected[dim - block : dim, :dim] = coefficients
    projected[:dim, dim - block : dim] = coefficients.T
    new, coupling = _orthonormal_rows(applied)
    # A block that cancelled almost entirely (an invariant subspace found) leaves rounding noise,
    # which the QR normalises into rows no longer orthogonal to the basis: one more pass fixes them.
    if np.abs(np.diag(coupling)).min() < 1e-6 * np.abs(coefficients).max():
        new -= lapack.matmul(lapack.matmul(new, basis, transpose_b=True), basis)
        new = _orthonormal_rows(new)[0]
    return new, coupling


def _orthonormal_rows(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows Q (p x k, orthonormal) and upper-triangular B with rows = B^T Q (QR of rows^T)."""
    q, b = scipy.linalg.qr(rows.T, mode="economic", check_finite=False)
    return np.ascontiguousarray(q.T), np.ascontiguousarray(b)
