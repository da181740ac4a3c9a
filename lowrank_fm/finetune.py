"""Optional fine-tuning of an approximated model: a short training of its parameters (the factors of every
factorized layer, the kept layers and their biases) that keeps its structure, with labels or label-free.

The method of the package needs no training; this is the extra step users take when they have a training
split and a few minutes: the last column of the Tucker-2 design's experiment table (issue 19).
"""

from __future__ import annotations

import copy
import logging
import math
import statistics
import time
from collections.abc import Callable, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset
from tqdm.auto import tqdm

__all__ = ["finetune", "FINETUNE_MODES", "DISTILL_LOSSES"]

log = logging.getLogger(__name__)

FINETUNE_MODES = ("labels", "distill")
DISTILL_LOSSES = ("mse", "kl")


def _split_batch(batch) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(images, labels or None) of a loader item: an ``(images, labels, ...)`` pair or an image tensor."""
    if torch.is_tensor(batch):
        return batch, None
    if isinstance(batch, (list, tuple)) and batch and torch.is_tensor(batch[0]):
        labels = batch[1] if len(batch) > 1 and torch.is_tensor(batch[1]) else None
        return batch[0], labels
    raise TypeError(f"finetune: a batch must be an image tensor or an (images, labels) pair, got {type(batch).__name__}")


def _loader(train_data, batch_size: int, seed: int, device) -> tuple[Iterable, int | None]:
    """A map-style data set becomes a loader that reshuffles each epoch from its own seeded generator; any
    other iterable of batches (a DataLoader) is used as given. Returns (loader, number of images or None)."""
    if isinstance(train_data, IterableDataset):  # items in its own order, batched
        return DataLoader(train_data, batch_size=batch_size), None
    if isinstance(train_data, Dataset) and hasattr(train_data, "__len__"):
        if len(train_data) == 0:
            raise ValueError("finetune: train_data is empty; pass a data set with at least one image")
        generator = torch.Generator().manual_seed(seed)
        loader = DataLoader(train_data, batch_size=batch_size, shuffle=True, generator=generator,
                            pin_memory=str(device).startswith("cuda"))
        return loader, len(train_data)
    return train_data, None


OUTLIER_ENERGY = 100.0  # "mse" distillation: an image whose teacher logits carry more than this multiple of
# the batch's median energy counts as if scaled down to it


def outlier_weights(teacher: torch.Tensor) -> torch.Tensor:
    """Per-image weights (B,) of the ``"mse"`` distillation loss from the teacher's logits t (B, classes):
    w_i = min(1, c * median_j ||t_j||^2 / ||t_i||^2) with c = ``OUTLIER_ENERGY`` (for an even batch the
    median is the lower of the two middle values, as ``torch.median`` takes it).

    Every weight is exactly 1 unless an image's logit energy ||t_i||^2 exceeds c times the batch's median; such
    an image's squared error then counts as if its logits (and the student's error on them) were scaled down to
    that energy. A network can give a few images logits thousands of times larger than the rest (on the
    DenseNet-161 of issue 19, 5 in 1,000 CIFAR-10 training images over 280 times the median energy, up to
    8,500 times; the other four architectures stay within 10 times): unweighted, those images own the gradient
    of every batch they are in, and one epoch of distillation took that model from 75% to 49% top-1."""
    energy = teacher.detach().pow(2).sum(dim=1)
    cap = OUTLIER_ENERGY * energy.median()
    outlier = (energy > cap) & (cap > 0)  # a batch whose median energy is 0 has no scale to cap at
    return torch.where(outlier, cap / energy, torch.ones_like(energy))


def _distill_loss(student: torch.Tensor, teacher: torch.Tensor, loss: str, temperature: float) -> torch.Tensor:
    if loss == "mse":  # mean over images of the squared logit difference, summed over classes, outliers capped
        return ((student - teacher).pow(2).sum(dim=1) * outlier_weights(teacher)).mean()
    log_p_student = F.log_softmax(student / temperature, dim=1)
    p_teacher = F.softmax(teacher / temperature, dim=1)
    return F.kl_div(log_p_student, p_teacher, reduction="batchmean") * temperature**2


MAX_RESTARTS = 2  # a diverging fine-tune starts again at lr / 10, at most this many times
DIVERGENCE_WINDOW = 20  # batches: the starting model's median loss on the first sets the scale; the last steps' median is compared
DIVERGENCE_FACTOR = 4.0  # diverged: the latest steps' median loss above this multiple of the starting model's
DIVERGENCE_FLOOR = 0.01  # ... or of this share of a blank model's loss (zero logits), whichever is larger
SCALE_FLOOR = 1e-3  # a tensor's step scale is max(its RMS, this): a zero (or tiny) tensor still moves (Adafactor's
# epsilon_2, Shazeer and Stern 2018)


def relative_step_groups(params: list[torch.Tensor], lr: float) -> list[dict]:
    """Adam parameter groups whose rates are relative to each tensor's size: tensor p (any shape) trains at
    rate lr * max(RMS(p), ``SCALE_FLOOR``), RMS(p) = sqrt(mean(p^2)) measured now (before any step).

    Adam's update moves every element by about its rate whatever the gradient's size (exactly the rate, in
    sign, at the first step), so one absolute rate is a large relative change to a tensor of small weights and a
    negligible one to a tensor of large weights; with these groups each tensor changes by about lr of its own
    RMS per step. Returns one ``{"params": [p], "lr": rate}`` per tensor, in order."""
    groups = []
    for p in params:
        scale = max(p.detach().float().pow(2).mean().sqrt().item(), SCALE_FLOOR)
        groups.append({"params": [p], "lr": lr * scale})
    return groups


class _Diverged(Exception):
    def __init__(self, message: str, step: int) -> None:
        super().__init__(message)
        self.step = step


class _Run:
    """The training loop of :func:`finetune` for one learning rate; raises :class:`_Diverged` when the loss
    becomes non-finite or the median of the last ``DIVERGENCE_WINDOW`` step losses exceeds ``DIVERGENCE_FACTOR``
    times the scale: the larger of the starting model's median loss on the first ``DIVERGENCE_WINDOW`` batches
    (measured on a frozen copy, so the scale is the untouched model's even when the first steps already blow it
    up) and ``DIVERGENCE_FLOOR`` times a blank model's median (zero logits: log(classes) with labels, the
    teacher's mean squared logits by distillation). A fine-tune starts from a good model: its loss should fall,
    and an Adam step too large for the small factors of a low-rank layer makes it explode instead. The floor
    keeps a start that is already (almost) the teacher, loss near 0, from reading the noise of the first steps
    as divergence. Medians, not means: one batch of a few extreme images (a loss thousands of times the others')
    is no divergence, and a mean over 20 steps would read it as one; a diverging model's loss rises on every
    batch and moves the median."""

    def __init__(self, student, params, mode, teacher, distill_loss, temperature, device, progress, evaluate,
                 epochs, steps_per_epoch) -> None:
        self.student, self.params, self.mode, self.teacher = student, params, mode, teacher
        self.distill_loss, self.temperature, self.device = distill_loss, temperature, device
        self.progress, self.evaluate, self.epochs, self.steps_per_epoch = progress, evaluate, epochs, steps_per_epoch
        self.start = copy.deepcopy(student)  # the model every try starts from; its loss sets the scale
        self.eval_seconds = 0.0

    def inputs(self, batch) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(images, labels, teacher's outputs) of a batch on the device; labels None in distill mode."""
        images, labels = _split_batch(batch)
        images = images.to(self.device, non_blocking=True)
        if self.mode == "labels":
            if labels is None:
                raise ValueError("finetune: mode='labels' needs (images, labels) batches; these have no "
                                 "labels: pass mode='distill' with teacher= to train without labels")
            return images, labels.to(self.device, non_blocking=True), None
        with torch.no_grad():
            return images, None, self.teacher(images)

    def objective(self, outputs: torch.Tensor, labels, target) -> torch.Tensor:
        if self.mode == "labels":
            return F.cross_entropy(outputs, labels)
        return _distill_loss(outputs, target, self.distill_loss, self.temperature)

    def train(self, loader, lr: float, record: dict) -> None:
        optimizer = torch.optim.Adam(relative_step_groups(self.params, lr))
        scheduler = (torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, self.epochs * self.steps_per_epoch)
                     if self.steps_per_epoch else None)
        first: list[float] = []
        blank: list[float] = []
        latest: list[float] = []
        final: dict[str, list[float]] = {"start": [], "trained": []}  # the last epoch's last batches, both models
        for epoch in range(self.epochs):
            total, count = 0.0, 0
            bar = tqdm(loader, desc=f"fine-tune ({self.mode}) epoch {epoch + 1}/{self.epochs}",
                       disable=not self.progress, leave=False, total=self.steps_per_epoch)
            check_from = (self.steps_per_epoch - DIVERGENCE_WINDOW if self.steps_per_epoch and epoch == self.epochs - 1
                          else None)
            for index, batch in enumerate(bar):
                images, labels, target = self.inputs(batch)
                loss = self.objective(self.student(images), labels, target)
                value, size = loss.item(), images.shape[0]
                if check_from is not None and index >= check_from:
                    with torch.no_grad():
                        final["start"].append(self.objective(self.start(images), labels, target).item())
                    final["trained"].append(value)
                step = record["steps"] + 1
                if not math.isfinite(value):
                    raise _Diverged(f"the loss became {value} at epoch {epoch + 1}, step {step} with lr {lr:g}", step)
                if len(first) < DIVERGENCE_WINDOW:
                    with torch.no_grad():
                        start_outputs = self.start(images)
                        first.append(self.objective(start_outputs, labels, target).item())
                        blank.append(self.objective(torch.zeros_like(start_outputs), labels, target).item())
                latest = (latest + [value])[-DIVERGENCE_WINDOW:]
                if len(latest) == DIVERGENCE_WINDOW:  # the window is full (and so is the start's, filled alongside)
                    start_loss, blank_loss, now = (statistics.median(v) for v in (first, blank, latest))
                    floored = DIVERGENCE_FLOOR * blank_loss > start_loss
                    scale = DIVERGENCE_FLOOR * blank_loss if floored else start_loss
                    if now > DIVERGENCE_FACTOR * scale:
                        floor = f", floored at {scale:.4g}" if floored else ""
                        raise _Diverged(f"the median loss rose from {start_loss:.4g} (the starting model, first "
                                        f"{len(first)} batches{floor}) to {now:.4g} (last {len(latest)} steps) "
                                        f"by step {step} with lr {lr:g}", step)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if scheduler is not None:
                    scheduler.step()
                record["steps"] = step
                total += value * size
                count += size
                bar.set_postfix(loss=f"{total / count:.4f}")
            if count == 0:
                raise ValueError("finetune: train_data gave no batches; pass a data set with at least one image")
            if final["trained"]:  # worse: above the start by more than the guard's floor, 1% of a blank model's
                record["final_check"] = {"batches": len(final["trained"]),
                                         "start_median": statistics.median(final["start"]),
                                         "trained_median": statistics.median(final["trained"]),
                                         "tolerance": DIVERGENCE_FLOOR * statistics.median(blank)}
            record["images"] = count
            record["loss"].append(total / count)
            message = f"fine-tune ({self.mode}) epoch {epoch + 1}/{self.epochs}: loss {total / count:.4f}"
            if self.evaluate is not None:
                eval_start = time.perf_counter()
                result = self.evaluate(self.student)
                self.eval_seconds += time.perf_counter() - eval_start
                if not isinstance(result, Mapping) or "top1" not in result:
                    raise TypeError(f"finetune: evaluate must return a mapping with 'top1' (and 'top5'), got "
                                    f"{type(result).__name__}")
                self.student.eval()  # whatever evaluate did, training goes on in eval mode (see above)
                record["top1"].append(result["top1"])
                record["top5"].append(result.get("top5"))
                message += f", top-1 {result['top1']:.4f}"
                if "images" in result:
                    record["eval_images"] = result["images"]
                    message += f" on {result['images']} images"
            log.info(message)


