"""Output-feature-map approximation (Zhang, Zou, He, Sun, TPAMI 2016, arXiv 1505.06798), linear solution.

Pure math in :func:`fm_linear_factors`; :class:`FeatureMapLinear` is the registered method ``fm-linear``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..layers import two_factor_chain
from .base import LayerContext, Method, unfold_weight, unfolded_shape

__all__ = ["fm_linear_factors", "FeatureMapLinear"]


def fm_linear_factors(
    weight: torch.Tensor, bias: torch.Tensor | None, mean: torch.Tensor, basis: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Factors of the projected layer y ~ U U^T (y - ybar) + ybar, float64.

    Parameters
    ----------
    weight : (d, n) the layer's weight unfolded along its output mode (n = c k_h k_w or in_features)
    bias : (d,) or None
    mean : (d,) ybar, the mean response
    basis : (d, r) U, orthonormal columns (the top-r principal directions of the responses)

    Returns
    -------
    first_weight : (r, n)  V = U^T W
    first_bias : (r,)      U^T b
    second_weight : (d, r) U
    second_bias : (d,)     ybar - U U^T ybar

    Notes
    -----
    U (U^T (W x + b)) + ybar - U U^T ybar = U U^T (y - ybar) + ybar with y = W x + b.
    """
    weight, mean, basis = weight.double(), mean.double(), basis.double()
    bias = torch.zeros(weight.shape[0], dtype=torch.float64) if bias is None else bias.double()
    first_weight = basis.T @ weight
    first_bias = basis.T @ bias
    second_bias = mean - basis @ (basis.T @ mean)
    return first_weight, first_bias, basis, second_bias


class FeatureMapLinear(Method):
    """``fm-linear``: project each layer's responses on their top principal directions (symmetric, linear).

    Cost per position: d' c k^2 + d d' instead of d c k^2.
    """

    name = "fm-linear"
    needs_responses = True
    output_correction = False  # the paper's symmetric baseline stays symmetric (``fm`` is its asymmetric form)

    def spectrum(self, ctx: LayerContext) -> np.ndarray:
        return ctx.stats.eigenvalues

    def full_rank(self, ctx: LayerContext) -> int:
        return ctx.out_channels

    def macs_per_position(self, ctx: LayerContext, rank: int) -> int:
        fan_in = unfolded_shape(ctx.module)[1]
        return rank * fan_in + ctx.out_channels * rank

    def factors(self, ctx: LayerContext, rank: int):
        """(first_weight, first_bias, second_weight, second_bias) of :func:`fm_linear_factors` at ``rank``."""
        stats = ctx.stats
        basis = torch.from_numpy(np.ascontiguousarray(stats.eigenvectors[:, :rank]))
        bias = None if ctx.module.bias is None else ctx.module.bias.detach()
        return fm_linear_factors(unfold_weight(ctx.module), bias, torch.from_numpy(stats.mean), basis)

    def build(self, ctx: LayerContext, rank: int, data=None, info: dict | None = None) -> nn.Module:
        return two_factor_chain(ctx.module, *self.factors(ctx, rank))
