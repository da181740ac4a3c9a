"""Classification accuracy of a model on a labelled data set (top-1 and top-5 as fractions in [0, 1])."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

__all__ = ["accuracy", "drop_standard_error"]


@torch.no_grad()
def accuracy(
    model: nn.Module,
    dataset: Dataset,
    *,
    eval_images: int | None = None,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    progress: bool = True,
    desc: str = "evaluate",
    per_image: bool = False,
) -> dict:
    """Top-1 / top-5 accuracy of ``model`` (in eval mode) on the first ``eval_images`` items of ``dataset``.

    Returns
    -------
    dict with ``top1``, ``top5`` (None when there are at most 5 classes) and ``images`` (count used); with
    ``per_image``, also ``top1_hits``: a bool array (images,), whether each image's top-1 class is its label
    (for :func:`drop_standard_error`).
    """
    if eval_images is not None:
        dataset = Subset(dataset, range(min(int(eval_images), len(dataset))))
    loader = DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, pin_memory=str(device).startswith("cuda")
    )
    was_training = model.training
    model.eval()
    correct1 = correct5 = total = 0
    hits1 = []
    has_top5 = True
    for images, labels in tqdm(loader, desc=desc, disable=not progress, leave=False):
        images, labels = images.to(device), labels.to(device)
        logits = model(images)
        k = min(5, logits.shape[1])
        has_top5 = logits.shape[1] > 5
        top = logits.topk(k, dim=1).indices
        hits = top == labels[:, None]
        correct1 += int(hits[:, 0].sum())
        hits1.append(hits[:, 0].cpu())
        correct5 += int(hits.any(dim=1).sum())
        total += len(labels)
    model.train(was_training)
    if total == 0:
        raise ValueError("accuracy: the evaluation set is empty; pass eval_images >= 1 or a non-empty data set")
    result = {"top1": correct1 / total, "top5": (correct5 / total) if has_top5 else None, "images": total}
    if per_image:
        result["top1_hits"] = torch.cat(hits1).numpy()
    return result


def drop_standard_error(hits_before, hits_after) -> float:
    """Standard error of a top-1 drop measured on one test set: the two models answer the same images, so the
    drop is the mean of d_i = h_i - h'_i (h, h' in {0, 1}: image i right before / after) and its standard error
    is the paired one, s_d / sqrt(n) with s_d the sample standard deviation (n - 1) of the d_i. Only images that
    one model gets right and the other wrong contribute (McNemar's discordant pairs): with b of them lost and c
    gained, s_d^2 = (b + c - (b - c)^2 / n) / (n - 1). A fraction (x 100 for points); 0 for one image."""
    before = np.asarray(hits_before, dtype=np.float64)
    after = np.asarray(hits_after, dtype=np.float64)
    if before.shape != after.shape or before.ndim != 1:
        raise ValueError(f"hits must be two 1-d arrays over the same images, got shapes {before.shape} and "
                         f"{after.shape}")
    n = len(before)
    return float(np.std(before - after, ddof=1) / np.sqrt(n)) if n > 1 else 0.0
