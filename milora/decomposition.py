"""Selected singular triplets of one weight matrix W (m x n), in float64.

Positions count singular values in descending order, sigma_0 >= ... >= sigma_{k-1}, k = min(m, n):
- ``milora``: the r smallest, positions [k - r, k)  (the minor components)
- ``pissa``:  the r largest,  positions [0, r)      (the principal components)
- ``middle``: the centred block, positions [(k - r) // 2, (k - r) // 2 + r)
- ``random``: r positions drawn without replacement by a seeded generator

Two solvers give the same triplets (up to the precision the boundary gap allows):
- ``svd``:  full float64 SVD, any selection.
- ``eigh``: float64 Gram matrix of the smaller side and an eigensolver for only the wanted
  contiguous block (LAPACK's index-range solver on CPU); the other factor comes from one
  product W @ V (or W^T @ U) followed by a thin SVD of that m x r block, which also
  re-orthonormalises it. A float32 Gram matrix would lose the minor subspace (sigma^2 falls
  below float32 resolution), hence float64 throughout.
``auto`` picks ``eigh`` for contiguous selections and ``svd`` for ``random``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.linalg
import torch

SELECTIONS = ("milora", "pissa", "middle", "random")
SOLVERS = ("auto", "eigh", "svd")


@dataclass
class Components:
    """W's selected part is ``U @ diag(S) @ Vh``; U (m x r), S (r,) descending, Vh (r x n), float64.

    ``boundary_gap`` is the relative gap between the selected block and its nearest unselected
    singular value (min over both ends for ``middle``): the selected subspace is only defined
    to about eps / gap. It is NaN for ``random``, whose selection has no boundary.
    """

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor
    solver: str
    boundary_gap: float


def selected_positions(selection: str, k: int, r: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Positions (descending order of singular values, ascending ints) of the r selected triplets."""
    if selection not in SELECTIONS:
        raise ValueError(f"Unknown selection {selection!r}: choose one of {', '.join(SELECTIONS)}.")
    if not 0 < r < k:
        raise ValueError(f"Rank r={r} must satisfy 0 < r < min(out, in) = {k}.")
    if selection == "random":
        return torch.randperm(k, generator=generator)[:r].sort().values
    start = {"milora": k - r, "pissa": 0, "middle": (k - r) // 2}[selection]
    return torch.arange(start, start + r)


def resolve_solver(solver: str, selection: str) -> str:
    if solver not in SOLVERS:
        raise ValueError(f"Unknown solver {solver!r}: choose one of {', '.join(SOLVERS)}.")
    if solver == "auto":
        return "svd" if selection == "random" else "eigh"
    if solver == "eigh" and selection == "random":
        raise ValueError("The eigh solver computes contiguous blocks only; use solver='svd' for selection 'random'.")
    return solver


def select_components(
    weight: torch.Tensor,
    r: int,
    selection: str = "milora",
    solver: str = "auto",
    generator: torch.Generator | None = None,
) -> Components:
    """The r selected singular triplets of ``weight`` (m x n), computed in float64 on its device."""
    if weight.ndim != 2:
        raise ValueError(f"Expected a 2-D weight, got shape {tuple(weight.shape)}.")
    k = min(weight.shape)
    positions = selected_positions(selection, k, r, generator)
    solver = resolve_solver(solver, selection)
    w = weight.detach().to(torch.float64)
    if solver == "svd":
        U, S, Vh = torch.linalg.svd(w, full_matrices=False)
        return Components(U[:, positions], S[positions], Vh[positions], "svd", _boundary_gap(S, positions, selection))
    return _eigh_components(w, positions, selection)


def _boundary_gap(singular_values: torch.Tensor, positions: torch.Tensor, selection: str) -> float:
    """Relative gap between the selected block and its unselected neighbours (descending S)."""
    if selection == "random":
        return math.nan
    first, last = int(positions[0]), int(positions[-1])
    s = singular_values
    gaps = []
    if first > 0:  # neighbour above the block
        gaps.append(float((s[first - 1] - s[first]) / s[first - 1].clamp_min(1e-300)))
    if last + 1 < s.numel():  # neighbour below the block
        gaps.append(float((s[last] - s[last + 1]) / s[last].clamp_min(1e-300)))
    return min(gaps)


def _eigh_components(w: torch.Tensor, positions: torch.Tensor, selection: str) -> Components:
    m, n = w.shape
    k = min(m, n)
    tall = m >= n
    gram = w.T @ w if tall else w @ w.T  # k x k, eigenvalues sigma^2 ascending
    first, last = int(positions[0]), int(positions[-1])
    # one extra eigenpair on each side that exists, for the boundary gap
    lo_pos, hi_pos = max(first - 1, 0), min(last + 1, k - 1)
    lo_asc, hi_asc = k - 1 - hi_pos, k - 1 - lo_pos  # ascending eigen-indices, inclusive
    if gram.device.type == "cpu":
        evals, evecs = scipy.linalg.eigh(gram.numpy(), subset_by_index=[lo_asc, hi_asc], driver="evr")
        evals, evecs = torch.from_numpy(evals), torch.from_numpy(evecs)
    else:
        all_evals, all_evecs = torch.linalg.eigh(gram)
        evals, evecs = all_evals[lo_asc : hi_asc + 1], all_evecs[:, lo_asc : hi_asc + 1]
    # flip to descending positions lo_pos..hi_pos, then keep the selected block
    evals, evecs = evals.flip(0), evecs.flip(1)
    sigmas = evals.clamp_min(0).sqrt()
    block = slice(first - lo_pos, first - lo_pos + (last - first + 1))
    basis = evecs[:, block].to(w.device)  # right (tall) or left (wide) singular vectors, k x r
    # project W onto the basis and re-orthonormalise the projection with a thin SVD
    projected = w @ basis if tall else w.T @ basis  # (m or n) x r
    Q, S, Rh = torch.linalg.svd(projected, full_matrices=False)
    if tall:
        U, Vh = Q, (basis @ Rh.T).T
    else:
        U, Vh = basis @ Rh.T, Q.T
    padded = torch.full((k,), float("nan"), dtype=torch.float64)
    padded[lo_pos : hi_pos + 1] = sigmas.cpu()
    return Components(U, S, Vh, "eigh", _boundary_gap(padded, positions, selection))


def principal_angle_sine(basis_a: torch.Tensor, basis_b: torch.Tensor) -> float:
    """Sine of the largest principal angle between the column spans of two orthonormal bases.

    Equal to the spectral-norm distance of the two orthogonal projectors; computed as
    ||(I - Qa Qa^T) Qb||_2, which stays accurate for tiny angles (unlike sqrt(1 - cos^2)).
    """
    qa, qb = np.linalg.qr(basis_a.double().cpu().numpy())[0], np.linalg.qr(basis_b.double().cpu().numpy())[0]
    return float(np.linalg.norm(qb - qa @ (qa.T @ qb), ord=2))
