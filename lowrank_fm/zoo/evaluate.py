"""Classification accuracy of a model on a labelled data set (top-1 and top-5 as fractions in [0, 1])."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

__all__ = ["accuracy"]


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
) -> dict:
    """Top-1 / top-5 accuracy of ``model`` (in eval mode) on the first ``eval_images`` items of ``dataset``.

    Returns
    -------
    dict with ``top1``, ``top5`` (None when there are at most 5 classes) and ``images`` (count used).
    """
    if eval_images is not None:
        dataset = Subset(dataset, range(min(int(eval_images), len(dataset))))
    loader = DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, pin_memory=str(device).startswith("cuda")
    )
    was_training = model.training
    model.eval()
    correct1 = correct5 = total = 0
    has_top5 = True
    for images, labels in tqdm(loader, desc=desc, disable=not progress, leave=False):
        images, labels = images.to(device), labels.to(device)
        logits = model(images)
        k = min(5, logits.shape[1])
        has_top5 = logits.shape[1] > 5
        top = logits.topk(k, dim=1).indices
        hits = top == labels[:, None]
        correct1 += int(hits[:, 0].sum())
        correct5 += int(hits.any(dim=1).sum())
        total += len(labels)
    model.train(was_training)
    if total == 0:
        raise ValueError("accuracy: the evaluation set is empty; pass eval_images >= 1 or a non-empty data set")
    return {"top1": correct1 / total, "top5": (correct5 / total) if has_top5 else None, "images": total}
