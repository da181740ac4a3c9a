"""``approximate(model, data, ...) -> (new_model, report)``: orchestration of the pipeline, nothing else.

Stages: copy and fold BatchNorm -> choose target layers -> calibrate (responses to HDF5) -> statistics ->
rank per layer -> factorize and swap modules -> measure each layer's error on held-out calibration images
-> count parameters and MACs. The input model is never modified.
"""

from __future__ import annotations

import copy
import logging
import math
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .config import ApproxConfig
from .cost import batch_size_of, measure_costs, module_params
from .methods import LayerContext, ResponseStats, get_method
from .methods.base import InputStats, LayerData, Method
from .ranks import energy_kept, rank_for_energy
from .report import LayerRecord, Report
from .stats import StreamingCovariance, incremental_pca_basis, principal_components
from .surgery import find_layers, fold_batchnorm, get_module, name_filter, set_module
from .patches import patches_at
from .samples import layer_data_from_maps

__all__ = ["approximate", "default_to_input", "check_finite_weights"]

log = logging.getLogger(__name__)


def default_to_input(batch):
    """The model input of one loader item: ``images`` of an ``(images, labels)`` pair, else the item itself.

    A pair counts as labelled when its second element is a 1-D integer tensor with one entry per image.
    """
    if isinstance(batch, (list, tuple)) and len(batch) == 2 and torch.is_tensor(batch[0]) and torch.is_tensor(batch[1]):
        images, labels = batch
        if labels.ndim == 1 and not labels.is_floating_point() and images.ndim >= 2 and labels.shape[0] == images.shape[0]:
            return images
    return batch


def _to_device(batch, device):
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=True)  # asynchronous from pinned memory to a GPU
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(b, device) for b in batch)
    return batch


def _count_images(data, n_images: int | None) -> int:
    if n_images is not None:
        return int(n_images)
    dataset = getattr(data, "dataset", None)
    if dataset is not None and hasattr(dataset, "__len__"):
        return len(dataset)
    if hasattr(data, "__len__"):
        raise ValueError("approximate: pass n_images= (the number of calibration images in data)")
    raise ValueError("approximate: data has no length; pass n_images= (the number of calibration images)")


def _iter_inputs(data, to_input, start: int = 0, stop: int | None = None, device="cpu") -> Iterable:
    """Model inputs for images with ordinals in [start, stop), re-slicing batches that straddle the range.
    An image with NaN or infinite values is refused (ValueError naming its ordinal)."""
    from calibration import check_finite_images

    seen = 0
    for item in data:
        batch = to_input(item)
        size = batch_size_of(batch)
        lo, hi = max(start - seen, 0), size if stop is None else min(stop - seen, size)
        if hi > lo:
            part = batch if (lo, hi) == (0, size) else batch[lo:hi]
            check_finite_images(part, seen + lo)
            seen += size
            yield _to_device(part, device)
        else:
            seen += size
        if stop is not None and seen >= stop:
            return


def _check_reiterable(data) -> None:
    """Refuse a one-shot iterator (a generator): the pipeline reads ``data`` several times, and a second
    pass over a consumed iterator would silently see other images, or none."""
    try:
        reiterable = iter(data) is not data
    except TypeError:
        raise TypeError(f"data must be an iterable of batches (a DataLoader or a list), got {type(data).__name__}") from None
    if not reiterable:
        raise TypeError(
            f"data is a one-shot iterator ({type(data).__name__}): approximate reads the calibration batches several "
            f"times (calibration, layer-wise pass, held-out error), so a generator would lose batches; pass a list of "
            f"batches, a DataLoader (shuffle=False), or an object whose __iter__ starts again from the first image"
        )


def check_finite_weights(model: nn.Module, when: str = "") -> None:
    """Raise ValueError naming the first layer of ``model`` whose parameters or floating buffers hold NaN or
    infinite values (``when`` says at which stage, for the message)."""
    for kind, named in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, tensor in named:
            if not tensor.is_floating_point() or bool(torch.isfinite(tensor).all()):
                continue
            layer = name.rpartition(".")[0]
            bad = int((~torch.isfinite(tensor)).sum())
            nans = int(torch.isnan(tensor).sum())
            raise ValueError(
                f"layer {layer or '(root)'!r} has non-finite weights{' ' + when if when else ''}: {kind} {name} holds "
                f"{bad} of {tensor.numel()} values NaN or infinite ({nans} NaN); fix the checkpoint (--weights) "
                f"before approximating, nothing was computed from it"
            )


def _check_include(config: ApproxConfig, layers: dict[str, nn.Module]) -> None:
    """Refuse ``include`` names that match no Conv2d/Linear layer of the model (nothing would be approximated
    as asked); warn about such ``exclude`` names (nothing is lost, but a typo is likely)."""
    for option, names in (("include", config.include or ()), ("exclude", config.exclude or ())):
        unmatched = [p for p in names if not any(n == p or n.startswith(p + ".") for n in layers)]
        if not unmatched:
            continue
        message = (f"{option} {unmatched} matches no Conv2d/Linear layer of the model; its layers are "
                   f"{list(layers)} (--{option} takes these names or a prefix of them, such as 'features')")
        if option == "include":
            raise ValueError(message)
        log.warning(message)


