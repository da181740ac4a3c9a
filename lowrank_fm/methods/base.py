"""What a decomposition method is to the pipeline: a spectrum for rank selection, a cost per rank, and a
factorized module for a rank. Methods are registered by name in :mod:`lowrank_fm.methods`."""

from __future__ import annotations

import functools

from collections.abc import Mapping
from dataclasses import dataclass, field, fields

import numpy as np
import torch
from torch import nn

from .shards import RowShards, shards_or_local, total

__all__ = ["ResponseStats", "InputStats", "LayerContext", "LayerData", "Method", "NoSettings", "settings_from",
           "original_macs_per_position", "unfold_weight", "unfolded_shape"]


@dataclass(frozen=True)
class ResponseStats:
    """Statistics of a layer's sampled output responses y (d channels), float64.

    mean : (d,)  ybar
    eigenvalues : (d,) descending eigenvalues of the centred covariance
    eigenvectors : (d, d) column a is the a-th principal direction
    n_samples : number of responses the statistics were computed from
    """

    mean: np.ndarray
    eigenvalues: np.ndarray
    eigenvectors: np.ndarray
    n_samples: int


@dataclass(frozen=True)
class InputStats:
    """Statistics of all of a layer's input patches x over the calibration images, float64.

    mean : (p,)  mu = E[x]
    covariance : (p, p)  Sigma = E[(x - mu)(x - mu)^T]
    n_samples : number of patches
    """

    mean: np.ndarray
    covariance: np.ndarray
    n_samples: int

    @functools.cached_property
    def regularised_covariance(self) -> np.ndarray:
        """Sigma as the Sigma-norm methods use it (:func:`~.sigma_math.regularised_sigma`: with a diagonal jitter
        when singular), computed once per layer: ``auto`` builds each candidate at several ranks (a p = 2304
        layer's Cholesky and L L^T cost about 0.1 s per build)."""
        from .sigma_math import regularised_sigma

        sigma = regularised_sigma(self.covariance)
        sigma.setflags(write=False)  # shared by every build of the layer: nobody may change it in place
        return sigma


@dataclass(frozen=True)
class LayerContext:
    """One target layer as a method sees it.

    name : qualified name in the model
    module : the layer after BatchNorm folding (``nn.Conv2d`` or ``nn.Linear``)
    positions : output positions per image (H' * W' for a conv)
    stats : response statistics from calibration, or None for weight-only methods
    in_shape, out_shape : per-image input and output shapes, e.g. (C, H, W) and (D, H', W')
    input_stats : input-patch mean and covariance, for methods with ``needs_input_covariance``, else None
    options : per-layer choices the rank planner made besides the rank (e.g. ALDS's ``{"groups": k}``)
    """

    name: str
    module: nn.Module
    positions: int
    stats: ResponseStats | None = None
    in_shape: tuple[int, ...] = ()
    out_shape: tuple[int, ...] = ()
    input_stats: InputStats | None = None
    options: Mapping[str, int] = field(default_factory=dict)

    def require_input_stats(self, method: str) -> InputStats:
        """The input statistics, or a ValueError saying that ``method`` needs them."""
        if self.input_stats is None:
            raise ValueError(f"{method} needs the input-patch covariance of layer {self.name!r}: build the context "
                             "with input_stats= (the pipeline gathers it when the method sets needs_input_covariance)")
        return self.input_stats

    @property
    def kind(self) -> str:
        return "conv" if isinstance(self.module, nn.Conv2d) else "linear"

    @property
    def out_channels(self) -> int:
        return self.module.out_channels if self.kind == "conv" else self.module.out_features


