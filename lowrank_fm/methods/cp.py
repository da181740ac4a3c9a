"""``cp``: CP decomposition of a conv kernel (Lebedev et al., ICLR 2015), weight-only. ALGORITHMS.md section 4.

K[t, s, i, j] ~ sum_{r < R} a_T[t, r] a_S[s, r] a_H[i, r] a_W[j, r], found by CP-ALS (:func:`cp_als`). The
conv becomes four convs applied in order:

1. 1x1 conv S -> R, weights a_S^T (no bias);
2. (kh x 1) depthwise conv over R channels (groups=R), weights a_H, stride (s_h, 1), padding (p_h, 0),
   dilation (d_h, 1);
3. (1 x kw) depthwise conv over R channels (groups=R), weights a_W, stride (1, s_w), padding (0, p_w),
   dilation (1, d_w);
4. 1x1 conv R -> T, weights a_T, the original bias.

Zero padding commutes with the bias-free 1x1 conv in front, so the chain equals the dense conv with the
CP-reconstructed kernel exactly (up to rounding).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..layers import cp_chain
from .base import LayerContext, Method, unfold_weight

__all__ = ["cp_als", "cp_reconstruct", "CPSettings", "CPDecomposition"]

def cp_reconstruct(a_t: np.ndarray, a_s: np.ndarray, a_h: np.ndarray, a_w: np.ndarray) -> np.ndarray:
    """The (T, S, kh, kw) kernel sum_r a_T[:, r] o a_S[:, r] o a_H[:, r] o a_W[:, r]."""
    return np.einsum("tr,sr,ir,jr->tsij", a_t, a_s, a_h, a_w, optimize=True)


def _khatri_rao(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """(I_a I_b I_c, R): row (i_a, i_b, i_c), C-major, holds a[i_a] * b[i_b] * c[i_c] (columnwise products)."""
    return (a[:, None, None, :] * b[None, :, None, :] * c[None, None, :, :]).reshape(-1, a.shape[1])


def _mttkrp(unfolded: np.ndarray, projected: np.ndarray | None, factors: list[np.ndarray], mode: int) -> np.ndarray:
    """M_n = X_(n) (Khatri-Rao product of the other factors), (I_n, R), for the kernel X (T, S, kh, kw).

    Mode 0 (T): ``unfolded`` X_(0) (T, S kh kw) times the Khatri-Rao product of a_S, a_H, a_W. The other modes
    share ``projected`` P[s, i, j, r] = sum_t X[t, s, i, j] a_T[t, r] (one product X_(0)^T a_T, formed once
    a_T is updated) and sum it against the remaining two factors, e.g. M_S[s, r] = sum_{i,j} P[s, i, j, r]
    a_H[i, r] a_W[j, r]: two (T x S kh kw x R) products per sweep instead of four."""
    if mode == 0:
        return unfolded @ _khatri_rao(factors[1], factors[2], factors[3])
    _, a_s, a_h, a_w = factors
    if mode == 1:
        return np.einsum("sijr,ir,jr->sr", projected, a_h, a_w)
    if mode == 2:
        return np.einsum("sijr,sr,jr->ir", projected, a_s, a_w)
    return np.einsum("sijr,sr,ir->jr", projected, a_s, a_h)


def _svd_init(kernel: np.ndarray, rank: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Leading left singular vectors of each mode unfolding (random columns where the mode is < rank)."""
    factors = []
    for mode in range(4):
        unfolding = np.moveaxis(kernel, mode, 0).reshape(kernel.shape[mode], -1)
        u = np.linalg.svd(unfolding, full_matrices=False)[0][:, :rank]
        if u.shape[1] < rank:
            u = np.concatenate([u, rng.standard_normal((kernel.shape[mode], rank - u.shape[1]))], axis=1)
        factors.append(u)
    return factors


