"""Wall-clock latency of models on one input batch: median of repeated runs after warm-up, measured in
the same process and interleaved when comparing (A, B, A, B, ...), so that machine noise hits all alike.
On a GPU the time of each run comes from CUDA events; on the CPU from ``time.perf_counter``.

Speed is only ever reported as a ratio of two models measured in the same rounds, with the thread count
and device beside it: absolute milliseconds on a shared machine mean little. A headline ratio is the median
of the per-round ratios of at least :data:`MIN_ROUNDS` rounds, reported with their min-max spread
(:func:`interleaved_rounds`, :func:`ratio_spread`). The original is always timed with the same BatchNorm
folding as the approximated model (:func:`measure_speed` folds a copy of each): an inference engine folds
BatchNorm anyway, so the gain from folding is not the gain from low rank.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import random
import statistics
import time

import torch
from torch import nn

from .allocator import allocator_state
from .surgery import folded_copy, run_model

__all__ = ["compare_latency", "interleaved_rounds", "ratio_spread", "measure_speed", "repeat_to_batch",
           "to_channels_last", "faster_layout", "machine_load", "MIN_ROUNDS", "BASELINE"]

MIN_ROUNDS = 5  # a headline ratio is the median of at least this many rounds
BASELINE = "BatchNorm folded in both"

log = logging.getLogger(__name__)


def machine_load() -> list[float] | None:
    """1, 5 and 15 minute load averages (None where the OS does not report them)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def _device_of(device) -> torch.device:
    return torch.device(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_run(model: nn.Module, batch, device: torch.device) -> float:
    """Milliseconds of one forward (CUDA events on a GPU, perf_counter on the CPU)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run_model(model, batch)
        end.record()
        torch.cuda.synchronize(device)
        return float(start.elapsed_time(end))
    begin = time.perf_counter()
    run_model(model, batch)
    return 1000.0 * (time.perf_counter() - begin)


def compare_latency(
    models: dict[str, nn.Module], example_input, *, repeats: int = 15, warmup: int = 3, device="cpu",
    inputs: dict | None = None, min_seconds: float = 0.0,
) -> dict[str, float]:
    """Median milliseconds per forward of each model, measured in interleaved rounds.

    Parameters
    ----------
    models : name -> model (put in eval mode).
    example_input : the batch every model runs on, unless ``inputs`` names another one for it (e.g. the
        same batch in channels-last memory format).
    repeats, warmup : timed rounds, and untimed forwards of each model first.
    min_seconds : run more rounds (up to 20 x ``repeats``) until the rounds last about this long, so that
        millisecond-scale forwards get enough samples for a stable median on a loaded machine.
    device : where the models and inputs live (CUDA events are used on a GPU).
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"compare_latency needs repeats >= 1 and warmup >= 0, got {repeats} and {warmup}")
    device = _device_of(device)
    inputs = inputs or {}
    _warm_up(models, example_input, inputs, warmup, device)
    times: dict[str, list[float]] = {name: [] for name in models}
    rounds = repeats
    if min_seconds > 0:
        first = sum(_timed_run(model, inputs.get(name, example_input), device) for name, model in models.items())
        rounds = max(repeats, min(20 * repeats, int(math.ceil(min_seconds * 1000.0 / max(first, 1e-3)))))
    for _ in range(rounds):
        for name, model in models.items():
            times[name].append(_timed_run(model, inputs.get(name, example_input), device))
    return {name: statistics.median(values) for name, values in times.items()}


def _warm_up(models: dict[str, nn.Module], example_input, inputs: dict, warmup: int, device) -> None:
    """Eval mode and ``warmup`` untimed forwards of each model (on its own input where ``inputs`` names one)."""
    for name, model in models.items():
        model.eval()
        for _ in range(warmup):
            run_model(model, inputs.get(name, example_input))
    _sync(device)


