"""Synthetic weights whose singular spectra cover the cases the init solvers meet, each reproducible from a seed.

Families (``weight(family, m, n, r)``, float32 like a checkpoint's weights):

- ``gaussian``: a Gaussian bulk (Marchenko-Pastur; for square weights its hard edge at 0 gives
  well separated smallest values) plus 16 outlier directions: the original benchmark weight.
- ``power``: a smooth power law sigma_k = 20 k^-0.6 with random singular vectors; relative gaps
  at the bottom about 0.6 / k (1.5e-4 at k = 4096): crowded minor values.
- ``clustered``: the gaussian family's limiting spectrum (Marchenko-Pastur quantiles plus the 16
  outliers, random singular vectors) with the 8 values around the rank-r boundary squeezed into
  a relative 1e-4 (the r-th and (r+1)-th smallest within 1.4e-5): depends on r.
- ``rank_deficient``: the gaussian family with 8 input features (columns of the smaller side)
  set to zero: exactly 8 zero singular values at the bottom, as dead features give.
- ``real``: the singular values of one SmolLM2-135M weight of layer 15 (``source``: q_proj,
  k_proj, v_proj, up_proj or down_proj; default q_proj for square weights, up_proj for tall,
  down_proj for wide), interpolated (log sigma, linear in relative position) to min(m, n)
  values, with random singular vectors. Needs the embedded model.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

FAMILIES = ("gaussian", "power", "clustered", "rank_deficient", "real")
OUTLIERS = np.logspace(1.3, 0.3, 16)
CLUSTER, CLUSTER_WIDTH = 8, 1e-4
ZERO_FEATURES = 8
REAL_LAYER = 15


def weight(family: str, m: int, n: int, r: int, seed: int = 0, source: str | None = None) -> torch.Tensor:
    """An m x n float32 weight of the given spectrum family (``r`` matters for ``clustered`` only,
    ``source`` for ``real`` only)."""
    if family == "gaussian":
        return gaussian(m, n, seed)
    if family == "rank_deficient":
        w = gaussian(m, n, seed)
        if m >= n:
            w[:, -ZERO_FEATURES:] = 0
        else:
            w[-ZERO_FEATURES:] = 0
        return w
    k = min(m, n)
    if family == "power":
        sigma = 20 * np.arange(1, k + 1, dtype=np.float64) ** -0.6
    elif family == "clustered":
        sigma = clustered_spectrum(m, n, r)
    elif family == "real":
        sigma = interpolated(real_spectrum(source or ("q_proj" if m == n else "up_proj" if m > n else "down_proj")), k)
    else:
        raise ValueError(f"unknown family {family!r}: choose one of {', '.join(FAMILIES)}")
    return with_spectrum(m, n, sigma, seed)


def gaussian(m: int, n: int, seed: int = 0) -> torch.Tensor:
    """Gaussian bulk (entries of variance 1/n) plus 16 outlier directions of strengths OUTLIERS."""
    generator = torch.Generator().manual_seed(seed)
    bulk = torch.randn(m, n, generator=generator, dtype=torch.float64) / np.sqrt(n)
    left = torch.randn(m, 16, generator=generator, dtype=torch.float64) / np.sqrt(m)
    right = torch.randn(n, 16, generator=generator, dtype=torch.float64) / np.sqrt(n)
    return (bulk + (left * torch.from_numpy(OUTLIERS)) @ right.T).float()


def with_spectrum(m: int, n: int, sigma: np.ndarray, seed: int = 0) -> torch.Tensor:
    """U diag(sigma) V^T with Haar-random orthonormal U (m x k), V (n x k), rounded to float32."""
    generator = torch.Generator().manual_seed(seed)
    k = min(m, n)
    U = torch.linalg.qr(torch.randn(m, k, generator=generator, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(n, k, generator=generator, dtype=torch.float64))[0]
    return ((U * torch.from_numpy(np.sort(sigma)[::-1].copy())) @ V.T).float()


def bulk_quantiles(m: int, n: int, count: int) -> np.ndarray:
    """``count`` quantiles (descending) of the limiting singular-value law of an m x n Gaussian
    matrix with entries of variance 1/n (Marchenko-Pastur; the quarter circle on [0, 2] if square)."""
    ratio = min(m, n) / max(m, n)
    scale = max(m, n) / n  # eigenvalues of W^T W (or W W^T) = scale * those of the normalised MP law
    lo, hi = (1 - ratio**0.5) ** 2, (1 + ratio**0.5) ** 2
    sigma = np.sqrt(np.linspace(lo, hi, 200_001) * scale)
    x = sigma**2 / scale
    density = np.sqrt(np.clip((hi - x) * (x - lo), 0, None)) / x.clip(1e-300) * sigma  # d/dsigma, unnormalised
    cdf = np.concatenate([[0], np.cumsum((density[1:] + density[:-1]) / 2 * np.diff(sigma))])
    quantiles = np.interp((np.arange(count) + 0.5) / count, cdf / cdf[-1], sigma)
    return quantiles[::-1]


def clustered_spectrum(m: int, n: int, r: int) -> np.ndarray:
    """Marchenko-Pastur quantiles plus OUTLIERS, with the CLUSTER values around the r-th smallest
    squeezed into a relative CLUSTER_WIDTH (descending)."""
    k = min(m, n)
    sigma = np.concatenate([OUTLIERS, bulk_quantiles(m, n, k - OUTLIERS.size)])
    ascending = sigma[::-1].copy()
    lo = r - CLUSTER // 2  # ascending positions lo .. lo + CLUSTER - 1 straddle the boundary r - 1 | r
    ascending[lo : lo + CLUSTER] = ascending[lo] * (1 + CLUSTER_WIDTH * np.linspace(0, 1, CLUSTER))
    return ascending[::-1].copy()


def interpolated(sigma: np.ndarray, count: int) -> np.ndarray:
    """A descending spectrum resampled to ``count`` values: log sigma, linear in relative position,
    first and last values kept (no extrapolation, so no artificial ties at the ends)."""
    return np.exp(np.interp(np.linspace(0, 1, count), np.linspace(0, 1, sigma.size), np.log(sigma)))


@functools.cache
def real_spectrum(source: str) -> np.ndarray:
    """Singular values (descending, float64) of SmolLM2-135M's module ``source`` in layer REAL_LAYER."""
    from milora.models import load_causal_lm

    layer = load_causal_lm(None).model.layers[REAL_LAYER]
    module = getattr(layer.mlp, source, None) or getattr(layer.self_attn, source)
    return np.linalg.svd(module.weight.detach().double().numpy(), compute_uv=False)
