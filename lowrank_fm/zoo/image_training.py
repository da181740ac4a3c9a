"""Training of colour-image classifiers with the whole data set resident on the device (CIFAR-10 models).

The uint8 images live on the device once; each step crops (zero padding ``crop_pad``), flips, resizes to the
model's input size, normalises and runs the step under bfloat16 autocast on CUDA (float32 on CPU). SGD with
Nesterov momentum; the learning rate rises linearly over the first epoch from lr/10 to lr, then follows a
cosine to 0 at the last step:

    lr(s) = lr * (0.1 + 0.9 s / S1)                      for s < S1 (one epoch of steps)
    lr(s) = lr * (1 + cos(pi (s - S1) / (S - S1))) / 2     afterwards, S = epochs * S1

With ``time_budget_s`` the number of epochs is set after the first epoch from the pace of its second half
(the first steps pay for cuDNN's algorithm search: 56 s against 19 s for DenseNet-161's next epochs), at most
``epochs``, and recorded, so ``--epochs N`` reproduces the same schedule.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .data import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["ImageTrainSettings", "train_on_device", "normalise"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImageTrainSettings:
    """Hyper-parameters of :func:`train_on_device`."""

    epochs: int = 30
    batch_size: int = 256
    lr: float = 0.1
    weight_decay: float = 5e-4
    crop_pad: int = 4
    input_size: int = 32
    seed: int = 0
    device: str = "cuda"
    time_budget_s: float | None = None
    max_images: int | None = None  # train on the first N images only (smoke tests)
    progress: bool = True


def normalise(images_u8: torch.Tensor, input_size: int) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, S, S) float32 normalised with the ImageNet mean/std that
    ``--dataset imagefolder`` uses; bilinear resize when S differs from H."""
    x = images_u8.permute(0, 3, 1, 2).float().div_(255.0)
    if x.shape[-1] != input_size:
        x = F.interpolate(x, size=(input_size, input_size), mode="bilinear", align_corners=False)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def _augment(images_u8: torch.Tensor, pad: int, generator: torch.Generator) -> torch.Tensor:
    """Random crop after zero padding by ``pad`` and random horizontal flip, (N, H, W, C) uint8 on any device."""
    n, h, w, _ = images_u8.shape
    padded = F.pad(images_u8.permute(0, 3, 1, 2), (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(images_u8.device)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(images_u8.device)
    flip = (torch.rand(n, generator=generator) < 0.5).to(images_u8.device)
    rows = dy[:, None] + torch.arange(h, device=images_u8.device)[None, :]
    cols = dx[:, None] + torch.arange(w, device=images_u8.device)[None, :]
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    batch = torch.arange(n, device=images_u8.device)[:, None, None, None]
    channel = torch.arange(padded.shape[1], device=images_u8.device)[None, :, None, None]
    out = padded[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]
    return out.permute(0, 2, 3, 1)


def _learning_rate(settings: ImageTrainSettings, step: int, steps_per_epoch: int, epochs: int) -> float:
    if step < steps_per_epoch:
        return settings.lr * (0.1 + 0.9 * step / steps_per_epoch)
    total = max(1, (epochs - 1) * steps_per_epoch)
    return settings.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - steps_per_epoch) / total)))


@torch.no_grad()
def evaluate_on_device(model: nn.Module, images_u8: torch.Tensor, labels: torch.Tensor, input_size: int,
                       batch_size: int = 1000) -> float:
    """Top-1 in float32 (no autocast), as the CPU pipeline evaluates."""
    model.eval()
    correct = 0
    for start in range(0, len(labels), batch_size):
        x = normalise(images_u8[start : start + batch_size], input_size)
        correct += int((model(x).argmax(1) == labels[start : start + batch_size]).sum())
    return correct / len(labels)


def train_on_device(model: nn.Module, train_images: torch.Tensor, train_labels: torch.Tensor,
                    val_images: torch.Tensor | None, val_labels: torch.Tensor | None,
                    settings: ImageTrainSettings) -> dict:
    """Train ``model`` in place; return the record (epochs run, seconds, per-epoch loss and val top-1).

    train_images : (N, 32, 32, 3) uint8, train_labels : (N,) int64 (CPU or device; moved once).
    """
    device = torch.device(settings.device)
    if settings.max_images:  # a seeded random subset (the splits are stored class by class)
        keep = torch.randperm(len(train_labels), generator=torch.Generator().manual_seed(settings.seed))
        keep = keep[: settings.max_images]
        train_images, train_labels = train_images[keep], train_labels[keep]
    train_images, train_labels = train_images.to(device), train_labels.to(device)
    if val_images is not None:
        val_images, val_labels = val_images.to(device), val_labels.to(device)
    model.to(device).to(memory_format=torch.channels_last)
    generator = torch.Generator().manual_seed(settings.seed)
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    optimizer = torch.optim.SGD([{"params": decay, "weight_decay": settings.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}],
                                lr=settings.lr, momentum=0.9, nesterov=True)
    use_amp = device.type == "cuda"
    if use_amp:
        torch.backends.cudnn.benchmark = True  # fixed shapes: the last partial batch is dropped
    n = len(train_labels)
    steps_per_epoch = n // settings.batch_size  # drop the last partial batch (BatchNorm on tiny batches)
    if steps_per_epoch == 0:
        raise ValueError(f"{n} training images are fewer than one batch of {settings.batch_size}: lower --batch-size")
    epochs = settings.epochs
    record: dict = {"settings": asdict(settings), "loss": [], "val_top1": [], "epoch_seconds": []}
    start = time.time()
    step = 0
    epoch = 0
    while epoch < epochs:
        model.train()
        epoch_start = time.time()
        order = torch.randperm(n, generator=generator).to(device)
        total = torch.zeros((), device=device)
        for index in tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{epochs}", disable=not settings.progress,
                          mininterval=5.0):
            if index == steps_per_epoch // 2:
                half_time = time.time()
            batch = order[index * settings.batch_size : (index + 1) * settings.batch_size]
            x = normalise(_augment(train_images[batch], settings.crop_pad, generator), settings.input_size)
            x = x.contiguous(memory_format=torch.channels_last)
            for group in optimizer.param_groups:
                group["lr"] = _learning_rate(settings, step, steps_per_epoch, epochs)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                loss = F.cross_entropy(model(x), train_labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.detach()
            step += 1
        record["loss"].append(float(total) / steps_per_epoch)
        record["epoch_seconds"].append(round(time.time() - epoch_start, 2))
        if epoch == 0 and settings.time_budget_s:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            pace = (time.time() - half_time) * steps_per_epoch / max(1, steps_per_epoch - steps_per_epoch // 2)
            affordable = 1 + int((settings.time_budget_s - (time.time() - start)) / max(1e-6, pace))
            epochs = min(settings.epochs, max(2, affordable))
            log.info("time budget %.0f s: %d epochs", settings.time_budget_s, epochs)
        if val_images is not None and (epoch + 1 == epochs or (epoch + 1) % 5 == 0):
            record["val_top1"].append((epoch + 1, evaluate_on_device(model, val_images, val_labels, settings.input_size)))
            log.info("epoch %d/%d: loss %.4f val top-1 %.4f", epoch + 1, epochs, record["loss"][-1],
                     record["val_top1"][-1][1])
        epoch += 1
    record["epochs"] = epochs
    record["train_seconds"] = round(time.time() - start, 1)
    model.eval().to("cpu").to(memory_format=torch.contiguous_format)
    return record
