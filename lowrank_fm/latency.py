"""Wall-clock latency of models on one input batch: median of repeated runs after warm-up, measured in
the same process (and interleaved when comparing), with CUDA synchronisation on a GPU."""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

from .surgery import run_model

__all__ = ["compare_latency"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compare_latency(
    models: dict[str, nn.Module], example_input, *, repeats: int = 15, warmup: int = 3, device="cpu"
) -> dict[str, float]:
    """Median milliseconds per forward of each model on ``example_input``.

    The models run in interleaved rounds (A, B, A, B, ...) so that machine noise hits all alike.
    """
    device = torch.device(device)
    for model in models.values():
        model.eval()
        for _ in range(warmup):
            run_model(model, example_input)
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            _sync(device)
            start = time.perf_counter()
            run_model(model, example_input)
            _sync(device)
            times[name].append(1000.0 * (time.perf_counter() - start))
    return {name: statistics.median(values) for name, values in times.items()}
