"""How much each layer's rank costs at the network's OUTPUT: the allocation signal for ``--allocation output``.

For layer l and rank r, the layer's responses are replaced (by a forward hook, nothing else changes) by
their projection on the top-r principal directions of the calibration responses,

    y' = U_r U_r^T (y - ybar) + ybar,

and the network's outputs are compared with the unmodified ones on a few calibration images:

    e_l(r)^2 = sum ||g'(x) - g(x)||^2 / sum ||g(x)||^2.

The budget greedy of :func:`lowrank_fm.ranks.select_ranks_for_speedup` (``score="error"``) then minimises
sum_l e_l(r_l)^2 under the MAC budget: ranks go where the output needs them, which the per-layer energy or
reconstruction error cannot see (ALGORITHMS.md section 1, trap 2). Errors are measured on a geometric grid of
ranks and interpolated linearly in between.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .methods.base import ResponseStats
from .predicted_error import tail_error

__all__ = ["rank_grid", "project_responses", "output_error_curves", "output_errors_for", "sensitivity_highest",
           "rank_for_error", "joint_output_divergence"]

log = logging.getLogger(__name__)


def rank_grid(highest: int, points: int = 12) -> list[int]:
    """About ``points`` ranks from 1 to ``highest``, geometrically spaced, both ends included."""
    highest = max(1, int(highest))
    return sorted({int(round(r)) for r in np.geomspace(1, highest, num=max(2, points))} | {1, highest})


def project_responses(y: torch.Tensor, mean: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """U U^T (y - ybar) + ybar along the channel axis (dim 1) of y: (B, d, ...) ; mean (d,), basis (d, r)."""
    shape = (1, -1) + (1,) * (y.ndim - 2)
    centred = y - mean.view(shape)
    coefficients = torch.einsum("bd...,dr->br...", centred, basis)
    return torch.einsum("br...,dr->bd...", coefficients, basis) + mean.view(shape)


def _project_outputs(module: nn.Module, stats: ResponseStats, rank: int):
    """A forward hook on ``module`` replacing its output by :func:`project_responses` on the top ``rank``
    principal directions of ``stats``; returns the hook's handle (``.remove()`` undoes it)."""
    dtype = next(module.parameters()).dtype
    mean = torch.from_numpy(stats.mean).to(dtype)
    basis = torch.from_numpy(np.ascontiguousarray(stats.eigenvectors[:, :rank])).to(dtype)
    return module.register_forward_hook(
        lambda _m, _a, out: project_responses(out, mean.to(out.device), basis.to(out.device)))


@torch.no_grad()
def output_error_curves(model: nn.Module, modules: dict[str, nn.Module], stats: dict[str, ResponseStats],
                        highest: dict[str, int], batches: Sequence, *, points: int = 12,
                        progress: bool = False) -> dict[str, np.ndarray] | None:
    """Relative output error e_l(r) of projecting one layer's responses at a time, per rank.

    Parameters
    ----------
    model : the (folded) network, outputs g(x) a tensor per batch
    modules : layer name -> module of ``model`` whose output is projected
    stats : layer name -> response statistics (mean and eigenvectors)
    highest : layer name -> the largest rank worth measuring (e.g. the break-even rank)
    batches : model inputs (a few calibration images are enough)

    Returns
    -------
    name -> (d + 1,) array, entry r = e_l(r) (index 0 unused, ranks above ``highest`` hold e_l(highest));
    None when the model's outputs are not tensors.
    """
    references = [model(b) for b in batches]
    if not all(torch.is_tensor(r) for r in references):
        return None
    norm = sum(float(r.double().pow(2).sum()) for r in references)
    curves: dict[str, np.ndarray] = {}
    jobs = [(name, rank) for name in modules for rank in rank_grid(highest[name], points)]
    bar = tqdm(jobs, desc="output sensitivity", disable=not progress, leave=False)
    measured: dict[str, dict[int, float]] = {name: {} for name in modules}
    for name, rank in bar:
        handle = _project_outputs(modules[name], stats[name], rank)
        try:
            error = sum(float((model(b) - r).double().pow(2).sum()) for b, r in zip(batches, references))
        finally:
            handle.remove()
        measured[name][rank] = np.sqrt(error / max(norm, 1e-300))
    for name, points_at in measured.items():
        d = stats[name].eigenvalues.size
        ranks = np.array(sorted(points_at))
        values = np.array([points_at[r] for r in ranks])
        curve = np.interp(np.arange(d + 1), ranks, values)
        curve[0] = values[0]
        curves[name] = np.maximum.accumulate(curve[::-1])[::-1]  # never rising with the rank
    return curves


