"""The one owner of rank decisions: which layers are factorized, at which rank, and why the others are kept.

:func:`plan_ranks` takes the layers' contexts and costs, the run's policy (an
:class:`~lowrank_fm.config.ApproxConfig`: overrides, energy, the ``speedup`` budget and its allocation
strategy, rounding, ``force``) and, where measured, the latency model, the output-error curves, a whole-plan
timer and the speed gate; it returns a :class:`Plan` with one :class:`LayerPlan` per layer and its reason.
Nothing else decides a rank: the budget engines of :mod:`lowrank_fm.ranks` and
:mod:`lowrank_fm.methods.grouped_svd` are pure math called from here, and measurements come in as callables.

Order of decisions for a target layer: an override (``layer_ranks``) -> VBMF (``ranks="vbmf"``) -> the
per-layer energy, or with ``speedup`` the budget strategy -> rounding to ``rank_multiple`` (never past
break-even) -> the latency re-plan (``budget="latency"``) -> break-even (a rank whose MACs are not below the
original's keeps the layer, unless ``force``) -> the speed gate (a layer not faster is kept, ``slower``; under a
MAC ``speedup`` the plan is made again with it at most half its rank, then without it).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
from torch import nn

from .methods.base import LayerContext, Method, unfolded_shape
from .methods.grouped_svd import Candidate, minmax_allocation
from .predicted_error import tail_error
from .ranks import BudgetLayer, energy_kept, rank_for_energy, round_rank, select_ranks_for_speedup, select_uniform_energy
from .surgery import name_filter

__all__ = ["ALLOCATIONS", "LayerPlan", "Plan", "check_policy", "keep_reasons", "plan_ranks", "highest_cheaper_rank"]

log = logging.getLogger(__name__)

#: The budget strategies of ``speedup``, by name; a method lists those it honours in ``Method.allocations``.
ALLOCATIONS = ("uniform", "energy", "error", "output", "alds-minmax", "auto")
_MACS_ONLY = ("alds-minmax",)  # strategies that cannot plan a latency budget


def default_allocation(method: type[Method] | Method) -> str:
    """The strategy used when ``allocation`` is None: ``"error"``, else the first the method lists (``alds``:
    ``"alds-minmax"``; ``auto``: ``"output"``)."""
    return "error" if "error" in method.allocations else method.allocations[0]


def check_policy(method: type[Method] | Method, allocation: str | None, budget: str, ranks: str,
                 speedup: float | None) -> None:
    """Refuse, with a message saying what to do, a policy the method cannot honour (before any work)."""
    if allocation is not None and allocation not in ALLOCATIONS:
        raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {allocation!r}")
    if allocation is not None and allocation not in method.allocations:
        raise ValueError(f"method {method.name!r} plans its budget with {list(method.allocations)} only; "
                         f"allocation {allocation!r} (--allocation) does not apply to it: leave it out")
    chosen = allocation or default_allocation(method)
    if budget == "latency" and chosen in _MACS_ONLY:
        raise ValueError(f"method {method.name!r} plans its {chosen!r} budget on MACs only; --budget latency does "
                         f"not apply to it: use --budget macs (the speed gate still times every layer)")
    if ranks == "vbmf" and not hasattr(method, "vbmf_rank"):
        raise ValueError(f"ranks='vbmf' (--ranks vbmf) applies to tucker2 and tucker1, not to {method.name}")
    if "auto" in method.allocations and speedup is None:
        raise ValueError(f"method {method.name!r} chooses each layer's decomposition under a --speedup budget: pass "
                         f"--speedup, or name a method (e.g. --method fm) to keep --energy")
    if ranks == "vbmf" and speedup is not None:
        raise ValueError("ranks='vbmf' (--ranks vbmf) chooses every rank from the layer's own spectrum and cannot "
                         "honour a --speedup target: pass one of them")


@dataclass
class LayerPlan:
    """The decision for one candidate layer.

    rank : the rank to build (None: kept); for a kept target layer, ``chosen`` says which rank was considered
    reason : why the layer is kept (None: it is factorized)
    energy : the share of the method's spectrum the rank keeps (None when the layer was not a target)
    macs_before, macs_after : MACs per image of the original layer and of the plan for it
    options : the method's per-layer choices besides the rank (ALDS: ``{"groups": k}``; auto: ``{"method": m}``)
    note : why this method and rank were chosen, where the strategy says (auto)
    """

    name: str
    rank: int | None
    reason: str | None
    macs_before: int
    macs_after: int
    full_rank: int | None = None
    chosen: int | None = None
    energy: float | None = None
    options: dict = field(default_factory=dict)
    note: str | None = None


@dataclass
class Plan:
    """Every layer's :class:`LayerPlan` (in the model's order), a summary of how the ranks were chosen, and
    the spectrum of every target layer (computed once, float64)."""

    layers: dict[str, LayerPlan]
    selection: dict
    spectra: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def ranks(self) -> dict[str, int]:
        """The layers to factorize and their ranks."""
        return {name: p.rank for name, p in self.layers.items() if p.rank is not None}


def keep_reasons(layers: Mapping[str, nn.Module], costs: Mapping, method: Method, config) -> dict[str, str | None]:
    """Why each layer is kept as it is (None: it is a target): not selected, the output layer, run several
    times per forward, the first layer, or not supported by the method. ``include`` names that match no
    layer are refused; ``exclude`` names that match none are warned about."""
    for option, names in (("include", config.include or ()), ("exclude", config.exclude or ())):
        unmatched = [p for p in names if not any(n == p or n.startswith(p + ".") for n in layers)]
        if unmatched:
            message = (f"{option} {unmatched} matches no Conv2d/Linear layer of the model; its layers are "
                       f"{list(layers)} (--{option} takes these names or a prefix of them, such as 'features')")
            if option == "include":
                raise ValueError(message)
            log.warning(message)
    targeted = name_filter(config.include, config.exclude)
    last_layer = list(costs)[-1] if costs else None  # hooks fire in execution order
    reasons: dict[str, str | None] = {}
    for name, module in layers.items():
        reason = None if targeted(name) else "not targeted"
        if reason is None and config.keep_last_layer and name == last_layer and name not in config.layer_ranks:
            reason = "output layer (its responses are the model's outputs)"
        if reason is None and costs[name].calls > 1:
            reason = f"runs {costs[name].calls} times per forward (shared weights)"
        if (reason is None and config.keep_first_layer and name not in config.layer_ranks
                and isinstance(module, nn.Conv2d) and module.in_channels <= 3):
            reason = f"first layer ({module.in_channels} input channels)"
        reasons[name] = reason or method.supports(module)
    return reasons


def is_cheaper(method: Method, ctx: LayerContext, rank: int, original_macs: int) -> bool:
    """Break-even: does the factorized layer at ``rank`` (both factors counted) cost fewer MACs than the
    original? (ALGORITHMS.md section 1, trap 1; the budget engines apply the same test to their cost curves.)"""
    return method.macs(ctx, rank) < original_macs


def highest_cheaper_rank(method: Method, ctx: LayerContext, original_macs: int) -> int:
    """The largest rank whose factorized layer costs fewer MACs than the original (at least 1)."""
    return max([1] + [r for r in range(1, method.full_rank(ctx) + 1) if is_cheaper(method, ctx, r, original_macs)])


def _rounded(method: Method, ctx: LayerContext, rank: int, multiple: int, original_macs: int) -> int:
    """``rank`` rounded to the nearest multiple of ``multiple``; when that is not below break-even, the
    largest multiple that is (the rank as chosen when there is none)."""
    rounded = round_rank(rank, multiple, method.full_rank(ctx))
    if rounded == rank or is_cheaper(method, ctx, rounded, original_macs):
        return rounded
    below = multiple * (highest_cheaper_rank(method, ctx, original_macs) // multiple)
    return below if below >= multiple and is_cheaper(method, ctx, below, original_macs) else rank


# ----------------------------------------------------------------------------------------------------------
# Budget strategies: (method, free contexts, MACs of every layer, config, fixed cost) -> (ranks, options, selection)
# ----------------------------------------------------------------------------------------------------------


class _Spectra:
    """Each layer's spectrum, computed once per plan (an SVD of a large layer takes seconds), and ``auto``'s
    candidate points, probed once per plan (a latency plan that misses is planned again on the same curves)."""

    def __init__(self, method: Method) -> None:
        self.method, self.values, self.points = method, {}, {}
        self.caps: dict[str, dict[str | None, int]] = {}  # layer -> {method (None: the run's): highest rank left}

    def __call__(self, ctx: LayerContext) -> np.ndarray:
        if ctx.name not in self.values:
            self.values[ctx.name] = np.asarray(self.method.spectrum(ctx), dtype=np.float64)
        return self.values[ctx.name]

    def candidate_points(self, ctx: LayerContext, original_macs: int) -> list:
        """The layer's candidate points, less those above their method's :meth:`rank_cap`."""
        if ctx.name not in self.points:
            self.points[ctx.name] = self.method.candidate_points(ctx, original_macs)
        caps = self.caps.get(ctx.name, {})
        return [p for p in self.points[ctx.name] if p.rank <= caps.get(p.method, p.rank)]

    def rank_cap(self, name: str, method: str | None = None) -> int | None:
        """The highest rank layer ``name`` may take (with candidate ``method``; None: the run's method) after
        the speed gate found a higher one slower (0: none); None where the gate set no cap."""
        return self.caps.get(name, {}).get(method)

    def cap_rank(self, name: str, method: str | None, rank: int) -> None:
        self.caps.setdefault(name, {})[method] = rank


def _greedy(method, free, macs, config, *, fixed, spectrum, latency=None, output_errors=None, progress=None,
            divergence=None):
    """``uniform``, ``energy``, ``error``, ``output``: the greedy of :mod:`lowrank_fm.ranks` over MACs or
    measured latency, scored by kept energy or by the relative error (responses, or the network's output)."""
    allocation = config.allocation or default_allocation(method)
    budget_layers = []
    for name, ctx in free.items():
        values = spectrum(ctx)
        errors = None
        if output_errors is not None:
            errors = output_errors[name]
        elif allocation in ("error", "output"):
            # relative error of the symmetric projection at rank r: discarded energy / E||y||^2
            errors = tail_error(values, ctx.stats.mean if ctx.stats is not None else np.zeros(1))
        if latency is None:  # a rank above the speed gate's cap costs more than the original: never chosen
            cap = spectrum.rank_cap(name)
            cost_at = (lambda r, ctx=ctx, cap=cap, name=name:
                       method.macs(ctx, r) if cap is None or r <= cap else macs[name] + r)
            original = macs[name]
        else:  # integer nanoseconds, + r so that the cost strictly grows with the rank
            curve = latency[0][name][None]
            cost_at, original = (lambda r, curve=curve: int(1e6 * curve.at(r)) + r), int(1e6 * curve.original_ms)
        budget_layers.append(BudgetLayer(name, values, cost_at, original, errors=errors))
    if allocation == "uniform":
        result = select_uniform_energy(budget_layers, config.speedup, fixed_macs=fixed)
    else:
        score = "energy" if allocation == "energy" else "error"
        result = select_ranks_for_speedup(budget_layers, config.speedup, fixed_macs=fixed, score=score)
    if not result.reachable:
        log.info("speedup %.2fx is not reachable: the cheapest setting gives %.2fx", config.speedup, result.achieved_speedup)
    selection = {"target_speedup": config.speedup, "planned_speedup": result.achieved_speedup,
                 "reachable": result.reachable, "allocation": allocation,
                 "budget": "macs" if latency is None else "latency"}
    return result.ranks, {}, selection


def _alds_minmax(method, free, macs, config, *, fixed, spectrum, latency=None, output_errors=None, progress=None,
                 divergence=None):
    """``alds-minmax``: (groups k, rank j) per layer minimising the largest relative error under the MAC
    budget (Liebenwein et al. 2021); every candidate below break-even, the original layer at error 0."""
    budget = (fixed + sum(macs[n] for n in free)) / float(config.speedup) - fixed
    layers = {}
    for name, ctx in free.items():
        options = [Candidate(macs[name], 0.0, None)]
        for k in method.group_choices(ctx):
            grouped = method.with_groups(ctx, k)
            errors = method.relative_errors(ctx, k)
            d, p = unfolded_shape(ctx.module)
            for j in range(1, min(d, p // k) + 1):
                if is_cheaper(method, grouped, k * j, macs[name]):
                    options.append(Candidate(method.macs(grouped, k * j), float(errors[j]), (k, j)))
        layers[name] = options
    chosen, level, reachable = minmax_allocation(layers, budget)
    groups = {name: c.choice[0] for name, c in chosen.items() if c.choice is not None}
    total = fixed + sum(c.macs for c in chosen.values())
    selection = {"target_speedup": config.speedup, "planned_speedup": (fixed + sum(macs[n] for n in free)) / total,
                 "reachable": reachable, "allocation": "alds-minmax", "max_rel_error": level, "groups": groups}
    ranks = {name: None if c.choice is None else c.choice[0] * c.choice[1] for name, c in chosen.items()}
    return ranks, {name: {"groups": k} for name, k in groups.items()}, selection


def pareto_envelope(points: list, original_cost: int, cost: Callable = lambda p: p.macs) -> list:
    """The points (anything with ``error``, and a ``cost``: by default their ``macs``) cheaper than
    ``original_cost`` that no other point beats on both: sorted by cost, each strictly less error than every
    cheaper one (the first listed wins a tie)."""
    envelope: list = []
    for point in sorted((p for p in points if cost(p) < original_cost), key=cost):
        if envelope and cost(point) == cost(envelope[-1]):
            continue
        if not envelope or point.error < envelope[-1].error:
            envelope.append(point)
    return envelope


def _auto(method, free, macs, config, *, fixed, spectrum, latency=None, output_errors=None, progress=None,
          divergence=None):
    """``auto``: one (method, rank) per layer. Each layer's candidates (:meth:`~lowrank_fm.methods.auto.Auto.
    candidate_points`, predicted error against MACs) are reduced to their Pareto envelope, which is a cost
    curve like a single method's ranks; the ``error`` greedy of :func:`~lowrank_fm.ranks.select_ranks_for_speedup`
    then minimises the sum of squared predicted errors under the MAC budget.

    With ``allocation="output"`` (``output_errors``: the network's output error e_out(r) when the layer's
    responses are projected on r principal directions, :mod:`lowrank_fm.sensitivity`) each layer's predicted
    errors are weighted by a power of its sensitivity s_l = median over the measured ranks of e_out(r) / e(r),
    e(r) the layer's own error there (:func:`~lowrank_fm.predicted_error.tail_error`): the sum minimised is
    sum_l s_l^(2 gamma) e_l^2. gamma = 1 counts the layers' errors as the network's output sees them, one
    layer at a time; gamma = 0 ignores the sensitivity; the default, 0.5, half trusts it. Their sum misses how
    the errors interact (deep residual networks gain from the weights, plain ones can lose), so with several
    exponents
    (``AutoSettings.sensitivity_exponents``) and ``divergence`` ({layer name: predicted error} ->
    :func:`~lowrank_fm.sensitivity.joint_output_divergence` on calibration images other than the sensitivity's),
    each exponent's plan is simulated whole and the one whose outputs move least is kept.

    With ``latency`` ({layer: {candidate method: LatencyCurve}}, milliseconds of the rest; ``budget="latency"``)
    a point's cost is its method's measured time at its rank instead of its MACs, and the budget is the
    model's measured time over the target: a candidate whose chain runs slowly for its MACs (cp's depthwise
    convs on a CPU) is chosen only where its error pays for its time."""
    from .sensitivity import rank_grid, sensitivity_highest  # (sensitivity imports the planner)

    start = time.perf_counter()
    progress = progress or (lambda items, desc: items)
    points, sensitivity = {}, {}
    for name in progress(list(free), "auto: candidate curves"):
        points[name] = spectrum.candidate_points(free[name], macs[name])
        if output_errors is not None and name in output_errors:  # measured where output_errors_for measured it
            measured = rank_grid(sensitivity_highest(method, free[name], macs[name]), method.sensitivity_points())
            sensitivity[name] = _sensitivity(output_errors[name], free[name], measured)
    curves_s = time.perf_counter() - start
    exponents = method.settings.sensitivity_exponents if sensitivity else (0.0,)
    if latency is None:
        costs = {name: (lambda p: p.macs) for name in points}
        originals = dict(macs)
    else:  # integer nanoseconds, + rank so that a method's cost strictly grows with its rank
        costs = {name: (lambda p, curves=latency[0][name]: int(1e6 * curves[p.method].at(p.rank)) + p.rank)
                 for name in points}
        originals = {name: int(1e6 * next(iter(latency[0][name].values())).original_ms) for name in points}
        points = {name: [p for p in layer_points if p.method in latency[0][name]] for name, layer_points in points.items()}
    plans = {gamma: _auto_plan(points, sensitivity, gamma, costs, originals, config, fixed) for gamma in exponents}
    simulated = {}
    if len(plans) > 1 and divergence is not None:
        for gamma, (_, chosen_points) in plans.items():
            simulated[gamma] = divergence({name: point.error for name, point in chosen_points.items()})
    exponent = min(simulated, key=simulated.get) if simulated and None not in simulated.values() else exponents[-1]
    result, chosen_points = plans[exponent]
    ranks = {name: None for name in free}
    options = {}
    for name, point in chosen_points.items():
        ranks[name], options[name] = point.rank, {"method": point.method}
    counts: dict[str, int] = {}
    for point in chosen_points.values():
        counts[point.method] = counts.get(point.method, 0) + 1
    weighting = {"sensitivity": sensitivity, "sensitivity_exponent": exponent} if sensitivity else {}
    if simulated:
        weighting["simulated_divergence"] = {str(g): d for g, d in simulated.items()}
    selection = {"target_speedup": config.speedup, "planned_speedup": result.achieved_speedup,
                 "reachable": result.reachable, "allocation": "auto",
                 "budget": "macs" if latency is None else "latency",
                 "auto": {"candidates": list(method.settings.candidates), "methods": counts, "curves_s": curves_s,
                          "choice_s": time.perf_counter() - start - curves_s, **weighting,
                          "notes": {name: _auto_note(point, points[name]) for name, point in chosen_points.items()}}}
    return ranks, options, selection


def _auto_plan(points: dict[str, list], sensitivity: dict[str, float], exponent: float, costs: dict[str, Callable],
               originals: dict[str, int], config, fixed: int) -> tuple:
    """The budget greedy over the layers' Pareto envelopes (cost ``costs[name](point)``: MACs, or measured
    nanoseconds; the original layer's ``originals[name]``) with each layer's errors scaled by s_l^exponent
    (layers without a measured sensitivity unscaled). Returns the greedy's result and the chosen point per
    layer that is approximated, with its own (unscaled) predicted error."""
    envelopes, budget_layers = {}, []
    for name, layer_points in points.items():
        weight = sensitivity.get(name, 1.0) ** exponent
        envelope = pareto_envelope([dataclasses.replace(p, error=p.error * weight) for p in layer_points],
                                   originals[name], costs[name])
        envelopes[name] = envelope
        if envelope:
            errors = np.array([1.0] + [p.error for p in envelope])
            budget_layers.append(BudgetLayer(name, np.ones(len(envelope)),
                                             lambda i, e=envelope, cost=costs[name]: cost(e[i - 1]),
                                             originals[name], errors=errors))
    result = select_ranks_for_speedup(budget_layers, config.speedup, fixed_macs=fixed, score="error")
    chosen = {}
    for name, index in result.ranks.items():
        if index is not None:
            point = envelopes[name][index - 1]
            chosen[name] = next(p for p in points[name] if (p.method, p.rank) == (point.method, point.rank))
    return result, chosen


def _sensitivity(output_curve: np.ndarray, ctx: LayerContext, measured: list[int]) -> float:
    """s_l = median over ranks of e_out(r) / e(r): how much of a layer's relative error reaches the output.

    e_out was measured at the ranks ``measured`` only (:func:`lowrank_fm.sensitivity.output_error_curves`, which
    holds e_out(highest) above the highest); between them the ratio e_out / e, smoother than e_out itself, is
    interpolated linearly in the rank (interpolating e_out would overstate it between sparse points, where e
    falls fastest)."""
    own = tail_error(ctx.stats.eigenvalues, ctx.stats.mean)[: len(output_curve)]
    ranks = [r for r in range(1, len(own)) if own[r] > 1e-9 and np.isfinite(output_curve[r])]
    if not ranks:
        return 1.0
    ratios = np.array([output_curve[r] / own[r] for r in ranks])
    known = [r for r in measured if r in set(ranks)]
    if known:
        below = np.array(ranks) <= max(known)
        ratios[below] = np.interp(np.array(ranks)[below], known, [output_curve[r] / own[r] for r in known])
    return float(np.median(ratios))


def _auto_note(point, points: list) -> str:
    """Why a layer got its (method, rank): its predicted error, and each other candidate method's at the
    most MACs it can have without costing more."""
    others = {}
    for other in sorted(points, key=lambda p: p.macs):
        if other.method != point.method and other.macs <= point.macs:
            others[other.method] = other
    alternatives = ", ".join(f"{m} {p.error:.3f}" for m, p in others.items())
    return (f"{point.method} rank {point.rank}: predicted error {point.error:.3f} at {point.macs:,} MACs; "
            + (f"at no more MACs: {alternatives}" if alternatives else "no other candidate fits these MACs"))


_STRATEGIES: dict[str, Callable] = {"uniform": _greedy, "energy": _greedy, "error": _greedy, "output": _greedy,
                                    "alds-minmax": _alds_minmax, "auto": _auto}


def _choose(method: Method, contexts: dict[str, LayerContext], macs: dict[str, int], config, spectrum: _Spectra,
            latency=None, output_errors=None, progress=None, divergence=None
            ) -> tuple[dict[str, int | None], dict[str, dict], dict]:
    """Rank per target layer (None: keep original), the per-layer options, and the selection summary."""
    overrides = {n: min(config.layer_ranks[n], method.full_rank(c)) for n, c in contexts.items() if n in config.layer_ranks}
    free = {n: c for n, c in contexts.items() if n not in overrides}
    options: dict[str, dict] = {}
    if config.ranks == "vbmf":
        chosen = {n: max(1, min(method.vbmf_rank(c), method.full_rank(c))) for n, c in free.items()}
        selection = {"ranks": "vbmf"}
    elif config.speedup is None:
        chosen = {n: min(rank_for_energy(spectrum(c), config.layer_energy.get(n, config.energy)),
                         method.full_rank(c)) for n, c in free.items()}
        selection = {}
    else:
        if latency is None:
            fixed = sum(m for n, m in macs.items() if n not in free) - sum(
                macs[n] - method.macs(contexts[n], r) for n, r in overrides.items())
        else:
            fixed = int(1e6 * latency[1])
        strategy = _STRATEGIES["auto" if "auto" in method.allocations else config.allocation or default_allocation(method)]
        chosen, options, selection = strategy(method, free, macs, config, fixed=fixed, spectrum=spectrum,
                                              latency=latency, output_errors=output_errors, progress=progress,
                                              divergence=divergence)
    chosen = {**chosen, **overrides}
    if config.rank_multiple > 1:
        chosen = {n: None if r is None else _rounded(method, _with_options(contexts[n], options.get(n)), r,
                                                      config.rank_multiple, macs[n])
                  for n, r in chosen.items()}
        selection["rank_multiple"] = config.rank_multiple
    return chosen, options, selection


def _with_options(ctx: LayerContext, options: dict | None) -> LayerContext:
    return dataclasses.replace(ctx, options={**ctx.options, **options}) if options else ctx


def _check_reachable(config, selection: dict, latency) -> None:
    if config.speedup is None or selection.get("reachable") is not False:
        return
    if latency is not None:
        log.warning("speedup %.2fx is not reachable by the latency model: the cheapest ranks give %.2fx (measured "
                    "estimates; the plan is checked on the whole model next)", config.speedup,
                    float(selection.get("planned_speedup") or 1.0))
        return
    most = math.floor(100 * float(selection.get("planned_speedup") or 1.0)) / 100
    raise ValueError(
        f"speedup {config.speedup:g}x is out of reach for this model: the cheapest ranks give {most:.2f}x "
        f"(every targeted layer at its lowest rank, the other layers unchanged); pass a smaller --speedup "
        f"(at most {most:.2f}, and expect a large accuracy drop near it)"
    )


def _replan_for_latency(method, contexts, macs, config, spectrum, latency, output_errors, chosen, options, selection,
                        measure_plan, *, rounds: int = 2, tolerance: float = 0.05, divergence=None):
    """Measure the latency plan on the whole model and re-plan when it misses.

    The per-layer curves are timed in isolation and do not add up exactly to the model's time, so a plan
    for S can measure above or below S. ``measure_plan(ranks by name, contexts)`` returns the measured
    speedup of a plan (the median of interleaved rounds against the original, with its spread); when it is
    off S by more than ``tolerance`` the plan is made again for S' <- S' * S / m. The plan measured closest
    to S is kept; every round is recorded in ``selection["latency_checks"]``.
    """
    target, planned = float(config.speedup), float(config.speedup)
    checks, best = [], None
    for _ in range(rounds + 1):
        cheaper = {n: r for n, r in chosen.items()
                   if r is not None and is_cheaper(method, _with_options(contexts[n], options.get(n)), r, macs[n])}
        spread = measure_plan(cheaper, {n: _with_options(contexts[n], options.get(n)) for n in cheaper})
        measured = spread["median"]
        checks.append({"planned_for": planned, "measured": measured, "min": spread["min"], "max": spread["max"],
                       "rounds": spread["rounds"]})
        if best is None or abs(measured / target - 1) < abs(best[0] / target - 1):
            best = (measured, chosen, options, selection)
        if abs(measured / target - 1) <= tolerance or len(checks) > rounds:
            break
        planned *= target / measured
        chosen, options, selection = _choose(method, contexts, macs, dataclasses.replace(config, speedup=max(planned, 1.0)),
                                             spectrum, latency, output_errors, divergence=divergence)
    measured, chosen, options, selection = best
    log.info("latency plan: %s", ", ".join(f"planned {c['planned_for']:.2f}x -> measured {c['measured']:.2f}x" for c in checks))
    return chosen, options, {**selection, "target_speedup": target, "measured_plan_speedup": measured,
                             "latency_checks": checks}


def plan_ranks(method: Method, layers: Mapping[str, nn.Module], contexts: dict[str, LayerContext], macs: dict[str, int],
               reasons: Mapping[str, str | None], config, *, latency=None, output_errors=None,
               measure_plan: Callable | None = None, gate: Callable | None = None, progress=lambda items, desc: items,
               divergence: Callable | None = None) -> Plan:
    """Every rank decision of a run.

    Parameters
    ----------
    method : the run's method
    layers : every candidate layer by name (model order); ``reasons`` says why a layer is kept (None: target)
    contexts : the target layers' contexts (statistics included)
    macs : MACs per image of every layer of the model
    config : the run's :class:`~lowrank_fm.config.ApproxConfig` (the policy)
    latency : (curves by layer, milliseconds of the rest of the model) for ``budget="latency"``
    output_errors : per layer, the relative output error per rank (``allocation="output"``)
    divergence : ``{layer: predicted relative error} -> float``, how far the outputs move with those errors at
        once (:func:`~lowrank_fm.sensitivity.joint_output_divergence`): ``auto`` keeps the sensitivity
        weighting whose plan moves them least
    measure_plan : ``(ranks, contexts) -> {"median", "min", "max", "rounds"}``, the measured speedup of a
        plan (``budget="latency"``)
    gate : ``(name, context, rank) -> bool``, True when the factorized layer is faster (the speed gate;
        under a MAC ``speedup`` the plan is made again with each slower layer at most half its rank, then
        without it, :func:`_gate_and_replan`);
        None: no gate
    """
    spectrum = _Spectra(method)
    chosen, options, selection = _choose(method, contexts, macs, config, spectrum, latency, output_errors, progress,
                                         divergence)
    _check_reachable(config, selection, latency)
    if latency is not None and measure_plan is not None:
        chosen, options, selection = _replan_for_latency(method, contexts, macs, config, spectrum, latency,
                                                         output_errors, chosen, options, selection, measure_plan,
                                                         divergence=divergence)
    plan = _layer_plans(method, layers, contexts, macs, reasons, config, spectrum, chosen, options, selection)
    if gate is not None:
        plan, selection = _gate_and_replan(method, layers, contexts, macs, reasons, config, spectrum, plan, selection,
                                           gate, output_errors=output_errors, latency=latency, progress=progress,
                                           divergence=divergence)
    return Plan(plan, selection, spectrum.values)


def _layer_plans(method: Method, layers: Mapping[str, nn.Module], contexts: dict[str, LayerContext],
                 macs: dict[str, int], reasons: Mapping[str, str | None], config, spectrum: _Spectra,
                 chosen: dict[str, int | None], options: dict[str, dict], selection: dict,
                 slower: frozenset = frozenset()) -> dict[str, LayerPlan]:
    """One :class:`LayerPlan` per layer from the chosen ranks: kept with its reason (not a target, ``slower``
    than the original, left original by the budget, or a rank past break-even), or factorized."""
    notes = selection.get("auto", {}).get("notes", {})
    plan: dict[str, LayerPlan] = {}
    for name in layers:
        if reasons[name] is not None:
            plan[name] = LayerPlan(name, None, reasons[name], macs[name], macs[name])
            continue
        if name in slower:
            plan[name] = LayerPlan(name, None, "slower", macs[name], macs[name])
            continue
        ctx = _with_options(contexts[name], options.get(name))
        full, rank = method.full_rank(ctx), chosen[name]
        if rank is None:
            plan[name] = LayerPlan(name, None, f"the {config.speedup}x budget keeps it original", macs[name],
                                   macs[name], full, full, 1.0)
            continue
        energy, new_macs = energy_kept(spectrum(ctx), rank), method.macs(ctx, rank)
        if not is_cheaper(method, ctx, rank, macs[name]) and not config.force:
            reason = f"rank {rank} of {full} would not reduce MACs ({new_macs:,} >= {macs[name]:,})"
            plan[name] = LayerPlan(name, None, reason, macs[name], macs[name], full, rank, energy)
            continue
        plan[name] = LayerPlan(name, rank, None, macs[name], new_macs, full, rank, energy, dict(ctx.options),
                               notes.get(name))
    return plan


#: How many times a ``speedup`` plan is made again after the speed gate found layers slower.
GATE_REPLANS = 3


def _gate_and_replan(method, layers, contexts, macs, reasons, config, spectrum, plan, selection, gate, *,
                     output_errors, latency, progress, divergence, replans: int = GATE_REPLANS) -> tuple:
    """The speed gate: each factorized layer is timed against the original (``gate(name, context, rank)``,
    True when faster; a layer found slower is timed once more and counts as slower only when both agree) and a
    slower one is kept original with reason ``slower``.

    Under a MAC ``speedup`` budget the plan is then made again so that what does run faster makes up the
    budget (``fixed + sum_l macs_l(r_l) <= total / S``): a layer found slower at rank r may take at most r // 2
    (a chain's time falls with its rank; the budget decides how the others share what it gives up), and when
    it is found slower again it is planned without (its MACs part of the fixed cost). With ``auto`` the cap and
    then the exclusion apply to the slower method on that layer, which can take another candidate or stay
    original as the budget decides. The new ranks are gated in turn, up to ``replans`` times; what is still
    slower after that is kept original. When the rest cannot reach S the last plan that could is kept, and
    the theoretical speedup falls short of S (a warning). A latency budget is not re-planned: its plan was
    timed whole and a slower layer costs what it measured."""
    verdicts: dict[tuple, bool] = {}

    def faster(name: str) -> bool:  # slower only when a second timing agrees (a near tie flips between runs)
        layer = plan[name]
        key = (name, layer.rank, tuple(sorted(layer.options.items())))
        if key not in verdicts:
            ctx = _with_options(contexts[name], layer.options)
            verdicts[key] = gate(name, ctx, layer.rank) or gate(name, ctx, layer.rank)
        return verdicts[key]

    per_candidate = "auto" in method.allocations
    excluded: set[str] = set()  # layers planned without
    still_slower: list[str] = []
    rounds = 0
    while True:
        new = sorted(n for n in progress([n for n, p in plan.items() if p.rank is not None], "speed gate")
                     if not faster(n))
        if not new:
            break
        still_slower = new
        replan = config.speedup is not None and latency is None and rounds < replans
        log.info("speed gate: %s not faster than the original%s", new, "; planned again" if replan else "")
        if not replan:
            break
        trial = set(excluded)
        for name in new:  # first at most half the slower rank (a chain's time falls with it), then without it
            candidate = plan[name].options.get("method") if per_candidate else None
            if name in config.layer_ranks or (candidate is None and per_candidate):
                trial.add(name)  # an override's rank is the user's: keep the layer original
            elif spectrum.rank_cap(name, candidate) is None and plan[name].rank >= 2:
                spectrum.cap_rank(name, candidate, plan[name].rank // 2)
            elif candidate is not None:
                spectrum.cap_rank(name, candidate, 0)
            else:
                trial.add(name)
        rest = {n: c for n, c in contexts.items() if n not in trial}
        chosen, options, replanned = _choose(method, rest, macs, config, spectrum, None, output_errors, progress,
                                             divergence)
        if replanned.get("reachable") is False:
            log.info("speed gate: without the slower layers %.2fx is out of reach (%.2fx); the plan stands",
                     config.speedup, float(replanned.get("planned_speedup") or 1.0))
            break
        excluded, still_slower, rounds = trial, [], rounds + 1
        if "auto" in replanned and "auto" in selection:  # the candidate curves were measured in the first plan
            for stage in ("curves_s", "choice_s"):
                replanned["auto"][stage] += selection["auto"][stage]
        selection = replanned
        plan = _layer_plans(method, layers, rest, macs, reasons, config, spectrum, chosen, options, selection,
                            frozenset(excluded))
    slower = excluded | set(still_slower)
    for name in slower:
        plan[name] = LayerPlan(name, None, "slower", macs[name], macs[name])
    total = sum(macs.values())
    achieved = total / max(1, total - sum(p.macs_before - p.macs_after for p in plan.values()))
    if slower and config.speedup is not None and (latency is not None or achieved < config.speedup * (1 - 1e-3)):
        log.warning("speed gate kept %d layer(s) original: the theoretical speedup falls short of %.2fx",
                    len(slower), config.speedup)
    selection["speed_gate"] = {"slower": sorted(slower), "replans": rounds}
    if spectrum.caps:  # {layer: {method (auto) or "*": highest rank left}}
        selection["speed_gate"]["rank_caps"] = {n: {m or "*": r for m, r in caps.items()}
                                                for n, caps in spectrum.caps.items()}
    return plan, selection
