"""``tucker2-sigma``: Tucker-2 of a conv kernel under the Sigma norm of its input patches (ALGORITHMS.md
section 6; Kalle et al., NeurIPS 2025, arXiv 2511.04494).

Same layer, ranks and rank selection as ``tucker2`` (1x1, kh x kw core, 1x1); the factors start from the
Frobenius HOSVD + HOOI and are refined by :func:`~.sigma_math.tucker2_sigma` to minimise the mean squared
output error over the calibration patches; the bias becomes b + (W - W~) mu.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..layers import set_output_bias, tucker2_chain
from .base import LayerContext
from .sigma_math import corrected_bias, tucker2_sigma
from .tucker import Tucker2, tucker2

__all__ = ["Tucker2Sigma", "Tucker2SigmaSettings"]


@dataclass(frozen=True)
class Tucker2SigmaSettings:
    """als_iterations : most Sigma-norm ALS sweeps; hooi_iterations : most sweeps of the Frobenius HOOI start;
    cg_iterations : most conjugate-gradient steps of each sweep's input-factor solve (``auto`` predicts errors
    with fewer of each)."""

    als_iterations: int = 30
    hooi_iterations: int = Tucker2.iterations
    cg_iterations: int = 50

    def __post_init__(self) -> None:
        for name in ("als_iterations", "hooi_iterations", "cg_iterations"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


class Tucker2Sigma(Tucker2):
    """``tucker2-sigma``: Sigma-norm ALS Tucker-2 (at most ``settings.als_iterations`` sweeps)."""

    name = "tucker2-sigma"
    Settings = Tucker2SigmaSettings
    needs_input_covariance = True

    def build(self, ctx: LayerContext, rank: int, data=None, info: dict | None = None) -> nn.Module:
        conv = ctx.module
        stats = ctx.require_input_stats(self.name)
        rank_out, rank_in = self.ranks(ctx, rank)
        start = tucker2(conv.weight, rank_out, rank_in, iterations=self.settings.hooi_iterations)
        weight = conv.weight.detach().double().numpy()
        core, u_out, u_in, history = tucker2_sigma(weight, stats.regularised_covariance,
                                                   *(f.numpy() for f in start), iterations=self.settings.als_iterations,
                                                   cg_iterations=self.settings.cg_iterations)
        approx = np.einsum("abhw,ta,sb->tshw", core, u_out, u_in, optimize=True).reshape(weight.shape[0], -1)
        bias = corrected_bias(None if conv.bias is None else conv.bias.detach().double().numpy(),
                              weight.reshape(weight.shape[0], -1), approx, stats.mean)
        done = {"ranks": [rank_out, rank_in], "sigma_error_start": history[0],
                "sigma_error": history[-1], "als_sweeps": len(history) - 1}
        if info is not None:
            info.update(done)
        chain = tucker2_chain(conv, core, u_out, u_in)
        return set_output_bias(chain, torch.from_numpy(bias))

    def timing_module(self, ctx: LayerContext, rank: int) -> nn.Module:
        """The HOSVD start's chain (no HOOI, no Sigma sweep) with the bias the corrected build always has."""
        conv = ctx.module
        core, u_out, u_in = tucker2(conv.weight, *self.ranks(ctx, rank), iterations=0)
        return set_output_bias(tucker2_chain(conv, core, u_out, u_in), torch.zeros(conv.out_channels))
