"""Selected singular triplets of one weight matrix W (m x n), in float64.

Positions count singular values in descending order, sigma_0 >= ... >= sigma_{k-1}, k = min(m, n):
- ``milora``: the r smallest, positions [k - r, k)  (the minor components)
- ``pissa``:  the r largest,  positions [0, r)      (the principal components)
- ``middle``: the centred block, positions [(k - r) // 2, (k - r) // 2 + r)
- ``random``: r positions drawn without replacement by a seeded generator

Three solvers give the same triplets (up to the precision the boundary gap allows):
- ``svd``:  full float64 SVD, any selection.
- ``eigh``: float64 Gram matrix G of the smaller side and an eigensolver for only the wanted
  contiguous block (LAPACK's index-range solver on CPU, torch's on other devices).
- ``lanczos`` (CPU; milora and pissa): block Lanczos (`milora.linalg.lanczos`) on the same G
  for the r + 1 extreme eigenpairs: of G itself for the largest, of G^-1 through a Cholesky
  factorisation of G (shift-invert at 0) for the smallest. It avoids the O(k^3) dense
  eigensolver where the spectrum lets it converge fast, and hands over to ``eigh`` on the same
  G, saying why, when it would cost more than eigh (a crowded spectrum at the block's edge)
  or fails (a singular W, an a-posteriori check).
The eigen-solvers return one side's singular vectors; the other side comes from one
product W @ V (or W^T @ U) followed by a thin SVD of that m x r block, which also
re-orthonormalises it. A float32 Gram matrix would lose the minor subspace (sigma^2 falls
below float32 resolution), hence float64 throughout.
``auto`` chooses per weight (see `resolve_solver`). On CPU the heavy steps go through
`milora.linalg.lapack` (scipy's OpenBLAS, GIL released), so `select_components_many` can decompose
several weights at once.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import scipy.linalg
import torch
from threadpoolctl import threadpool_limits

from milora.constants import SELECTIONS, SOLVERS
from milora.linalg import lanczos, lapack
from milora.linalg.blocks import LongSide

# Smaller side from which one weight keeps several cores busy (and Lanczos can pay off)
LARGE_SIDE = 2048
# Cap on concurrent CPU decompositions: each holds a float64 block of its weight and a Gram
# matrix, so more workers trade memory for little speed.
MAX_WORKERS = 4
T = TypeVar("T")


@dataclass
class Components:
    """W's selected part is ``U @ diag(S) @ Vh``; U (m x r), S (r,) descending, Vh (r x n), float64.

    ``solver`` is the solver that produced the triplets: ``"eigh (lanczos over budget)"`` or
    ``"eigh (lanczos failed)"`` when Lanczos handed over to eigh, with ``reason`` saying why
    (empty otherwise). ``boundary_gap`` is the relative gap between the selected block and its nearest unselected
    singular value (min over both ends for ``middle``): the selected subspace is only defined
    to about eps / gap. It is NaN for ``random``, whose selection has no boundary.
    """

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor
    solver: str
    boundary_gap: float
    reason: str = ""


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


def resolve_solver(
    solver: str, selection: str, device: torch.device | str = "cpu", shape: tuple[int, int] | None = None,
    r: int | None = None,
) -> str:
    """The solver ``auto`` stands for with this weight, after checking the choice fits the selection.

    ``auto`` on CPU, for weights whose smaller side k is at least LARGE_SIDE: ``lanczos`` for
    milora and pissa where the cost model says a typical Lanczos run would cost well under the
    dense solver (`lanczos.worth_trying`: the Cholesky factorisation plus TYPICAL_STEPS block
    steps, against the dense eigensolver, both on the same Gram matrix); Lanczos then hands over
    to eigh by itself when the spectrum makes it slow (see `select_components`). ``eigh``
    otherwise (also on GPU); ``svd`` for random. The rule depends on k and r only.
    """
    if solver not in SOLVERS:
        raise ValueError(f"Unknown solver {solver!r}: choose one of {', '.join(SOLVERS)}.")
    if selection not in SELECTIONS:
        raise ValueError(f"Unknown selection {selection!r}: choose one of {', '.join(SELECTIONS)}.")
    if solver in ("eigh", "lanczos") and selection == "random":
        raise ValueError(f"The {solver} solver computes contiguous blocks only; "
                         "use solver='svd' for selection 'random'.")
    if solver == "lanczos" and selection == "middle":
        raise ValueError("The lanczos solver finds the largest or smallest triplets only; "
                         "use solver='eigh' for 'middle'.")
    if solver != "auto":
        return solver
    if selection == "random":
        return "svd"
    if torch.device(device).type != "cpu" or shape is None or r is None or min(shape) < LARGE_SIDE:
        return "eigh"
    k = min(shape)
    costs = lanczos.COSTS
    setup = costs.cholesky(k) if selection == "milora" else 0.0
    if selection in ("milora", "pissa") and lanczos.worth_trying(k, r + 1, setup, costs):
        return "lanczos"
    return "eigh"


def default_workers(shapes: Iterable[tuple[int, int]]) -> int:
    """How many CPU weights `select_components_many` should decompose at once by default.

    When every weight's smaller side is below LARGE_SIDE, one per torch thread (at most
    MAX_WORKERS): LAPACK cannot keep several cores busy on one such weight. Otherwise 1:
    large weights use the cores on their own, and sequential work keeps one set of buffers.
    """
    if any(min(shape) >= LARGE_SIDE for shape in shapes):
        return 1
    return max(1, min(torch.get_num_threads(), MAX_WORKERS))


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
    solver = resolve_solver(solver, selection, weight.device, tuple(weight.shape), r)
    if solver == "lanczos" and not _on_lapack(weight):
        raise ValueError("The lanczos solver runs on CPU; use solver='eigh' (or 'auto') on other devices.")
    if solver == "svd":
        U, S, Vh = torch.linalg.svd(weight.detach().to(torch.float64), full_matrices=False)
        return Components(U[:, positions], S[positions], Vh[positions], "svd", _boundary_gap(S, positions, selection))
    if not _on_lapack(weight):
        return _device_eigh_components(weight.detach().to(torch.float64), positions, selection)
    side = LongSide(weight)  # float64 one block at a time (`milora.linalg.blocks`)
    if solver == "lanczos":
        return _lanczos_components(side, positions, selection)
    return _eigh_components(side, positions, selection)


def select_components_many(
    tasks: Iterable[tuple[torch.Tensor, int, torch.Generator | None]],
    selection: str = "milora",
    solver: str = "auto",
    workers: int = 1,
) -> Iterator[Components]:
    """`select_components` of each ``(weight, r, generator)``, yielded in order.

    With ``workers > 1`` (CPU weights only) that many weights are decomposed at once, each on
    one BLAS thread (see `map_concurrently`). LAPACK's eigensolvers spend half their time in
    memory-bound level-2 steps that barely use a second core on weights of a few thousand
    columns or less, so whole-model throughput scales with the cores; the cost is ``workers``
    sets of float64 work buffers alive at once instead of one. Close the generator
    (``contextlib.closing``) if you stop early: that cancels waiting tasks and restores the
    thread settings.
    """

    def checked(task):
        if workers > 1 and task[0].device.type != "cpu":
            raise ValueError(f"workers={workers} applies to CPU weights; got one on {task[0].device}: use workers=1.")
        return task

    def decompose(weight, r, generator):
        return select_components(weight, r, selection, solver, generator)

    return map_concurrently(decompose, (checked(task) for task in tasks), workers)


def map_concurrently(function: Callable[..., T], tasks: Iterable[tuple], workers: int = 1) -> Iterator[T]:
    """``function(*task)`` for each task, yielded in order, ``workers`` at a time (threads).

    For float64 linear algebra on CPU that releases the GIL (`milora.linalg.lapack`, torch): while
    it runs, torch and the BLAS libraries use one thread each (restored after), so concurrent
    tasks use one core each instead of thread pools oversubscribing the cores. At most two
    finished results per worker wait to be consumed, so results do not pile up in memory.
    Close the generator if you stop early: waiting tasks are cancelled, running ones finish.
    """
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}.")
    if workers == 1:
        for task in tasks:
            yield function(*task)
        return
    with _one_blas_thread_each():
        pool = ThreadPoolExecutor(workers, thread_name_prefix="milora-linalg")
        try:
            pending = deque()
            for task in tasks:
                pending.append(pool.submit(function, *task))
                if len(pending) >= 2 * workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


@contextmanager
def _one_blas_thread_each():
    """Single-threaded torch and BLAS for the duration (restored after)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(limits=1):
            yield
    finally:
        torch.set_num_threads(threads)


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


