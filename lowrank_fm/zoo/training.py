"""Supervised training of the reference models (SGD + one-cycle schedule, seeded, CPU-friendly).

Used by ``scripts/train_reference.py`` for the shipped Fashion-MNIST checkpoints and by
:mod:`lowrank_fm.zoo.models` to train ``vgg-digits`` on first use.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset
from tqdm.auto import tqdm

from .evaluate import accuracy

__all__ = ["TrainSettings", "train_classifier"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainSettings:
    """Hyper-parameters of :func:`train_classifier`."""

    epochs: int = 15
    batch_size: int = 128
    lr: float = 0.1
    weight_decay: float = 5e-4
    augment: bool = True  # random 2-pixel shifts and horizontal flips
    seed: int = 0
    progress: bool = True
    device: str = "cpu"  # "cuda" trains on a GPU; images are augmented on the CPU and moved per batch


def _augment(images: torch.Tensor, generator: torch.Generator, pad: int = 2) -> torch.Tensor:
    """Random translation by up to ``pad`` pixels (zero fill at the normalised minimum) and horizontal flip.

    images : (N, C, H, W) -> (N, C, H, W)
    """
    n, _, h, w = images.shape
    fill = float(images.min())
    padded = F.pad(images, (pad, pad, pad, pad), value=fill)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h)[None, :])[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, None, :]
    batch = torch.arange(n)[:, None, None, None]
    channel = torch.arange(images.shape[1])[None, :, None, None]
    shifted = padded[batch, channel, rows, cols]
    flip = torch.rand(n, generator=generator) < 0.5
    shifted[flip] = shifted[flip].flip(-1)
    return shifted


def train_classifier(
    model: nn.Module, train: TensorDataset, test: TensorDataset | None = None, settings: TrainSettings = TrainSettings()
) -> dict:
    """Train ``model`` in place with cross-entropy; return a history dict (per-epoch loss and test top-1).

    The run is a function of ``settings.seed`` (weights must be initialised by the caller under the same
    seed); shuffling and augmentation draw from their own seeded generator.
    """
    images, labels = train.tensors
    device = torch.device(settings.device)
    model.to(device)
    generator = torch.Generator().manual_seed(settings.seed)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=settings.lr, momentum=0.9, nesterov=True, weight_decay=settings.weight_decay
    )
    steps_per_epoch = (len(labels) + settings.batch_size - 1) // settings.batch_size
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=settings.lr, total_steps=settings.epochs * steps_per_epoch, pct_start=0.25
    )
    history: dict = {"loss": [], "test_top1": []}
    for epoch in range(settings.epochs):
        model.train()
        order = torch.randperm(len(labels), generator=generator)
        total = 0.0
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{settings.epochs}", disable=not settings.progress)
        for step in bar:
            index = order[step * settings.batch_size : (step + 1) * settings.batch_size]
            x = images[index]
            if settings.augment:
                x = _augment(x, generator)
            loss = F.cross_entropy(model(x.to(device)), labels[index].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += loss.item() * len(index)
        history["loss"].append(total / len(labels))
        if test is not None:
            top1 = accuracy(model, test, device=device, progress=False)["top1"]
            history["test_top1"].append(top1)
            log.info("epoch %d: loss %.4f test top-1 %.4f", epoch + 1, history["loss"][-1], top1)
    model.eval().to("cpu")
    return history
