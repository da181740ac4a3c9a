"""``fm-3d``: spatial separation, then the output-feature-map method on the separated layer (Zhang, Zou, He,
Sun, TPAMI 2016, "asymmetric 3d"; ALGORITHMS.md section 1).

A kh x kw conv W (d filters over c channels) becomes three convs:

    (kh x 1, K filters over c)  ->  (1 x kw, d' filters over K)  ->  (1 x 1, d filters over d')

1. Spatial split (Jaderberg et al. 2014, scheme 2): the closed-form vertical filters V (K, c, kh) and
   horizontal filters H (d, K, kw) of :func:`~lowrank_fm.methods.spatial.spatial_factors`. With data, H and
   the bias are refitted by least squares so that H z + b matches the ORIGINAL responses y, z being the
   vertical conv applied to the approximated network's inputs (kept only if it lowers the held-out error).
2. Channel stage on the (1 x kw, d) conv: reduced-rank regression of y on yhat = H z + b, then the nonlinear
   refinement of :func:`~lowrank_fm.methods.fm_nonlinear.fit_two_factors` against f(y), f the activation
   that follows the layer.
3. With the RMSProp solver, all three factors are refined together (:func:`refine_jointly`); the result is
   kept only if it lowers the held-out objective.

Ranks: the method's rank is the channel rank d'; the spatial rank follows the paper's even split of the
layer's speedup between the two stages (each stage gains d / d'):

    K = ceil(d' c kh kw / (c kh + d kw)),  clipped to [1, min(c kh, d kw)]  (full at d' = d).

MACs per image: H' W_in K c kh (vertical conv, full input width) + H' W' d' K kw + H' W' d d'.
1x1 convs and Linear layers have nothing to separate and take the ``fm`` method unchanged.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..layers import separable_two_factor_chain
from .base import LayerContext, LayerData
from .fm import fm_linear_factors
from .fm_nonlinear import FeatureMap, fit_two_factors
from .solvers import rmsprop_minimise
from .spatial import spatial_factors, spatial_svd

__all__ = ["spatial_rank_for", "vertical_responses", "refit_horizontal", "refine_jointly", "FeatureMap3D"]


def spatial_rank_for(channel_rank: int, out_channels: int, in_channels: int, kernel: tuple[int, int]) -> int:
    """K for channel rank d': the even split of the layer's speedup (see the module docstring)."""
    kh, kw = kernel
    full = min(in_channels * kh, out_channels * kw)
    if channel_rank >= out_channels:
        return full
    ideal = channel_rank * in_channels * kh * kw / (in_channels * kh + out_channels * kw)
    return int(min(full, max(1, math.ceil(ideal - 1e-9))))


def vertical_responses(patches: torch.Tensor, vertical: torch.Tensor, kernel: tuple[int, int]) -> torch.Tensor:
    """The horizontal conv's input patches z from the original layer's kh x kw input patches x.

    Parameters
    ----------
    patches : (n, c kh kw) input patches of the kh x kw conv, flattened like its weight (c, kh, kw)
    vertical : (K, c, kh, 1) the vertical filters
    kernel : (kh, kw)

    Returns
    -------
    (n, K kw) with z[n, e, j] = sum_{c, i} V[e, c, i] x[n, c, i, j], flattened (e slowest) like the
    horizontal weight (d, K, 1, kw). The kh x kw patch holds exactly the input rows and columns that the
    vertical conv (stride (s, 1), padding (p, 0)) feeds into the horizontal conv's window at that position,
    and the padded columns of z are zero because the vertical conv has no bias.
    """
    kh, kw = kernel
    n = patches.shape[0]
    dtype = torch.promote_types(patches.dtype, vertical.dtype)  # float64 unless both are float32 (RMSProp)
    x = patches.to(dtype).reshape(n, -1, kh, kw)
    return torch.einsum("ncij,eci->nej", x, vertical.to(dtype)[..., 0]).reshape(n, -1)


def refit_horizontal(Z: torch.Tensor, Y: torch.Tensor, ridge: float = 1e-8) -> tuple[torch.Tensor, torch.Tensor]:
    """Least squares H (d, q), b (d,) minimising || Y - Z H^T - b ||_F (ridge relative to tr(Zc^T Zc) / q).

    Z : (n, q) regressors; Y : (n, d) targets.
    """
    zbar, ybar = Z.mean(0), Y.mean(0)
    Zc, Yc = Z - zbar, Y - ybar
    gram = Zc.T @ Zc
    gram = gram + ridge * float(torch.trace(gram)) / gram.shape[0] * torch.eye(gram.shape[0], dtype=gram.dtype)
    H = torch.linalg.solve(gram, Zc.T @ Yc).T
    return H, ybar - H @ zbar


def refine_jointly(vertical: torch.Tensor, factors: tuple, data: LayerData, kernel: tuple[int, int],
                   settings: dict) -> tuple[torch.Tensor, tuple, dict]:
    """RMSProp on all three factors at once (the vertical filters too) against f(y), from the staged solution.

    The chain on an input patch x (n, c kh kw): z = vertical_responses(x, V), y' = P (A z + b1) + c, with
    V (K, c, kh, 1), A (d', K kw), b1 (d',), P (d, d'), c (d,). Returns the best of (staged, refined) on the
    held-out rows, and what it measured.
    """
    fit, val = data.fit_and_validation()
    X, Y = data.inputs, data.targets.double()

    def forward(params, x):
        V, A, b1, P, c = params
        return (vertical_responses(x, V, kernel) @ A.T + b1) @ P.T + c

    kwargs = {} if settings["steps"] is None else {"steps": int(settings["steps"])}
    before, after, best, _ = rmsprop_minimise([vertical.double(), *factors], forward, X[fit], Y[fit], X[val], Y[val],
                                              activation=data.activation, seed=settings["seed"], **kwargs)
    return best[0], tuple(best[1:]), {"objective_before": before, "objective_after": after}


class FeatureMap3D(FeatureMap):
    """``fm-3d``: (kh x 1, K) -> (1 x kw, d') -> (1 x 1, d), asymmetric and refined against f(y)."""

    name = "fm-3d"
    # its vertical-filter fit and joint refinement do not add their sums over the ranks (yet): under torchrun the
    # layer-wise pass gathers the rows to rank 0, which solves alone
    solves_shards = False

    @staticmethod
    def _separable(module: nn.Module) -> bool:
        return isinstance(module, nn.Conv2d) and min(module.kernel_size) > 1

    def spatial_rank(self, ctx: LayerContext, rank: int) -> int:
        conv = ctx.module
        return spatial_rank_for(rank, conv.out_channels, conv.in_channels, tuple(conv.kernel_size))

    def macs(self, ctx: LayerContext, rank: int) -> int:
        if not self._separable(ctx.module):
            return super().macs(ctx, rank)
        conv = ctx.module
        _, out_h, out_w = ctx.out_shape
        in_w = ctx.in_shape[2]
        kh, kw = conv.kernel_size
        k = self.spatial_rank(ctx, rank)
        return (out_h * in_w * k * conv.in_channels * kh + out_h * out_w * rank * k * kw
                + out_h * out_w * conv.out_channels * rank)

    def build(self, ctx: LayerContext, rank: int, data: LayerData | None = None, info: dict | None = None
              ) -> nn.Module:
        if not self._separable(ctx.module):
            return super().build(ctx, rank, data, info)
        return self._build_separated(ctx, rank, data, info)

    def chains_at(self, ctx: LayerContext, ranks) -> dict[int, nn.Module]:
        """One SVD of the spatial split for every rank."""
        if not self._separable(ctx.module):
            return super().chains_at(ctx, ranks)
        svd = spatial_svd(ctx.module.weight.detach())
        return {int(r): self._build_separated(ctx, int(r), svd=svd) for r in ranks}

    def _build_separated(self, ctx: LayerContext, rank: int, data: LayerData | None = None, info: dict | None = None,
                         svd: tuple[torch.Tensor, ...] | None = None) -> nn.Module:
        conv = ctx.module
        kernel = tuple(conv.kernel_size)
        k = self.spatial_rank(ctx, rank)
        vertical, horizontal = spatial_factors(conv.weight.detach(), k, svd)
        H = horizontal.reshape(conv.out_channels, -1)
        bias = None if conv.bias is None else conv.bias.detach().double()
        done = {"spatial_rank": k}
        if data is None:  # no layer-wise pass: symmetric projection of the separated layer on the response basis
            stats = ctx.stats
            basis = torch.from_numpy(stats.eigenvectors[:, :rank].copy())
            factors = fm_linear_factors(H, bias, torch.from_numpy(stats.mean), basis)
            done.update(solver="symmetric-linear", note="no layer-wise pass: model not traceable")
        else:
            Z = vertical_responses(data.inputs.double(), vertical, kernel)
            Y = data.targets.double()
            fit, val = data.fit_and_validation()

            def heldout_error(h, b):
                return float((Y[val] - Z[val] @ h.T - (0.0 if b is None else b)).pow(2).sum())

            refit_H, refit_b = refit_horizontal(Z[fit], Y[fit])
            done["spatial_refit"] = heldout_error(refit_H, refit_b) < heldout_error(H, bias)
            if done["spatial_refit"]:
                H, bias = refit_H, refit_b
            settings = self.solver_settings()
            factors, solved = fit_two_factors(H, bias, LayerData(Z, Y, data.heldout, data.activation), rank,
                                              **settings)
            done.update(solved)
            if settings["solver"] == "rmsprop":
                vertical, factors, done["joint"] = refine_jointly(vertical, factors, data, kernel, settings)
        if info is not None:
            info.update(done)
        return separable_two_factor_chain(conv, vertical, *factors)
