"""``tucker2`` and ``tucker1``: Tucker decompositions of conv kernels (Kim et al., ICLR 2016), weight-only.

Tucker-2: K (T, S, kh, kw) ~ G x_1 U_out x_2 U_in with core G (R4, R3, kh, kw), U_out (T, R4) and
U_in (S, R3) orthonormal. The layer becomes a 1x1 conv S -> R3 (weights U_in^T), the kh x kw conv R3 -> R4
(weights G, the original stride, padding and dilation), and a 1x1 conv R4 -> T (weights U_out, the original
bias). The factors start from the HOSVD (leading left singular vectors of the mode-1 and mode-2 unfoldings)
and are refined by HOOI. Tucker-1 keeps one factor: ``"output"`` (the default: only the output channels are
reduced, for a layer with few input channels such as the first) is a kh x kw conv S -> R4 (weights
U_out^T K) then a 1x1 conv R4 -> T, which is the truncated SVD of the output unfolding (the ``svd``
method's layer, scaled differently); ``"input"`` is a 1x1 conv S -> R3 (weights U_in^T) then a kh x kw conv R3 -> T (weights
K x_2 U_in^T). ALGORITHMS.md section 3.

The pipeline picks one integer rank r per layer. ``tucker2`` couples the two ranks as
(R4, R3) = (r, round(r S / T)) clamped to [1, S], the same fraction of each mode, so that r = T is the
exact layer and the MACs grow strictly with r (which the budgeted rank search needs). Its spectrum is that
of the output unfolding, so "energy" speaks for R4 only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..layers import explicit_padding, tucker1_chain, tucker2_chain
from ..vbmf import vbmf_rank as _vbmf_rank
from .base import LayerContext, Method

__all__ = ["mode_unfold", "tucker2", "tucker1", "coupled_ranks", "Tucker2", "Tucker1"]

TUCKER1_MODES = ("output", "input")


def mode_unfold(weight: torch.Tensor, mode: int) -> torch.Tensor:
    """Mode-1 (``mode=0``, shape (T, S kh kw)) or mode-2 (``mode=1``, shape (S, T kh kw)) unfolding, float64."""
    if mode not in (0, 1):
        raise ValueError(f"mode must be 0 (output channels) or 1 (input channels), got {mode!r}")
    w = weight.detach().double()
    if mode == 1:
        w = w.transpose(0, 1)
    return w.reshape(w.shape[0], -1)


def _leading_left(matrix: torch.Tensor, rank: int) -> torch.Tensor:
    """(n, rank) orthonormal: the leading left singular vectors of ``matrix`` (n, p), 1 <= rank <= n.

    They are the leading eigenvectors of the Gram matrix A A^T (n, n): five times faster than an SVD of a
    512 x 1152 unfolding, and a full basis, so a rank above min(n, p) is completed by directions of singular
    value 0 and any rank up to n gives an orthonormal factor.
    """
    vectors = torch.linalg.eigh(matrix @ matrix.T)[1]  # ascending eigenvalues
    return vectors[:, -rank:].flip(1)


def _check_weight(weight: torch.Tensor) -> None:
    if weight.ndim != 4:
        raise ValueError(f"weight must have shape (out, in, kh, kw), got shape {tuple(weight.shape)}")


def _check_rank(name: str, rank: int, limit: int, what: str) -> int:
    if int(rank) != rank or not 1 <= rank <= limit:
        raise ValueError(f"{name} must be an integer in [1, {limit}] ({what}), got {rank!r}")
    return int(rank)


def tucker2(weight: torch.Tensor, rank_out: int, rank_in: int, *, iterations: int = 50, tol: float = 1e-4
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tucker-2 decomposition of a conv kernel by HOSVD refined by HOOI, float64.

    Parameters
    ----------
    weight : Tensor of shape (T, S, kh, kw)
    rank_out : R4, 1 <= R4 <= T
    rank_in : R3, 1 <= R3 <= S
    iterations : most HOOI sweeps (0: the HOSVD alone)
    tol : stop when a sweep raises the fit 1 - ||K - K~|| / ||K|| by less than ``tol`` (1e-4 is the default
        of the Tensor Toolbox's ``tucker_als``; later sweeps change the error by hundredths of a percent)

    Returns
    -------
    core : Tensor of shape (R4, R3, kh, kw)
    u_out : Tensor of shape (T, R4), orthonormal columns
    u_in : Tensor of shape (S, R3), orthonormal columns

    Notes
    -----
    K~ = core x_1 u_out x_2 u_in, i.e. K~[t, s] = sum_{a, b} u_out[t, a] core[a, b] u_in[s, b], and
    core = K x_1 u_out^T x_2 u_in^T. With orthonormal factors ||K - K~||^2 = ||K||^2 - ||core||^2.
    The HOSVD takes the leading left singular vectors of the mode-1 and mode-2 unfoldings. A HOOI sweep
    sets u_out to the leading R4 left singular vectors of the mode-1 unfolding of K x_2 u_in^T, then u_in to
    those of the mode-2 unfolding of K x_1 u_out^T; each step maximises ||core|| over one factor, so the
    error never rises (a sweep that raises it by rounding is not accepted).
    """
    _check_weight(weight)
    t, s = weight.shape[:2]
    rank_out = _check_rank("rank_out", rank_out, t, "the output channels T")
    rank_in = _check_rank("rank_in", rank_in, s, "the input channels S")
    if int(iterations) != iterations or iterations < 0:
        raise ValueError(f"iterations must be a non-negative integer, got {iterations!r}")
    w = weight.detach().double()
    u_out = _leading_left(mode_unfold(w, 0), rank_out)
    u_in = _leading_left(mode_unfold(w, 1), rank_in)

    def core_of(u_out, u_in):
        return torch.einsum("tshw,ta,sb->abhw", w, u_out, u_in)

    total = float(w.pow(2).sum())

    def fit_of(core):
        return 1.0 - np.sqrt(max(total - float(core.pow(2).sum()), 0.0) / total) if total > 0 else 1.0

    core = core_of(u_out, u_in)
    fit = fit_of(core)
    for _ in range(int(iterations)):
        projected_in = torch.einsum("tshw,sb->tbhw", w, u_in)  # K x_2 u_in^T, (T, R3, kh, kw)
        new_out = _leading_left(projected_in.reshape(t, -1), rank_out)
        projected_out = torch.einsum("tshw,ta->sahw", w, new_out)  # K x_1 u_out^T in mode-2 order
        new_in = _leading_left(projected_out.reshape(s, -1), rank_in)
        new_core = core_of(new_out, new_in)
        new_fit = fit_of(new_core)
        if new_fit < fit:
            break
        u_out, u_in, core, improvement, fit = new_out, new_in, new_core, new_fit - fit, new_fit
        if improvement < tol:
            break
    return core, u_out, u_in


