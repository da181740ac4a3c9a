"""Multi-process calibration: one shard of the images per rank, merged into one store by rank 0.

With ``world_size`` processes (``torch.distributed``, launched by ``torchrun``), rank r calibrates the
contiguous images ``shard_range(n_images, r, world_size)`` into its own store ``shard_path(path, r,
world_size)``. Positions are drawn with the images' global ordinals, so each shard holds exactly the rows a
single-process run would hold for those images. Rank 0 then appends the shards in rank order to ``path``
(:func:`merge_shards`): the result is the single-process store, row for row.

A shard is an ordinary store (see :mod:`calibration.store`) whose metadata also names its place in the run
(``meta["shard"]``): an interrupted run resumes each shard from its committed images, and a shard made by
another run (other settings, images or world size) is refused with the settings that differ.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from .input_stats import merge_input_stats
from .store import CalibrationWriter, open_calibration, stored_weights_fingerprint

__all__ = ["shard_range", "shard_path", "shard_meta", "merge_shards", "barrier"]

logger = logging.getLogger(__name__)


def barrier() -> None:
    """Wait for every rank of the initialised process group (nothing without one)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def shard_range(n_images: int, rank: int, world_size: int) -> tuple[int, int]:
    """Images ``[start, stop)`` of rank ``rank``: contiguous, sizes differing by at most one, in rank order."""
    if isinstance(world_size, bool) or not isinstance(world_size, (int, np.integer)) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, world_size={world_size}), got {rank!r}")
    if n_images < world_size:
        raise ValueError(
            f"{n_images} calibration images cannot be shared among {world_size} processes: use at most "
            f"{n_images} processes or more images"
        )
    base, extra = divmod(int(n_images), int(world_size))
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def shard_path(path: str | os.PathLike, rank: int, world_size: int) -> str:
    """Store of rank ``rank``: ``PATH.shards/rank-R-of-W.h5`` beside the merged store ``PATH``."""
    return os.path.join(os.fspath(path) + ".shards", f"rank-{rank}-of-{world_size}.h5")


def shard_meta(meta: Mapping[str, Any] | None, rank: int, world_size: int, n_images: int) -> dict[str, Any]:
    """The metadata of a shard: the run's ``meta`` plus ``shard`` (rank, world size, image range)."""
    start, stop = shard_range(n_images, rank, world_size)
    return {**dict(meta or {}), "shard": {"rank": int(rank), "world_size": int(world_size),
                                          "first_ordinal": start, "stop_ordinal": stop, "n_images": int(n_images)}}


def merge_shards(
    path: str | os.PathLike,
    *,
    world_size: int,
    layers: Mapping[str, tuple[int, str]],
    seed: int,
    positions_per_image: int | None,
    image_ids: np.ndarray,
    meta: Mapping[str, Any] | None,
    block_images: int = 256,
    remove: bool = True,
    weights_fingerprint: str | None = None,
) -> str:
    """Append the complete shards of a run, in rank order, to the store ``path`` (resumable).

    Parameters
    ----------
    path : str or PathLike
        The merged store; its shards are ``shard_path(path, r, world_size)``.
    world_size : int
    layers, seed, positions_per_image, image_ids, meta
        The run's settings, as given to :func:`calibration.calibrate` (``image_ids`` of all images).
    block_images : int, default 256
        Images copied per append: memory holds one block of rows, whatever the number of images.
    remove : bool, default True
        Delete the shards (and their folder, if left empty) once the merged store is complete.
    weights_fingerprint : str, optional
        The digest of the model's weights, as :func:`calibration.calibrate` stored it in each shard
        (default: the one recorded in the merged store, else in the first shard; the others must agree).

    Returns
    -------
    str
        ``path``, complete.

    Raises
    ------
    FileNotFoundError
        If a shard still needed is missing.
    CalibrationMismatchError
        If a shard, or an existing ``path``, was made with other settings (the message names them).
    IncompleteCalibrationError
        If a shard still needed is incomplete (its rank stopped early: run the calibration again to resume).
    """
    path = os.fspath(path)
    ids = np.asarray(image_ids)
    n_images = int(ids.shape[0])
    if weights_fingerprint is None:
        for candidate in (path, shard_path(path, 0, world_size)):
            weights_fingerprint = stored_weights_fingerprint(candidate)
            if weights_fingerprint is not None:
                break
    settings = dict(layers=layers, seed=seed, positions_per_image=positions_per_image,
                    weights_fingerprint=weights_fingerprint)
    with CalibrationWriter.open(path, image_ids=ids, meta=meta, **settings) as writer:
        if writer.complete:
            return path
        n_done = writer.n_images_done
        for rank in range(world_size):
            start, stop = shard_range(n_images, rank, world_size)
            if stop <= n_done:
                continue
            shard = shard_path(path, rank, world_size)
            if not os.path.exists(shard):
                raise FileNotFoundError(
                    f"calibration shard {shard!r} (rank {rank} of {world_size}) is missing: run the calibration "
                    f"again with {world_size} processes to redo it"
                )
            # refuses a shard of another run (settings, images, world size) before reading it
            CalibrationWriter.open(shard, image_ids=ids[start:stop],
                                   meta=shard_meta(meta, rank, world_size, n_images), **settings).close()
            with open_calibration(shard) as reader:
                _copy_shard(reader, writer, start, stop, max(n_done - start, 0), block_images)
        with contextlib.ExitStack() as stack:  # every shard is still there until the merged store is complete
            merge_input_stats([stack.enter_context(open_calibration(shard_path(path, r, world_size)))
                               for r in range(world_size)], writer)
        writer.mark_complete()
    logger.info("merged %d calibration shards into %s", world_size, path)
    if remove:
        for rank in range(world_size):
            shard = shard_path(path, rank, world_size)
            if os.path.exists(shard):
                os.remove(shard)
        folder = os.path.dirname(shard_path(path, 0, world_size))
        if os.path.isdir(folder) and not os.listdir(folder):
            os.rmdir(folder)
    return path


def _copy_shard(reader, writer: CalibrationWriter, start: int, stop: int, local: int, block_images: int) -> None:
    """Append the shard's images ``start + local .. stop - 1`` to the merged store, block by block."""
    ordinals = {name: reader.image_ordinal(name) for name in writer.layers}
    digests = reader.image_digests()
    while local < stop - start:
        high = min(local + block_images, stop - start)
        samples = {}
        for name, ordinal in ordinals.items():
            lo, hi = (int(np.searchsorted(ordinal, value, side="left")) for value in (local, high))
            rows = slice(lo, hi)
            samples[name] = (reader.responses(name, rows), ordinal[lo:hi] + start, reader.position(name, rows))
        writer.append(samples, images_done=start + high, digests=digests[local:high])
        local = high
