"""Calibration throughput against plain inference, on the same model and the same batches, in one run.

Calibration (hooks, position sampling, HDF5 writes) should cost little more than the forward pass it rides
on. :func:`calibration_throughput` times both, interleaved ``repeats`` times so that the load of a shared
machine weighs on both alike, and reports images per second and their ratio (calibration / inference).
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..surgery import find_layers

__all__ = ["calibration_throughput"]

log = logging.getLogger(__name__)


def _inference_seconds(model: nn.Module, batches: Sequence[torch.Tensor], device: torch.device) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        for batch in batches:
            model(batch.to(device, non_blocking=True))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def calibration_throughput(
    model: nn.Module,
    batches: Sequence[torch.Tensor],
    *,
    layer_names: Sequence[str] | None = None,
    positions_per_image: int | None = 10,
    repeats: int = 3,
    device: str | torch.device = "cpu",
    work_dir: str | os.PathLike | None = None,
) -> dict:
    """Images per second of plain inference and of calibration over the same batches.

    Parameters
    ----------
    model : nn.Module
        Run in eval mode on ``device``.
    batches : sequence of Tensor of shape (B, C, H, W)
        The images, held in memory (on the CPU) so that data loading weighs on neither measurement.
    layer_names : sequence of str, optional
        Calibrated layers (default: every Conv2d and Linear layer of the model).
    positions_per_image : int or None, default 10
    repeats : int, default 3
        Inference and calibration alternate this many times; the median of each is reported.
    device : str or torch.device, default "cpu"
    work_dir : path, optional
        Where the calibration files go (default: a temporary directory, deleted afterwards).

    Returns
    -------
    dict
        ``images``, ``layers``, ``inference_images_per_s``, ``calibration_images_per_s``, ``ratio`` (their
        quotient, medians), the lists ``inference_s`` and ``calibration_s`` of every repeat, ``store_mb``.
    """
    from calibration import calibrate  # lazy: importing lowrank_fm must not import h5py

    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive int, got {repeats!r}")
    device = torch.device(device)
    model = model.to(device).eval()
    names = list(layer_names) if layer_names is not None else list(find_layers(model))
    n_images = sum(int(b.shape[0]) for b in batches)
    temp = tempfile.TemporaryDirectory(prefix="lowrank_fm_bench_") if work_dir is None else None
    root = Path(temp.name if temp is not None else work_dir)
    root.mkdir(parents=True, exist_ok=True)
    inference_s, calibration_s, store_bytes = [], [], 0
    try:
        _inference_seconds(model, batches[:2], device)  # warm-up
        for index in range(repeats):
            inference_s.append(_inference_seconds(model, batches, device))
            path = root / f"throughput-{index}.h5"
            if path.exists():
                path.unlink()
            start = time.perf_counter()
            calibrate(model, batches, names, path, n_images=n_images, positions_per_image=positions_per_image,
                      device=device, progress=False)
            calibration_s.append(time.perf_counter() - start)
            store_bytes = path.stat().st_size
            path.unlink()
            log.info("repeat %d: inference %.2f s, calibration %.2f s", index, inference_s[-1], calibration_s[-1])
    finally:
        if temp is not None:
            temp.cleanup()
    inference = n_images / float(np.median(inference_s))
    calibration = n_images / float(np.median(calibration_s))
    return {
        "images": n_images,
        "layers": names,
        "positions_per_image": positions_per_image,
        "inference_images_per_s": inference,
        "calibration_images_per_s": calibration,
        "ratio": calibration / inference,
        "inference_s": inference_s,
        "calibration_s": calibration_s,
        "store_mb": store_bytes / 2**20,
        "device": str(device),
        "threads": torch.get_num_threads(),
    }