def tucker1(weight: torch.Tensor, rank: int, *, mode: str = "output") -> tuple[torch.Tensor, torch.Tensor]:
    """Tucker-1 decomposition of a conv kernel along one channel mode (the optimum: a truncated SVD), float64.

    Parameters
    ----------
    weight : Tensor of shape (T, S, kh, kw)
    rank : R4 (``mode="output"``, 1 <= R4 <= T) or R3 (``mode="input"``, 1 <= R3 <= S)
    mode : ``"output"`` or ``"input"``, the channel mode that is factored

    Returns
    -------
    core : (R4, S, kh, kw) = K x_1 U_out^T, or (T, R3, kh, kw) = K x_2 U_in^T
    factor : U_out (T, R4) or U_in (S, R3), orthonormal columns, the leading left singular vectors of
        that mode's unfolding; K~ = core x_1 U_out or core x_2 U_in
    """
    _check_weight(weight)
    if mode not in TUCKER1_MODES:
        raise ValueError(f"mode must be one of {TUCKER1_MODES}, got {mode!r}")
    w = weight.detach().double()
    if mode == "output":
        factor = _leading_left(mode_unfold(w, 0), _check_rank("rank", rank, w.shape[0], "the output channels T"))
        return torch.einsum("tshw,ta->ashw", w, factor), factor
    factor = _leading_left(mode_unfold(w, 1), _check_rank("rank", rank, w.shape[1], "the input channels S"))
    return torch.einsum("tshw,sb->tbhw", w, factor), factor


def coupled_ranks(out_channels: int, in_channels: int, rank: int) -> tuple[int, int]:
    """(R4, R3) = (r, round(r S / T)) clamped to [1, S] (halves round up): the same fraction of each mode."""
    rank_in = (2 * rank * in_channels + out_channels) // (2 * out_channels)
    return rank, min(max(rank_in, 1), in_channels)


