"""Empirical variational Bayesian matrix factorization (EVBMF): a rank estimate from a matrix alone.

Nakajima, Sugiyama, Babacan, Tomioka, "Global analytic solution of fully-observed variational Bayesian
matrix factorization", JMLR 2013, as used by Kim et al. (ICLR 2016) to choose Tucker ranks. Pure
numpy/scipy; ALGORITHMS.md section 3.
"""

from __future__ import annotations

import numpy as np

__all__ = ["evbmf", "vbmf_rank"]

TAU_CONSTANT = 2.5129  # tau_bar / sqrt(alpha): the zero of log(tau + 1) + alpha log(tau / alpha + 1) - tau
_GRID_POINTS = 64


def _omega(sigma2: float, s: np.ndarray, length: int, width: int, residual: float, x_bar: float) -> float:
    """The EVBMF free energy (up to constants) as a function of the noise variance ``sigma2``."""
    alpha = length / width
    x = s ** 2 / (width * sigma2)
    below, above = x[x <= x_bar], x[x > x_bar]
    shifted = above - 1.0 - alpha
    tau = 0.5 * (shifted + np.sqrt(np.maximum(shifted ** 2 - 4.0 * alpha, 0.0)))
    value = np.sum(below - np.log(below))
    value += np.sum(above - tau + np.log(tau + 1.0) - np.log(above) + alpha * np.log(tau / alpha + 1.0))
    return float(value + residual / (width * sigma2) + (length - s.size) * np.log(sigma2))


def evbmf(matrix: np.ndarray) -> tuple[int, float]:
    """Rank and noise variance of ``matrix`` by empirical VBMF.

    Parameters
    ----------
    matrix : array of shape (L, M) or (M, L); it is transposed to L <= M (the answer does not depend on it)

    Returns
    -------
    rank : number of singular values gamma_h > sqrt(M sigma^2 x_bar) (0 for pure noise or a zero matrix)
    sigma2 : the estimated noise variance per entry

    Notes
    -----
    With alpha = L / M, tau_bar = 2.5129 sqrt(alpha) and x_bar = (1 + tau_bar)(1 + alpha / tau_bar),
    sigma^2 minimises

        Omega(s2) = sum_{x_h <= x_bar} (x_h - log x_h)
                  + sum_{x_h > x_bar} (x_h - tau_h + log(tau_h + 1) - log x_h + alpha log(tau_h / alpha + 1))
                  + residual / (M s2) + (L - H) log s2,

    x_h = gamma_h^2 / (M s2), tau_h = ((x_h - 1 - alpha) + sqrt((x_h - 1 - alpha)^2 - 4 alpha)) / 2.
    All H = L singular values are used, so residual = 0 and L - H = 0.

    The search interval is Nakajima et al.'s (their reference code ``EVBMF.m``):

    * upper = ||Y||_F^2 / (L M): all of Y is noise;
    * lower = max(gamma_{h*}^2 / (M x_bar), mean_{h >= h*} gamma_h^2 / M) with h* = ceil(L / (1 + alpha)),
      1-based: EVBMF never keeps more than h* - 1 components, so the h*-th must fall below the threshold,
      and the trailing singular values are at least noise.

    The search runs over log sigma^2: a bounded search over sigma^2 itself uses scipy's absolute tolerance
    of 1e-5, coarser than the sigma^2 of conv weights (on a 64 x 576 matrix with sigma^2 = 1e-6 it stopped at
    4.1e-6). A 64-point grid picks the best bracket (Omega can have several local minima), then
    ``minimize_scalar(method="bounded")`` refines between the neighbouring grid points.
    """
    from scipy.optimize import minimize_scalar  # lazily: importing lowrank_fm does not import scipy

    y = np.asarray(matrix, dtype=np.float64)
    if y.ndim != 2 or y.size == 0:
        raise ValueError(f"matrix must be a non-empty 2-D array, got shape {y.shape}")
    if not np.all(np.isfinite(y)):
        raise ValueError("matrix has non-finite entries (nan or inf): VBMF needs finite values")
    if y.shape[0] > y.shape[1]:
        y = y.T
    length, width = y.shape
    s = np.linalg.svd(y, compute_uv=False)
    residual = 0.0  # every singular value is used
    alpha = length / width
    tau_bar = TAU_CONSTANT * np.sqrt(alpha)
    x_bar = (1.0 + tau_bar) * (1.0 + alpha / tau_bar)

    upper = float(np.sum(s ** 2) + residual) / (length * width)
    if upper <= 0.0:
        return 0, 0.0
    h_star = min(int(np.ceil(length / (1.0 + alpha))) - 1, s.size - 1)  # 0-based index of the h*-th value
    lower = max(s[h_star] ** 2 / (width * x_bar), float(np.mean(s[h_star:] ** 2)) / width)
    lower = max(lower, upper * 1e-12)  # a (numerically) exact low-rank matrix has zero trailing values

    if lower >= upper:
        sigma2 = upper
    else:
        def objective(log_sigma2: float) -> float:
            return _omega(float(np.exp(log_sigma2)), s, length, width, residual, x_bar)

        grid = np.linspace(np.log(lower), np.log(upper), _GRID_POINTS)
        best = int(np.argmin([objective(t) for t in grid]))
        left, right = grid[max(best - 1, 0)], grid[min(best + 1, grid.size - 1)]
        result = minimize_scalar(objective, bounds=(left, right), method="bounded", options={"xatol": 1e-10})
        log_sigma2 = result.x if result.fun <= objective(grid[best]) else grid[best]
        sigma2 = float(np.exp(log_sigma2))

    threshold = np.sqrt(width * sigma2 * x_bar)
    return int(np.count_nonzero(s > threshold)), sigma2


def vbmf_rank(matrix: np.ndarray) -> int:
    """The EVBMF rank of ``matrix`` (see :func:`evbmf`)."""
    return evbmf(matrix)[0]
