"""The calibration data as the pipeline reads it: model inputs of loader items, device moves, the number
of images, and re-slicing by image ordinal (the data is read several times, in the same order)."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from .batches import batch_size_of, check_finite_images, to_device
from .distributed import split_range

__all__ = ["default_to_input", "count_images", "iter_inputs", "check_reiterable", "shard_inputs", "pass_shard"]


def default_to_input(batch):
    """The model input of one loader item: ``images`` of an ``(images, labels)`` pair, else the item itself.

    A pair counts as labelled when its second element is a 1-D integer tensor with one entry per image.
    """
    if isinstance(batch, (list, tuple)) and len(batch) == 2 and torch.is_tensor(batch[0]) and torch.is_tensor(batch[1]):
        images, labels = batch
        if labels.ndim == 1 and not labels.is_floating_point() and images.ndim >= 2 and labels.shape[0] == images.shape[0]:
            return images
    return batch


def count_images(data, n_images: int | None) -> int:
    if n_images is not None:
        return int(n_images)
    dataset = getattr(data, "dataset", None)
    if dataset is not None and hasattr(dataset, "__len__"):
        return len(dataset)
    if hasattr(data, "__len__"):
        raise ValueError("approximate: pass n_images= (the number of calibration images in data)")
    raise ValueError("approximate: data has no length; pass n_images= (the number of calibration images)")


def iter_inputs(data, to_input, start: int = 0, stop: int | None = None, device="cpu") -> Iterable:
    """Model inputs for images with ordinals in [start, stop), re-slicing batches that straddle the range.
    An image with NaN or infinite values is refused (ValueError naming its ordinal)."""
    seen = 0
    for item in data:
        batch = to_input(item)
        size = batch_size_of(batch)
        lo, hi = max(start - seen, 0), size if stop is None else min(stop - seen, size)
        if hi > lo:
            part = batch if (lo, hi) == (0, size) else batch[lo:hi]
            check_finite_images(part, seen + lo)
            seen += size
            yield to_device(part, device)
        else:
            seen += size
        if stop is not None and seen >= stop:
            return


def check_reiterable(data) -> None:
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


def shard_inputs(data, to_input, images: tuple[int, int], size: int, device) -> Iterable:
    """Model inputs of the images ``[start, stop)``; in a multi-process run through a loader over those images
    only when ``data`` is a sequential DataLoader (else ``data`` is read and the other images skipped)."""
    from .distributed import shard_loader

    start, stop = images
    loader = shard_loader(data, start, stop) if size > 1 and stop > start else None
    if loader is not None:
        return iter_inputs(loader, to_input, 0, stop - start, device)
    return iter_inputs(data, to_input, start, stop, device)


def _batch_starts(data, to_input, total: int) -> list[int] | None:
    """The ordinal of each batch's first image, when known without loading images: a sequential DataLoader
    with a batch size, or a list (tuple) of batches; else None."""
    from torch.utils.data import DataLoader, SequentialSampler

    if isinstance(data, DataLoader) and isinstance(data.sampler, SequentialSampler) and data.batch_size is not None:
        return list(range(0, total, int(data.batch_size)))
    if isinstance(data, (list, tuple)):
        starts, seen = [], 0
        for item in data:
            if seen >= total:
                break
            starts.append(seen)
            seen += batch_size_of(to_input(item))
        return starts
    return None


def pass_shard(data, to_input, total: int, rank: int, size: int) -> tuple[int, int]:
    """The images ``[start, stop)`` of rank ``rank``'s layer-wise pass: whole batches of ``data`` (contiguous, in
    rank order), so that each rank computes every batch exactly as one process does; contiguous images
    (:func:`calibration.shard_range`) when the batches are unknown or fewer than the ranks."""
    from calibration import shard_range

    if size == 1:
        return 0, total
    starts = _batch_starts(data, to_input, total)
    if starts is None or len(starts) < size:
        return shard_range(total, rank, size)
    first, last = split_range(0, len(starts), rank, size)
    return starts[first], (starts[last] if last < len(starts) else total)