def _squared_singular_values(matrix: torch.Tensor, length: int) -> np.ndarray:
    """Descending s_a^2 of ``matrix``, padded with zeros to ``length`` (the full rank)."""
    values = torch.linalg.svdvals(matrix).pow(2).numpy()
    return np.concatenate([values, np.zeros(max(length - values.size, 0))])


def _spatial_sizes(ctx: LayerContext, method: str) -> tuple[int, int]:
    """H W of the input and H' W' of the output, from the context's per-image shapes."""
    if len(ctx.in_shape) != 3 or len(ctx.out_shape) != 3:
        raise ValueError(f"{method} counts MACs from ctx.in_shape (C, H, W) and ctx.out_shape (D, H', W'); "
                         f"got {ctx.in_shape} and {ctx.out_shape} for layer {ctx.name!r}: build the context "
                         "from lowrank_fm.cost.measure_costs")
    return ctx.in_shape[1] * ctx.in_shape[2], ctx.out_shape[1] * ctx.out_shape[2]


def _relative_error(weight: torch.Tensor, approximation: torch.Tensor) -> float:
    """||K - K~|| / ||K|| (0 for a zero kernel)."""
    weight = weight.detach().double()
    norm = float(weight.norm())
    return float((weight - approximation).norm()) / norm if norm > 0 else 0.0


def _tucker_support(module: nn.Module, name: str) -> str | None:
    if not isinstance(module, nn.Conv2d):
        return f"{name} applies to convs only (use svd for Linear layers)"
    if explicit_padding(module) is None:
        return f"padding={module.padding!r} with kernel {tuple(module.kernel_size)} pads asymmetrically"
    return None


class Tucker2(Method):
    """``tucker2``: 1x1, kh x kw core, 1x1 convs from HOSVD + HOOI; rank r means (R4, R3) = :func:`coupled_ranks`.

    1x1 convs are refused: there Tucker-2 is three 1x1 convs where ``svd`` or ``tucker1`` reaches the same
    rank with two and fewer MACs.
    """

    name = "tucker2"
    needs_responses = False
    iterations = 50  # most HOOI sweeps

    def supports(self, module: nn.Module) -> str | None:
        reason = _tucker_support(module, self.name)
        if reason is None and tuple(module.kernel_size) == (1, 1):
            reason = "a 1x1 conv is a matrix: tucker2 would be three 1x1 convs where svd or tucker1 needs two"
        return reason or super().supports(module)

    def ranks(self, ctx: LayerContext, rank: int) -> tuple[int, int]:
        """(R4, R3) for the pipeline's rank r."""
        conv = ctx.module
        return coupled_ranks(conv.out_channels, conv.in_channels, rank)

    def spectrum(self, ctx: LayerContext) -> np.ndarray:
        """s_a^2 of the output (mode-1) unfolding (T, S kh kw), zero-padded to length T."""
        return _squared_singular_values(mode_unfold(ctx.module.weight, 0), ctx.module.out_channels)

    def full_rank(self, ctx: LayerContext) -> int:
        return ctx.module.out_channels

    def macs(self, ctx: LayerContext, rank: int) -> int:
        """S R3 H W + R3 R4 kh kw H' W' + R4 T H' W' per image."""
        conv = ctx.module
        rank_out, rank_in = self.ranks(ctx, rank)
        in_positions, out_positions = _spatial_sizes(ctx, self.name)
        kh, kw = conv.kernel_size
        return (conv.in_channels * rank_in * in_positions + rank_in * rank_out * kh * kw * out_positions
                + rank_out * conv.out_channels * out_positions)

    def vbmf_rank(self, ctx: LayerContext) -> int:
        """R4 from empirical VBMF on the output unfolding (the pipeline's ``--ranks vbmf``), in [1, T]."""
        return max(1, min(_vbmf_rank(mode_unfold(ctx.module.weight, 0).numpy()), self.full_rank(ctx)))

    def vbmf_ranks(self, ctx: LayerContext) -> tuple[int, int]:
        """(R4, R3) from VBMF on the mode-1 and mode-2 unfoldings separately, as Kim et al. choose them."""
        conv = ctx.module
        rank_out = _vbmf_rank(mode_unfold(conv.weight, 0).numpy())
        rank_in = _vbmf_rank(mode_unfold(conv.weight, 1).numpy())
        return max(1, min(rank_out, conv.out_channels)), max(1, min(rank_in, conv.in_channels))

    def build(self, ctx: LayerContext, rank: int, data=None, info: dict | None = None) -> nn.Module:
        conv = ctx.module
        rank_out, rank_in = self.ranks(ctx, rank)
        core, u_out, u_in = tucker2(conv.weight, rank_out, rank_in, iterations=self.iterations)
        t, s, kh, kw = conv.weight.shape
        error = _relative_error(conv.weight, torch.einsum("abhw,ta,sb->tshw", core, u_out, u_in))
        done = {
            "compression": kh * kw * s * t / (s * rank_in + kh * kw * rank_in * rank_out + t * rank_out),
            "ranks": [rank_out, rank_in],
            "kernel_rel_error": error,
        }
        if info is not None:
            info.update(done)
        return tucker2_chain(conv, core, u_out, u_in)