def _normalise(factor: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    norms = np.linalg.norm(factor, axis=0)
    safe = np.where(norms > 0, norms, 1.0)
    return factor / safe, norms


def _fit(kernel: np.ndarray, factors: list[np.ndarray], norm: float) -> float:
    return 1.0 - float(np.linalg.norm(kernel - cp_reconstruct(*factors))) / norm


def _als_run(kernel, factors, iterations, ridge, tol, norm):
    """One CP-ALS run from ``factors`` (unit columns except the last mode updated); returns (factors, fit)."""
    rank = factors[0].shape[1]
    unfolded, projected = kernel.reshape(kernel.shape[0], -1), None
    factors = [_normalise(f)[0] for f in factors]
    weights = np.ones(rank)
    grams = [f.T @ f for f in factors]
    previous = -np.inf
    for _ in range(iterations):
        for mode in range(4):
            v = np.ones((rank, rank))
            for m in range(4):
                if m != mode:
                    v *= grams[m]
            m_n = _mttkrp(unfolded, projected, factors, mode)
            # proximal ridge: min ||X_(n) - A KR^T||^2 + lam ||A - A_old||^2 (A_old carries the weights); it
            # bounds the step when the Gram is near-singular (degenerate, cancelling components) and has the
            # plain least-squares solution as its fixed point, so it does not bias a converged fit
            lam = ridge * max(np.trace(v) / rank, np.finfo(np.float64).tiny)
            old = factors[mode] * weights
            solved = np.linalg.solve(v + lam * np.eye(rank), (m_n + lam * old).T).T
            factors[mode], weights = _normalise(solved)
            grams[mode] = factors[mode].T @ factors[mode]
            if mode == 0:
                projected = (unfolded.T @ factors[0]).reshape(*kernel.shape[1:], rank)
        # ||K - Khat||^2 = ||K||^2 - 2 <K, Khat> + ||Khat||^2, from the last update's MTTKRP and the Grams
        inner = float(np.sum((factors[3] * weights) * m_n))
        gram_all = np.outer(weights, weights)
        for g in grams:
            gram_all = gram_all * g
        fit = 1.0 - np.sqrt(max(norm**2 - 2.0 * inner + float(gram_all.sum()), 0.0)) / norm
        if abs(fit - previous) < tol:
            break
        previous = fit
    out = [f.copy() for f in factors]
    out[0] = out[0] * weights  # the scale goes to a_T
    return out, _fit(kernel, out, norm)


def cp_als(kernel, rank: int, *, restarts: int = 3, iterations: int = 500, ridge: float = 1e-6, seed: int = 0,
           tol: float = 1e-10):
    """Rank-``rank`` CP decomposition of a (T, S, kh, kw) kernel by alternating least squares.

    Each sweep updates a_T, a_S, a_H, a_W in turn, each by a ridge-regularised least squares against the
    Khatri-Rao product of the other three (normal equations via the Hadamard product of their Grams), and
    normalises the updated factor's columns (the scale is carried separately and put into a_T at the end).
    The ridge is relative: lam = ``ridge`` * trace(V) / R for the Gram Hadamard product V, and proximal
    (towards the previous iterate), which guards against degeneracy without biasing a converged solution.

    ``restarts`` runs in all: the first from an SVD-based start (leading singular vectors of each mode
    unfolding), the others from Gaussian random factors drawn in sequence from ``seed``, so that more
    restarts only add candidates (the returned fit never gets worse). A run stops after ``iterations``
    sweeps or when the fit changes by less than ``tol``.

    Returns (a_T (T, R), a_S (S, R), a_H (kh, R), a_W (kw, R), fit) with fit = 1 - ||K - Khat||_F / ||K||_F
    of the best run (1.0 for an all-zero kernel).
    """
    kernel = np.asarray(kernel.detach().cpu() if isinstance(kernel, torch.Tensor) else kernel, dtype=np.float64)
    if kernel.ndim != 4:
        raise ValueError(f"kernel must be (T, S, kh, kw), got shape {kernel.shape}")
    rank, restarts = int(rank), int(restarts)
    if rank < 1 or restarts < 1 or iterations < 1:
        raise ValueError(f"rank, restarts and iterations must be >= 1, got {rank}, {restarts}, {iterations}")
    norm = float(np.linalg.norm(kernel))
    if norm == 0.0:
        return (*[np.zeros((n, rank)) for n in kernel.shape], 1.0)
    rng = np.random.default_rng(seed)
    best, best_fit = None, -np.inf
    for run in range(restarts):
        start = _svd_init(kernel, rank, rng) if run == 0 else [rng.standard_normal((n, rank)) for n in kernel.shape]
        factors, fit = _als_run(kernel, start, iterations, ridge, tol, norm)
        if np.isfinite(fit) and fit > best_fit:
            best, best_fit = factors, fit
    if best is None:  # every run diverged to non-finite values
        raise FloatingPointError("CP-ALS did not produce a finite decomposition")
    return (*best, best_fit)


@dataclass(frozen=True)
class CPSettings:
    """Settings of ``cp`` and ``cp-sigma``: ALS starts (the best is kept), sweeps per start, ridge of the
    normal equations (see :func:`cp_als`)."""

    restarts: int = 3
    iterations: int = 500
    ridge: float = 1e-6

    def __post_init__(self) -> None:
        if int(self.restarts) < 1 or int(self.iterations) < 1 or not float(self.ridge) >= 0.0:
            raise ValueError(f"cp settings need restarts >= 1, iterations >= 1 and ridge >= 0, got {self}")

    def als_options(self, seed: int) -> dict:
        """The keyword arguments of :func:`cp_als`."""
        return {"restarts": int(self.restarts), "iterations": int(self.iterations), "ridge": float(self.ridge),
                "seed": int(seed)}


class CPDecomposition(Method):
    """``cp``: 1x1 (S->R), (kh x 1) depthwise, (1 x kw) depthwise, 1x1 (R->T) with the bias.

    There is no exact CP spectrum (CP ranks are not nested and the best rank-R CP approximation need not
    exist), so :meth:`spectrum` is a proxy: the squared singular values of the output unfolding
    (T, S kh kw). :meth:`full_rank` is the generic upper bound on the CP rank of a T x S x kh x kw tensor,
    T S kh kw / max(T, S, kh, kw) (each slice over the two largest modes is a matrix of rank at most the
    smaller of them): a CP of that rank reproducing the kernel exists, but it is far too large to be useful and
    ALS is not guaranteed to find it.

    Settings: :class:`CPSettings`; the run's seed seeds the ALS starts.
    """

    name = "cp"
    needs_responses = False
    Settings = CPSettings

    def supports(self, module: nn.Module) -> str | None:
        if not isinstance(module, nn.Conv2d):
            return "CP decomposition applies to convs only"
        if tuple(module.kernel_size) == (1, 1):
            return "a 1x1 conv has no spatial modes to decompose (use svd or tucker)"
        return super().supports(module)

    def spectrum(self, ctx: LayerContext) -> np.ndarray:
        """Energy proxy: squared singular values of the (T, S kh kw) unfolding (no exact CP spectrum exists)."""
        return torch.linalg.svdvals(unfold_weight(ctx.module)).pow(2).numpy()

    def full_rank(self, ctx: LayerContext) -> int:
        shape = tuple(ctx.module.weight.shape)
        return int(np.prod(shape)) // max(shape)

    def macs(self, ctx: LayerContext, rank: int) -> int:
        """Per image: S R H W (1x1 in) + R kh H' W (vertical depthwise: output height H', full input width W)
        + R kw H' W' (horizontal depthwise) + T R H' W' (1x1 out)."""
        conv = ctx.module
        _, in_h, in_w = ctx.in_shape
        _, out_h, out_w = ctx.out_shape
        kh, kw = conv.kernel_size
        return (conv.in_channels * rank * in_h * in_w + rank * kh * out_h * in_w + rank * kw * out_h * out_w
                + conv.out_channels * rank * out_h * out_w)

    def build(self, ctx: LayerContext, rank: int, data=None, info: dict | None = None) -> nn.Module:
        conv = ctx.module
        a_t, a_s, a_h, a_w, fit = cp_als(conv.weight.detach().double().cpu().numpy(), rank,
                                         **self.settings.als_options(self.seed))
        if info is not None:
            info["cp_fit"] = float(fit)
        return cp_chain(conv, a_t, a_s, a_h, a_w)

    def timing_module(self, ctx: LayerContext, rank: int) -> nn.Module:
        """The rank-``rank`` CP chain with seeded Gaussian factors (T, R), (S, R), (kh, R), (kw, R): no ALS."""
        conv = ctx.module
        generator = np.random.default_rng(self.seed)
        t, s, kh, kw = conv.weight.shape
        return cp_chain(conv, *(generator.standard_normal((n, rank)) for n in (t, s, kh, kw)))
