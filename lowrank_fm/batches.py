"""Model inputs ("batches"): how many images one holds, moving it to a device, refusing non-finite images.

A batch is what the model is called with: a Tensor of shape (B, ...), or a list (or tuple) of image
tensors, as torchvision detection models take. These helpers know only torch; the pipeline
(:mod:`lowrank_fm.api`, :mod:`lowrank_fm.cost`) and the calibration stage (:mod:`calibration.run`) share them.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["batch_size_of", "to_device", "check_finite_images"]


def batch_size_of(batch: Any) -> int:
    """Images in a model input: ``len`` of a list or tuple of images, else the first dimension.

    Parameters
    ----------
    batch : Tensor of shape (B, ...), or list or tuple of B image tensors

    Raises
    ------
    ValueError
        If ``batch`` is a 0-dimensional tensor (a scalar holds no images).
    TypeError
        If ``batch`` is none of those (e.g. a dict): the message says how to turn a loader item into a model
        input (``to_input``).
    """
    if isinstance(batch, (list, tuple)):
        return len(batch)
    if not isinstance(batch, torch.Tensor):
        raise TypeError(
            f"a batch must be a Tensor of shape (B, ...) or a list of image tensors, got {type(batch).__name__}; "
            f"pass to_input=... to turn a loader item into the model input (e.g. to_input=lambda item: item[0])"
        )
    if batch.dim() == 0:
        raise ValueError("a batch must be a Tensor of shape (B, ...) or a list of image tensors, got a scalar")
    return int(batch.shape[0])


def to_device(batch: Any, device: str | torch.device) -> Any:
    """``batch`` with every tensor in it (nested lists and tuples too) moved to ``device``; other items as they are.

    The copies are ``non_blocking``: a batch in pinned memory goes to a GPU while the host goes on (a no-op
    on the CPU). Lists stay lists and tuples stay tuples.
    """
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(item, device) for item in batch)
    return batch


def check_finite_images(batch: Any, first_index: int) -> None:
    """Raise ValueError naming the first image of ``batch`` (global index ``first_index + i``) that holds a
    NaN or an infinite value. Non-tensor items are not checked."""
    items = [batch] if isinstance(batch, torch.Tensor) else batch if isinstance(batch, (list, tuple)) else []
    for k, item in enumerate(items):
        if not isinstance(item, torch.Tensor) or not item.is_floating_point() or item.numel() == 0:
            continue
        if bool(torch.isfinite(item.sum())):  # fast: a NaN or inf makes the sum non-finite (an overflow: checked below)
            continue
        finite = torch.isfinite(item)
        if bool(finite.all()):
            continue
        if isinstance(batch, torch.Tensor):  # (B, ...): the first image with a non-finite value
            bad = int(torch.nonzero(~finite.reshape(finite.shape[0], -1).all(dim=1))[0, 0]) if item.dim() else 0
        else:
            bad = k
        raise ValueError(
            f"calibration image {first_index + bad} holds NaN or infinite values: fix or drop it from the data "
            f"(no result is computed from non-finite images)"
        )
