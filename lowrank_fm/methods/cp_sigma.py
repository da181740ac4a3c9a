"""``cp-sigma``: CP decomposition of a conv kernel under the Sigma norm of its input patches (ALGORITHMS.md
section 6; Kalle et al., NeurIPS 2025, arXiv 2511.04494).

Same layer, ranks and rank selection as ``cp`` (1x1, kh x 1, 1 x kw, 1x1); the factors start from CP-ALS
and are refined by :func:`~.sigma_math.cp_sigma` to minimise the mean squared output error over the
calibration patches; the bias becomes b + (W - W~) mu.
"""

from __future__ import annotations

import torch
from torch import nn

from ..layers import cp_chain, set_output_bias
from .base import LayerContext
from .cp import CPDecomposition, cp_als, cp_reconstruct
from .sigma_math import corrected_bias, cp_sigma

__all__ = ["CPSigma"]


class CPSigma(CPDecomposition):
    """``cp-sigma``: Sigma-norm ALS CP (at most ``als_iterations`` sweeps); options as ``cp``."""

    name = "cp-sigma"
    needs_input_covariance = True
    als_iterations = 30

    def build(self, ctx: LayerContext, rank: int, data=None, info: dict | None = None) -> nn.Module:
        conv = ctx.module
        stats = ctx.require_input_stats(self.name)
        weight = conv.weight.detach().double().numpy()
        *start, _ = cp_als(weight, rank, **self.settings.als_options(self.seed))
        factors, history = cp_sigma(weight, stats.regularised_covariance, start, iterations=self.als_iterations)
        approx = cp_reconstruct(*factors).reshape(weight.shape[0], -1)
        bias = corrected_bias(None if conv.bias is None else conv.bias.detach().double().numpy(),
                              weight.reshape(weight.shape[0], -1), approx, stats.mean)
        if info is not None:
            info.update(sigma_error_start=history[0], sigma_error=history[-1], als_sweeps=len(history) - 1)
        return set_output_bias(cp_chain(conv, *factors), torch.from_numpy(bias))

    def timing_module(self, ctx: LayerContext, rank: int) -> nn.Module:
        """``cp``'s unfitted chain with the bias the corrected build always has."""
        return set_output_bias(super().timing_module(ctx, rank), torch.zeros(ctx.module.out_channels))