@dataclass(frozen=True)
class Tucker1Settings:
    """``mode``: the channel mode ``tucker1`` factors, ``"output"`` (default) or ``"input"``."""

    mode: str = "output"

    def __post_init__(self) -> None:
        if self.mode not in TUCKER1_MODES:
            raise ValueError(f"mode must be one of {TUCKER1_MODES}, got {self.mode!r}")


class Tucker1(Method):
    """``tucker1``: one channel mode factored (``mode="output"`` by default, see the module notes).

    ``"output"``: kh x kw conv S -> r then 1x1 r -> T, full rank T, spectrum of the output unfolding.
    ``"input"``: 1x1 conv S -> r then kh x kw r -> T, full rank S, spectrum of the input unfolding.
    """

    name = "tucker1"
    needs_responses = False
    Settings = Tucker1Settings

    @property
    def mode(self) -> str:
        return self.settings.mode

    @property
    def _axis(self) -> int:
        return 0 if self.mode == "output" else 1

    def supports(self, module: nn.Module) -> str | None:
        return _tucker_support(module, self.name) or super().supports(module)

    def spectrum(self, ctx: LayerContext) -> np.ndarray:
        """s_a^2 of the factored mode's unfolding, zero-padded to :meth:`full_rank`."""
        return _squared_singular_values(mode_unfold(ctx.module.weight, self._axis), self.full_rank(ctx))

    def full_rank(self, ctx: LayerContext) -> int:
        return ctx.module.weight.shape[self._axis]

    def macs(self, ctx: LayerContext, rank: int) -> int:
        """``"output"``: S r kh kw H' W' + r T H' W'; ``"input"``: S r H W + r T kh kw H' W' (per image)."""
        conv = ctx.module
        in_positions, out_positions = _spatial_sizes(ctx, self.name)
        kh, kw = conv.kernel_size
        if self.mode == "output":
            return (conv.in_channels * kh * kw + conv.out_channels) * rank * out_positions
        return conv.in_channels * rank * in_positions + rank * conv.out_channels * kh * kw * out_positions

    def vbmf_rank(self, ctx: LayerContext) -> int:
        """The rank from empirical VBMF on the factored mode's unfolding, in [1, full rank]."""
        return max(1, min(_vbmf_rank(mode_unfold(ctx.module.weight, self._axis).numpy()), self.full_rank(ctx)))

    def build(self, ctx: LayerContext, rank: int, data=None, info: dict | None = None) -> nn.Module:
        conv = ctx.module
        core, factor = tucker1(conv.weight, rank, mode=self.mode)
        t, s, kh, kw = conv.weight.shape
        pattern = "ashw,ta->tshw" if self.mode == "output" else "tbhw,sb->tshw"
        error = _relative_error(conv.weight, torch.einsum(pattern, core, factor))
        params = kh * kw * s * rank + rank * t if self.mode == "output" else s * rank + kh * kw * rank * t
        done = {
            "compression": kh * kw * s * t / params,
            "ranks": [rank, s] if self.mode == "output" else [t, rank],
            "mode": self.mode,
            "kernel_rel_error": error,
        }
        if info is not None:
            info.update(done)
        return tucker1_chain(conv, core, factor, self.mode)
