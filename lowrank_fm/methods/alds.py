"""``alds``: per-layer grouped SVD with (groups k, rank j) chosen for every layer under the ``--speedup`` budget
to minimise the largest relative error across layers (Liebenwein et al., NeurIPS 2021; ALGORITHMS.md
section 7). Weight-only: the error is the Frobenius one, ||W - W~||_F / ||W||_F (the paper bounds the
operator norm; the Frobenius norm is exact for every (k, j) at once, see :mod:`.grouped_svd`).

The layer is a grouped conv (k groups of j filters, the original kernel, stride, padding, dilation; input
channels split in k equal consecutive groups) then a 1x1 conv (d, k j) with the bias. k runs over
:attr:`ALDS.group_options` that divide the input channels; a Linear layer takes k = 1 (a plain SVD).

To the pipeline the rank of a layer is k j, the width between the two convs; the planner's ``alds-minmax``
strategy chooses (k, j) and records k in the layer context's options. Without ``--speedup`` (per-layer
energy) every layer takes k = 1.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from torch import nn

from ..layers import grouped_two_factor_chain
from .base import LayerContext, Method, unfold_weight, unfolded_shape
from .grouped_svd import group_bases, grouped_errors, grouped_factors

__all__ = ["ALDSSettings", "ALDS"]


@dataclass(frozen=True)
class ALDSSettings:
    """``group_options``: the group counts k a conv may take (those that divide its input channels)."""

    group_options: tuple[int, ...] = (1, 2, 4, 8)

    def __post_init__(self) -> None:
        options = tuple(int(k) for k in self.group_options)
        if not options or min(options) < 1:
            raise ValueError(f"group_options must be group counts >= 1, got {self.group_options}")
        object.__setattr__(self, "group_options", options)


class ALDS(Method):
    """``alds``: grouped SVD, (k, j) per layer by min-max relative error under the MAC budget (the planner's
    ``alds-minmax`` strategy); the layer's k comes in ``ctx.options["groups"]`` (1 when absent)."""

    name = "alds"
    needs_responses = False
    Settings = ALDSSettings
    allocations = ("alds-minmax",)

    # the Sigma of the error norm and the patch mean; the data-aware subclass overrides these
    def sigma(self, ctx: LayerContext) -> np.ndarray | None:
        return None

    def mean(self, ctx: LayerContext) -> np.ndarray | None:
        return None

    def group_choices(self, ctx: LayerContext) -> list[int]:
        """The group counts k this layer may take (a Linear layer: k = 1)."""
        if ctx.kind != "conv":
            return [1]
        return [k for k in self.settings.group_options if ctx.module.in_channels % k == 0]

    @staticmethod
    def with_groups(ctx: LayerContext, groups: int) -> LayerContext:
        """``ctx`` with k = ``groups`` recorded in its options."""
        return replace(ctx, options={**ctx.options, "groups": int(groups)})

    @staticmethod
    def _k(ctx: LayerContext) -> int:
        return int(ctx.options.get("groups", 1))

    def relative_errors(self, ctx: LayerContext, groups: int) -> np.ndarray:
        """(d + 1,) relative error of the grouped rank-j approximation with k = ``groups``, for j = 0 .. d:
        sqrt(err(j) / ||W Sigma^1/2||_F^2) (Sigma = I for ``alds``)."""
        weight = unfold_weight(ctx.module).numpy()
        sigma = self.sigma(ctx)
        total = float(np.sum((weight @ sigma) * weight)) if sigma is not None else float(np.sum(weight**2))
        return np.sqrt(grouped_errors(weight, sigma, group_bases(weight, sigma, groups)) / max(total, 1e-300))

    def spectrum(self, ctx: LayerContext) -> np.ndarray:
        """Per-layer energy (k = 1): the eigenvalues of W Sigma W^T (Sigma = I: squared singular values)."""
        weight = unfold_weight(ctx.module).numpy()
        sigma = self.sigma(ctx)
        gram = weight @ weight.T if sigma is None else weight @ sigma @ weight.T
        return np.clip(np.linalg.eigvalsh(0.5 * (gram + gram.T))[::-1], 0.0, None)

    def full_rank(self, ctx: LayerContext) -> int:
        return min(unfolded_shape(ctx.module))

    def macs_per_position(self, ctx: LayerContext, rank: int) -> int:
        """k groups of j = rank / k filters over p / k inputs each, then d x (k j): j p + d k j."""
        d, p = unfolded_shape(ctx.module)
        return (rank // self._k(ctx)) * p + d * rank

    def build(self, ctx: LayerContext, rank: int, data=None, info: dict | None = None) -> nn.Module:
        module = ctx.module
        k = self._k(ctx)
        if k not in self.group_choices(ctx):
            raise ValueError(f"alds: layer {ctx.name!r} cannot take {k} groups (it may take {self.group_choices(ctx)})")
        if rank % k:
            raise ValueError(f"alds: rank {rank} of layer {ctx.name!r} is not a multiple of its {k} groups")
        j = rank // k
        weight = unfold_weight(module).numpy()
        sigma = self.sigma(ctx)
        first, second = grouped_factors(weight, group_bases(weight, sigma, k), j)
        bias = np.zeros(weight.shape[0]) if module.bias is None else module.bias.detach().double().numpy()
        mean = self.mean(ctx)
        if mean is not None:  # b' = b + (W - W~) mu keeps the mean response exact
            approx = np.concatenate([second[:, g * j:(g + 1) * j] @ first[g * j:(g + 1) * j] for g in range(k)], axis=1)
            bias = bias + (weight - approx) @ mean
        if info is not None:
            info.update(groups=k, group_rank=j)
        return grouped_two_factor_chain(module, first, second, bias, k)
