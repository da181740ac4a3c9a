"""The settings of one approximation run: a frozen dataclass that checks itself and round-trips to a dict."""

from __future__ import annotations

import math

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field

from .ranks import check_energy

__all__ = ["ApproxConfig", "default_method"]

_COVARIANCE_BACKENDS = ("streaming", "ipca")
_BUDGETS = ("macs", "latency")


def default_method(speedup: float | None, budget: str = "macs", allocation: str | None = None, ranks: str = "energy",
                   method_settings: Mapping | None = None) -> str:
    """The method a run gets when it names none: ``"auto"`` (each layer's decomposition chosen under the budget)
    for a ``speedup`` MAC budget it can plan with these settings, else ``"fm"`` (an ``energy`` run, as the
    design card prescribes; ``budget="latency"``, ``ranks="vbmf"``, another ``allocation``, or settings of fm).
    ``auto`` plans a latency budget when named (``--method auto --budget latency``), but it times every candidate
    of every layer at a few ranks, so it is not the default there."""
    from .methods import method_class, settings_from
    from .planner import check_policy

    if speedup is None or budget == "latency":
        return "fm"
    auto = method_class("auto")
    try:
        settings_from(auto.Settings, method_settings)
        check_policy(auto, allocation, budget, ranks, speedup)
    except ValueError:
        return "fm"
    return "auto"


