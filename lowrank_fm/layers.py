"""Factorized modules, built from factors they are given (they never compute a decomposition).

A factorized layer is a chain of plain ``nn.Conv2d`` (or ``nn.Linear``) modules applied in order, so that
every method (output-feature-map, spatial, Tucker, CP, SVD) shares one module type, one MAC counter and one
save/load path. :meth:`ConvChain.spec` describes the chain's shapes as plain JSON; :func:`chain_from_spec`
rebuilds an empty chain from it (weights then come from a state_dict).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ConvFactor", "ConvChain", "LinearChain", "chain_from_spec", "conv_like", "set_output_bias",
           "last_factor_refittable", "last_factor_inputs", "last_factor_matrix", "set_last_factor",
           "two_factor_chain", "grouped_two_factor_chain", "spatial_chain", "separable_two_factor_chain",
           "tucker2_chain", "tucker1_chain", "cp_chain", "explicit_padding"]


@dataclass(frozen=True)
class ConvFactor:
    """One conv of a chain: weight (out, in / groups, kh, kw), optional bias (out,), geometry as tuples."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1


def conv_like(factor: ConvFactor, dtype: torch.dtype | None = None) -> nn.Conv2d:
    """An ``nn.Conv2d`` holding ``factor``'s weights (cast to ``dtype``, default the weight's dtype)."""
    out_channels, in_per_group, kh, kw = factor.weight.shape
    conv = nn.Conv2d(
        in_per_group * factor.groups,
        out_channels,
        (kh, kw),
        stride=tuple(factor.stride),
        padding=tuple(factor.padding),
        dilation=tuple(factor.dilation),
        groups=factor.groups,
        bias=factor.bias is not None,
    )
    dtype = dtype or factor.weight.dtype
    conv = conv.to(dtype)
    with torch.no_grad():
        conv.weight.copy_(factor.weight.to(dtype))
        if factor.bias is not None:
            conv.bias.copy_(factor.bias.to(dtype))
    return conv


def _conv_spec(conv: nn.Conv2d) -> dict:
    return {
        "in_channels": conv.in_channels,
        "out_channels": conv.out_channels,
        "kernel_size": list(conv.kernel_size),
        "stride": list(conv.stride),
        "padding": list(conv.padding),
        "dilation": list(conv.dilation),
        "groups": conv.groups,
        "bias": conv.bias is not None,
    }


class ConvChain(nn.Sequential):
    """A conv layer replaced by a chain of convs: x -> conv_1 -> ... -> conv_m (no nonlinearity between).

    Input (N, C, H, W) -> output (N, D, H', W') with the same geometry as the layer it replaces.
    """

    kind = "conv"

    @classmethod
    def from_factors(cls, factors: Sequence[ConvFactor], dtype: torch.dtype | None = None) -> "ConvChain":
        return cls(*[conv_like(f, dtype) for f in factors])

    @property
    def rank(self) -> int:
        """Width of the narrowest intermediate (the chain's rank)."""
        return min(conv.out_channels for conv in list(self)[:-1]) if len(self) > 1 else self[0].out_channels

    def spec(self) -> dict:
        return {"type": "ConvChain", "convs": [_conv_spec(conv) for conv in self]}


class LinearChain(nn.Sequential):
    """A Linear layer replaced by a chain of Linear layers: (..., in) -> (..., r) -> ... -> (..., out)."""

    kind = "linear"

    @classmethod
    def from_factors(cls, factors: Sequence[tuple[torch.Tensor, torch.Tensor | None]], dtype=None) -> "LinearChain":
        """factors: (weight (out_i, in_i), bias (out_i,) or None) in application order."""
        modules = []
        for weight, bias in factors:
            dtype_i = dtype or weight.dtype
            linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None).to(dtype_i)
            with torch.no_grad():
                linear.weight.copy_(weight.to(dtype_i))
                if bias is not None:
                    linear.bias.copy_(bias.to(dtype_i))
            modules.append(linear)
        return cls(*modules)

    @property
    def rank(self) -> int:
        return min(linear.out_features for linear in list(self)[:-1]) if len(self) > 1 else self[0].out_features

    def spec(self) -> dict:
        return {
            "type": "LinearChain",
            "linears": [{"in_features": l.in_features, "out_features": l.out_features, "bias": l.bias is not None} for l in self],
        }