def sensitivity_highest(method, ctx, original_macs: int) -> int:
    """The highest rank at which a layer's output error is measured: the method's highest rank below break-even
    (:func:`lowrank_fm.planner.highest_cheaper_rank`; for ``auto`` its first candidate's), at most the response
    width d (projected on d directions the responses are unchanged). The planner's sensitivity reads the curve at
    the same ranks."""
    from .planner import highest_cheaper_rank

    return min(highest_cheaper_rank(method, ctx, original_macs), ctx.out_channels)


def output_errors_for(method, work, contexts: dict, macs: dict[str, int], batches: list, config) -> dict | None:
    """Per-layer output error curves for ``allocation="output"`` of the layers without a rank override (None
    when they cannot be measured: no response statistics, or outputs that are not tensors)."""
    from .surgery import get_module

    free = {n: c for n, c in contexts.items() if n not in config.layer_ranks}
    if not free or any(c.stats is None or c.stats.eigenvalues.size != c.out_channels for c in free.values()):
        return None
    highest = {n: sensitivity_highest(method, c, macs[n]) for n, c in free.items()}
    curves = output_error_curves(work, {n: get_module(work, n) for n in free}, {n: c.stats for n, c in free.items()},
                                 highest, batches, points=method.sensitivity_points(), progress=config.progress)
    if curves is None:
        log.warning("allocation 'output' needs tensor outputs; using 'error' instead")
    return curves


def rank_for_error(stats: ResponseStats, error: float) -> int:
    """The smallest rank r >= 1 whose response projection leaves a relative error of at most ``error``:
    min {r : e(r) <= error}, e(r) = :func:`~lowrank_fm.predicted_error.tail_error` (the full rank when none
    does)."""
    tail = tail_error(stats.eigenvalues, stats.mean)
    within = np.nonzero(tail[1:] <= error)[0]
    return int(within[0]) + 1 if within.size else len(tail) - 1


def output_divergence(approximated: torch.Tensor, reference: torch.Tensor) -> float:
    """Summed over the batch: KL(p || p') with p = softmax(g(x)), p' = softmax(g'(x)) over dim 1 for (B, K)
    outputs (class scores: what a changed prediction is made of); for outputs of another shape, the squared
    difference ||g'(x) - g(x)||^2 (the caller divides by sum ||g(x)||^2)."""
    if reference.ndim != 2:
        return float((approximated - reference).double().pow(2).sum())
    p_log = torch.log_softmax(reference.double(), dim=1)
    q_log = torch.log_softmax(approximated.double(), dim=1)
    return float((p_log.exp() * (p_log - q_log)).sum())


@torch.no_grad()
def joint_output_divergence(model: nn.Module, modules: dict[str, nn.Module], stats: dict[str, ResponseStats],
                            errors: dict[str, float], batches: Sequence) -> float | None:
    """How far the network's outputs move when every layer of ``errors`` carries an error of its size at once.

    Each named layer's responses are projected, all in the same forward pass (hooks, nothing else changes), on
    their top r_l principal directions, y' = U_r U_r^T (y - ybar) + ybar with r_l = :func:`rank_for_error`
    (stats_l, errors[l]): an error of the predicted size, in the directions the layer varies most. The result:
    for (B, K) outputs the mean over images of KL(softmax g(x) || softmax g'(x)); otherwise
    sum ||g'(x) - g(x)||^2 / sum ||g(x)||^2. Unlike the sum of the layers' own output errors, it sees how their
    errors interact. None when the outputs are not tensors.

    Parameters: model (outputs g(x)); modules, stats: layer name -> module of ``model`` and its response
    statistics; errors: layer name -> relative error of that layer's response; batches: model inputs.
    """
    references = [model(b) for b in batches]
    if not references or not all(torch.is_tensor(r) for r in references):
        return None
    handles = [_project_outputs(modules[name], stats[name], rank_for_error(stats[name], error))
               for name, error in errors.items()]
    try:
        total = sum(output_divergence(model(b), r) for b, r in zip(batches, references))
    finally:
        for handle in handles:
            handle.remove()
    if references[0].ndim == 2:
        return total / sum(r.shape[0] for r in references)
    return total / max(sum(float(r.double().pow(2).sum()) for r in references), 1e-300)
