"""``auto``: the best decomposition for each layer under one budget.

Every target layer gets candidate decompositions (by default ``fm``, ``fm-3d``, ``tucker2-sigma``, ``spatial``,
for Linear layers ``svd-sigma``, and ``cp`` on kernels of at most 128 x 128 x 3 x 3 weights, below half the
layer's MACs: ``als_kernel_limit``, ``als_macs_fraction``), each with a predicted error-versus-MACs curve; the
planner's ``auto`` strategy (:mod:`lowrank_fm.planner`) picks one (method, rank) per layer for the whole-model
budget, and the layer-wise pass builds each layer with its method (``ctx.options["method"]``), plus the
whole-model correction of its last factor for the methods that do not fit data themselves.

Predicted error of a candidate (method m, rank r): its chain is built from the weights and the statistics
(no samples), then :func:`lowrank_fm.predicted_error.refit_error` gives the relative output error left after
the correction refits its last factor on the layer's input moments (the error as built when the chain's last
factor cannot be refitted). For ``fm`` the curve is exact at every rank and costs nothing: the tail of the
response spectrum. Other methods are built at ``grid_points`` ranks (geometric from 1 to the method's
break-even rank) and log e^2 is interpolated linearly in the rank between them. A layer whose input patches
are wider than ``probe_limit`` takes ``fm`` alone (the probes' p x p products would dominate the run).

Fixed cost: the input moments (mu, Sigma) are kept over about ``input_rows`` x p patches per layer, seeded
positions of every calibration image (:mod:`calibration.input_stats`), not over every patch (n L p^2
multiply-adds, most of the run: calibration of vgg-fmnist 28 -> 7 s, resnet56-cifar10 44 -> 4 s), and
``allocation="output"`` measures the output error at ``sensitivity_points`` ranks per layer on
``Auto.sensitivity_images`` images, as it takes one ratio per layer from them (resnet56-cifar10 101 -> 10 s,
resnet-fmnist 16 -> 1.6 s). Side by side on seven cells (issue 17, 2026-11-26) the layers' methods stayed but
for 4 of 114 near ties and the top-1 drops moved by -0.15 to +0.12 points.

With ``allocation="output"`` the planner weighs each layer's predicted errors by its output sensitivity to the
power gamma (``sensitivity_exponents``, by default 0.5: the one-layer-at-a-time sensitivities half trusted).
With several exponents it simulates each plan whole (:func:`lowrank_fm.sensitivity.joint_output_divergence` on
``divergence_images`` further calibration images: every layer's responses projected at once to its predicted
error, the outputs compared by softmax KL) and keeps the one whose outputs move least: one forward pass of
those images per plan and one of the original (``rank_selection.auto.choice_s``). Until commit 5c6d0be the
default compared 0 and 1 that way; 0.5 alone lost less on 6 of the 10 cells of issue 17, as much on one and more
on three (README, "auto").

Everything else (spectrum, full rank, MACs, build) is the chosen method's, so the planner, the speed gate and
the layer-wise pass treat an ``auto`` layer exactly like a layer of that method. Without a choice in
``ctx.options`` (an override of ``layer_ranks``), the first candidate that supports the layer is used (``fm``).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..predicted_error import LayerMoments, affine_error, refit_error, tail_error
from .base import LayerContext, LayerData, Method, unfold_weight

__all__ = ["Auto", "AutoSettings", "CandidatePoint", "chain_error"]

#: settings of the chains built only to predict errors (the layer itself is built with the method's defaults):
#: one Sigma-norm sweep from the Frobenius start gives the predicted error within about 0.01 of thirty; its
#: input-factor solve stopped at 10 CG steps (of 50) raised vgg-fmnist's predicted errors by at most 0.1% of
#: themselves at every probed rank, and its 256x256x3x3 layer's probes took 3.1 s instead of 5.5 (2026-11-27)
PROBE_SETTINGS = {"tucker2-sigma": {"als_iterations": 1, "cg_iterations": 10},
                  "cp": {"restarts": 1, "iterations": 30}, "cp-sigma": {"restarts": 1, "iterations": 30}}
#: the candidates fitted by CP-ALS, whose probes cost the most (their cost grows with the kernel and the rank)
ALS_CANDIDATES = ("cp", "cp-sigma")
#: the candidate that takes a Linear layer's response projection (the chain fm, fm-3d and svd-sigma share, with
#: one predicted error) where its input covariance is kept: svd-sigma's factors from the input-weighted SVD, the
#: last refitted in closed form by the correction, rather than fm's RMSProp refinement of both factors, which a
#: Linear layer's few rows (one per calibration image, about 540 against r (p + d) weights) overfit:
#: vgg-fmnist-narrow at 4x over five calibration draws lost 0.44 points on average against 0.54 with fm on its
#: classifier.1 (results/draws.jsonl, rows of 626fbbe and 8424f5c). Wider layers (no input covariance) keep fm,
#: the first candidate.
LINEAR_PROJECTION = "svd-sigma"
#: settings of the layers auto builds with a candidate, where they differ from the method's defaults: one CP-ALS
#: start (from the SVD), the whole-model correction refitting its last factor after it
BUILD_SETTINGS = {"cp": {"restarts": 1, "iterations": 150}, "cp-sigma": {"restarts": 1, "iterations": 150}}


@dataclass(frozen=True)
class AutoSettings:
    """candidates : the methods tried on every layer, in order of preference on a tie (the first is also the
    default for a layer without a choice); grid_points : ranks probed per method and layer; probe_limit : the
    widest input patch (c kh kw, or in_features) probed, wider layers take the first candidate alone;
    als_kernel_limit : ``cp`` / ``cp-sigma`` (CP-ALS, whose probes cost the most) are candidates only on kernels
    of at most this many weights (T S kh kw; 128 x 128 x 3 x 3 by default), and only at ranks of at most
    ``als_macs_fraction`` of the layer's MACs (probed with one ALS start of 30 sweeps); input_rows : the
    input-patch moments (mu, Sigma) of a layer are kept over about ``input_rows`` x p patches (p its patch width;
    :mod:`calibration.input_stats`: the same number of seeded output positions from every calibration image), None: every patch of every image (n L p^2 multiply-adds per layer, most of a run's
    calibration time); sensitivity_points : ranks per layer at which ``allocation="output"`` measures the output
    error for the layer's sensitivity (a median ratio, :func:`lowrank_fm.planner._auto`), each one forward pass
    of the sensitivity images (``ApproxConfig.sensitivity_images``, by default ``Auto.sensitivity_images``);
    sensitivity_exponents : the powers gamma of the sensitivity s_l that weigh a layer's predicted errors
    (s_l^gamma e_l) in the plans ``allocation="output"`` compares; with more than one, each plan is simulated
    whole on ``divergence_images`` further calibration images and the one whose outputs move least is kept
    (:func:`lowrank_fm.planner._auto`), with one (or without those images) the last is used."""

    candidates: tuple[str, ...] = ("fm", "fm-3d", "tucker2-sigma", "spatial", "svd-sigma", "cp")
    grid_points: int = 6
    probe_limit: int = 4608
    als_kernel_limit: int = 128 * 128 * 9
    als_macs_fraction: float = 0.5
    input_rows: float | None = 8.0
    sensitivity_points: int = 4
    sensitivity_exponents: tuple[float, ...] = (0.5,)
    divergence_images: int = 256

    def __post_init__(self) -> None:
        names = (self.candidates,) if isinstance(self.candidates, str) else tuple(self.candidates)
        object.__setattr__(self, "candidates", names)
        if not names or "auto" in names:
            raise ValueError(f"candidates must name one or more methods other than 'auto', got {names}")
        if self.grid_points < 2:
            raise ValueError(f"grid_points must be at least 2, got {self.grid_points}")
        if self.sensitivity_points < 2:
            raise ValueError(f"sensitivity_points must be at least 2, got {self.sensitivity_points}")
        try:
            exponents = tuple(float(g) for g in np.atleast_1d(self.sensitivity_exponents))
        except (TypeError, ValueError):
            exponents = ()
        if not exponents or not all(math.isfinite(g) and g >= 0 for g in exponents):
            raise ValueError(f"sensitivity_exponents must be one or more finite numbers >= 0 (e.g. 0,1), got "
                             f"{self.sensitivity_exponents!r}")
        object.__setattr__(self, "sensitivity_exponents", exponents)
        if isinstance(self.divergence_images, bool) or int(self.divergence_images) != self.divergence_images \
                or self.divergence_images < 0:
            raise ValueError(f"divergence_images must be a whole number >= 0, got {self.divergence_images!r}")
        if not 0 < self.als_macs_fraction <= 1 or self.als_kernel_limit < 0:
            raise ValueError(f"als_macs_fraction must be in (0, 1] and als_kernel_limit >= 0, got "
                             f"{self.als_macs_fraction!r}, {self.als_kernel_limit!r}")
        if self.input_rows is not None and (isinstance(self.input_rows, bool) or not self.input_rows > 0):
            raise ValueError(f"input_rows must be a positive number or None (every patch), got {self.input_rows!r}")


@dataclass(frozen=True)
class CandidatePoint:
    """One (method, rank) of a layer: its MACs per image and its predicted relative output error."""

    method: str
    rank: int
    macs: int
    error: float


class Auto(Method):
    """``auto``: per layer, the candidate method and rank the planner chose (see the module docstring)."""

    name = "auto"
    Settings = AutoSettings
    needs_responses = True
    needs_inputs = True  # the layer-wise pass runs; each layer is then built as its own method says
    needs_input_covariance = True
    # "output" (the default): the predicted errors weighted by each layer's output sensitivity; "auto": unweighted
    allocations = ("output", "auto")
    # the sensitivity is one median ratio per layer (planner._auto), steady on 32 images where the budget greedy
    # of the other methods spends along the whole output-error curve (128)
    sensitivity_images = 32

    def __init__(self, settings=None, *, seed: int = 0) -> None:
        super().__init__(settings, seed=seed)
        from . import get_method  # the registry imports this module

        self.delegates = {name: get_method(name, BUILD_SETTINGS.get(name), seed=seed)
                          for name in self.settings.candidates}
        self.probes = {name: get_method(name, PROBE_SETTINGS.get(name), seed=seed) for name in self.settings.candidates}

    def input_covariance_for(self, module: nn.Module) -> bool:
        """Only layers narrow enough to be probed (wider ones take the first candidate, fm, alone)."""
        return int(np.prod(module.weight.shape[1:])) <= self.settings.probe_limit

    def input_covariance_rows(self) -> float | None:
        return self.settings.input_rows

    def sensitivity_points(self) -> int:
        return self.settings.sensitivity_points

    def divergence_images(self) -> int:
        return int(self.settings.divergence_images) if len(self.settings.sensitivity_exponents) > 1 else 0

    def for_layer(self, ctx: LayerContext) -> Method:
        choice = ctx.options.get("method") or next(  # without a choice: the first candidate for this layer
            (name for name, method in self.delegates.items() if method.supports(ctx.module) is None),
            self.settings.candidates[0])
        if choice not in self.delegates:
            raise ValueError(f"layer {ctx.name!r}: method {choice!r} is not one of auto's candidates "
                             f"{list(self.delegates)}")
        return self.delegates[choice]

    def supports(self, module: nn.Module) -> str | None:
        reasons = [m.supports(module) for m in self.delegates.values()]
        return None if any(r is None for r in reasons) else reasons[0]

    def spectrum(self, ctx: LayerContext) -> np.ndarray:
        return self.for_layer(ctx).spectrum(ctx)

    def full_rank(self, ctx: LayerContext) -> int:
        return self.for_layer(ctx).full_rank(ctx)

    def macs(self, ctx: LayerContext, rank: int) -> int:
        return self.for_layer(ctx).macs(ctx, rank)

    def build(self, ctx: LayerContext, rank: int, data: LayerData | None = None, info: dict | None = None
              ) -> nn.Module:
        layer_method = self.for_layer(ctx)  # (the layer's record names it: the plan's options)
        return layer_method.build(ctx, rank, data if layer_method.needs_inputs else None, info)

    def timing_module(self, ctx: LayerContext, rank: int) -> nn.Module:
        return self.for_layer(ctx).timing_module(ctx, rank)

    def _applicable(self, ctx: LayerContext) -> list[str]:
        """The candidates that apply to ``ctx``'s layer, in order: those that support it, one per distinct chain
        (fm-3d on a 1x1 conv is fm), cp / cp-sigma only on kernels of at most ``als_kernel_limit`` weights; on a
        Linear layer with its input covariance, :data:`LINEAR_PROJECTION` first (so it, not fm, takes the
        response projection)."""
        names, structures = [], set()
        order = list(self.delegates)
        if isinstance(ctx.module, nn.Linear) and LINEAR_PROJECTION in order and self.input_covariance_for(ctx.module):
            order.insert(0, order.pop(order.index(LINEAR_PROJECTION)))  # it takes the chain it shares with fm
        for name in order:
            method = self.delegates[name]
            if method.supports(ctx.module) is not None:
                continue
            if name in ALS_CANDIDATES and ctx.module.weight.numel() > self.settings.als_kernel_limit:
                continue
            structure = _structure(method, ctx)
            if structure not in structures:
                structures.add(structure)
                names.append(name)
        return names

    def timing_variants(self, ctx: LayerContext) -> dict[str | None, LayerContext]:
        """One context per applicable candidate (``options["method"]`` set), the first alone for a layer too wide
        to probe (:meth:`candidate_points` gives it that one)."""
        names = self._applicable(ctx)
        names = names[:1] if not self.input_covariance_for(ctx.module) else names
        return {name: dataclasses.replace(ctx, options={**ctx.options, "method": name}) for name in names}

    def candidate_points(self, ctx: LayerContext, original_macs: int) -> list[CandidatePoint]:
        """Every (method, rank) below break-even with its MACs and predicted error, for the planner."""
        from ..planner import highest_cheaper_rank, is_cheaper

        points: list[CandidatePoint] = []
        wide = not self.input_covariance_for(ctx.module)
        moments = None
        for name in self._applicable(ctx):
            if wide and points:
                break
            method = self.delegates[name]
            top = highest_cheaper_rank(method, ctx, original_macs)
            if not is_cheaper(method, ctx, top, original_macs):
                continue
            if name in ALS_CANDIDATES:
                affordable = [r for r in range(1, top + 1)
                              if method.macs(ctx, r) <= self.settings.als_macs_fraction * original_macs]
                if not affordable:
                    continue
                top = affordable[-1]
            if _is_response_projection(method, ctx):
                tail = tail_error(ctx.stats.eigenvalues, ctx.stats.mean)
                errors = {r: float(tail[r]) for r in range(1, top + 1)}
            else:
                if moments is None:
                    stats = ctx.require_input_stats("auto's error prediction")
                    layer = ctx.module
                    moments = LayerMoments.of(unfold_weight(layer).numpy(), None if layer.bias is None else
                                              layer.bias.detach().double().numpy(), stats.mean, stats.covariance)
                errors = self._probed_curve(self.probes[name], ctx, top, moments)
            points += [CandidatePoint(name, r, method.macs(ctx, r), float(e)) for r, e in errors.items()]
        return points

    def _probed_curve(self, method: Method, ctx: LayerContext, top: int, moments: LayerMoments) -> dict[int, float]:
        """Predicted relative error at the ranks from 1 to ``top``: probed at ``grid_points`` ranks, geometric
        from 1 to ``top``, and log e^2 interpolated linearly in the rank between them."""
        from ..sensitivity import rank_grid

        grid = rank_grid(top, self.settings.grid_points)
        measured = {r: chain_error(chain, ctx.module, moments) for r, chain in method.chains_at(ctx, grid).items()}
        ranks = np.arange(grid[0], top + 1)
        logs = np.interp(ranks, grid, [math.log(max(measured[r], 1e-12) ** 2) for r in grid])
        return {int(r): float(math.exp(v / 2)) for r, v in zip(ranks, logs)}


def _is_response_projection(method: Method, ctx: LayerContext) -> bool:
    """Whether the method's rank-r chain, its last factor refitted on the input moments, leaves the response
    spectrum's tail: ``fm`` and its symmetric form, ``fm-3d`` on a layer with nothing to separate, and
    ``svd-sigma`` (its first factor spans the same optimal rank-r subspace; the one :meth:`Auto._applicable`
    puts first takes the layer: fm on a conv, :data:`LINEAR_PROJECTION` on a Linear layer)."""
    from .fm import FeatureMapLinear
    from .fm3d import FeatureMap3D
    from .svd_sigma import SVDSigma

    if not isinstance(method, (FeatureMapLinear, SVDSigma)) or ctx.stats is None:
        return False
    return not (isinstance(method, FeatureMap3D) and method._separable(ctx.module))


def _structure(method: Method, ctx: LayerContext) -> str:
    """What the method builds on this layer, to skip a candidate that would repeat another."""
    return "response projection" if _is_response_projection(method, ctx) else method.name


def chain_error(chain: nn.Module, layer: nn.Module, moments: LayerMoments) -> float:
    """The predicted relative error of ``chain`` (a factorization of ``layer``, whose moments are ``moments``):
    :func:`~lowrank_fm.predicted_error.refit_error` on the chain's earlier factors (A, probed by feeding the
    identity patches through them) or, when the last factor cannot be refitted,
    :func:`~lowrank_fm.predicted_error.affine_error` of the whole chain."""
    from ..layers import last_factor_inputs, last_factor_refittable

    with torch.no_grad():
        chain = copy.deepcopy(chain).cpu()  # the caller's chain stays where it is, in its dtype
        p = moments.W.shape[1]
        if last_factor_refittable(chain, layer) is None:
            # the identity patches through the earlier factors in float32 (last_factor_inputs takes the weights in
            # the patches' dtype; a float32 network's factors lose nothing: each entry the first factor gives is
            # one of its weights exactly; vgg-fmnist's predicted errors moved by 5e-8 of themselves), as float32
            # convolutions run 3-10 times faster on a CPU than float64 ones (a 256x256x3x3 layer's fm-3d probes
            # 3.1 -> 1.6 s)
            basis = torch.cat([torch.zeros(1, p), torch.eye(p)])
            z = last_factor_inputs(chain, layer, basis).double().numpy()
            return refit_error(moments, (z[1:] - z[0]).T)
        # a single-factor or otherwise non-refittable chain: its response to each patch direction, in float64
        flat = _valid(chain).double()
        basis = torch.cat([torch.zeros(1, p, dtype=torch.float64), torch.eye(p, dtype=torch.float64)])
        if isinstance(layer, nn.Conv2d):
            outputs = flat(basis.reshape(p + 1, layer.in_channels, *layer.kernel_size)).reshape(p + 1, -1)
        else:
            outputs = flat(basis)
        outputs = outputs.numpy()
    return affine_error(moments, (outputs[1:] - outputs[0]).T, outputs[0])


def _valid(chain: nn.Module) -> nn.Module:
    """A copy of the chain with stride 1, no padding and no dilation: applied to one (c, kh, kw) patch it gives
    the output at that patch's position (the patch already holds the layer's stride, padding and dilation); a
    chain of Linear layers is copied as it is."""
    flat = copy.deepcopy(chain)
    for conv in flat.modules():
        if isinstance(conv, nn.Conv2d):
            conv.stride, conv.padding, conv.dilation = (1, 1), (0, 0), (1, 1)
    return flat