def _response_stats(reader, name: str, n_fit: int, backend: str, shard: tuple[int, int] | None = None) -> ResponseStats:
    """Mean and principal components of the responses of images with ordinal < n_fit (float64).

    With ``shard=(start, stop)`` (a rank of a multi-process run), this rank reads only its images' rows and
    the ranks' streaming statistics are merged (:func:`~lowrank_fm.distributed.reduce_covariance`).
    """
    from .distributed import reduce_covariance

    ordinals = reader.image_ordinal(name)
    fit_rows = ordinals < n_fit
    if not fit_rows.any():
        raise ValueError(f"layer {name}: no calibration samples to fit on; pass more calibration images")

    def blocks(fit_rows=fit_rows):
        start = 0
        for block in reader.iter_responses(name):
            rows = fit_rows[start : start + len(block)]
            start += len(block)
            if rows.any():
                yield block[rows]

    if backend == "ipca":
        mean, values, vectors = incremental_pca_basis(blocks())
        return ResponseStats(mean, values, vectors, int(fit_rows.sum()))
    mine = fit_rows if shard is None else fit_rows & (ordinals >= shard[0]) & (ordinals < shard[1])
    estimator = reduce_covariance(StreamingCovariance.from_blocks(blocks(mine)))
    values, vectors = principal_components(estimator.covariance_)
    return ResponseStats(estimator.mean_, values, vectors, estimator.n_samples_seen_)


def _first_layer_reason(module: nn.Module) -> str | None:
    if isinstance(module, nn.Conv2d) and module.in_channels <= 3:
        return f"first layer ({module.in_channels} input channels)"
    return None


@torch.no_grad()
def _heldout_errors(reference: nn.Module, replacements: dict[str, nn.Module], inputs: Iterable) -> dict[str, float]:
    """||y - yhat||_F / ||y||_F per replaced layer, over every output position of the held-out inputs.

    y is the original layer's output inside the reference (original, folded) network; yhat is the
    replacement applied to the very same layer input.
    """
    sums = {name: [0.0, 0.0] for name in replacements}
    handles = []
    for name, replacement in replacements.items():
        def hook(_module, args, output, name=name, replacement=replacement):
            approx = replacement(args[0])
            sums[name][0] += float((output.double() - approx.double()).pow(2).sum())
            sums[name][1] += float(output.double().pow(2).sum())

        handles.append(get_module(reference, name).register_forward_hook(hook))
    try:
        for batch in inputs:
            reference(batch)
    finally:
        for handle in handles:
            handle.remove()
    return {name: (np.sqrt(err / ref) if ref > 0 else float(err > 0)) for name, (err, ref) in sums.items()}


def _keep_reasons(layers: dict[str, nn.Module], costs: dict, method: Method, config: ApproxConfig) -> dict[str, str | None]:
    """Why each layer is kept as it is (None: it is a target): not selected, the output layer, run several
    times per forward, the first layer, or not supported by the method."""
    targeted = name_filter(config.include, config.exclude)
    last_layer = list(costs)[-1] if costs else None  # hooks fire in execution order
    reasons: dict[str, str | None] = {}
    for name, module in layers.items():
        reason = None if targeted(name) else "not targeted"
        if reason is None and config.keep_last_layer and name == last_layer and name not in config.layer_ranks:
            reason = "output layer (its responses are the model's outputs)"
        if reason is None and costs[name].calls > 1:
            reason = f"runs {costs[name].calls} times per forward (shared weights)"
        if reason is None and config.keep_first_layer and name not in config.layer_ranks:
            reason = _first_layer_reason(module)
        reasons[name] = reason or method.supports(module)
    return reasons