def set_output_bias(chain: nn.Sequential, bias: torch.Tensor) -> nn.Sequential:
    """Set the bias (out,) of the chain's last conv / Linear (adding one where it had none); returns ``chain``."""
    last = chain[-1]
    bias = bias.detach().to(last.weight.dtype)
    if last.bias is None:
        last.bias = nn.Parameter(bias.clone())
    else:
        with torch.no_grad():
            last.bias.copy_(bias)
    return chain


def last_factor_refittable(chain: nn.Module, layer: nn.Module) -> str | None:
    """None when the last factor of ``chain`` (the factorized ``layer``) can be refitted from the layer's input
    patches by :func:`last_factor_inputs`, else the reason it cannot.

    A chain qualifies when it has at least two factors, its last factor is ungrouped, and every conv after the
    first that pads its input sees no bias before it (a bias before a zero-padded conv makes the padded border
    differ from the patch's zeros).
    """
    if not isinstance(chain, (ConvChain, LinearChain)) or len(chain) < 2:
        return f"{type(chain).__name__} is not a chain of two or more factors"
    if isinstance(chain, LinearChain):
        return None
    if not isinstance(layer, nn.Conv2d) or isinstance(layer.padding, str) or layer.groups != 1:
        return "the layer is not an ungrouped Conv2d with numeric padding"
    if chain[-1].groups != 1:
        return f"the last factor is grouped (groups={chain[-1].groups})"
    biased = False
    for conv in chain:
        if biased and any(p != 0 for p in conv.padding):
            return "a factor pads its input after a factor with a bias"
        biased = biased or conv.bias is not None
    return None


def last_factor_inputs(chain: nn.Module, layer: nn.Module, patches: torch.Tensor) -> torch.Tensor:
    """The input patches z of the chain's last factor at the output positions whose input patches of ``layer``
    (the original layer the chain replaces) are ``patches``.

    Parameters
    ----------
    chain : ConvChain or LinearChain (see :func:`last_factor_refittable`)
    layer : the original nn.Conv2d (kernel kh x kw over c channels) or nn.Linear
    patches : (n, p) layer input patches, p = c kh kw (as :func:`lowrank_fm.patches.patches_at` gives them) or in

    Returns
    -------
    (n, q) in ``patches``' dtype, flattened like the last factor's weight: q = r kh' kw' for a last conv with
    kernel (kh', kw') over r channels (r for a 1x1 conv; K kw for ``spatial``'s (1 x kw) conv), r for a Linear.

    Notes
    -----
    A patch already holds the layer's stride, padding (as zeros) and dilation, so every factor but the last is
    applied to the (c, kh, kw) patch with stride 1, no padding and no dilation: what is left is exactly the
    (r, kh', kw') window the last factor reads at that position.
    """
    reason = last_factor_refittable(chain, layer)
    if reason is not None:
        raise ValueError(f"cannot refit the last factor: {reason}")
    x = patches
    if isinstance(chain, LinearChain):
        for linear in list(chain)[:-1]:
            x = F.linear(x, linear.weight.to(x.dtype), None if linear.bias is None else linear.bias.to(x.dtype))
        return x
    x = x.reshape(x.shape[0], layer.in_channels, *layer.kernel_size)
    for conv in list(chain)[:-1]:
        x = F.conv2d(x, conv.weight.to(x.dtype), None if conv.bias is None else conv.bias.to(x.dtype),
                     groups=conv.groups)
    last = chain[-1]
    if tuple(x.shape[1:]) != (last.in_channels, *last.kernel_size):
        raise ValueError(f"the factors before the last give windows of shape {tuple(x.shape[1:])}, not the last "
                         f"factor's input {(last.in_channels, *last.kernel_size)}")
    return x.reshape(x.shape[0], -1)


