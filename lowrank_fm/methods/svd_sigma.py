"""``svd-sigma``: the rank-r W~ minimising ||(W - W~) Sigma^1/2||_F for Linear layers and conv unfoldings, in
closed form (top eigenvectors of W Sigma W^T, :func:`~.sigma_math.svd_sigma`); ALGORITHMS.md section 6.

The layer is the ``svd`` layer (r filters U_r^T W, then a 1x1 / Linear U_r) with the bias b + (W - W~) mu.
Its spectrum, for rank selection, is that of W Sigma W^T: the output variance each rank keeps.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .base import LayerContext, unfold_weight
from ..layers import two_factor_chain
from .sigma_math import corrected_bias, svd_sigma
from .svd import TruncatedSVD

__all__ = ["SVDSigma"]


class SVDSigma(TruncatedSVD):
    """``svd-sigma``: data-aware truncated SVD; the energy of a rank is its share of the output variance."""

    name = "svd-sigma"
    needs_input_covariance = True

    def spectrum(self, ctx: LayerContext) -> np.ndarray:
        weight = unfold_weight(ctx.module).numpy()
        gram = weight @ ctx.require_input_stats(self.name).regularised_covariance @ weight.T
        return np.clip(np.linalg.eigvalsh(0.5 * (gram + gram.T))[::-1], 0.0, None)

    def build(self, ctx: LayerContext, rank: int, data=None, info: dict | None = None) -> nn.Module:
        stats = ctx.require_input_stats(self.name)
        weight = unfold_weight(ctx.module).numpy()
        first, second = svd_sigma(weight, stats.regularised_covariance, rank)
        bias = corrected_bias(None if ctx.module.bias is None else ctx.module.bias.detach().double().numpy(),
                              weight, second @ first, stats.mean)
        return two_factor_chain(ctx.module, first, torch.zeros(rank, dtype=torch.float64), second, bias)