def interleaved_rounds(
    models: dict[str, nn.Module], example_input, *, rounds: int = 7, repeats: int = 1, warmup: int = 2, device="cpu",
    inputs: dict | None = None, min_seconds: float = 0.0, max_repeats: int = 200,
) -> dict[str, list[float]]:
    """Median milliseconds of each model in each of ``rounds`` rounds.

    A round runs every model ``repeats`` times interleaved (each pass in a new seeded random order) and
    keeps each model's median, so a ratio of two models within one round compares runs made under the same
    machine state. The shuffling matters: a run right after a model of another memory layout can be slower,
    so a fixed order (A, B, C, A, B, C, ...) biased the ratio of two identical models on vgg-digits at
    batch 32 by about 1.06x. With
    ``min_seconds``, ``repeats`` grows (up to ``max_repeats``) until all rounds together last about that
    long (fast models need many runs per round for a stable median). ``inputs`` as in :func:`compare_latency`.
    """
    if rounds < 1 or repeats < 1 or warmup < 0:
        raise ValueError(f"interleaved_rounds needs rounds >= 1, repeats >= 1 and warmup >= 0, got {rounds}, "
                         f"{repeats} and {warmup}")
    device = _device_of(device)
    inputs = inputs or {}
    _warm_up(models, example_input, inputs, warmup, device)
    first = {name: _timed_run(model, inputs.get(name, example_input), device) for name, model in models.items()}
    if min_seconds > 0:
        per_pass = max(sum(first.values()), 1e-3)
        repeats = max(repeats, min(max_repeats, int(math.ceil(min_seconds * 1000.0 / (per_pass * rounds)))))
    result: dict[str, list[float]] = {name: [] for name in models}
    order = random.Random(0)
    for _ in range(rounds):
        times: dict[str, list[float]] = {name: [] for name in models}
        for _ in range(repeats):
            names = list(models)
            order.shuffle(names)  # no model always runs right after a given other one
            for name in names:
                times[name].append(_timed_run(models[name], inputs.get(name, example_input), device))
        for name, values in times.items():
            result[name].append(statistics.median(values))
    return result


def ratio_spread(numerator: list[float], denominator: list[float]) -> dict:
    """The per-round ratios numerator[i] / denominator[i]: ``median``, ``min``, ``max`` and ``rounds``."""
    if len(numerator) != len(denominator) or not numerator:
        raise ValueError(f"ratio_spread needs two equally long, non-empty lists of per-round times, got "
                         f"{len(numerator)} and {len(denominator)}")
    ratios = [a / b for a, b in zip(numerator, denominator)]
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios), "rounds": len(ratios)}


