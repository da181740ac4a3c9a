"""Rank selection: spectra in, ranks out. Pure numpy, no modules.

- :func:`rank_for_energy`: the smallest rank keeping a fraction of a spectrum's energy.
- :func:`energy_kept`: the fraction a given rank keeps.
- :func:`select_ranks_for_speedup`: per-layer ranks (or "keep original") for a whole-model speedup, by a
  greedy on real MACs (both factors counted) that handles the break-even trap of ALGORITHMS.md section 1.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

__all__ = [
    "rank_for_energy",
    "energy_kept",
    "check_energy",
    "BudgetLayer",
    "BudgetResult",
    "select_ranks_for_speedup",
    "select_uniform_energy",
    "round_rank",
]


def check_energy(energy: float, name: str = "energy") -> float:
    """Validate 0 < energy <= 1 and return it as float."""
    energy = float(energy)
    if not (0.0 < energy <= 1.0):
        raise ValueError(f"{name} must satisfy 0 < {name} <= 1, got {energy}; e.g. 0.95 keeps 95% of the energy")
    return energy


def rank_for_energy(eigenvalues: np.ndarray, energy: float) -> int:
    """Smallest d' with sum_{a <= d'} s_a / sum_a s_a >= energy (eigenvalues sorted descending).

    ``energy == 1`` returns the full length d (the layer is then reproduced exactly, whatever rounding
    says about trailing zero eigenvalues). An all-zero spectrum gives rank 1.

    Parameters
    ----------
    eigenvalues : (d,) non-negative, descending
    energy : 0 < energy <= 1
    """
    energy = check_energy(energy)
    values = np.clip(np.asarray(eigenvalues, dtype=np.float64), 0.0, None)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"eigenvalues must be a non-empty 1-D array, got shape {values.shape}")
    if energy >= 1.0:
        return int(values.size)
    total = values.sum()
    if total <= 0.0:
        return 1
    cumulative = np.cumsum(values) / total
    return int(min(values.size, np.searchsorted(cumulative, energy - 1e-12) + 1))


def energy_kept(eigenvalues: np.ndarray, rank: int) -> float:
    """sum_{a <= rank} s_a / sum_a s_a (1.0 for an all-zero spectrum)."""
    values = np.clip(np.asarray(eigenvalues, dtype=np.float64), 0.0, None)
    total = values.sum()
    return 1.0 if total <= 0.0 else float(values[: int(rank)].sum() / total)


# ----------------------------------------------------------------------------------------------------------
# Rank selection for a whole-model speedup
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class BudgetLayer:
    """One candidate layer for :func:`select_ranks_for_speedup`.

    name : unique name (the key of :attr:`BudgetResult.ranks`)
    eigenvalues : (d,) descending, non-negative spectrum; d = len(eigenvalues) is the full rank
    macs_at : rank -> MACs of the FACTORIZED layer at that rank, both factors counted
        (e.g. ``positions * (r * c * k * k + d * r)``); must be strictly increasing in the rank over the
        ranks that are cheaper than the original
    original_macs : MACs of the unfactorized layer
    min_rank : floor on the rank when the layer is factorized (1 <= min_rank <= d)
    errors : optional (d + 1,) measured relative reconstruction error per rank, ``errors[r]`` at rank r
        (index 0 unused); required by ``score="error"``
    """

    name: str
    eigenvalues: np.ndarray
    macs_at: Callable[[int], int]
    original_macs: int
    min_rank: int = 1
    errors: np.ndarray | None = None

    @property
    def full_rank(self) -> int:
        return int(np.asarray(self.eigenvalues).size)


@dataclass(frozen=True, eq=False)
class BudgetResult:
    """Outcome of :func:`select_ranks_for_speedup`.

    ranks : name -> rank, or None where the layer is kept original
    achieved_speedup : original_macs / total_macs
    target_speedup : the requested S
    reachable : False when even every layer at its cheapest setting (min_rank, or original where min_rank
        is not below break-even) misses the budget; ``ranks`` is then that cheapest setting
    total_macs, original_macs : whole-model MACs after / before, ``fixed_macs`` included in both
    loss : the minimised objective, sum over layers of -log(kept energy) (``score="energy"``) or of
        errors[r]^2 (``score="error"``); 0 for layers kept original
    """

    ranks: dict[str, int | None]
    achieved_speedup: float
    target_speedup: float
    reachable: bool
    total_macs: int
    original_macs: int
    loss: float = 0.0
    score: str = "energy"


class _Plan:
    """Per-layer tables of the greedy: MACs, losses and the moves between settings (plain Python lists)."""

    __slots__ = ("name", "lo", "hi", "orig", "macs", "loss", "step_loss", "jump_rank", "jump_score")

    def __init__(self, layer: BudgetLayer, score: str):
        self.name = layer.name
        values = np.asarray(layer.eigenvalues, dtype=np.float64)
        if values.ndim != 1 or values.size == 0:
            raise ValueError(f"layer {layer.name!r}: eigenvalues must be a non-empty 1-D array, got {values.shape}")
        if not np.all(np.isfinite(values)):
            raise ValueError(f"layer {layer.name!r}: eigenvalues must be finite")
        values = np.clip(values, 0.0, None)
        d = values.size
        lo = int(layer.min_rank)
        if not (1 <= lo <= d):
            raise ValueError(f"layer {layer.name!r}: min_rank must satisfy 1 <= min_rank <= {d}, got {lo}")
        self.lo = lo
        self.orig = int(layer.original_macs)
        if self.orig < 0:
            raise ValueError(f"layer {layer.name!r}: original_macs must be >= 0, got {self.orig}")

        macs = [0] * (d + 1)
        hi = None
        for r in range(lo, d + 1):
            macs[r] = int(layer.macs_at(r))
            if macs[r] < self.orig:
                hi = r  # largest rank below break-even
        self.macs = macs
        self.hi = hi
        if hi is None:  # factorizing never saves MACs: the layer can only stay original
            self.loss = self.step_loss = []
            self.jump_rank, self.jump_score = None, math.inf
            return
        for r in range(lo + 1, hi + 1):
            if macs[r] <= macs[r - 1]:
                raise ValueError(
                    f"layer {layer.name!r}: macs_at must be strictly increasing in the rank below break-even, "
                    f"got macs_at({r - 1})={macs[r - 1]} >= macs_at({r})={macs[r]}"
                )

        # loss[r]: what the layer loses at rank r (0 when kept original); step_loss[r] = loss[r-1] - loss[r],
        # computed without cancellation for the energy score.
        if score == "energy":
            head = np.concatenate(([0.0], np.cumsum(values)))  # head[r] = sum_{a <= r} s_a
            tail = np.concatenate((np.cumsum(values[::-1])[::-1], [0.0]))  # tail[r] = sum_{a > r} s_a
            with np.errstate(divide="ignore", invalid="ignore"):
                loss = np.where(tail <= 0.0, 0.0, np.log1p(tail / head))  # -log(head / (head + tail))
                step = np.zeros(d + 1)
                step[1:] = np.where(values <= 0.0, 0.0, np.log1p(values / head[:-1]))  # log(head[r]/head[r-1])
        elif score == "error":
            if layer.errors is None:
                raise ValueError(f"layer {layer.name!r}: score='error' needs per-rank errors (errors=None)")
            errors = np.asarray(layer.errors, dtype=np.float64)
            if errors.shape != (d + 1,):
                raise ValueError(
                    f"layer {layer.name!r}: errors must have shape ({d + 1},) (index = rank), got {errors.shape}"
                )
            if not np.all(np.isfinite(errors[lo : hi + 1])):
                raise ValueError(f"layer {layer.name!r}: errors must be finite for ranks {lo}..{hi}")
            loss = np.square(errors)
            step = np.zeros(d + 1)
            step[1:] = loss[:-1] - loss[1:]
        else:
            raise ValueError(f"score must be 'energy' or 'error', got {score!r}")
        self.loss = loss.tolist()
        self.step_loss = step.tolist()

        # The first move of an untouched layer (trap 1): from "original" straight to a rank below break-even,
        # scored by the loss over the REAL MACs saved. Of the ranks lo..hi it lands on the one with the least
        # loss per MAC saved (the first vertex of the lower convex hull of the layer's loss-vs-MACs curve; for
        # a convex curve, i.e. the energy score, every later one-rank step then scores at least as much, so
        # the per-layer move sequence is convex and the greedy is the exact Lagrangian solution).
        ranks = np.arange(lo, hi + 1)
        saved = self.orig - np.asarray(macs[lo : hi + 1], dtype=np.float64)
        ratios = loss[lo : hi + 1] / saved
        best = int(np.argmin(ratios))  # first minimum = the deepest cut among ties
        self.jump_rank = int(ranks[best])
        self.jump_score = float(ratios[best])


def _meets(total: int, original: int, speedup: float) -> bool:
    return total <= 0 or original / total >= speedup


def select_ranks_for_speedup(
    layers: Sequence[BudgetLayer],
    speedup: float,
    *,
    fixed_macs: int = 0,
    score: str = "energy",
) -> BudgetResult:
    """Ranks for a whole-model speedup S on real MACs: keep each layer original or factorize it at a rank.

    Budget: ``fixed_macs + sum_l cost_l <= (fixed_macs + sum_l original_macs_l) / S`` where cost_l is
    ``original_macs`` for a layer kept original and ``macs_at(r)`` for one factorized at rank r.

    Objective: minimise ``sum_l loss_l``.

    - ``score="energy"`` (the paper's): loss = -log(sum_{a <= r} s_a / sum_a s_a), i.e. maximise the product
      of kept energies (ALGORITHMS.md section 1, "Rank selection for a whole-model speedup S").
    - ``score="error"``: loss = errors[r]^2, the squared MEASURED relative reconstruction error at rank r
      (e.g. after the asymmetric / nonlinear solve). This is the better allocation signal that trap (2) asks
      for: the energy product over-cuts early, high-resolution layers whose energy is spread thin but whose
      reconstruction error (and effect on accuracy) is large.

    A layer kept original loses nothing.

    Greedy (least loss per MAC saved first; a heap over the layers):

    1. Trap (1): counting both factors, a factorized layer costs more than the original until the rank
       drops below break-even. An untouched layer's first move therefore jumps from "original" straight to a
       rank below break-even: to the rank in [min_rank, r_be] (r_be = the largest rank below break-even) with
       the least loss per real MAC saved, which is r_be itself unless cutting a little deeper is cheaper per
       MAC. Its score is that ratio. A naive one-rank step would see a negative saving and starve the others.
    2. After that, each move drops one rank (score = loss increase / MACs saved by the step), down to
       ``min_rank``.
    3. Stop as soon as the budget holds. Then undo the overshoot of the last (possibly large) move: grow
       ranks back, largest loss decrease per MAC first (one rank up, or back to original), while the budget
       still holds.

    If even the cheapest setting (every layer at ``min_rank``, or original where ``min_rank`` is not below
    break-even) misses the budget, that setting is returned with ``reachable=False``. Layers that cannot go
    below break-even at or above ``min_rank`` stay original. ``speedup <= 1`` keeps everything original.

    Cost: O(sum_l d_l log L) for the greedy plus d_l calls of each ``macs_at``.
    """
    speedup = float(speedup)
    if not (math.isfinite(speedup) and speedup > 0.0):
        raise ValueError(f"speedup must be a positive finite number, got {speedup}")
    if score not in ("energy", "error"):
        raise ValueError(f"score must be 'energy' or 'error', got {score!r}")
    fixed_macs = int(fixed_macs)
    if fixed_macs < 0:
        raise ValueError(f"fixed_macs must be >= 0, got {fixed_macs}")
    names = [layer.name for layer in layers]
    if len(set(names)) != len(names):
        raise ValueError(f"layer names must be unique, got {names}")

    plans = [_Plan(layer, score) for layer in layers]
    original = fixed_macs + sum(p.orig for p in plans)
    state: list[int | None] = [None] * len(plans)  # None = original, else the rank
    total = original

    def result(reachable: bool) -> BudgetResult:
        loss = sum(0.0 if r is None else p.loss[r] for p, r in zip(plans, state))
        achieved = math.inf if total <= 0 else original / total
        return BudgetResult(
            ranks={p.name: r for p, r in zip(plans, state)},
            achieved_speedup=achieved,
            target_speedup=speedup,
            reachable=reachable,
            total_macs=int(total),
            original_macs=int(original),
            loss=float(loss),
            score=score,
        )

    if _meets(total, original, speedup):
        return result(True)

    cheapest = fixed_macs + sum(p.orig if p.hi is None else p.macs[p.lo] for p in plans)
    if not _meets(cheapest, original, speedup):
        state = [None if p.hi is None else p.lo for p in plans]
        total = cheapest
        return result(False)

    # --- shrink: one heap entry per layer (its next move) ---
    heap: list[tuple[float, int]] = [(p.jump_score, i) for i, p in enumerate(plans) if p.hi is not None]
    heapq.heapify(heap)
    while heap and not _meets(total, original, speedup):
        _, i = heapq.heappop(heap)
        p, r = plans[i], state[i]
        if r is None:
            new = p.jump_rank
            total -= p.orig - p.macs[new]
        else:
            new = r - 1
            total -= p.macs[r] - p.macs[new]
        state[i] = new
        if new > p.lo:
            heapq.heappush(heap, (p.step_loss[new] / (p.macs[new] - p.macs[new - 1]), i))

    # --- grow back while the budget holds: largest loss decrease per MAC first ---
    version = [0] * len(plans)
    grow: list[tuple[float, int, int, int]] = []  # (-gain/cost, layer, version, target rank or -1 = original)

    def push_growth(i: int) -> None:
        p, r = plans[i], state[i]
        if r is None:
            return
        moves = [(-1, p.loss[r], p.orig - p.macs[r])]
        if r < p.hi:
            moves.append((r + 1, p.step_loss[r + 1], p.macs[r + 1] - p.macs[r]))
        for target, gain, cost in moves:
            if gain > 0.0:
                heapq.heappush(grow, (-gain / cost, i, version[i], target))

    for i in range(len(plans)):
        push_growth(i)
    while grow:
        _, i, ver, target = heapq.heappop(grow)
        if ver != version[i]:
            continue
        p, r = plans[i], state[i]
        cost = (p.orig if target < 0 else p.macs[target]) - p.macs[r]
        if not _meets(total + cost, original, speedup):
            continue
        total += cost
        state[i] = None if target < 0 else target
        version[i] += 1
        push_growth(i)

    return result(True)


def select_uniform_energy(layers: Sequence[BudgetLayer], speedup: float, *, fixed_macs: int = 0,
                          tolerance: float = 1e-7) -> BudgetResult:
    """Ranks for a whole-model speedup S from one energy threshold E common to every layer.

    Each layer takes ``rank_for_energy(eigenvalues, E)`` (at least ``min_rank``), or stays original where
    that rank is not below break-even; E is the largest threshold (found by bisection) whose total MACs
    meet ``fixed_macs + sum cost <= original / S``. A plain per-layer energy threshold lost less accuracy
    than the energy-product greedy on a small Fashion-MNIST VGG (ALGORITHMS.md, rank selection, trap 2).
    """
    original = fixed_macs + sum(layer.original_macs for layer in layers)

    def plan(energy: float) -> tuple[dict[str, int | None], int]:
        ranks: dict[str, int | None] = {}
        total = fixed_macs
        for layer in layers:
            rank = max(layer.min_rank, rank_for_energy(layer.eigenvalues, energy)) if energy < 1 else layer.full_rank
            cost = layer.macs_at(rank)
            if cost < layer.original_macs:
                ranks[layer.name], total = rank, total + cost
            else:
                ranks[layer.name], total = None, total + layer.original_macs
        return ranks, total

    def result(ranks, total, reachable):
        loss = sum(-np.log(max(energy_kept(l.eigenvalues, ranks[l.name]), 1e-300)) for l in layers if ranks[l.name])
        return BudgetResult(ranks, original / total if total else float("inf"), float(speedup), reachable, total,
                            original, float(loss), "uniform")

    if speedup <= 1.0:
        return result({layer.name: None for layer in layers}, original, True)
    low_ranks, low_total = plan(1e-12)
    if not _meets(low_total, original, speedup):
        return result(low_ranks, low_total, False)
    low, high = 1e-12, 1.0  # plan(low) meets the budget, plan(high) does not
    while high - low > tolerance:
        middle = 0.5 * (low + high)
        if _meets(plan(middle)[1], original, speedup):
            low = middle
        else:
            high = middle
    ranks, total = plan(low)
    return result(ranks, total, True)


def round_rank(rank: int, multiple: int, full_rank: int) -> int:
    """``rank`` rounded to the nearest multiple of ``multiple`` (at least ``multiple``), at most ``full_rank``."""
    if multiple < 1:
        raise ValueError(f"rank_multiple must be >= 1, got {multiple}")
    if multiple == 1:
        return rank
    return int(min(full_rank, max(multiple, multiple * round(rank / multiple))))
