"""``spatial``: spatially separable filters (Jaderberg, Vedaldi, Zisserman 2014, scheme 2), weight-only.

A kh x kw conv with N filters over C channels becomes a (kh x 1) conv with K filters over C, then a
(1 x kw) conv with N filters over K. The filter reconstruction
min sum_{n,c} || W_n^c - sum_k h_n^k * v_k^c ||^2 has a closed form: the SVD of the kernel rearranged as
M[(c, i), (n, j)] = W[n, c, i, j], of shape (C kh) x (N kw). Stride, padding and dilation are split:
(s_h, 1), (p_h, 0), (d_h, 1) on the vertical conv and (1, s_w), (0, p_w), (1, d_w) on the horizontal one.
ALGORITHMS.md section 2.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..layers import spatial_chain
from .base import LayerContext, Method

__all__ = ["spatial_svd", "spatial_factors", "SpatialSeparable"]


def _rearranged(weight: torch.Tensor) -> torch.Tensor:
    """(N, C, kh, kw) -> M of shape (C kh, N kw), M[(c, i), (n, j)] = W[n, c, i, j]."""
    n, c, kh, kw = weight.shape
    return weight.double().permute(1, 2, 0, 3).reshape(c * kh, n * kw)


def spatial_svd(weight: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(U, s, V^T) of the rearranged kernel M (C kh, N kw): the separations of every rank truncate it."""
    return tuple(torch.linalg.svd(_rearranged(weight), full_matrices=False))


def spatial_factors(weight: torch.Tensor, rank: int, svd: tuple[torch.Tensor, ...] | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Vertical filters (K, C, kh, 1) and horizontal filters (N, K, 1, kw) of the best rank-K separation,
    M ~ (U_K s_K^1/2)(s_K^1/2 V_K^T); ``svd``: :func:`spatial_svd` of ``weight`` when it is already known."""
    n, c, kh, kw = weight.shape
    u, s, vh = spatial_svd(weight) if svd is None else svd
    root = s[:rank].sqrt()
    vertical = (u[:, :rank] * root).T.reshape(rank, c, kh, 1)
    horizontal = (vh[:rank].T * root).reshape(n, kw, rank).permute(0, 2, 1).reshape(n, rank, 1, kw)
    return vertical, horizontal


class SpatialSeparable(Method):
    """``spatial``: (kh x 1) then (1 x kw) convs; energy is the share of the rearranged kernel's s_a^2."""

    name = "spatial"
    needs_responses = False

    def supports(self, module: nn.Module) -> str | None:
        if not isinstance(module, nn.Conv2d):
            return "spatial separation applies to convs only"
        if min(module.kernel_size) == 1:
            return f"kernel {tuple(module.kernel_size)} has nothing to separate"
        return super().supports(module)

    def spectrum(self, ctx: LayerContext) -> np.ndarray:
        return torch.linalg.svdvals(_rearranged(ctx.module.weight.detach())).pow(2).numpy()

    def full_rank(self, ctx: LayerContext) -> int:
        n, c, kh, kw = ctx.module.weight.shape  # _rearranged's shape (C kh, N kw), without the copy
        return min(c * kh, n * kw)

    def macs(self, ctx: LayerContext, rank: int) -> int:
        """H' W_in K C kh (vertical conv, full input width) + H' W' N K kw (horizontal conv)."""
        conv = ctx.module
        _, out_h, out_w = ctx.out_shape
        in_w = ctx.in_shape[2]  # the vertical conv (kernel width 1, stride 1, no width padding) keeps the width
        kh, kw = conv.kernel_size
        return out_h * in_w * rank * conv.in_channels * kh + out_h * out_w * conv.out_channels * rank * kw

    def build(self, ctx: LayerContext, rank: int, data=None, info: dict | None = None) -> nn.Module:
        return spatial_chain(ctx.module, *spatial_factors(ctx.module.weight.detach(), rank))

    def chains_at(self, ctx: LayerContext, ranks) -> dict[int, nn.Module]:
        """One SVD for every rank."""
        weight = ctx.module.weight.detach()
        svd = spatial_svd(weight)
        return {int(r): spatial_chain(ctx.module, *spatial_factors(weight, int(r), svd)) for r in ranks}