def repeat_to_batch(images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """A batch of exactly ``batch_size`` images (N, C, H, W) taken cyclically from ``images``."""
    if images.ndim != 4 or images.shape[0] < 1:
        raise ValueError(f"repeat_to_batch needs images of shape (N >= 1, C, H, W), got {tuple(images.shape)}")
    index = torch.arange(batch_size) % images.shape[0]
    return images[index].contiguous()


def to_channels_last(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose 4-D weights are stored channels-last (NHWC); the input is not modified."""
    return copy.deepcopy(model).to(memory_format=torch.channels_last)


def faster_layout(model: nn.Module, batch: torch.Tensor, *, repeats: int = 3, device="cpu") -> tuple[str, dict]:
    """Which memory layout runs ``model`` faster on the image batch (N, C, H, W): ``"channels_last"`` or
    ``"nchw"``, and the median milliseconds of each (interleaved rounds after one warm-up forward)."""
    variants = {"nchw": model, "channels_last": to_channels_last(model)}
    ms = compare_latency(variants, batch, repeats=repeats, warmup=1, device=device,
                         inputs={"channels_last": batch.contiguous(memory_format=torch.channels_last)})
    return min(ms, key=ms.get), ms


def measure_speed(
    original: nn.Module, approximated: nn.Module, images: torch.Tensor, *, batch_sizes=(1, 32), rounds: int = 7,
    repeats: int = 1, warmup: int = 2, device="cpu", try_channels_last: bool = True, min_seconds: float = 3.0,
    fold_batchnorm: bool = True, time_unfolded: bool = True,
) -> dict:
    """Latency of the original against the approximated model at each batch size, in one process.

    The baseline is the original **with the same BatchNorm folding** as the approximated model: with
    ``fold_batchnorm`` a copy of each model has every BatchNorm that follows a conv folded into it (the
    callers' models are not touched; the approximated model of :func:`lowrank_fm.approximate` is folded
    already, so its copy changes nothing). With ``time_unfolded`` and BatchNorm present, the original as
    given is timed in the same rounds as an extra (``before_unfolded_ms``, ``speedup_vs_unfolded``), never
    as the baseline.

    Both models run in the default (NCHW) layout and, with ``try_channels_last``, in channels-last, all
    variants in the same interleaved rounds (:func:`interleaved_rounds`). Each model is credited with its
    faster layout by median (``before_memory_format`` / ``after_memory_format``), and ``measured_speedup``
    is the median over the rounds of the per-round ratio original / approximated in those layouts, with
    ``speedup_min`` / ``speedup_max`` over the rounds. ``speedup_nchw``: the same median with both in NCHW.

    Parameters
    ----------
    images : (N, C, H, W) example images, repeated cyclically to fill each batch.
    rounds : interleaved rounds per batch size (at least :data:`MIN_ROUNDS`).
    repeats, min_seconds : runs of each variant per round: at least ``repeats``, more until the rounds
        last about ``min_seconds`` together (batch 1 on a shared machine needs many samples).

    Returns
    -------
    dict with ``device``, ``threads``, ``load`` and ``load_after`` (load averages before and after),
    ``allocator`` (:func:`lowrank_fm.allocator.allocator_state`), ``baseline`` (what the original was timed
    as), ``folded_batchnorm`` (pairs folded in the original's and the approximated model's copies),
    ``rounds``, ``repeats``, ``warmup`` and ``batches``: one entry per batch size with ``before_ms``,
    ``after_ms`` (medians), ``measured_speedup``, ``speedup_min``, ``speedup_max``, ``rounds``,
    ``speedup_nchw``, the per-layout milliseconds and the layout chosen for each model.
    """
    if rounds < MIN_ROUNDS:
        raise ValueError(f"measure_speed needs rounds >= {MIN_ROUNDS} (a headline is a median of rounds), got {rounds}")
    device = _device_of(device)
    result = {"device": str(device), "threads": torch.get_num_threads(), "load": machine_load(),
              "allocator": allocator_state(), "rounds": rounds, "repeats": repeats, "warmup": warmup, "batches": {}}
    example = repeat_to_batch(images, 1).to(device)
    if fold_batchnorm:
        baseline, folded_original = folded_copy(original, example)
        candidate, folded_approximated = folded_copy(approximated, example)
    else:
        baseline, candidate, folded_original, folded_approximated = original, approximated, [], []
    result["folded_batchnorm"] = {"original": len(folded_original), "approximated": len(folded_approximated)}
    result["baseline"] = BASELINE if fold_batchnorm else "as given (no BatchNorm folding)"
    models = {"before": baseline.eval(), "after": candidate.eval()}
    if time_unfolded and folded_original:
        models["unfolded"] = original.eval()
    variants = {f"{side}_nchw": model for side, model in models.items()}
    if try_channels_last:
        variants.update({f"{side}_channels_last": to_channels_last(model).eval() for side, model in models.items()})
    for batch_size in batch_sizes:
        batch = repeat_to_batch(images, int(batch_size)).to(device)
        inputs = {name: batch.contiguous(memory_format=torch.channels_last) for name in variants
                  if name.endswith("channels_last")}
        per_round = interleaved_rounds(variants, batch, rounds=rounds, repeats=repeats, warmup=warmup, device=device,
                                       inputs=inputs, min_seconds=min_seconds)
        ms = {name: statistics.median(values) for name, values in per_round.items()}
        entry: dict = {f"{name}_ms": value for name, value in ms.items()}
        chosen = {}
        for side in models:
            chosen[side] = min((name for name in ms if name.startswith(side + "_")), key=ms.get)
            entry[f"{side}_ms"] = ms[chosen[side]]
            entry[f"{side}_memory_format"] = chosen[side].split("_", 1)[1]
        spread = ratio_spread(per_round[chosen["before"]], per_round[chosen["after"]])
        entry.update(measured_speedup=spread["median"], speedup_min=spread["min"], speedup_max=spread["max"],
                     rounds=spread["rounds"])
        entry["speedup_nchw"] = ratio_spread(per_round["before_nchw"], per_round["after_nchw"])["median"]
        if "unfolded" in models:
            entry["before_unfolded_ms"] = entry.pop("unfolded_ms")
            entry["before_unfolded_memory_format"] = entry.pop("unfolded_memory_format")
            entry["speedup_vs_unfolded"] = ratio_spread(per_round[chosen["unfolded"]], per_round[chosen["after"]])["median"]
        log.info("batch %d (%s): original %.2f ms (%s), approximated %.2f ms (%s): %.2fx (median of %d rounds, "
                 "%.2fx-%.2fx)", batch_size, result["baseline"], entry["before_ms"], entry["before_memory_format"],
                 entry["after_ms"], entry["after_memory_format"], entry["measured_speedup"], spread["rounds"],
                 spread["min"], spread["max"])
        result["batches"][str(batch_size)] = entry
    result["load_after"] = machine_load()
    return result