def _neighbourhood(positions: torch.Tensor, k: int) -> tuple[int, int]:
    """Descending positions of the block plus one neighbour on each side that exists (for the gap)."""
    return max(int(positions[0]) - 1, 0), min(int(positions[-1]) + 1, k - 1)


def _eigh_components(
    side: LongSide, positions: torch.Tensor, selection: str, gram: np.ndarray | None = None
) -> Components:
    """Triplets from LAPACK's index-range eigensolver on the Gram matrix (``gram`` if given, as
    `LongSide.gram` sets it, which is overwritten)."""
    lo_pos, hi_pos = _neighbourhood(positions, side.k)
    gram = side.gram() if gram is None else gram
    evals, evecs = map(torch.from_numpy, lapack.eigh_range(gram, side.k - 1 - hi_pos, side.k - 1 - lo_pos))
    return _complete(side, evals.flip(0), evecs.flip(1), positions, lo_pos, selection, "eigh")


def _device_eigh_components(w: torch.Tensor, positions: torch.Tensor, selection: str) -> Components:
    """Triplets from torch's eigensolver on the Gram matrix of a float64 ``w`` on a GPU (or other device)."""
    k = min(w.shape)
    tall = w.shape[0] >= w.shape[1]
    lo_pos, hi_pos = _neighbourhood(positions, k)
    all_evals, all_evecs = torch.linalg.eigh(w.T @ w if tall else w @ w.T)
    evals, evecs = all_evals[k - 1 - hi_pos : k - lo_pos].flip(0), all_evecs[:, k - 1 - hi_pos : k - lo_pos].flip(1)
    basis = _selected_basis(evecs, positions, lo_pos).to(w.device)
    Q, S, Rh = torch.linalg.svd(w @ basis if tall else w.T @ basis, full_matrices=False)
    return _triplets(Q, S, Rh @ basis.T, tall, evals, k, positions, lo_pos, selection, "eigh")