def finetune(
    model: nn.Module,
    train_data,
    *,
    epochs: int,
    mode: str = "labels",
    teacher: nn.Module | None = None,
    lr: float = 3e-3,
    batch_size: int = 64,
    evaluate: Callable[[nn.Module], Mapping] | None = None,
    start_top1: float | None = None,
    distill_loss: str = "mse",
    temperature: float = 4.0,
    device: str | torch.device = "cpu",
    seed: int = 0,
    progress: bool = True,
) -> tuple[nn.Module, dict]:
    """Train a copy of ``model`` (an approximated model) for ``epochs`` epochs; its structure is kept.

    Every floating-point parameter of the model is trained (the factors of each factorized layer, the layers
    that were kept, all biases); no module is added, removed or reshaped, so ranks, parameter counts and MACs
    are those of the model given. The model runs in eval mode throughout: its BatchNorms were folded into
    the convs by :func:`lowrank_fm.approximate` (so there are no batch statistics to update; any BatchNorm
    left keeps its running statistics, and dropout is off), and the function trained is the one deployed.

    Parameters
    ----------
    model : the approximated model (left untouched; a copy is trained). Outputs logits of shape (B, classes).
    train_data : a map-style data set of ``(image, label)`` items or of images (reshuffled each epoch by a
        generator seeded with ``seed``), an ``IterableDataset`` of such items (batched in its own order), or
        any other iterable of batches (a DataLoader, a list; used in its own order): ``(images, labels)``
        pairs or image tensors (N, C, H, W). ``mode="distill"`` ignores the labels.
    epochs : passes over ``train_data`` (>= 1).
    mode : ``"labels"``: cross-entropy with the labels. ``"distill"``: label-free, the model learns the
        outputs of ``teacher`` on the same images (see Notes).
    teacher : the original model (``mode="distill"`` only, on ``device``), run in eval mode without gradients,
        with its BatchNorm as given; its train/eval mode is restored afterwards.
    lr : relative learning rate (default 3e-3): each parameter tensor p trains with Adam at
        lr * max(RMS(p), 1e-3) (its RMS before training), at the start of a cosine decay to 0 over all steps.
    batch_size : images per step when ``train_data`` is a data set.
    evaluate : called after each epoch with the trained copy (in eval mode, on ``device``); returns a mapping
        with ``top1`` and ``top5`` (fractions in [0, 1]; ``top5`` may be None) and optionally ``images`` (how
        many were evaluated), e.g. ``lambda m: lowrank_fm.zoo.evaluate.accuracy(m, test_set, device=device)``.
        The package itself knows no data set: None (default) measures nothing.
    start_top1 : ``model``'s top-1 when the caller has measured it: the ``top1_returned`` of a run whose final
        check keeps the start (None: ``evaluate`` measures it then).
    distill_loss, temperature : ``"mse"`` (default) or ``"kl"`` with temperature T (see Notes).
    device, seed, progress : where to train; the shuffling seed; a tqdm bar per epoch.

    Returns
    -------
    model : the trained copy, in eval mode; or, when training raised the loss on the training images (see
        Notes), a copy of ``model`` unchanged (``kept_start`` in the record).
    record : dict with ``mode``, ``epochs``, ``loss`` (mean training loss of each epoch, measured on each
        batch before its step), ``top1`` / ``top5`` (after each epoch, when ``evaluate`` is given, else
        empty; ``eval_images``: the last evaluation's ``images``), ``seconds`` (all), ``train_seconds``,
        ``eval_seconds`` (in ``evaluate``), ``steps``, ``images`` (per epoch),
        ``parameters`` (count trained), ``final_check`` (the last epoch's last 20 batches: ``start_median``
        and ``trained_median`` losses and the ``tolerance``; absent when the loader has no length),
        ``kept_start``, ``top1_returned`` (the returned model's top-1: the last epoch's, or the start's when
        kept), ``restarts`` (one entry per diverged try: its ``step``, ``lr`` and ``reason``) and the
        settings (``lr``: the relative rate of the try that finished, ``lr_per_tensor``: how it scales each
        tensor, ``batch_size``, ``optimizer``, ``schedule``,
        ``objective`` (cross-entropy, mse or kl), ``temperature``, ``seed``, ``device``).

    Raises
    ------
    ValueError : bad ``mode``, ``epochs``, ``lr``, ``batch_size`` or ``distill_loss``; distill without a
        teacher; labels mode on batches without labels.
    TypeError : ``evaluate`` returned something other than a mapping with ``top1``.
    FloatingPointError : the loss diverged (see Notes) at ``lr``, ``lr / 10`` and ``lr / 100``.

    Notes
    -----
    Optimiser: Adam (betas 0.9/0.999, no weight decay) with one rate per parameter tensor,
    lr * max(RMS(p), 1e-3), and a cosine decay to 0 over all steps. Adam moves every element by about its rate
    whatever its gradient, so a single absolute rate is a large change to a tensor of small weights (the
    factors of a 4096-wide Linear) and a small one to a tensor of large weights (a conv with a BatchNorm
    folded in); a rate relative to each tensor's RMS (as Adafactor's relative step, Shazeer and Stern 2018)
    moves each by about the same share of its size. Chosen on one epoch of the whole training split
    (2026-11-26, one CPU thread, labels), against the former absolute 3e-4 on the same approximated models:
    alexnet-cifar10 at 2x (default, 80.53% approximated, as the original) 79.95% at 3e-4 absolute, 80.42% at
    1e-4 absolute, 80.41% / 80.73% at 1e-2 / 3e-3 relative (its weights' RMS is 0.005 to 0.02: 3e-4 is a
    2-6% change per step, and the epoch's training loss rose from 0.30 to 0.54); resnet20-cifar10 at 2x (84.98%)
    85.31% at 3e-4 absolute, 85.27% at 3e-3 relative; vgg-fmnist at 4x (94.24%) 94.55% / 94.51%. Earlier, with
    the absolute rate: vgg-fmnist at 4x (fm, 93.76%) reached 94.01% / 94.10% with 1e-4 / 3e-4 and resnet20-cifar10
    at 2x (81.04%) 82.95% / 83.63% / 83.74% with 1e-4 / 3e-4 / 1e-3. With only a few hundred training images
    (the embedded Fashion-MNIST sample, which is also the calibration set) fine-tuning does not help (see README).

    Divergence: a fine-tune starts from a good model, so its loss should fall. When a step's loss is not
    finite, or the median loss of the last 20 steps exceeds 4 times the starting model's median loss on the
    first 20 batches (measured without training it, on a frozen copy) or, when larger, 4 times 1% of a blank
    model's (zero logits: log(classes) with labels, the teacher's mean squared logits by distillation; a
    distillation that starts at the teacher has a loss near 0, and the first steps' noise is not divergence;
    medians, so that one batch of extreme images is not divergence either), the try is
    abandoned and training starts again from the approximated model (a data set: the same shuffling; a loader given
    is iterated again, a one-shot generator cannot restart) with a tenth of the learning
    rate, at most twice (``restarts`` in the record, a warning in the log). ShuffleNet V2 at 3x MACs went from
    68% to 10% top-1 in one epoch at an absolute 3e-4 before this guard existed.

    Final check: on the last epoch's last 20 batches the trained model's losses (each measured before its
    step, as training goes) are compared with the approximated model's on the same batches; when the trained
    median exceeds the start's by more than the divergence guard's floor (1% of a blank model's median loss:
    0.023 with ten classes), training made the model worse on its own training images and the approximated
    model is returned unchanged, with a warning (``kept_start``). Training images only: the test split decides
    nothing. ShuffleNet V2 at 3x MACs (rank-1 factors with biases of about 350 that cancel in stage 4) went
    from 68% to 55% top-1 in one epoch at the rate that did not diverge (median loss 1.16 -> 1.44 on those
    batches); AlexNet at 2x, which had lost nothing, rose from 80.53% to 80.73% with a median 0.335 -> 0.354,
    within the floor (without it, the check would have thrown that gain away).

    Distillation loss, with z = the model's logits and t = the teacher's on the same image:

    - ``"mse"`` (default): L = mean over images i of w_i ||z_i - t_i||^2 (summed over classes), logit
      matching (Ba and Caruana 2014), with w_i = 1 except for an image whose teacher logits carry more than
      100 times the batch's median energy ||t||^2 (:func:`outlier_weights`): its error is scaled down to
      that energy, so that a few images with exploding logits do not own the gradient (DenseNet-161 on
      CIFAR-10: 75% -> 49% top-1 in one epoch unweighted). It is what the approximation itself minimises
      layer by layer (output reconstruction), keeps all of the teacher's information (also the logits'
      scale), has no temperature to tune, and is the limit of the softened KL for a large temperature
      (Hinton et al. 2015: the KL's gradient tends to (z - t) / (N T^2) for zero-mean logits). Kim et al.
      (IJCAI 2021) found logit MSE as good as or better than KL for distillation.
    - ``"kl"``: L = T^2 KL(softmax(t / T) || softmax(z / T)) (Hinton et al. 2015), mean over images; T^2
      keeps the gradient's size independent of T.
    """
    if mode not in FINETUNE_MODES:
        raise ValueError(f"finetune: mode must be one of {FINETUNE_MODES}, got {mode!r}")
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"finetune: epochs must be an integer >= 1, got {epochs!r}")
    if not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"finetune: lr must be a finite number > 0, got {lr!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"finetune: batch_size must be an integer >= 1, got {batch_size!r}")
    if distill_loss not in DISTILL_LOSSES:
        raise ValueError(f"finetune: distill_loss must be one of {DISTILL_LOSSES}, got {distill_loss!r}")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"finetune: temperature must be a finite number > 0, got {temperature!r}")
    if mode == "distill" and teacher is None:
        raise ValueError("finetune: mode='distill' needs teacher= (the original model); with labels use mode='labels'")
    if mode == "labels" and teacher is not None:
        log.warning("finetune: mode='labels' ignores the teacher; pass mode='distill' to learn its outputs")

    start = time.perf_counter()
    device = torch.device(device)
    student = copy.deepcopy(model).to(device).eval()
    params = [p for p in student.parameters() if p.is_floating_point()]
    if not params:
        raise ValueError("finetune: the model has no floating-point parameters to train")
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    teacher_was_training = teacher.training if teacher is not None else False
    if teacher is not None and mode == "distill":
        teacher.eval()
    loader, n_images = _loader(train_data, batch_size, seed, device)
    try:
        steps_per_epoch = len(loader)
    except TypeError:  # a generator, or a DataLoader over an IterableDataset without a length
        steps_per_epoch = None
    record: dict = {
        "mode": mode, "epochs": epochs, "lr": lr, "batch_size": batch_size if n_images is not None else None,
        "optimizer": "adam", "lr_per_tensor": "lr * max(RMS, 1e-3)",
        "schedule": "cosine" if steps_per_epoch else "constant",
        "objective": "cross-entropy" if mode == "labels" else distill_loss,
        "temperature": temperature if mode == "distill" and distill_loss == "kl" else None,
        "seed": seed, "device": str(device), "parameters": sum(p.numel() for p in params),
        "loss": [], "top1": [], "top5": [], "images": None, "steps": 0, "restarts": [],
        "train_seconds": 0.0, "eval_seconds": 0.0,
    }
    run = _Run(student, params, mode, teacher, distill_loss, temperature, device, progress, evaluate, epochs,
               steps_per_epoch)
    try:
        while True:
            try:
                run.train(loader, lr, record)
                break
            except _Diverged as diverged:  # start again from the approximated model, at a tenth of the rate
                if len(record["restarts"]) >= MAX_RESTARTS:
                    raise FloatingPointError(f"finetune: {diverged} (after {MAX_RESTARTS} restarts down to lr {lr:g}); "
                                             f"try a smaller lr") from None
                log.warning("finetune: %s; starting again from the approximated model with lr %g", diverged, lr / 10)
                record["restarts"].append({"step": diverged.step, "lr": lr, "reason": str(diverged)})
                lr /= 10
                student.load_state_dict(run.start.state_dict())
                loader, _ = _loader(train_data, batch_size, seed, device)  # the same shuffling as the first try
                for key in ("loss", "top1", "top5"):
                    record[key] = []
                record["steps"] = 0
                record.pop("final_check", None)
        record["lr"] = lr
        check = record.get("final_check")
        record["kept_start"] = bool(check and check["trained_median"] > check["start_median"] + check["tolerance"])
        record["top1_returned"] = record["top1"][-1] if record["top1"] else None
        if record["kept_start"]:  # training made the model worse on its own training images: return the start
            log.warning("finetune: the trained model's median loss on the last %d batches (%.4g) is above the "
                        "approximated model's on the same batches (%.4g) by more than %.4g: returning the "
                        "approximated model unchanged", check["batches"], check["trained_median"],
                        check["start_median"], check["tolerance"])
            student.load_state_dict(run.start.state_dict())
            record["top1_returned"] = start_top1
            if start_top1 is None and evaluate is not None:
                eval_start = time.perf_counter()
                record["top1_returned"] = evaluate(student)["top1"]
                run.eval_seconds += time.perf_counter() - eval_start
                student.eval()
        record["eval_seconds"] = run.eval_seconds
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
        if teacher is not None:
            teacher.train(teacher_was_training)
    record["seconds"] = time.perf_counter() - start
    record["train_seconds"] = record["seconds"] - record["eval_seconds"]
    return student.eval(), record
