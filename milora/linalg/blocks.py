"""A weight read in float64 one block at a time, for the CPU solvers: never a whole float64 copy.

The CPU solvers (`milora.linalg.decomposition`) need W (m x n, any floating dtype) in float64 for
three products only: the Gram matrix of its smaller side, W times a basis of that side, and that
side's transpose times singular vectors. `LongSide` views W as A = W (tall, m >= n) or A = W^T
(wide), a long x k matrix with k = min(m, n), and computes each product over blocks of A's rows of
about `BLOCK_BYTES` of float64, each converted from the stored weight when it is used. Peak
memory is then the weight as stored (bfloat16: a quarter of its float64 copy) plus one block and
the k x k Gram matrix, instead of the whole float64 copy beside them (1.75 GiB for a 28672 x 8192
MLP weight of a 70B model). Sums over blocks round differently from one BLAS call over the whole
matrix (at float64 resolution); every caller uses the same blocks, so a weight gives the same bits
wherever it comes from.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from milora.linalg import lapack

BLOCK_BYTES = 1 << 26
"""About 64 MiB of float64 per block of rows of A."""


class LongSide:
    """W (m x n) as A, long x k: A = W if m >= n (``tall``), else W^T; read in float64 row blocks of A."""

    def __init__(self, weight: torch.Tensor, block_bytes: int = BLOCK_BYTES):
        if weight.ndim != 2 or weight.device.type != "cpu":
            raise ValueError(f"expected a 2-D CPU weight, got shape {tuple(weight.shape)} on {weight.device}")
        self.weight = weight.detach()
        self.tall = weight.shape[0] >= weight.shape[1]
        self.long, self.k = (weight.shape if self.tall else weight.shape[::-1])
        self.rows = max(1, block_bytes // (8 * self.k))

    def blocks(self) -> Iterator[tuple[slice, np.ndarray]]:
        """(rows of A, those rows as a C-contiguous float64 array), block by block."""
        for start in range(0, self.long, self.rows):
            rows = slice(start, min(start + self.rows, self.long))
            block = self.weight[rows] if self.tall else self.weight[:, rows].T
            yield rows, np.ascontiguousarray(block.to(torch.float64).numpy())

    def gram(self) -> np.ndarray:
        """A^T A (k x k), upper triangle set as `lapack.gram` sets it."""
        g = np.zeros((self.k, self.k))
        for _, block in self.blocks():
            lapack.gram(block, accumulate=g)
        return g

    def times(self, basis: np.ndarray) -> np.ndarray:
        """A @ basis (long x r) for a basis of the short side (k x r)."""
        out = np.empty((self.long, basis.shape[1]))
        for rows, block in self.blocks():
            out[rows] = lapack.matmul(block, basis)
        return out

    def transpose_times(self, vectors: np.ndarray) -> np.ndarray:
        """A^T @ vectors (k x r) for vectors of the long side (long x r)."""
        out = np.zeros((self.k, vectors.shape[1]))
        for rows, block in self.blocks():
            out += lapack.matmul(block, np.ascontiguousarray(vectors[rows]), transpose_a=True)
        return out

    def norm(self) -> float:
        """||W||_F in float64."""
        return float(np.sqrt(sum(np.einsum("ij,ij->", block, block) for _, block in self.blocks())))
