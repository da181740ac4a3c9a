"""Multi-process runs under ``torch.distributed`` (launched with ``torchrun``): rank, shards, reductions.

Each rank calibrates a contiguous shard of the calibration images (:func:`calibration.distributed.shard_range`)
and fits the response statistics of its own images; :func:`reduce_covariance` merges the ranks' (count,
mean, scatter) in rank order, so every rank holds the statistics of all images, equal to a single-process
fit up to float64 summation order. Without an initialised process group everything here is the
single-process case (rank 0 of 1).
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, SequentialSampler, Subset

from .stats import StreamingCovariance

__all__ = ["world", "reduce_covariance", "shard_loader", "init_from_env"]


def world() -> tuple[int, int]:
    """(rank, world_size) of the initialised process group, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_env(device: str) -> tuple[int, int, str]:
    """Join the process group that ``torchrun`` describes in the environment (``WORLD_SIZE`` > 1).

    Uses gloo for a CPU ``device`` and nccl for CUDA; a CUDA device without an index becomes this rank's
    ``cuda:LOCAL_RANK``. Returns (rank, world_size, device); without ``WORLD_SIZE`` > 1, (0, 1, device).
    """
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1 or (dist.is_available() and dist.is_initialized()):
        rank, size = world()
        return rank, size, device
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed: run one process")
    cuda = device.startswith("cuda")
    if cuda and device == "cuda":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    if cuda:
        torch.cuda.set_device(torch.device(device))
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def reduce_covariance(estimator: StreamingCovariance) -> StreamingCovariance:
    """Merge every rank's :class:`StreamingCovariance` in rank order; the same result on every rank.

    Notes
    -----
    The pairwise update of :meth:`StreamingCovariance.merge` combines (n_r, mean_r, scatter_r) of the ranks
    exactly as it combines blocks of one process, so the result equals a single-process fit over the same
    samples up to float64 rounding.
    """
    rank, size = world()
    if size == 1:
        return estimator
    gathered: list = [None] * size
    dist.all_gather_object(gathered, estimator)
    merged = StreamingCovariance()
    for other in gathered:
        merged.merge(other)
    return merged


def shard_loader(data: Iterable, start: int, stop: int) -> DataLoader | None:
    """A loader over images ``[start, stop)`` of ``data`` when ``data`` is a sequential DataLoader, else None.

    The new loader keeps ``data``'s batch size, workers, pinned memory and collate function, so a rank loads
    only its own images (the caller falls back to reading ``data`` and skipping the others' images).
    """
    if not isinstance(data, DataLoader) or not isinstance(data.sampler, SequentialSampler) or data.batch_size is None:
        return None
    return DataLoader(Subset(data.dataset, range(start, stop)), batch_size=data.batch_size, shuffle=False,
                      num_workers=data.num_workers, collate_fn=data.collate_fn, pin_memory=data.pin_memory,
                      drop_last=False, persistent_workers=False)