def last_factor_matrix(chain: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The last factor's weight unfolded along its output mode (d, q) and its bias (d,) or None, detached."""
    last = chain[-1]
    return last.weight.detach().reshape(last.weight.shape[0], -1), None if last.bias is None else last.bias.detach()


def set_last_factor(chain: nn.Module, weight: torch.Tensor, bias: torch.Tensor) -> nn.Module:
    """Set the chain's last factor to ``weight`` (d, q), unfolded like :func:`last_factor_matrix`, and ``bias``
    (d,) (added where it had none), in the chain's dtype; returns ``chain``."""
    last = chain[-1]
    with torch.no_grad():
        last.weight.copy_(weight.reshape(last.weight.shape).to(last.weight.dtype))
    return set_output_bias(chain, bias)


def chain_from_spec(spec: dict) -> nn.Module:
    """Rebuild an (uninitialised) chain from :meth:`ConvChain.spec` / :meth:`LinearChain.spec`."""
    if spec.get("type") == "ConvChain":
        return ConvChain(
            *[
                nn.Conv2d(
                    c["in_channels"],
                    c["out_channels"],
                    tuple(c["kernel_size"]),
                    stride=tuple(c["stride"]),
                    padding=tuple(c["padding"]),
                    dilation=tuple(c["dilation"]),
                    groups=c["groups"],
                    bias=c["bias"],
                )
                for c in spec["convs"]
            ]
        )
    if spec.get("type") == "LinearChain":
        return LinearChain(*[nn.Linear(l["in_features"], l["out_features"], bias=l["bias"]) for l in spec["linears"]])
    raise ValueError(f"unknown factorized layer spec type {spec.get('type')!r}: expected ConvChain or LinearChain")


# ----------------------------------------------------------------------------------------------------------
# The chain of each method, from its factors (the methods compute factors; only this file builds modules)
# ----------------------------------------------------------------------------------------------------------


def _tensor(array) -> torch.Tensor:
    return array if torch.is_tensor(array) else torch.from_numpy(np.ascontiguousarray(array))


def _bias(conv: nn.Module) -> torch.Tensor | None:
    return None if conv.bias is None else conv.bias.detach()


def _pointwise(matrix: torch.Tensor, bias: torch.Tensor | None = None) -> ConvFactor:
    return ConvFactor(matrix.reshape(*matrix.shape, 1, 1), bias)


def explicit_padding(conv: nn.Conv2d) -> tuple[int, int] | None:
    """The conv's padding as a pair, or None where a string padding is asymmetric (``"same"``, even kernel)."""
    if not isinstance(conv.padding, str):
        return tuple(conv.padding)
    if conv.padding == "valid":
        return (0, 0)
    totals = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
    return None if any(total % 2 for total in totals) else tuple(total // 2 for total in totals)


def _full_kernel(conv: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor | None = None) -> ConvFactor:
    """A kh x kw conv with ``conv``'s stride, padding and dilation."""
    return ConvFactor(weight, bias, tuple(conv.stride), explicit_padding(conv), tuple(conv.dilation))


def _vertical(conv: nn.Conv2d, weight: torch.Tensor, bias=None, groups: int = 1) -> ConvFactor:
    """(kh x 1) conv: ``conv``'s stride, padding and dilation along the height only."""
    (sh, _), (ph, _), (dh, _) = conv.stride, conv.padding, conv.dilation
    return ConvFactor(weight, bias, (sh, 1), (ph, 0), (dh, 1), groups=groups)


def _horizontal(conv: nn.Conv2d, weight: torch.Tensor, bias=None, groups: int = 1) -> ConvFactor:
    """(1 x kw) conv: ``conv``'s stride, padding and dilation along the width only."""
    (_, sw), (_, pw), (_, dw) = conv.stride, conv.padding, conv.dilation
    return ConvFactor(weight, bias, (1, sw), (0, pw), (1, dw), groups=groups)


def two_factor_chain(module: nn.Module, first_w, first_b, second_w, second_b) -> nn.Module:
    """The layer with r outputs (``module``'s kernel and geometry), then a 1x1 conv / Linear back to d.

    first_w : (r, p) unfolded like ``module.weight`` (p = c kh kw or in); first_b : (r,) or None
    second_w : (d, r); second_b : (d,) or None
    """
    first_w, second_w = _tensor(first_w), _tensor(second_w)
    first_b = None if first_b is None else _tensor(first_b)
    second_b = None if second_b is None else _tensor(second_b)
    if isinstance(module, nn.Linear):
        return LinearChain.from_factors([(first_w, first_b), (second_w, second_b)], dtype=module.weight.dtype)
    rank = first_w.shape[0]
    return ConvChain.from_factors(
        [ConvFactor(first_w.reshape(rank, *module.weight.shape[1:]), first_b, tuple(module.stride),
                    tuple(module.padding), tuple(module.dilation)),
         _pointwise(second_w, second_b)],
        dtype=module.weight.dtype,
    )


def grouped_two_factor_chain(module: nn.Module, first, second, bias, groups: int) -> nn.Module:
    """ALDS's layer: a grouped conv (``groups`` groups of r / groups filters, ``module``'s kernel and geometry,
    input channels split in equal consecutive groups) then a 1x1 conv (d, r) with ``bias``; a Linear
    ``module`` (groups 1) becomes two Linear layers.

    first : (r, p / groups) the filters of all groups stacked; second : (d, r); bias : (d,)
    """
    first, second, bias = _tensor(first), _tensor(second), _tensor(bias)
    if isinstance(module, nn.Linear):
        return LinearChain.from_factors([(first, None), (second, bias)], dtype=module.weight.dtype)
    kh, kw = module.kernel_size
    return ConvChain.from_factors(
        [ConvFactor(first.reshape(first.shape[0], module.in_channels // groups, kh, kw), None, tuple(module.stride),
                    tuple(module.padding), tuple(module.dilation), groups=groups),
         _pointwise(second, bias)],
        dtype=module.weight.dtype)


def spatial_chain(conv: nn.Conv2d, vertical: torch.Tensor, horizontal: torch.Tensor) -> ConvChain:
    """(kh x 1) conv with K filters ``vertical`` (K, C, kh, 1), then (1 x kw) conv ``horizontal`` (N, K, 1, kw)
    with ``conv``'s bias; the stride, padding and dilation split between the two."""
    return ConvChain.from_factors([_vertical(conv, vertical), _horizontal(conv, horizontal, _bias(conv))],
                                  dtype=conv.weight.dtype)


def separable_two_factor_chain(conv: nn.Conv2d, vertical, first_w, first_b, second_w, second_b) -> ConvChain:
    """fm-3d's layer: (kh x 1) conv ``vertical`` (K, C, kh, 1), then (1 x kw) conv with r filters ``first_w``
    (r, K kw), then 1x1 conv ``second_w`` (d, r) back to d."""
    kw = conv.kernel_size[1]
    rank, k = first_w.shape[0], vertical.shape[0]
    return ConvChain.from_factors(
        [_vertical(conv, _tensor(vertical)), _horizontal(conv, _tensor(first_w).reshape(rank, k, 1, kw), first_b),
         _pointwise(_tensor(second_w), second_b)],
        dtype=conv.weight.dtype)


def tucker2_chain(conv: nn.Conv2d, core, u_out, u_in) -> ConvChain:
    """1x1 conv S -> R3 (u_in^T), kh x kw conv R3 -> R4 (core, ``conv``'s geometry), 1x1 conv R4 -> T (u_out,
    ``conv``'s bias), in ``conv``'s dtype."""
    core, u_out, u_in = _tensor(core), _tensor(u_out), _tensor(u_in)
    return ConvChain.from_factors(
        [_pointwise(u_in.T), _full_kernel(conv, core), _pointwise(u_out, _bias(conv))], dtype=conv.weight.dtype)


def tucker1_chain(conv: nn.Conv2d, core, factor, mode: str = "output") -> ConvChain:
    """``"output"``: kh x kw conv S -> R4 (core) then 1x1 conv R4 -> T (U_out, the bias); ``"input"``: 1x1 conv
    S -> R3 (U_in^T) then kh x kw conv R3 -> T (core, the bias)."""
    if mode not in ("output", "input"):
        raise ValueError(f"mode must be one of ('output', 'input'), got {mode!r}")
    if mode == "output":
        factors = [_full_kernel(conv, core), _pointwise(factor, _bias(conv))]
    else:
        factors = [_pointwise(factor.T), _full_kernel(conv, core, _bias(conv))]
    return ConvChain.from_factors(factors, dtype=conv.weight.dtype)


def cp_chain(conv: nn.Conv2d, a_t, a_s, a_h, a_w) -> ConvChain:
    """CP's four convs from factors a_T (T, R), a_S (S, R), a_H (kh, R), a_W (kw, R): 1x1 S -> R, (kh x 1)
    depthwise, (1 x kw) depthwise (``conv``'s geometry split between them), 1x1 R -> T with ``conv``'s bias."""
    t, s, kh, kw = conv.weight.shape
    rank = a_t.shape[1]
    return ConvChain.from_factors(
        [_pointwise(_tensor(a_s.T).reshape(rank, s)),
         _vertical(conv, _tensor(a_h.T).reshape(rank, 1, kh, 1), groups=rank),
         _horizontal(conv, _tensor(a_w.T).reshape(rank, 1, 1, kw), groups=rank),
         _pointwise(_tensor(a_t).reshape(t, rank), _bias(conv))],
        dtype=conv.weight.dtype,
    )