@dataclass(frozen=True)
class ApproxConfig:
    """Every setting of an approximation run.

    Parameters
    ----------
    method : registered method name (``lowrank_fm.methods.list_methods()``); None (the default): the run's
        :func:`default_method` (:attr:`method_name`), ``"auto"`` for a ``speedup`` budget on MACs and ``"fm"``
        otherwise, chosen again whenever the settings change.
    method_settings : the method's own settings by name (fields of its ``Settings`` dataclass, e.g.
        ``{"solver": "none"}`` for ``fm``, ``{"restarts": 5}`` for ``cp``); unknown names are refused.
    energy : per-layer energy kept, 0 < energy <= 1 (ignored when ``speedup`` is set).
    speedup : whole-model MAC reduction target S > 1 (ranks from a global budget over real MACs).
    ranks : ``"energy"`` (or the ``speedup`` budget) or ``"vbmf"`` (each layer's rank from empirical VBMF,
        for the methods that offer it: tucker2, tucker1).
    allocation : how ``speedup`` is shared out (None: the method's default, ``"error"``, or ``"alds-minmax"`` for
        the ALDS methods, which honour only that one): ``"uniform"`` (one energy threshold for all layers),
        ``"energy"`` (greedy on the product of kept energies, the paper's) or ``"error"`` (greedy on the
        squared relative reconstruction error of each layer's responses) or ``"output"`` (greedy on the
        squared relative error each layer's rank causes at the network's output, measured on
        ``sensitivity_images`` calibration images; see :mod:`lowrank_fm.sensitivity`).
    sensitivity_images : calibration images used to measure the output errors of ``allocation="output"``; None
        (the default): the method's own number (``Method.sensitivity_images``: 128; ``auto`` 32, which takes one
        ratio per layer from those errors).
    layer_ranks : rank overrides by qualified layer name (take precedence over energy).
    layer_energy : energy overrides by qualified layer name.
    include : qualified-name prefixes of the layers to approximate (None: every Conv2d and Linear).
    exclude : qualified-name prefixes never to approximate.
    keep_first_layer : keep convs with <= 3 input channels (the first layer of an image model).
    keep_last_layer : keep the last layer the forward runs (the output layer: its responses are the
        model's outputs, e.g. the logits; cutting its rank merges classes).
    fold_batchnorm : fold BatchNorm into the preceding conv before anything else.
    positions_per_image : sampled output positions per image and layer (None: every position).
    fit_positions : output positions per image drawn from whole feature maps for the data-driven solvers of
        the layer-wise pass (the original network runs alongside for the targets); None: replay the
        ``positions_per_image`` samples of the calibration store instead.
    heldout_fraction : share of the calibration images kept out of fitting to measure each layer's error.
    covariance : ``"streaming"`` (float64 running covariance) or ``"ipca"`` (scikit-learn IncrementalPCA).
    seed : seeds position sampling (and anything random in the methods).
    device : where calibration and solvers run.
    progress : show tqdm progress bars.
    output_matching : refine all factors jointly so the network's outputs match the original's on the
        calibration images (off by default: on vgg-fmnist it did not improve test accuracy, see README).
    matching_steps, matching_lr, matching_batch : Adam steps, learning rate and images per step of output
        matching.
    matching_shift, matching_flip : output matching compares the networks on random views of the calibration
        images (shifted by up to this many pixels, mirrored left-right), the reference computed on each view.
    force : factorize a layer even when its rank does not reduce its MACs (to check exactness; normally
        such a layer is kept with the reason).
    speed_gate : time every factorized layer against the original on its real input shape at
        ``speed_batch`` images, in the memory layout the whole model runs faster in, and keep the original
        (reason ``slower``) when it is not faster.
    speed_batch, speed_repeats : batch size and interleaved repetitions of those per-layer timings.
    budget : what ``speedup`` counts: ``"macs"`` (theoretical) or ``"latency"`` (measured per-layer latency
        on ``device`` at ``speed_batch``, the rest of the model measured with those layers stubbed out as a
        fixed cost; the plan is then timed whole and re-planned when it misses ``speedup`` by more than 5%).
    rank_multiple : round every chosen rank to a multiple of this (e.g. 8, friendlier to vectorised
        kernels); 1 leaves ranks as chosen.
    correction : the whole-model correction for methods that do not fit data themselves (every method but
        ``fm``, ``fm-3d``, which always do it, and the symmetric ``fm-linear``): in the layer-wise pass the last
        factor of each built layer (the output-side 1x1 conv / Linear with the bias, ``spatial``'s (1 x kw)
        conv) is refitted by least squares, then RMSProp through the activation that follows, to the original
        network's responses from the approximated network's inputs, each kept only when the held-out error
        drops (:mod:`lowrank_fm.correction`). Ranks and shapes are unchanged. False: the weights as the
        method computes them.
    shortcut_compensation : in the layer-wise pass with ``fit_positions`` (the original network alongside), a
        layer whose output y feeds a residual sum s = y + v is fitted to y + v - vhat (vhat: the other operand
        in the network approximated so far), so the sum the next layers see tracks the original one instead of
        carrying every earlier block's error along the shortcut (He, Zhang, Sun, ICCV 2017, multi-branch
        enhancement). Applies to the correction and to the methods that fit data themselves (fm, fm-3d); the
        correction's refinement and held-out choice then compare the sums through the activation after them,
        f(y + v) against f(yhat + vhat). With ``fit_positions=None`` (the store) there is no v and nothing changes.
    sharded_solvers : under torchrun, each rank fits the solvers (fm's regression and RMSProp, the correction)
        on its own rows of the layer-wise pass and the sums are added over the ranks, instead of rank 0 solving
        on every rank's rows. Faster with many processes; the layers then equal one process's only up to the
        summation order, which RMSProp's choice of its best step can amplify (False: rank 0 solves each layer
        on every rank's rows while the others wait).
    solver_threads : under torchrun, the threads rank 0 solves with while the other processes wait for its
        layer (not with ``sharded_solvers``). None: its own threads times the processes on its machine
        (``LOCAL_WORLD_SIZE``), at most its cores: the waiting processes' cores do the work. The layers then
        equal one process's up to the summation order of threaded sums; the one-process thread count gives
        bit-identical layers.
    """

    method: str | None = None
    method_settings: Mapping[str, object] = field(default_factory=dict)
    energy: float = 0.95
    speedup: float | None = None
    ranks: str = "energy"
    allocation: str | None = None
    sensitivity_images: int | None = None
    layer_ranks: Mapping[str, int] = field(default_factory=dict)
    layer_energy: Mapping[str, float] = field(default_factory=dict)
    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()
    keep_first_layer: bool = True
    keep_last_layer: bool = True
    fold_batchnorm: bool = True
    positions_per_image: int | None = 10
    fit_positions: int | None = 64
    heldout_fraction: float = 0.1
    covariance: str = "streaming"
    seed: int = 0
    device: str = "cpu"
    progress: bool = True
    output_matching: bool = False
    matching_steps: int = 300
    matching_lr: float = 1e-4
    matching_batch: int | None = 64
    matching_shift: int = 0
    matching_flip: bool = False
    force: bool = False
    speed_gate: bool = True
    speed_batch: int = 32
    speed_repeats: int = 5
    budget: str = "macs"
    rank_multiple: int = 1
    correction: bool = True
    shortcut_compensation: bool = True
    sharded_solvers: bool = False
    solver_threads: int | None = None

    def __post_init__(self) -> None:
        from .methods import method_class, settings_from
        from .planner import check_policy

        method = method_class(self.method_name)
        settings_from(method.Settings, self.method_settings)  # refuses unknown names and bad values
        object.__setattr__(self, "method_settings", dict(self.method_settings))
        check_energy(self.energy)
        if self.speedup is not None and not (float(self.speedup) >= 1.0 and math.isfinite(float(self.speedup))):
            raise ValueError(f"speedup must be a finite number >= 1 (a MAC reduction factor), got {self.speedup}")
        if self.ranks not in ("energy", "vbmf"):
            raise ValueError(f"ranks must be 'energy' or 'vbmf', got {self.ranks!r}")
        if self.sensitivity_images is not None and int(self.sensitivity_images) < 1:
            raise ValueError(f"sensitivity_images must be >= 1, got {self.sensitivity_images}")
        for name, value in dict(self.layer_energy).items():
            check_energy(value, f"layer_energy[{name!r}]")
        for name, value in dict(self.layer_ranks).items():
            if int(value) < 1:
                raise ValueError(f"layer_ranks[{name!r}] must be >= 1, got {value}")
        if self.positions_per_image is not None and int(self.positions_per_image) < 1:
            raise ValueError(f"positions_per_image must be >= 1 or None (all positions), got {self.positions_per_image}")
        if self.fit_positions is not None and int(self.fit_positions) < 1:
            raise ValueError(f"fit_positions must be >= 1 or None (replay the store's samples), got {self.fit_positions}")
        if self.solver_threads is not None and (isinstance(self.solver_threads, bool) or int(self.solver_threads) < 1):
            raise ValueError(f"solver_threads must be a positive number of threads or None, got {self.solver_threads!r}")
        if not (0.0 < self.heldout_fraction < 1.0):
            raise ValueError(f"heldout_fraction must be in (0, 1), got {self.heldout_fraction}")
        if self.covariance not in _COVARIANCE_BACKENDS:
            raise ValueError(f"covariance must be one of {_COVARIANCE_BACKENDS}, got {self.covariance!r}")
        if self.budget not in _BUDGETS:
            raise ValueError(f"budget must be one of {_BUDGETS}, got {self.budget!r}")
        if self.budget == "latency" and self.speedup is None:
            raise ValueError("budget='latency' (--budget latency) needs a speedup target (--speedup S)")
        for key in ("speed_batch", "speed_repeats", "rank_multiple"):
            if int(getattr(self, key)) < 1:
                raise ValueError(f"{key} must be an integer >= 1, got {getattr(self, key)}")
        check_policy(method, self.allocation, self.budget, self.ranks, self.speedup)
        object.__setattr__(self, "layer_ranks", {str(k): int(v) for k, v in dict(self.layer_ranks).items()})
        object.__setattr__(self, "layer_energy", {str(k): float(v) for k, v in dict(self.layer_energy).items()})
        if self.include is not None:
            object.__setattr__(self, "include", tuple(self.include))
        object.__setattr__(self, "exclude", tuple(self.exclude))

    @property
    def method_name(self) -> str:
        """The method the run uses: ``method``, or when None the :func:`default_method` of these settings."""
        return self.method or default_method(self.speedup, self.budget, self.allocation, self.ranks, self.method_settings)

    def to_dict(self) -> dict:
        """Plain JSON-ready dict of every setting."""
        data = dataclasses.asdict(self)
        data["method_settings"] = dict(self.method_settings)
        data["layer_ranks"] = dict(self.layer_ranks)
        data["layer_energy"] = dict(self.layer_energy)
        data["include"] = None if self.include is None else list(self.include)
        data["exclude"] = list(self.exclude)
        return data

    @classmethod
    def from_dict(cls, data: Mapping) -> "ApproxConfig":
        """Inverse of :meth:`to_dict`; unknown keys raise."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown ApproxConfig keys {sorted(unknown)}; known: {sorted(known)}")
        return cls(**dict(data))

    def replace(self, **changes) -> "ApproxConfig":
        """A copy with ``changes``: fields of the run, or settings of its method by name (merged into
        ``method_settings``); a name that is neither is refused."""
        from .methods import method_class

        fields = {f.name for f in dataclasses.fields(self)}
        own = {k: v for k, v in changes.items() if k in fields}
        rest = {k: v for k, v in changes.items() if k not in fields}
        if rest:
            merged = {**dict(own.get("method_settings", self.method_settings)), **rest}
            name = own.get("method", self.method) or default_method(
                *(own.get(k, getattr(self, k)) for k in ("speedup", "budget", "allocation", "ranks")), merged)
            method = method_class(name)
            known = {f.name for f in dataclasses.fields(method.Settings)}
            unknown = sorted(set(rest) - known)
            if unknown:
                raise ValueError(f"unknown setting(s) {unknown}: not a field of ApproxConfig nor a setting of method "
                                 f"{method.name!r} (its settings: {sorted(known) or 'none'})")
            own["method_settings"] = {**dict(own.get("method_settings", self.method_settings)), **rest}
        return dataclasses.replace(self, **own)
