"""Wall-clock latency of models on one input batch: median of repeated runs after warm-up, measured in
the same process and interleaved when comparing (A, B, A, B, ...), so that machine noise hits all alike.
On a GPU the time of each run comes from CUDA events; on the CPU from ``time.perf_counter``.

Speed is only ever reported as a ratio of two models measured in the same rounds, with the thread count
and device beside it: absolute milliseconds on a shared machine mean little.
"""

from __future__ import annotations

import copy
import logging
import math
import statistics
import time

import torch
from torch import nn

from .allocator import allocator_state
from .surgery import run_model

__all__ = ["compare_latency", "measure_speed", "repeat_to_batch", "to_channels_last", "faster_layout", "machine_load"]

log = logging.getLogger(__name__)


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
    for name, model in models.items():
        model.eval()
        for _ in range(warmup):
            run_model(model, inputs.get(name, example_input))
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in models}
    rounds = repeats
    if min_seconds > 0:
        first = sum(_timed_run(model, inputs.get(name, example_input), device) for name, model in models.items())
        rounds = max(repeats, min(20 * repeats, int(math.ceil(min_seconds * 1000.0 / max(first, 1e-3)))))
    for _ in range(rounds):
        for name, model in models.items():
            times[name].append(_timed_run(model, inputs.get(name, example_input), device))
    return {name: statistics.median(values) for name, values in times.items()}


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


def machine_load() -> list[float] | None:
    """1, 5 and 15 minute load averages (None where the OS does not report them)."""
    try:
        import os

        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def measure_speed(
    original: nn.Module, approximated: nn.Module, images: torch.Tensor, *, batch_sizes=(1, 32),
    repeats: int = 10, warmup: int = 2, device="cpu", try_channels_last: bool = True, min_seconds: float = 3.0,
) -> dict:
    """Latency of the original against the approximated model at each batch size, in one process.

    Both models run in the default (NCHW) layout and, with ``try_channels_last``, in channels-last; the
    four variants are timed in interleaved rounds. Each model is then credited with its faster layout
    (``memory_format`` says which), and ``measured_speedup`` = best original / best approximated, so the
    speedup is not inflated by giving only the approximated model the better layout.
    ``speedup_nchw`` is the ratio with both in NCHW.

    Parameters
    ----------
    images : (N, C, H, W) example images, repeated cyclically to fill each batch.
    repeats, min_seconds : at least ``repeats`` interleaved rounds per batch size, more (up to 20 x) until
        the rounds last ``min_seconds`` (batch 1 on a shared machine needs many samples).

    Returns
    -------
    dict with ``device``, ``threads``, ``load`` (load averages before measuring), ``allocator`` (what the
    process does with freed memory, :func:`lowrank_fm.allocator.allocator_state`), ``repeats``, ``warmup``
    and ``batches``: one entry per batch size with ``before_ms``, ``after_ms``, ``measured_speedup``,
    ``speedup_nchw``, the per-layout milliseconds and the layout chosen for each model.
    """
    device = _device_of(device)
    result = {"device": str(device), "threads": torch.get_num_threads(), "load": machine_load(),
              "allocator": allocator_state(), "repeats": repeats, "warmup": warmup, "batches": {}}
    variants = {"before_nchw": original.eval(), "after_nchw": approximated.eval()}
    if try_channels_last:
        variants["before_channels_last"] = to_channels_last(original).eval()
        variants["after_channels_last"] = to_channels_last(approximated).eval()
    for batch_size in batch_sizes:
        batch = repeat_to_batch(images, int(batch_size)).to(device)
        inputs = {name: batch.contiguous(memory_format=torch.channels_last) for name in variants
                  if name.endswith("channels_last")}
        ms = compare_latency(variants, batch, repeats=repeats, warmup=warmup, device=device, inputs=inputs,
                             min_seconds=min_seconds)
        entry: dict = {f"{name}_ms": value for name, value in ms.items()}
        for side in ("before", "after"):
            layout = min((name for name in ms if name.startswith(side)), key=ms.get)
            entry[f"{side}_ms"] = ms[layout]
            entry[f"{side}_memory_format"] = layout.split("_", 1)[1]
        entry["measured_speedup"] = entry["before_ms"] / entry["after_ms"]
        entry["speedup_nchw"] = ms["before_nchw"] / ms["after_nchw"]
        log.info("batch %d: original %.2f ms (%s), approximated %.2f ms (%s): %.2fx", batch_size, entry["before_ms"],
                 entry["before_memory_format"], entry["after_ms"], entry["after_memory_format"], entry["measured_speedup"])
        result["batches"][str(batch_size)] = entry
    return result
