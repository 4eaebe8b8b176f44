"""Float64 BLAS/LAPACK calls that release the GIL: Gram matrix, products, Cholesky, index-range eigensolver.

scipy's Python wrappers (``scipy.linalg.blas`` / ``lapack``) hold the GIL while the routine
runs, so threads decomposing different weights would take turns. scipy exports the same
routines as C function pointers for Cython (``scipy.linalg.cython_blas`` / ``cython_lapack``,
a public API); called through ctypes, which releases the GIL, they run in parallel. It is the
same OpenBLAS as ``scipy.linalg``, so results are identical, and keeping every heavy step in
one thread pool avoids two BLAS pools spinning against each other on the same cores.

LAPACK is column-major: a C-contiguous (rows x cols) array is, to LAPACK, its transpose.
"""

from __future__ import annotations

import ctypes

import numpy as np
from scipy.linalg import cython_blas, cython_lapack

_get_name = ctypes.pythonapi.PyCapsule_GetName
_get_name.restype, _get_name.argtypes = ctypes.c_char_p, [ctypes.py_object]
_get_pointer = ctypes.pythonapi.PyCapsule_GetPointer
_get_pointer.restype, _get_pointer.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]


def _routine(module, name: str, arguments: int):
    """The C function scipy exports as ``module.name``, every argument passed as a pointer."""
    capsule = module.__pyx_capi__[name]
    signature = _get_name(capsule)
    # reference BLAS/LAPACK argument lists with 32-bit integers (an ILP64 build would differ)
    if signature.count(b"*") != arguments or b"int *" not in signature:
        raise ImportError(f"scipy's {name} has an unexpected signature {signature!r}")
    return ctypes.CFUNCTYPE(None, *[ctypes.c_void_p] * arguments)(_get_pointer(capsule, signature))


_dsyrk = _routine(cython_blas, "dsyrk", 10)
_dgemm = _routine(cython_blas, "dgemm", 13)
_dsymm = _routine(cython_blas, "dsymm", 12)
_dsyevr = _routine(cython_lapack, "dsyevr", 21)
_dpotrf = _routine(cython_lapack, "dpotrf", 5)
_dpotrs = _routine(cython_lapack, "dpotrs", 8)


def _char(value: str):
    return ctypes.byref(ctypes.c_char(value.encode()))


def _int(value: int):
    return ctypes.byref(ctypes.c_int(value))


def _double(value: float):
    return ctypes.byref(ctypes.c_double(value))


def _data(array: np.ndarray):
    return ctypes.c_void_p(array.ctypes.data)


def _float64_c(array: np.ndarray, writeable: bool = False) -> np.ndarray:
    if array.dtype != np.float64 or not array.flags.c_contiguous or 0 in array.shape:
        raise ValueError("expected a non-empty C-contiguous float64 array")
    if writeable and not array.flags.writeable:
        raise ValueError("expected a writeable array (it is overwritten)")
    return array


def gram(a: np.ndarray, accumulate: np.ndarray | None = None) -> np.ndarray:
    """The k x k Gram matrix of the smaller side of ``a`` (m x n): a^T a if m >= n, else a a^T.

    BLAS syrk (half the flops of a product). Only the upper triangle is set; the lower is zero
    (it is LAPACK's lower triangle, which LAPACK's tridiagonal reduction handles faster).
    ``accumulate``: an n x n Gram matrix to add a^T a to, in place, whatever the shape of ``a`` (a sum over
    blocks of rows of a tall matrix, the last of which may be short).
    """
    a = _float64_c(a)
    m, n = a.shape
    columns = m >= n or accumulate is not None
    k = n if columns else m
    g = np.zeros((k, k)) if accumulate is None else _float64_c(accumulate, writeable=True)
    if g.shape != (k, k):
        raise ValueError(f"cannot accumulate a {k} x {k} Gram matrix into one of shape {g.shape}")
    # column-major, a is n x m: a^T a (row-major) = A A^T ('N'); a a^T = A^T A ('T').
    # LAPACK's lower triangle is the row-major upper one.
    trans, depth = ("N", m) if columns else ("T", n)
    beta = 0.0 if accumulate is None else 1.0
    _dsyrk(_char("L"), _char(trans), _int(k), _int(depth), _double(1.0), _data(a), _int(n), _double(beta), _data(g),
           _int(k))
    return g


def matmul(a: np.ndarray, b: np.ndarray, transpose_a: bool = False, transpose_b: bool = False) -> np.ndarray:
    """``a @ b`` with either factor transposed (``a.T``, ``b.T``), for C-contiguous float64 a and b, with BLAS gemm."""
    a, b = _float64_c(a), _float64_c(b)
    rows, inner = (a.shape[1], a.shape[0]) if transpose_a else a.shape
    inner_b, cols = (b.shape[1], b.shape[0]) if transpose_b else b.shape
    if inner_b != inner:
        shapes = f"{a.shape}{'.T' if transpose_a else ''} and {b.shape}{'.T' if transpose_b else ''}"
        raise ValueError(f"shapes {shapes} do not match")
    c = np.empty((rows, cols))
    # column-major: c^T = b^T a^T, with b^T = B (or B^T) and a^T = A (or A^T)
    _dgemm(_char("T" if transpose_b else "N"), _char("T" if transpose_a else "N"), _int(cols), _int(rows), _int(inner),
           _double(1.0), _data(b), _int(b.shape[1]), _data(a), _int(a.shape[1]), _double(0.0), _data(c), _int(cols))
    return c