def _layer_records(layers: dict[str, nn.Module], costs: dict, reasons: dict, contexts: dict[str, LayerContext],
                   chosen: dict[str, int | None], method: Method, config: ApproxConfig
                   ) -> tuple[dict[str, LayerRecord], dict[str, int]]:
    """One report record per layer and the ranks of the layers to factorize (a chosen rank that would not
    reduce the layer's MACs keeps it, unless ``config.force``)."""
    records: dict[str, LayerRecord] = {}
    ranks: dict[str, int] = {}
    for name, module in layers.items():
        cost = costs[name]
        shape = list(module.weight.shape)
        base = dict(name=name, kind="conv" if isinstance(module, nn.Conv2d) else "linear", shape=shape,
                    params_before=module_params(module), macs_before=cost.macs)
        kept = dict(params_after=base["params_before"], macs_after=cost.macs, rel_error=None, status="kept")
        if reasons[name] is not None:
            records[name] = LayerRecord(**base, rank=shape[0], energy=None, **kept, reason=reasons[name])
            continue
        ctx = contexts[name]
        full = method.full_rank(ctx)
        rank = chosen[name]
        if rank is None:
            records[name] = LayerRecord(**base, rank=full, energy=1.0, **kept,
                                        reason=f"the {config.speedup}x budget keeps it original")
            continue
        energy = energy_kept(method.spectrum(ctx), rank)
        new_macs = method.macs(ctx, rank)
        if new_macs >= cost.macs and not config.force:
            reason = f"rank {rank} of {full} would not reduce MACs ({new_macs:,} >= {cost.macs:,})"
            records[name] = LayerRecord(**base, rank=rank, energy=energy, **kept, reason=reason)
            continue
        ranks[name] = rank
        records[name] = LayerRecord(**base, rank=rank, energy=energy, params_after=base["params_before"],
                                    macs_after=new_macs, rel_error=None, status="approximated")
    return records, ranks


def _below_break_even(method: Method, ctx: LayerContext, original_macs: int) -> int:
    """The largest rank whose factorized layer costs fewer MACs than the original (at least 1)."""
    return max([1] + [r for r in range(1, method.full_rank(ctx) + 1) if method.macs(ctx, r) < original_macs])


def _output_errors(method: Method, work: nn.Module, contexts: dict[str, LayerContext], macs: dict[str, int],
                   batches: list, config: ApproxConfig) -> dict[str, np.ndarray] | None:
    """Per-layer output error curves for ``allocation="output"`` (None when they cannot be measured: no
    response statistics, or outputs that are not tensors); see :mod:`lowrank_fm.sensitivity`."""
    from .sensitivity import output_error_curves

    free = {n: c for n, c in contexts.items() if n not in config.layer_ranks}
    if not free or any(c.stats is None or c.stats.eigenvalues.size != method.full_rank(c) for c in free.values()):
        return None
    highest = {n: _below_break_even(method, c, macs[n]) for n, c in free.items()}
    curves = output_error_curves(work, {n: get_module(work, n) for n in free}, {n: c.stats for n, c in free.items()},
                                 highest, batches, progress=config.progress)
    if curves is None:
        log.warning("allocation 'output' needs tensor outputs; using 'error' instead")
    return curves


def _choose_ranks(method: Method, contexts: dict[str, LayerContext], macs: dict[str, int],
                  config: ApproxConfig, latency=None, output_errors: dict[str, np.ndarray] | None = None
                  ) -> tuple[dict[str, int | None], dict]:
    """Rank per target layer (None: keep original), rounded to ``config.rank_multiple``."""
    from .speedgate import round_rank

    chosen, selection = _choose_raw_ranks(method, contexts, macs, config, latency, output_errors)
    if config.rank_multiple > 1:
        chosen = {n: None if r is None else round_rank(r, config.rank_multiple, method.full_rank(contexts[n]))
                  for n, r in chosen.items()}
        selection["rank_multiple"] = config.rank_multiple
    return chosen, selection


