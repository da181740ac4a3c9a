"""``alds``: per-layer grouped SVD with (groups k, rank j) chosen for every layer under the ``--speedup`` budget
to minimise the largest relative error across layers (Liebenwein et al., NeurIPS 2021; ALGORITHMS.md
section 7). Weight-only: the error is the Frobenius one, ||W - W~||_F / ||W||_F (the paper bounds the
operator norm; the Frobenius norm is exact for every (k, j) at once, see :mod:`.grouped_svd`).

The layer is a grouped conv (k groups of j filters, the original kernel, stride, padding, dilation; input
channels split in k equal consecutive groups) then a 1x1 conv (d, k j) with the bias. k runs over
:attr:`ALDS.group_options` that divide the input channels; a Linear layer takes k = 1 (a plain SVD).

To the pipeline the rank of a layer is k j, the width between the two convs; :meth:`ALDS.select_ranks`
records each layer's k. Without ``--speedup`` (per-layer energy) every layer takes k = 1.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..layers import ConvChain, ConvFactor, LinearChain
from .base import LayerContext, Method, unfold_weight, unfolded_shape
from .grouped_svd import Candidate, group_bases, grouped_errors, grouped_factors, minmax_allocation

__all__ = ["ALDS"]


class ALDS(Method):
    """``alds``: grouped SVD, (k, j) per layer by min-max relative error under the MAC budget."""

    name = "alds"
    needs_responses = False
    group_options = (1, 2, 4, 8)

    def __init__(self, config=None) -> None:
        super().__init__(config)
        self.groups: dict[str, int] = {}  # layer name -> k chosen by select_ranks

    # the Sigma of the error norm and the patch mean; the data-aware subclass overrides these
    def sigma(self, ctx: LayerContext) -> np.ndarray | None:
        return None

    def mean(self, ctx: LayerContext) -> np.ndarray | None:
        return None

    def _group_choices(self, ctx: LayerContext) -> list[int]:
        if ctx.kind != "conv":
            return [1]
        return [k for k in self.group_options if ctx.module.in_channels % k == 0]

    def _k(self, ctx: LayerContext) -> int:
        return self.groups.get(ctx.name, 1)

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

    def _candidates(self, ctx: LayerContext, original_macs: int) -> list[Candidate]:
        weight = unfold_weight(ctx.module).numpy()
        sigma = self.sigma(ctx)
        total = float(np.sum((weight @ sigma) * weight)) if sigma is not None else float(np.sum(weight**2))
        d, p = weight.shape
        options = [Candidate(original_macs, 0.0, None)]
        for k in self._group_choices(ctx):
            errors = np.sqrt(grouped_errors(weight, sigma, group_bases(weight, sigma, k)) / max(total, 1e-300))
            for j in range(1, min(d, p // k) + 1):
                macs = (j * p + d * k * j) * ctx.positions
                if macs < original_macs:
                    options.append(Candidate(macs, float(errors[j]), (k, j)))
        return options

    def select_ranks(self, contexts: dict[str, LayerContext], macs: dict[str, int], config
                     ) -> tuple[dict[str, int | None], dict]:
        """(k, j) per layer in ``contexts`` minimising the largest relative error with all layers' MACs (``macs``,
        every layer of the model) cut by ``config.speedup``; returns ranks k j (None: kept) and a summary."""
        fixed = sum(m for n, m in macs.items() if n not in contexts)
        budget = sum(macs.values()) / float(config.speedup) - fixed
        layers = {name: self._candidates(ctx, macs[name]) for name, ctx in contexts.items()}
        chosen, level, reachable = minmax_allocation(layers, budget)
        self.groups = {name: c.choice[0] for name, c in chosen.items() if c.choice is not None}
        total = fixed + sum(c.macs for c in chosen.values())
        selection = {"target_speedup": config.speedup, "planned_speedup": sum(macs.values()) / total,
                     "reachable": reachable, "allocation": "alds-minmax", "max_rel_error": level,
                     "groups": dict(self.groups)}
        return {name: None if c.choice is None else c.choice[0] * c.choice[1] for name, c in chosen.items()}, selection

    def build(self, ctx: LayerContext, rank: int, data=None) -> nn.Module:
        module = ctx.module
        k = self._k(ctx)
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
        self.last_info = {"groups": k, "group_rank": j}
        tensor = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
        if isinstance(module, nn.Linear):
            return LinearChain.from_factors([(tensor(first), None), (tensor(second), tensor(bias))],
                                            dtype=module.weight.dtype)
        kh, kw = module.kernel_size
        return ConvChain.from_factors(
            [ConvFactor(tensor(first).reshape(k * j, module.in_channels // k, kh, kw), None, tuple(module.stride),
                        tuple(module.padding), tuple(module.dilation), groups=k),
             ConvFactor(tensor(second).reshape(*second.shape, 1, 1), tensor(bias))],
            dtype=module.weight.dtype)