def symmetric_times(g: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``rows @ G`` for a symmetric k x k G given by its upper triangle (as `gram` sets it) and rows (p x k).

    BLAS symm; each row of the result is G applied to that row (G is symmetric).
    """
    g, rows = _float64_c(g), _float64_c(rows)
    k, count = g.shape[0], rows.shape[0]
    if g.shape != (k, k) or rows.shape[1] != k:
        raise ValueError(f"need a square matrix and rows of its size, got {g.shape} and {rows.shape}")
    out = np.empty((count, k))
    # column-major: rows is the k x count matrix X whose columns are the rows; out = G X (LAPACK lower = our upper)
    _dsymm(_char("L"), _char("L"), _int(k), _int(count), _double(1.0), _data(g), _int(k), _data(rows), _int(k),
           _double(0.0), _data(out), _int(k))
    return out


def cholesky(g: np.ndarray, lower: bool = False) -> np.ndarray:
    """Overwrite one triangle of a symmetric positive definite G with its Cholesky factor.

    LAPACK dpotrf on the upper triangle (as `gram` sets it; afterwards it holds R with
    G = R^T R), or with ``lower`` on the lower triangle (afterwards it holds R^T). The other
    triangle is neither read nor written; the diagonal belongs to both. Raises LinAlgError when
    G is not numerically positive definite.
    """
    g = _float64_c(g, writeable=True)
    k = g.shape[0]
    if g.shape != (k, k):
        raise ValueError(f"need a square matrix, got {g.shape}")
    info = ctypes.c_int(0)
    _dpotrf(_char("U" if lower else "L"), _int(k), _data(g), _int(k), ctypes.byref(info))
    if info.value != 0:
        raise np.linalg.LinAlgError(f"dpotrf failed (info={info.value}): the matrix is not positive definite")
    return g


def cholesky_solve(factor: np.ndarray, rows: np.ndarray, lower: bool = False) -> np.ndarray:
    """``rows @ G^-1`` (p x k) from the Cholesky factor of G written by `cholesky` (with the same
    ``lower``): G^-1 applied to each row. LAPACK dpotrs (two triangular solves with the block)."""
    factor = _float64_c(factor)
    out = np.array(_float64_c(rows), order="C", copy=True)
    k, count = factor.shape[0], out.shape[0]
    if factor.shape != (k, k) or out.shape[1] != k:
        raise ValueError(f"need a square factor and rows of its size, got {factor.shape} and {out.shape}")
    info = ctypes.c_int(0)
    # column-major: the rows are the columns of a k x count right-hand side
    _dpotrs(_char("U" if lower else "L"), _int(k), _int(count), _data(factor), _int(k), _data(out), _int(k),
            ctypes.byref(info))
    if info.value != 0:
        raise np.linalg.LinAlgError(f"dpotrs failed (info={info.value})")
    return out


def mirror_upper(g: np.ndarray, block: int = 256) -> np.ndarray:
    """Copy the strict upper triangle of a square array onto its strict lower one, in place (blocks
    of ``block`` rows, so no k x k temporary)."""
    g = _float64_c(g, writeable=True)
    for start in range(block, g.shape[0], block):
        g[start : start + block, :start] = g[:start, start : start + block].T
    for start in range(0, g.shape[0], block):  # the diagonal blocks
        square = g[start : start + block, start : start + block]
        square[np.tril_indices(square.shape[0], -1)] = square.T[np.tril_indices(square.shape[0], -1)]
    return g


def eigh_range(g: np.ndarray, first: int, last: int) -> tuple[np.ndarray, np.ndarray]:
    """Eigenpairs ``first..last`` (0-based, inclusive, ascending order) of a symmetric matrix.

    Reads the upper triangle of ``g`` (as `gram` sets it) and overwrites ``g``. LAPACK dsyevr
    (tridiagonal reduction, then bisection and inverse iteration for a subset), as
    ``scipy.linalg.eigh(g, subset_by_index=[first, last], driver="evr")``. Returns the
    eigenvalues (ascending) and the eigenvectors as the columns of a k x count array.
    """
    g = _float64_c(g, writeable=True)
    k = g.shape[0]
    if g.shape != (k, k) or not 0 <= first <= last < k:
        raise ValueError(f"need a square matrix and 0 <= first <= last < {k}, got {g.shape}, {first}, {last}")
    count = last - first + 1
    values = np.empty(k)
    vectors = np.empty((count, k))  # row-major count x k = column-major k x count
    support = np.empty(2 * count, dtype=np.intc)
    found, info = ctypes.c_int(0), ctypes.c_int(0)

    def call(work: np.ndarray, lwork: int, iwork: np.ndarray, liwork: int) -> None:
        _dsyevr(_char("V"), _char("I"), _char("L"), _int(k), _data(g), _int(k), _double(0.0), _double(0.0),
                _int(first + 1), _int(last + 1), _double(0.0), ctypes.byref(found), _data(values), _data(vectors),
                _int(k), _data(support), _data(work), _int(lwork), _data(iwork), _int(liwork), ctypes.byref(info))

    work, iwork = np.empty(1), np.empty(1, dtype=np.intc)
    call(work, -1, iwork, -1)  # workspace query
    lwork, liwork = int(work[0]), int(iwork[0])
    call(np.empty(lwork), lwork, np.empty(liwork, dtype=np.intc), liwork)
    if info.value != 0 or found.value != count:
        raise np.linalg.LinAlgError(f"dsyevr failed (info={info.value}, found {found.value} of {count} eigenpairs)")
    return values[:count], vectors.T