def _choose_raw_ranks(method: Method, contexts: dict[str, LayerContext], macs: dict[str, int],
                      config: ApproxConfig, latency=None, output_errors: dict[str, np.ndarray] | None = None
                      ) -> tuple[dict[str, int | None], dict]:
    """Rank per target layer (None: keep original): overrides first, then the per-layer energy, or, with
    ``config.speedup``, the whole-model budget over real MACs (both factors counted), or over measured
    latency when ``latency`` = (curves by layer name, milliseconds of the rest of the model) is given.
    ``output_errors`` (allocation "output"): per layer, the relative output error per rank."""
    from .ranks import BudgetLayer, select_ranks_for_speedup, select_uniform_energy

    overrides = {n: min(config.layer_ranks[n], method.full_rank(c)) for n, c in contexts.items() if n in config.layer_ranks}
    free = {n: c for n, c in contexts.items() if n not in overrides}
    if config.speedup is not None and hasattr(method, "select_ranks"):  # a method's own budgeted allocation
        chosen, selection = method.select_ranks(free, macs, config)
        return {**chosen, **overrides}, selection
    if config.ranks == "vbmf":
        if not hasattr(method, "vbmf_rank"):
            raise ValueError(f"ranks='vbmf' (--ranks vbmf) applies to tucker2 and tucker1, not to {method.name}")
        chosen = {n: max(1, min(method.vbmf_rank(c), method.full_rank(c))) for n, c in free.items()}
        return {**chosen, **overrides}, {"ranks": "vbmf"}
    if config.speedup is None:
        chosen = {n: min(rank_for_energy(method.spectrum(c), config.layer_energy.get(n, config.energy)),
                         method.full_rank(c)) for n, c in free.items()}
        return {**chosen, **overrides}, {}
    budget_layers = []
    for name, ctx in free.items():
        spectrum = np.asarray(method.spectrum(ctx), dtype=np.float64)
        errors = None
        if output_errors is not None:
            errors = output_errors[name]
        elif config.allocation in ("error", "output"):
            # relative error of the symmetric projection at rank r: discarded energy / E||y||^2
            second_moment = spectrum.sum() + (float(np.sum(ctx.stats.mean ** 2)) if ctx.stats is not None else 0.0)
            tail = np.concatenate([np.cumsum(spectrum[::-1])[::-1], [0.0]])
            errors = np.sqrt(tail / max(second_moment, 1e-300))
        if latency is None:
            cost_at, original = (lambda r, ctx=ctx: method.macs(ctx, r)), macs[name]
        else:  # integer nanoseconds, + r so that the cost strictly grows with the rank
            curve = latency[0][name]
            cost_at, original = (lambda r, curve=curve: int(1e6 * curve.at(r)) + r), int(1e6 * curve.original_ms)
        budget_layers.append(BudgetLayer(name, spectrum, cost_at, original, errors=errors))
    if latency is None:
        fixed = sum(m for n, m in macs.items() if n not in free) - sum(
            macs[n] - method.macs(contexts[n], r) for n, r in overrides.items())
    else:
        fixed = int(1e6 * latency[1])
    if config.allocation == "uniform":
        result = select_uniform_energy(budget_layers, config.speedup, fixed_macs=fixed)
    else:
        score = "energy" if config.allocation == "energy" else "error"
        result = select_ranks_for_speedup(budget_layers, config.speedup, fixed_macs=fixed, score=score)
    if not result.reachable:
        log.info("speedup %.2fx is not reachable: the cheapest setting gives %.2fx", config.speedup, result.achieved_speedup)
    selection = {"target_speedup": config.speedup, "planned_speedup": result.achieved_speedup,
                 "reachable": result.reachable, "allocation": config.allocation,
                 "budget": "macs" if latency is None else "latency"}
    return {**result.ranks, **overrides}, selection


def _timing_layout(work: nn.Module, example, config: ApproxConfig) -> dict:
    """The memory layout the per-layer timings use: the one in which the whole model runs faster at
    ``config.speed_batch`` (image models; others: NCHW), so that the gate and the latency budget judge layers
    as the deployed model runs them. Returns {"layout": ..., and the whole model's ms per layout}."""
    from .latency import faster_layout, repeat_to_batch

    if not (config.speed_gate or config.budget == "latency") or not torch.is_tensor(example) or example.ndim != 4:
        return {"layout": "nchw"}
    layout, ms = faster_layout(work, repeat_to_batch(example, config.speed_batch), repeats=config.speed_repeats,
                               device=config.device)
    return {"layout": layout, **{f"model_{name}_ms": value for name, value in ms.items()}}