def _on_lapack(w: torch.Tensor) -> bool:
    """CPU tensors go through `milora.linalg.lapack` (scipy's OpenBLAS), others through torch's device solvers."""
    return w.device.type == "cpu"


def _lanczos_components(side: LongSide, positions: torch.Tensor, selection: str) -> Components:
    """Block Lanczos on the Gram matrix G (see `milora.linalg.lanczos`), handing over to eigh on the
    same G when it fails or is predicted to cost more than eigh."""
    gram = side.gram()
    try:
        lo_pos = _neighbourhood(positions, side.k)[0]
        evals, evecs = _lanczos_eigenpairs(gram, positions, selection)
        parts = _complete(side, evals, evecs, positions, lo_pos, selection, "lanczos")
        # a-posteriori check: the triplets must be exact for a W perturbed by at most 1e-10 relative
        long_vectors, short = (parts.U, parts.Vh.T) if side.tall else (parts.Vh.T, parts.U)  # A^T L = K S
        residual = np.linalg.norm(side.transpose_times(_as_numpy(long_vectors)) - (short * parts.S).numpy())
        if residual > 1e-10 * side.norm() * math.sqrt(positions.numel()):
            raise FloatingPointError(f"Lanczos triplets have residual {float(residual):.1e}")
        return parts
    except lanczos.OverBudget as stop:
        solver, reason = "eigh (lanczos over budget)", str(stop)
    except (np.linalg.LinAlgError, FloatingPointError) as error:
        solver, reason = "eigh (lanczos failed)", str(error)
    parts = _eigh_components(side, positions, selection, gram)
    parts.solver, parts.reason = solver, reason
    return parts


def _as_numpy(w: torch.Tensor) -> np.ndarray:
    """A C-contiguous float64 numpy view (or copy) of a CPU tensor."""
    return np.ascontiguousarray(w.numpy())


