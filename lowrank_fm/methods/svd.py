"""``svd``: truncated SVD of the weight unfolded along its output mode (weight-only, no data).

W (d, p) ~ U_r S_r V_r^T: a layer with r filters V_r^T (same kernel, stride, padding, dilation as the
original, no bias), then a 1x1 conv / Linear U_r S_r (d, r) with the original bias. Eckart-Young: the
Frobenius error is sqrt(sum_{a > r} s_a^2). ALGORITHMS.md section 5.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .base import LayerContext, Method, unfold_weight, unfolded_shape
from ..layers import two_factor_chain

__all__ = ["svd_factors", "TruncatedSVD"]


def svd_factors(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """first (r, p) = V_r^T and second (d, r) = U_r S_r of the unfolded weight (d, p), float64."""
    u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
    return vh[:rank], u[:, :rank] * s[:rank]


class TruncatedSVD(Method):
    """``svd``: weight-only truncated SVD; the energy of a rank is its share of sum s_a^2."""

    name = "svd"
    needs_responses = False

    def spectrum(self, ctx: LayerContext) -> np.ndarray:
        return torch.linalg.svdvals(unfold_weight(ctx.module)).pow(2).numpy()

    def full_rank(self, ctx: LayerContext) -> int:
        return min(unfolded_shape(ctx.module))

    def macs_per_position(self, ctx: LayerContext, rank: int) -> int:
        d, p = unfolded_shape(ctx.module)
        return rank * p + d * rank

    def build(self, ctx: LayerContext, rank: int, data=None, info: dict | None = None) -> nn.Module:
        first, second = svd_factors(unfold_weight(ctx.module), rank)
        bias = ctx.module.bias.detach().double() if ctx.module.bias is not None else torch.zeros(second.shape[0], dtype=torch.float64)
        return two_factor_chain(ctx.module, first, torch.zeros(rank, dtype=torch.float64), second, bias)