@dataclass(frozen=True)
class LayerData:
    """Samples for data-driven solvers, one row per sampled output position (targets float64; inputs in the
    network's precision, float32, whether replayed from the calibration store or drawn from whole feature maps).

    inputs : (n, p) the layer's input patches taken from the network approximated so far (xhat)
    targets : (n, d) the original network's responses y at the same positions
    heldout : (n,) bool, rows of held-out calibration images (for choosing between solutions)
    activation : "relu" or "identity", the nonlinearity that follows the layer in the model
    shards : None when these rows are all the layer's rows; else these are one process's share and
        :class:`~lowrank_fm.methods.shards.RowShards` adds partial sums over the processes (solvers that
        support it: ``Method.solves_shards``)
    offset : None, or (n, d) float64: for a layer before a residual sum s = y + v fitted with the shortcut
        compensation, vhat at the same rows (the approximated network's shortcut); ``activation`` then acts on
        the sum, f(targets + offset) against f(yhat + offset) (only the whole-model correction reads it)
    """

    inputs: torch.Tensor
    targets: torch.Tensor
    heldout: torch.Tensor
    activation: str = "identity"
    shards: RowShards | None = None
    offset: torch.Tensor | None = None

    def fit_and_validation(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Boolean row masks (fit, validation): the held-out rows validate; without any (on every shard), the
        fit rows do."""
        fit, val = ~self.heldout, self.heldout
        held = total(shards_or_local(self.shards), float(val.sum()))[0]
        return fit, (val if held > 0 else fit)


def original_macs_per_position(module: nn.Module) -> int:
    """MACs of the original layer per output position: d * (c / groups) * kh * kw, or out * in."""
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return module.out_channels * (module.in_channels // module.groups) * kh * kw
    return module.out_features * module.in_features


def unfolded_shape(module: nn.Module) -> tuple[int, int]:
    """The shape of :func:`unfold_weight` read from the weight's shape, without copying it: (d, c/groups*kh*kw)
    or (out, in). MAC and rank counts use this (a float64 copy of vgg16's classifier.0 is 800 MB)."""
    shape = module.weight.shape
    return int(shape[0]), int(np.prod(shape[1:]))


def unfold_weight(module: nn.Module) -> torch.Tensor:
    """The weight unfolded along its output mode, float64 on the CPU (where every decomposition runs, whatever
    the model's device): (d, c/groups * kh * kw) or (out, in)."""
    return module.weight.detach().double().cpu().reshape(module.weight.shape[0], -1)


@dataclass(frozen=True)
class NoSettings:
    """The settings of a method that has none."""


def settings_from(settings_class: type, values) -> object:
    """An instance of a method's settings dataclass from an instance, None (the defaults) or a mapping of
    field names to values; an unknown name raises ValueError listing the known ones."""
    if values is None:
        return settings_class()
    if isinstance(values, settings_class):
        return values
    if not isinstance(values, Mapping):
        raise TypeError(f"method settings must be a {settings_class.__name__} or a mapping, got {type(values).__name__}")
    known = [f.name for f in fields(settings_class)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"unknown method setting(s) {unknown}; this method takes {known or 'none'}")
    return settings_class(**dict(values))


class Method:
    """Base of every decomposition method: a stateless estimator.

    Subclasses set ``name``, ``needs_responses`` (and the other ``needs_*`` flags), optionally ``Settings``
    (a frozen dataclass of the method's own options, validated at construction) and implement
    :meth:`spectrum`, :meth:`full_rank`, :meth:`macs_per_position` (or :meth:`macs`) and :meth:`build`.
    ``supports(module)`` returns None when the method can factorize the module, else the reason it is kept.
    Nothing is remembered between calls: every answer depends on the settings, the seed and the arguments
    (the layer context carries the planner's per-layer choices in ``ctx.options``).
    """

    name: str = ""
    Settings: type = NoSettings
    needs_responses: bool = True
    needs_inputs: bool = False  # True: build() receives LayerData from the layer-wise pass
    needs_input_covariance: bool = False  # True: calibration also stores input-patch statistics (ctx.input_stats)
    # True: unless the method fits data itself (needs_inputs), the layer-wise pass refits the last factor of what
    # it builds to the original responses from the approximated inputs (lowrank_fm.correction; ApproxConfig.correction)
    output_correction: bool = True
    # True: build() fits LayerData whose rows are one process's share (data.shards), adding partial sums over the
    # processes; False: the layer-wise pass gathers every row to rank 0, which builds alone
    solves_shards: bool = False
    allocations: tuple[str, ...] = ("uniform", "energy", "error", "output")  # budget strategies it honours
    # calibration images on which allocation "output" measures the output errors when ApproxConfig.sensitivity_images
    # is None (auto takes only one ratio per layer from them: fewer)
    sensitivity_images: int = 128

    def __init__(self, settings=None, *, seed: int = 0) -> None:
        self.settings = settings_from(self.Settings, settings)
        self.seed = int(seed)

    def input_covariance_for(self, module: nn.Module) -> bool:
        """Whether calibration keeps ``module``'s input-patch statistics for this method (``ctx.input_stats``):
        ``needs_input_covariance``, or for ``auto`` only the layers it predicts errors on."""
        return self.needs_input_covariance

    def input_covariance_rows(self) -> float | None:
        """Input-patch rows per input dimension p that calibration keeps for those statistics (about that many
        times p patches per layer, from seeded positions of every image; :mod:`calibration.input_stats`), or None
        for every patch of every image: the methods that build their layers from Sigma keep every one; ``auto``,
        which mostly predicts errors with it, its ``input_rows`` setting."""
        return None

    def sensitivity_points(self) -> int:
        """Ranks per layer at which ``allocation="output"`` measures the network's output error
        (:func:`lowrank_fm.sensitivity.output_error_curves`, each a forward pass of the sensitivity images): 12 for
        the budget greedy, which spends along the whole curve; ``auto`` takes one ratio from it, its
        ``sensitivity_points`` setting."""
        return 12

    def divergence_images(self) -> int:
        """Calibration images (after the sensitivity images) on which the planner simulates whole plans
        (:func:`lowrank_fm.sensitivity.joint_output_divergence`) to choose between them: none for a single
        plan; ``auto`` with several ``sensitivity_exponents``, its ``divergence_images`` setting."""
        return 0

    def timing_variants(self, ctx: LayerContext) -> dict[str | None, LayerContext]:
        """The contexts whose latency curves ``budget="latency"`` measures for this layer, by the layer option
        they stand for: the layer itself (key None); for ``auto``, one per candidate method (key its name, the
        context's ``options["method"]``)."""
        return {None: ctx}

    def for_layer(self, ctx: LayerContext) -> "Method":
        """The method that builds ``ctx``'s layer: itself, or for a method that chooses per layer (``auto``) the
        one named in ``ctx.options``. The layer-wise pass asks it whether the layer fits data itself
        (``needs_inputs``) or gets the whole-model correction."""
        return self

    def supports(self, module: nn.Module) -> str | None:
        if isinstance(module, nn.Conv2d) and module.groups != 1:
            return f"grouped conv (groups={module.groups}) is not factorized by {self.name}"
        if isinstance(module, nn.Conv2d) and isinstance(module.padding, str):
            return f"padding={module.padding!r} is not supported by {self.name}; give the padding as numbers"
        if isinstance(module, nn.Conv2d) and module.padding_mode != "zeros":
            return f"padding_mode={module.padding_mode!r} is not supported by {self.name}"
        return None

    def spectrum(self, ctx: LayerContext) -> np.ndarray:
        """Descending non-negative values whose cumulative share is the 'energy' a rank keeps."""
        raise NotImplementedError

    def full_rank(self, ctx: LayerContext) -> int:
        """The rank at which the layer is reproduced exactly."""
        raise NotImplementedError

    def macs_per_position(self, ctx: LayerContext, rank: int) -> int:
        """MACs of the factorized layer per output position at ``rank``."""
        raise NotImplementedError

    def macs(self, ctx: LayerContext, rank: int) -> int:
        """MACs per image of the factorized layer at ``rank`` (both factors counted)."""
        return self.macs_per_position(ctx, rank) * ctx.positions

    def build(self, ctx: LayerContext, rank: int, data: LayerData | None = None, info: dict | None = None
              ) -> nn.Module:
        """The factorized module (same input and output shapes as ``ctx.module``). ``info``, when given, is
        filled with what the build did (solver, fit), for the layer's report record."""
        raise NotImplementedError

    def chains_at(self, ctx: LayerContext, ranks) -> dict[int, nn.Module]:
        """{rank: ``build(ctx, rank)``} without samples, for each of ``ranks`` (``auto`` predicts each
        candidate's error at a few ranks). A method whose ranks truncate one factorization overrides it to
        compute that factorization once."""
        return {int(r): self.build(ctx, int(r)) for r in ranks}

    def timing_module(self, ctx: LayerContext, rank: int) -> nn.Module:
        """A module with the layers, shapes and biases of ``build(ctx, rank)``, for timing only (the speed gate,
        the latency model, the whole-plan timer): a dense layer's time depends on its shapes, not on its values.
        By default the build itself (cheap without data); a method whose fit iterates (CP-ALS, the Sigma-norm
        ALS) returns its factors unfitted, so that a run does not fit each layer twice."""
        return self.build(ctx, rank)