def _latency_model(method: Method, contexts: dict[str, LayerContext], costs: dict, work: nn.Module, example,
                   config: ApproxConfig, layout: dict) -> tuple[dict, float]:
    """Per-layer latency curves (ms against rank, measured at ``config.speed_batch`` in ``layout``) of the
    free target layers, and the milliseconds of the rest of the model (the model with those layers replaced
    by free stand-ins, same layout: isolated layer times do not add up to the whole model's, so the rest is
    measured rather than taken as a difference)."""
    from .latency import repeat_to_batch
    from .speedgate import fit_latency_curve, time_rest

    curves = {}
    free = [n for n in contexts if n not in config.layer_ranks]
    for name in _progress(free, config, "latency model"):
        ctx = contexts[name]
        top = _below_break_even(method, ctx, costs[name].macs)
        ranks = {max(1, top // 8), max(1, top // 4), max(1, top // 2), top}
        curves[name] = fit_latency_curve(ctx.module, lambda r, ctx=ctx: method.build(ctx, r), ranks, ctx.in_shape,
                                         config.speed_batch, repeats=config.speed_repeats, device=config.device,
                                         channels_last=layout["layout"] == "channels_last")
    if not torch.is_tensor(example) or example.ndim != 4:
        raise ValueError("budget='latency' needs image-tensor inputs (N, C, H, W) to time the whole model")
    rest = time_rest(work, {name: contexts[name].out_shape for name in free}, repeat_to_batch(example, config.speed_batch),
                     repeats=config.speed_repeats, device=config.device, channels_last=layout["layout"] == "channels_last")
    return curves, rest


def _checked_latency_plan(method: Method, contexts: dict[str, LayerContext], costs: dict, config: ApproxConfig,
                          latency, output_errors, layout: dict, work: nn.Module, example, chosen: dict, selection: dict,
                          *, rounds: int = 2, tolerance: float = 0.05) -> tuple[dict, dict]:
    """Measure the latency plan on the whole model and re-plan when it misses.

    The per-layer curves are timed in isolation and do not add up exactly to the model's time (caches,
    the layers' neighbours), so a plan for S can measure well above or below S. Each round builds the
    planned layers (``method.build`` without data: the module shapes are what counts), times the whole model
    in ``layout`` against the original (the BatchNorm-folded working copy) in the same interleaved rounds,
    m = the median of at least 5 per-round ratios (as every headline), and when m is off S by more
    than ``tolerance`` plans again for S' <- S' * S / m. The plan whose measurement is closest to S is kept;
    every round is recorded in ``selection["latency_checks"]``.
    """
    import dataclasses

    from .latency import MIN_ROUNDS, interleaved_rounds, ratio_spread, repeat_to_batch, to_channels_last
    from .speedgate import copy_with

    target, planned = float(config.speedup), float(config.speedup)
    batch = repeat_to_batch(example, config.speed_batch)
    channels_last = layout["layout"] == "channels_last"
    if channels_last:
        batch = batch.contiguous(memory_format=torch.channels_last)
    original = to_channels_last(work) if channels_last else work
    checks, best = [], None
    for _ in range(rounds + 1):
        candidate = copy_with(work, {name: method.build(contexts[name], rank).to(config.device).eval()
                                     for name, rank in chosen.items()
                                     if rank is not None and method.macs(contexts[name], rank) < costs[name].macs},
                              channels_last=channels_last)
        times = interleaved_rounds({"original": original, "plan": candidate}, batch, rounds=max(MIN_ROUNDS, config.speed_repeats),
                                    warmup=1, device=config.device)  # the baseline measured in the same rounds
        spread = ratio_spread(times["original"], times["plan"])
        measured = spread["median"]
        checks.append({"planned_for": planned, "measured": measured, "min": spread["min"], "max": spread["max"],
                       "rounds": spread["rounds"]})
        if best is None or abs(measured / target - 1) < abs(best[0] / target - 1):
            best = (measured, chosen, selection)
        if abs(measured / target - 1) <= tolerance or len(checks) > rounds:
            break
        planned *= target / measured
        chosen, selection = _choose_ranks(method, contexts, {n: c.macs for n, c in costs.items()},
                                          dataclasses.replace(config, speedup=max(planned, 1.0)), latency, output_errors)
    measured, chosen, selection = best
    selection = {**selection, "target_speedup": target, "measured_plan_speedup": measured, "latency_checks": checks}
    log.info("latency plan: %s", ", ".join(f"planned {c['planned_for']:.2f}x -> measured {c['measured']:.2f}x" for c in checks))
    return chosen, selection


def _progress(items, config: ApproxConfig, desc: str):
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, disable=not config.progress, leave=False)


def _speed_gated_ranks(method: Method, contexts: dict[str, LayerContext], costs: dict, config: ApproxConfig,
                       latency=None, output_errors=None, layout: dict | None = None, work: nn.Module | None = None,
                       example=None) -> tuple[dict[str, int | None], dict, dict]:
    """Choose ranks, then time each layer to factorize (a module of the exact shape the method builds at its
    rank) against the original, in ``layout`` (see :func:`_timing_layout`); a layer that is not faster is kept
    original. Under the latency budget (``latency`` given, with ``work`` and ``example``) the plan is first
    checked against the whole model's measured time (:func:`_checked_latency_plan`).

    The other layers keep their ranks: a kept layer gave no measured speed, so cutting the others deeper to
    hold a MAC target would trade accuracy for a theoretical number (in the benchmark, re-budgeting cost
    tucker2 at 3x 29 points of top-1). Under ``speedup`` the theoretical speedup then falls short of the
    target, with a warning.

    Returns the ranks, the selection summary and the :class:`~lowrank_fm.speedgate.LayerTiming` per layer
    checked.
    """
    from .speedgate import SpeedGate

    chosen, selection = _choose_ranks(method, contexts, {n: c.macs for n, c in costs.items()}, config, latency,
                                      output_errors)
    if config.speedup is not None and selection.get("reachable") is False and latency is not None:
        log.warning("speedup %.2fx is not reachable by the latency model: the cheapest ranks give %.2fx (measured "
                    "estimates; the plan is checked on the whole model next)", config.speedup,
                    float(selection.get("planned_speedup") or 1.0))
    elif config.speedup is not None and selection.get("reachable") is False:  # exact under the MAC budget
        most = math.floor(100 * float(selection.get("planned_speedup") or 1.0)) / 100
        raise ValueError(
            f"speedup {config.speedup:g}x is out of reach for this model: the cheapest ranks give {most:.2f}x "
            f"(every targeted layer at its lowest rank, the other layers unchanged); pass a smaller --speedup "
            f"(at most {most:.2f}, and expect a large accuracy drop near it)"
        )
    if latency is not None and work is not None:
        chosen, selection = _checked_latency_plan(method, contexts, costs, config, latency, output_errors, layout,
                                                  work, example, chosen, selection)
    if not config.speed_gate:
        return chosen, selection, {}
    layout = layout or {"layout": "nchw"}
    gate = SpeedGate(config.speed_batch, repeats=config.speed_repeats, device=config.device,
                     channels_last=layout["layout"] == "channels_last")
    checks = [n for n, r in chosen.items()
              if r is not None and (config.force or method.macs(contexts[n], r) < costs[n].macs)]
    slower = sorted(n for n in _progress(checks, config, "speed gate")
                    if not gate.check(n, contexts[n].module, method.build(contexts[n], chosen[n]), contexts[n].in_shape))
    if slower:
        log.info("speed gate: %s not faster than the original at batch %d; kept", slower, config.speed_batch)
        if config.speedup is not None:
            log.warning("speed gate kept %d layer(s) original: the theoretical speedup falls short of %.2fx",
                        len(slower), config.speedup)
    for name in slower:
        chosen[name] = None
    selection["speed_gate"] = {"batch": config.speed_batch, "repeats": config.speed_repeats, "slower": slower,
                               **layout}
    return chosen, selection, gate.timings_


class _LayerSamples:
    """Builds a layer's :class:`LayerData` during the layer-wise pass from the calibration store: the
    stored original responses and positions, and patches of the current (approximated) inputs."""

    def __init__(self, reader, batch_sizes: list[int], n_fit: int) -> None:
        self.reader = reader
        self.starts = np.concatenate([[0], np.cumsum(batch_sizes)])
        self.n_fit = n_fit

    def __call__(self, name: str, module: nn.Module, inputs, activation: str) -> LayerData:
        ordinals = self.reader.image_ordinal(name)
        positions = torch.from_numpy(self.reader.position(name).astype(np.int64))
        targets = torch.from_numpy(self.reader.responses(name)).double()
        rows = []
        for index in range(len(self.starts) - 1):
            lo, hi = np.searchsorted(ordinals, [self.starts[index], self.starts[index + 1]])
            if hi > lo:
                image = torch.from_numpy(ordinals[lo:hi] - self.starts[index])
                rows.append(patches_at(module, inputs[index].detach(), image.to(inputs[index].device),
                                       positions[lo:hi].to(inputs[index].device)).double().cpu())
        heldout = torch.from_numpy(ordinals >= self.n_fit)
        return LayerData(torch.cat(rows), targets, heldout, activation)


def _traceable_root(work: nn.Module, names: list[str], batches: list):
    """The traced module that holds every target layer, its name prefix, and its input per batch.

    The whole model is traced when possible. Otherwise (a detector's control flow) the deepest submodule that
    contains all targets (e.g. ``backbone``) is traced, and its inputs are captured by running the model.
    Returns None when nothing traceable holds the targets.
    """
    from .layerwise import NotTraceableError, trace

    try:
        return trace(work), "", batches
    except NotTraceableError as error:
        first_error = error
    parts = [name.split(".") for name in names]
    common = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    for depth in range(min(len(common), min(len(p) for p in parts) - 1), 0, -1):
        prefix = ".".join(common[:depth])
        sub = get_module(work, prefix)
        try:
            graph_module = trace(sub)
        except NotTraceableError:
            continue
        captured: list = []
        handle = sub.register_forward_pre_hook(lambda _m, args, kwargs: captured.append(args), with_kwargs=True)
        try:
            with torch.no_grad():
                for batch in batches:
                    work(batch)
        finally:
            handle.remove()
        if len(captured) != len(batches) or any(len(args) != 1 or not torch.is_tensor(args[0]) for args in captured):
            continue  # called more than once per forward, or with other than one tensor
        return graph_module, prefix + ".", [args[0] for args in captured]
    log.warning("%s; layers are approximated one by one without whole-model correction", first_error)
    return None


def _build_layerwise(work: nn.Module, method: Method, contexts: dict[str, LayerContext], ranks: dict[str, int],
                     batches: list, reader, n_fit: int, config: ApproxConfig) -> tuple[dict[str, nn.Module], dict]:
    """Approximate the layers shallow to deep in one pass: each layer's inputs come from the network
    approximated so far, its targets from the original network (the store)."""
    from .layerwise import LayerwisePass, activation_after

    root = _traceable_root(work, list(ranks), batches)
    if root is None:
        replacements = {name: method.build(contexts[name], rank).to(config.device).eval() for name, rank in ranks.items()}
        return replacements, {name: dict(method.last_info) for name in ranks}
    graph_module, prefix, root_inputs = root
    dense = config.fit_positions is not None
    samples = None if dense else _LayerSamples(reader, [batch_size_of(b) for b in batches], n_fit)
    replacements: dict[str, nn.Module] = {}
    info: dict[str, dict] = {}

    def on_layer(local_name, module, inputs, reference_inputs=None):
        name = prefix + local_name
        activation = activation_after(graph_module, local_name)
        if dense:
            data = layer_data_from_maps(name, module, inputs, reference_inputs, n_fit, config.fit_positions,
                                        config.seed, activation)
        else:
            data = samples(name, module, inputs, activation)
        replacement = method.build(contexts[name], ranks[name], data).to(config.device).eval()
        info[name] = dict(method.last_info, activation=activation)
        replacements[name] = replacement
        return replacement

    local_targets = [name[len(prefix):] for name in ranks]
    LayerwisePass(graph_module, root_inputs, device=config.device, progress=config.progress,
                  with_reference=dense).run(local_targets, on_layer)
    return replacements, info


def approximate(
    model: nn.Module,
    data: Iterable,
    config: ApproxConfig | None = None,
    *,
    n_images: int | None = None,
    calib_file: str | Path | None = None,
    image_ids: np.ndarray | None = None,
    to_input: Callable | None = None,
    model_name: str | None = None,
    dataset_name: str | None = None,
    **settings,
) -> tuple[nn.Module, Report]:
    """Approximate ``model``'s Conv2d/Linear layers by low rank from calibration ``data``.

    Parameters
    ----------
    model : any ``nn.Module`` (left untouched; a copy is approximated).
    data : an iterable of batches, iterated in the same order each time (a DataLoader without shuffling):
        ``(images, labels)`` pairs, image tensors (N, C, H, W), or lists of image tensors (detectors).
        It is read twice: once to calibrate, once more for its held-out tail.
    config : an :class:`ApproxConfig`; ``settings`` override its fields (``energy=0.9``).
    n_images : calibration images in ``data`` (default: ``len(data.dataset)``).
    calib_file : HDF5 file to write, resume or reuse (default: a temporary file, deleted afterwards).
    image_ids : an identifier per calibration image stored in the file (e.g. indices in the training set).
    to_input : maps a loader item to the model input (default :func:`default_to_input`).

    Returns
    -------
    new_model : the approximated copy, in eval mode.
    report : a :class:`~lowrank_fm.report.Report` (accuracy and latency left for the caller to measure).
    """
    from calibration import calibrate, open_calibration, shard_range  # lazy: lowrank_fm must not import h5py

    from .distributed import shard_loader, world

    config = (config or ApproxConfig()).replace(**settings) if settings else (config or ApproxConfig())
    method = get_method(config.method, config)
    spectra: dict[str, np.ndarray] = {}  # each layer's spectrum computed once (rank choice, records, report)
    method_spectrum = method.spectrum

    def cached_spectrum(ctx: LayerContext) -> np.ndarray:
        if ctx.name not in spectra:
            spectra[ctx.name] = np.asarray(method_spectrum(ctx), dtype=np.float64)
        return spectra[ctx.name]

    method.spectrum = cached_spectrum
    to_input = to_input or default_to_input
    _check_reiterable(data)
    total_images = _count_images(data, n_images)
    if total_images < 2:
        raise ValueError(f"approximate needs at least 2 calibration images (fit + held out), got {total_images}")
    n_heldout = max(1, int(round(config.heldout_fraction * total_images)))
    n_fit = total_images - n_heldout
    timing: dict[str, float] = {}
    check_finite_weights(model)

    example = next(iter(_iter_inputs(data, to_input, 0, None, config.device)), None)
    if example is None:
        raise ValueError(f"data yielded no batches but n_images={total_images} calibration images were expected: "
                         f"pass a loader (or list) of the calibration batches")
    work = copy.deepcopy(model).eval().to(config.device)
    folded = fold_batchnorm(work, example) if config.fold_batchnorm else []
    if folded:
        check_finite_weights(work, "after folding BatchNorm into the convolutions (check the BatchNorm running "
                                   "statistics: a negative running_var gives NaN)")
    reference = copy.deepcopy(work)
    costs = measure_costs(work, example)
    layers = {name: module for name, module in find_layers(work).items() if name in costs}
    _check_include(config, layers)

    reasons = _keep_reasons(layers, costs, method, config)
    targets = [name for name, reason in reasons.items() if reason is None]

    stats: dict[str, ResponseStats] = {}
    temp_dir = None
    rank, size = world()  # under torchrun: each rank calibrates one shard of the images, then all go on alike
    shard = shard_range(total_images, rank, size) if size > 1 else (0, total_images)
    shard_data = shard_loader(data, *shard) if size > 1 else None
    calibrated = (method.needs_responses or method.needs_input_covariance) and bool(targets)
    if calibrated:
        if calib_file is None and size > 1:
            raise ValueError("a multi-process run needs calib_file= on a file system that every rank sees")
        if calib_file is None:
            temp_dir = tempfile.TemporaryDirectory(prefix="lowrank_fm_")
            calib_file = Path(temp_dir.name) / "calibration.h5"
        start = time.perf_counter()
        calibrate(
            work,
            _iter_inputs(shard_data, to_input, 0, shard[1] - shard[0], config.device) if shard_data is not None
            else _iter_inputs(data, to_input, shard[0], shard[1], config.device),
            targets,
            str(calib_file),
            n_images=total_images,
            seed=config.seed,
            positions_per_image=config.positions_per_image,
            image_ids=image_ids,
            meta={"model": model_name or type(model).__name__, "folded_batchnorm": [list(p) for p in folded]},
            device=config.device,
            progress=config.progress,
            input_stats=method.needs_input_covariance,
        )
        timing["calibrate_s"] = time.perf_counter() - start

    start = time.perf_counter()
    inputs: dict[str, InputStats] = {}
    if calibrated:
        from calibration import read_input_stats

        with open_calibration(str(calib_file)) as reader:
            if method.needs_responses:
                stats = {name: _response_stats(reader, name, n_fit, config.covariance, shard if size > 1 else None)
                         for name in targets}
            if method.needs_input_covariance:
                inputs = {name: InputStats(*read_input_stats(reader, name)) for name in targets}

    # the methods' math runs in float64 on the CPU: on another device they see a CPU copy of each layer
    on_cpu = {name: layers[name] if str(config.device) == "cpu" else copy.deepcopy(layers[name]).cpu() for name in targets}
    contexts = {name: LayerContext(name, on_cpu[name], costs[name].positions, stats.get(name), costs[name].in_shape,
                                  costs[name].out_shape, inputs.get(name)) for name in targets}
    output_errors = None
    if config.speedup is not None and config.allocation == "output" and contexts:
        sample = list(_iter_inputs(data, to_input, 0, min(n_fit, config.sensitivity_images), config.device))
        output_errors = _output_errors(method, work, contexts, {n: costs[n].macs for n in layers}, sample, config)
    layout = _timing_layout(work, example, config) if contexts else {"layout": "nchw"}
    latency = _latency_model(method, contexts, costs, work, example, config, layout) if config.budget == "latency" else None
    chosen, selection, layer_timings = _speed_gated_ranks(method, contexts, costs, config, latency, output_errors, layout,
                                                          work, example)
    if latency is not None:  # the latency model's parts: what the plan was made from
        selection["latency_model"] = {**layout, "rest_ms": latency[1],
                                      "layers_original_ms": sum(c.original_ms for c in latency[0].values())}
    if output_errors is not None:
        selection["allocation_signal"] = f"output error on {min(n_fit, config.sensitivity_images)} calibration images"
    slower = set(selection.get("speed_gate", {}).get("slower", ()))
    records, ranks = _layer_records(layers, costs, {**reasons, **{n: "slower" for n in slower}}, contexts, chosen,
                                    method, config)
    for name, measured in layer_timings.items():  # the gate's measurement (ms at config.speed_batch images)
        records[name].extra.update(measured.to_dict())

    if method.needs_inputs and ranks:
        batches = list(_iter_inputs(data, to_input, 0, total_images, config.device))
        with open_calibration(str(calib_file)) as reader:
            replacements, info = _build_layerwise(work, method, contexts, ranks, batches, reader, n_fit, config)
    else:
        replacements, info = {}, {}
        for name in ranks:
            replacements[name] = method.build(contexts[name], ranks[name]).to(config.device).eval()
            if method.last_info:
                info[name] = dict(method.last_info)
    for name, replacement in replacements.items():
        records[name].params_after = module_params(replacement)
        records[name].extra.update(info.get(name, {}))
    for name, replacement in replacements.items():
        set_module(work, name, replacement)
    timing["approximate_s"] = time.perf_counter() - start
    matching: dict = {}
    if replacements and config.output_matching:
        from .output_matching import match_outputs

        matching = match_outputs(reference, work, list(replacements.values()),
                                 list(_iter_inputs(data, to_input, 0, n_fit, config.device)),
                                 list(_iter_inputs(data, to_input, n_fit, total_images, config.device)),
                                 steps=config.matching_steps, lr=config.matching_lr,
                                 batch_images=config.matching_batch, augment_shift=config.matching_shift,
                                 augment_flip=config.matching_flip, seed=config.seed, progress=config.progress)
        timing["output_matching_s"] = matching["seconds"]
    if temp_dir is not None:
        temp_dir.cleanup()

    if replacements:
        heldout = _iter_inputs(data, to_input, n_fit, total_images, config.device)
        for name, error in _heldout_errors(reference, replacements, heldout).items():
            records[name].rel_error = error
        after = measure_costs(work, example)
        for name in replacements:  # the MACs actually counted in the new model's forward
            records[name].macs_after = sum(c.macs for n, c in after.items() if n.startswith(name + "."))

    report = Report(
        model=model_name or type(model).__name__,
        dataset=dataset_name,
        method=config.method,
        config=config.to_dict(),
        layers=list(records.values()),
        timing=timing,
        calibration={"images": total_images, "fit_images": n_fit, "heldout_images": n_heldout,
                     "positions_per_image": config.positions_per_image,
                     "file": None if temp_dir is not None else (str(calib_file) if calib_file else None)},
        folded_batchnorm=[list(p) for p in folded],
        selection=selection,
        output_matching=matching,
        spectra=spectra,
    )
    return work.eval(), report
