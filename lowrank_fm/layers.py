"""Factorized modules, built from factors they are given (they never compute a decomposition).

A factorized layer is a chain of plain ``nn.Conv2d`` (or ``nn.Linear``) modules applied in order, so that
every method (output-feature-map, spatial, Tucker, CP, SVD) shares one module type, one MAC counter and one
save/load path. :meth:`ConvChain.spec` describes the chain's shapes as plain JSON; :func:`chain_from_spec`
rebuilds an empty chain from it (weights then come from a state_dict).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["ConvFactor", "ConvChain", "LinearChain", "chain_from_spec", "conv_like", "set_output_bias"]


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