def _lanczos_eigenpairs(gram: np.ndarray, positions: torch.Tensor, selection: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenpairs of G (descending eigenvalues, eigenvectors as columns) at the block's positions and
    its neighbour: the largest eigenpairs of G for pissa, of G^-1 (through a Cholesky factor of
    G, i.e. shift-invert at 0) for milora. Only the neighbour's eigenvalue is needed (for the
    boundary gap), so its vector is left unconverged. ``gram``'s upper triangle, diagonal included
    (all that `lapack.eigh_range` reads), is left intact for the fallback."""
    k = gram.shape[0]
    lo_pos, hi_pos = _neighbourhood(positions, k)
    want = hi_pos - lo_pos + 1
    block = lanczos.block_size(want)
    costs = lanczos.COSTS
    budget = costs.dense(k, want)  # Lanczos must not cost more than eigh would on the same G
    if selection == "pissa":
        values, vectors = lanczos.largest_eigenpairs(
            lambda rows: lapack.symmetric_times(gram, rows), k, want, block, budget, values_only=1, costs=costs
        )
        values, vectors = values[::-1], vectors[::-1]
    else:
        diagonal = np.diag(gram).copy()  # squared norms of W's columns (rows if wide): a dead feature gives a zero
        if diagonal.min() <= k * np.finfo(np.float64).eps * diagonal.max():
            raise np.linalg.LinAlgError("a zero row or column: the weight is singular")
        # factor in G's unused lower triangle (a k x k copy costs more, page faults included);
        # the factor's diagonal overwrites G's, put back for the fallback
        lapack.mirror_upper(gram)
        try:
            pivots = np.diag(lapack.cholesky(gram, lower=True)).copy()
            # the pivots bound the smallest eigenvalue from above (the last is 1 / (G^-1)_kk): tiny ones
            # reveal a numerically singular G, whose inverse's largest eigenpairs are rounding noise
            if pivots.min() ** 2 <= k * np.finfo(np.float64).eps * pivots.max() ** 2:
                raise np.linalg.LinAlgError("numerically singular Gram matrix")
            budget -= costs.cholesky(k)
            values, vectors = lanczos.largest_eigenpairs(lambda rows: lapack.cholesky_solve(gram, rows, lower=True), k,
                                                         want, block, budget, values_only=1, costs=costs)
        finally:
            np.fill_diagonal(gram, diagonal)
        values = 1.0 / values  # eigenvalues of G from those of G^-1, now descending
    return torch.from_numpy(values.copy()), torch.from_numpy(np.ascontiguousarray(vectors.T))


def _complete(
    side: LongSide, evals: torch.Tensor, evecs: torch.Tensor, positions: torch.Tensor, lo_pos: int, selection: str,
    solver: str,
) -> Components:
    """Triplets from eigenpairs of the Gram matrix at descending positions lo_pos, lo_pos + 1, ...

    Projects W onto the selected eigenvectors and re-orthonormalises the projection with a
    thin SVD, which yields both singular factors of the selected part.
    """
    basis = _as_numpy(_selected_basis(evecs, positions, lo_pos))  # right (tall) or left (wide), k x r
    Q, S, Rh = scipy.linalg.svd(side.times(basis), full_matrices=False, check_finite=False)  # the same LAPACK
    Q, S, rotated = map(torch.from_numpy, (Q, S, lapack.matmul(np.ascontiguousarray(Rh), basis.T.copy())))
    return _triplets(Q, S, rotated, side.tall, evals, side.k, positions, lo_pos, selection, solver)


def _selected_basis(evecs: torch.Tensor, positions: torch.Tensor, lo_pos: int) -> torch.Tensor:
    """The eigenvectors (columns, descending from position lo_pos) at the selected positions."""
    first = int(positions[0])
    return evecs[:, first - lo_pos : first - lo_pos + positions.numel()]


def _triplets(Q: torch.Tensor, S: torch.Tensor, rotated: torch.Tensor, tall: bool, evals: torch.Tensor, k: int,
              positions: torch.Tensor, lo_pos: int, selection: str, solver: str) -> Components:
    """`Components` from the thin SVD Q S Rh of the projection and ``rotated`` = Rh basis^T (r x k)."""
    U, Vh = (Q, rotated) if tall else (rotated.T, Q.T)
    sigmas = torch.full((k,), float("nan"), dtype=torch.float64)
    sigmas[lo_pos : lo_pos + evals.numel()] = evals.cpu().clamp_min(0).sqrt()
    return Components(U, S, Vh, solver, _boundary_gap(sigmas, positions, selection))


def principal_angle_sine(basis_a: torch.Tensor, basis_b: torch.Tensor) -> float:
    """Sine of the largest principal angle between the column spans of two orthonormal bases.

    Equal to the spectral-norm distance of the two orthogonal projectors; computed as
    ||(I - Qa Qa^T) Qb||_2, which stays accurate for tiny angles (unlike sqrt(1 - cos^2)).
    """
    qa, qb = np.linalg.qr(basis_a.double().cpu().numpy())[0], np.linalg.qr(basis_b.double().cpu().numpy())[0]
    return float(np.linalg.norm(qb - qa @ (qa.T @ qb), ord=2))
