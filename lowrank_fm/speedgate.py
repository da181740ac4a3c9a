"""Measured speed of single layers: the speed gate (is a factorized layer faster than the original on its
real input shape?) and the latency cost model of ``budget="latency"`` (milliseconds as a function of rank).

Only measurement lives here; which layers to gate and what to do with the answer is the pipeline's
(:mod:`lowrank_fm.api`). Every number is a median of interleaved runs on random input of the layer's real
per-image input shape at the given batch size.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .latency import compare_latency, to_channels_last

__all__ = ["LayerTiming", "time_layers", "SpeedGate", "LatencyCurve", "fit_latency_curve", "copy_with", "time_rest"]


@dataclass(frozen=True)
class LayerTiming:
    """Median milliseconds of the original layer and of its replacement on one batch."""

    original_ms: float
    factorized_ms: float

    @property
    def speedup(self) -> float:
        return self.original_ms / self.factorized_ms

    def to_dict(self) -> dict:
        return {"original_ms": self.original_ms, "factorized_ms": self.factorized_ms, "layer_speedup": self.speedup}


def _on(module: nn.Module, device) -> nn.Module:
    """``module`` on ``device``: itself when it is there already, else a copy (the caller's stays put)."""
    first = next(module.parameters(), None)
    if first is None or first.device == torch.device(device):
        return module
    return copy.deepcopy(module).to(device)


def _random_input(in_shape: Sequence[int], batch: int, device, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn((batch, *in_shape), generator=generator).to(device)


def time_layers(modules: dict[str, nn.Module], in_shape: Sequence[int], batch: int, *, repeats: int = 5,
                warmup: int = 1, device="cpu", min_seconds: float = 0.5, channels_last: bool = False) -> dict[str, float]:
    """Median milliseconds of each module on one random batch of shape (batch, *in_shape), interleaved
    (at least ``repeats`` rounds, more for fast layers until the rounds last ``min_seconds``).
    ``channels_last``: image input (C, H, W) and 4-D weights in that memory format (copies of the modules),
    the layout the whole model will run in."""
    if not in_shape:
        raise ValueError("time_layers needs the layer's per-image input shape, got an empty shape")
    x = _random_input(in_shape, batch, device)
    if channels_last and x.ndim == 4:
        x = x.contiguous(memory_format=torch.channels_last)
        modules = {name: to_channels_last(module) for name, module in modules.items()}
    return compare_latency(modules, x, repeats=repeats, warmup=warmup, device=device, min_seconds=min_seconds)


class SpeedGate:
    """Keeps a factorized layer only when it runs faster than the original layer.

    Parameters
    ----------
    batch : batch size of the measurement (the batch the model will be used at).
    repeats, warmup : timed interleaved rounds and untimed forwards per module.
    device : where the layers run.
    margin : the factorized layer passes when ``factorized_ms * margin < original_ms`` (1.0: strictly faster).
    channels_last : time image layers in channels-last memory format (the layout the model runs in).

    Attributes
    ----------
    timings_ : name -> :class:`LayerTiming` of every layer checked.
    """

    def __init__(self, batch: int = 32, *, repeats: int = 5, warmup: int = 1, device="cpu", margin: float = 1.0,
                 channels_last: bool = False) -> None:
        if batch < 1 or repeats < 1:
            raise ValueError(f"SpeedGate needs batch >= 1 and repeats >= 1, got batch={batch}, repeats={repeats}")
        self.batch, self.repeats, self.warmup, self.device, self.margin = batch, repeats, warmup, device, margin
        self.channels_last = channels_last
        self.timings_: dict[str, LayerTiming] = {}

    def check(self, name: str, original: nn.Module, factorized: nn.Module, in_shape: Sequence[int]) -> bool:
        """True when ``factorized`` is faster than ``original`` on input (batch, *in_shape)."""
        modules = {"original": _on(original, self.device), "factorized": factorized.to(self.device)}
        ms = time_layers(modules, in_shape, self.batch, repeats=self.repeats, warmup=self.warmup, device=self.device,
                         channels_last=self.channels_last)
        timing = LayerTiming(ms["original"], ms["factorized"])
        self.timings_[name] = timing
        return timing.factorized_ms * self.margin < timing.original_ms


@dataclass(frozen=True)
class LatencyCurve:
    """Measured latency of one layer: the original's, and the factorized layer's as ``intercept + slope * r``.

    A factorized conv chain's work is linear in its rank r (every factor has r input or output channels),
    so a straight line through a few measured ranks is the model; ``slope`` is clipped to a small positive
    value so that cost strictly grows with rank (the budget's greedy needs that).
    """

    original_ms: float
    intercept_ms: float
    slope_ms: float
    measured: dict

    def at(self, rank: int) -> float:
        return self.intercept_ms + self.slope_ms * rank


def fit_latency_curve(original: nn.Module, build_at: Callable[[int], nn.Module], ranks: Sequence[int],
                      in_shape: Sequence[int], batch: int, *, repeats: int = 3, device="cpu",
                      channels_last: bool = False) -> LatencyCurve:
    """Time the original layer and the factorized one at each of ``ranks`` (interleaved, in channels-last
    with ``channels_last``), then fit ms(r) = a + b r by least squares."""
    ranks = sorted({int(r) for r in ranks})
    if not ranks:
        raise ValueError("fit_latency_curve needs at least one rank")
    modules = {"original": _on(original, device), **{f"r{r}": build_at(r).to(device) for r in ranks}}
    ms = time_layers(modules, in_shape, batch, repeats=repeats, device=device, channels_last=channels_last)
    values = np.array([ms[f"r{r}"] for r in ranks])
    if len(ranks) == 1:
        slope, intercept = values[0] / ranks[0], 0.0
    else:
        slope, intercept = np.polyfit(np.array(ranks, dtype=float), values, 1)
    slope = max(float(slope), 1e-6)
    return LatencyCurve(float(ms["original"]), float(intercept), slope, {r: float(ms[f"r{r}"]) for r in ranks})


class _FixedOutput(nn.Module):
    """Stands in for a layer at no cost: returns one preallocated tensor of the layer's output shape
    (batch, *out_shape), in the input's memory format. Its values are meaningless: it only times the rest."""

    def __init__(self, out_shape: Sequence[int]) -> None:
        super().__init__()
        self.out_shape = tuple(out_shape)
        self.out: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (x.shape[0], *self.out_shape)
        if self.out is None or self.out.shape != shape or self.out.device != x.device:
            fmt = torch.channels_last if x.ndim == 4 and len(shape) == 4 and not x.is_contiguous() else torch.contiguous_format
            self.out = torch.zeros(shape, dtype=x.dtype, device=x.device).contiguous(memory_format=fmt)
        return self.out


def copy_with(model: nn.Module, replacements: dict[str, nn.Module], *, channels_last: bool = False) -> nn.Module:
    """A copy of ``model`` with the named submodules replaced (the caller's model is left alone), its 4-D
    weights in channels-last memory format when ``channels_last``."""
    from .surgery import set_module

    copied = copy.deepcopy(model)
    for name, module in replacements.items():
        set_module(copied, name, module)
    return copied.to(memory_format=torch.channels_last) if channels_last else copied


def time_rest(model: nn.Module, out_shapes: dict[str, Sequence[int]], batch: torch.Tensor, *, repeats: int = 3,
              device="cpu", channels_last: bool = False) -> float:
    """Median milliseconds of ``model`` on ``batch`` with the named layers replaced by free stand-ins that
    return a fixed tensor of their per-image output shape ``out_shapes[name]``: the time of everything but
    those layers (pooling, activations, the other layers), measured rather than taken as a difference."""
    rest = copy_with(model, {name: _FixedOutput(shape) for name, shape in out_shapes.items()},
                     channels_last=channels_last)
    if channels_last:
        batch = batch.contiguous(memory_format=torch.channels_last)
    return compare_latency({"rest": rest}, batch, repeats=repeats, warmup=1, device=device)["rest"]


# ----------------------------------------------------------------------------------------------------------
# What the pipeline measures for the planner (the planner decides; these only time)
# ----------------------------------------------------------------------------------------------------------


def timing_layout(work: nn.Module, example, config) -> dict:
    """The memory layout the per-layer timings use: the one in which the whole model runs faster at
    ``config.speed_batch`` (image models; others: NCHW), so that the gate and the latency budget judge layers
    as the deployed model runs them. Returns {"layout": ..., and the whole model's ms per layout}."""
    from .latency import faster_layout, repeat_to_batch

    if not (config.speed_gate or config.budget == "latency") or not torch.is_tensor(example) or example.ndim != 4:
        return {"layout": "nchw"}
    layout, ms = faster_layout(work, repeat_to_batch(example, config.speed_batch), repeats=config.speed_repeats,
                               device=config.device)
    return {"layout": layout, **{f"model_{name}_ms": value for name, value in ms.items()}}


def latency_model(method, targets: dict[str, dict], work: nn.Module, example, config, layout: dict,
                  progress=lambda items, desc: items) -> tuple[dict[str, dict], float]:
    """Per-layer latency curves and the milliseconds of the rest of the model.

    ``targets``: layer name -> {variant: (context, top rank)}, the variants of :meth:`Method.timing_variants`
    (None: the layer as the method builds it; for ``auto``, each candidate method). Each variant's curve is ms
    against rank, measured at ``config.speed_batch`` in ``layout`` at ranks up to its top; returned as
    {name: {variant: LatencyCurve}}. The rest is the model with the named layers replaced by free stand-ins, same
    layout (isolated layer times do not add up to the whole model's, so it is measured, not taken as a
    difference)."""
    from .latency import repeat_to_batch

    if not torch.is_tensor(example) or example.ndim != 4:
        raise ValueError("budget='latency' needs image-tensor inputs (N, C, H, W) to time the whole model")
    channels_last = layout["layout"] == "channels_last"
    curves: dict[str, dict] = {}
    for name in progress(list(targets), "latency model"):
        curves[name] = {}
        for variant, (ctx, top) in targets[name].items():
            ranks = {max(1, top // 8), max(1, top // 4), max(1, top // 2), top}
            curves[name][variant] = fit_latency_curve(
                ctx.module, lambda r, ctx=ctx: method.timing_module(ctx, r), ranks, ctx.in_shape, config.speed_batch,
                repeats=config.speed_repeats, device=config.device, channels_last=channels_last)
    first = {name: next(iter(variants.values()))[0] for name, variants in targets.items()}
    rest = time_rest(work, {name: ctx.out_shape for name, ctx in first.items()},
                     repeat_to_batch(example, config.speed_batch), repeats=config.speed_repeats, device=config.device,
                     channels_last=channels_last)
    return curves, rest


def plan_timer(method, work: nn.Module, example, config, layout: dict) -> Callable[[dict, dict], dict]:
    """``measure(ranks, contexts)``: the whole model with the layers built at ``ranks`` (``method.timing_module``:
    the module shapes are what counts) timed against the original (the BatchNorm-folded
    working copy) in the same interleaved rounds, in ``layout``; returns the spread of the per-round ratios
    (median of at least 5 rounds, as every headline)."""
    from .latency import MIN_ROUNDS, interleaved_rounds, ratio_spread, repeat_to_batch, to_channels_last

    channels_last = layout["layout"] == "channels_last"
    batch = repeat_to_batch(example, config.speed_batch)
    if channels_last:
        batch = batch.contiguous(memory_format=torch.channels_last)
    original = to_channels_last(work) if channels_last else work

    def measure(ranks: dict, contexts: dict) -> dict:
        candidate = copy_with(work, {name: method.timing_module(contexts[name], rank).to(config.device).eval()
                                     for name, rank in ranks.items()}, channels_last=channels_last)
        times = interleaved_rounds({"original": original, "plan": candidate}, batch,
                                   rounds=max(MIN_ROUNDS, config.speed_repeats), warmup=1, device=config.device)
        return ratio_spread(times["original"], times["plan"])

    return measure
