"""End-to-end output matching: the last stage of the whole-model pass.

All factorized layers are refined jointly so that the approximated network's outputs match the original
network's outputs on the calibration images: min over the factors of mean || g(x) - ghat(x) ||^2 where g is
the original network and ghat the approximated one. No labels, no data beyond the calibration set, and only
the factors move (every other parameter is frozen). Related practice: block-wise reconstruction in
post-training quantization (BRECQ, Li et al. ICLR 2021). The result is kept only when it lowers the output
error on held-out calibration images.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

__all__ = ["match_outputs"]

log = logging.getLogger(__name__)


def _output_error(model: nn.Module, batches: Sequence, targets: Sequence[torch.Tensor]) -> float:
    """Mean squared output difference per image, summed over output entries."""
    total, count = 0.0, 0
    with torch.no_grad():
        for batch, target in zip(batches, targets):
            total += float((model(batch) - target).double().pow(2).sum())
            count += target.shape[0]
    return total / max(count, 1)


def shift_and_flip(images: torch.Tensor, max_shift: int, flip: bool, generator: torch.Generator) -> torch.Tensor:
    """A random translation by up to ``max_shift`` pixels (zero fill) and, with ``flip``, a random horizontal
    flip of each image in a batch (B, C, H, W): label-free views on which the two networks are compared."""
    b, _, h, w = images.shape
    padded = torch.nn.functional.pad(images, (max_shift,) * 4)
    offsets = torch.randint(0, 2 * max_shift + 1, (b, 2), generator=generator)
    out = torch.stack([padded[i, :, dy:dy + h, dx:dx + w] for i, (dy, dx) in enumerate(offsets.tolist())])
    if flip:
        mirrored = torch.rand(b, generator=generator) < 0.5
        out[mirrored] = out[mirrored].flip(-1)
    return out


def match_outputs(
    reference: nn.Module,
    model: nn.Module,
    factor_modules: Sequence[nn.Module],
    fit_batches: Sequence,
    heldout_batches: Sequence,
    *,
    steps: int = 300,
    lr: float = 1e-4,
    batch_images: int | None = None,
    augment_shift: int = 0,
    augment_flip: bool = False,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Refine ``factor_modules`` (parts of ``model``) in place so that ``model`` matches ``reference``.

    Parameters
    ----------
    reference : the original network (after BatchNorm folding), outputs g(x) of shape (B, ...)
    model : the approximated network, containing ``factor_modules``
    factor_modules : the factorized layers whose parameters are trained
    fit_batches, heldout_batches : model inputs (tensors); outputs must be tensors
    steps : Adam steps (one batch each, cycling through ``fit_batches``); lr : Adam learning rate
    batch_images : images per step (tensor inputs are re-batched to this size; None keeps the given batches)
    augment_shift, augment_flip : with image batches (B, C, H, W), each step compares the networks on a
        random view of its batch (:func:`shift_and_flip`), the target computed by ``reference`` on that view

    Returns
    -------
    dict with ``steps``, ``seconds``, ``heldout_error_before``, ``heldout_error_after`` (mean squared output
    difference per image) and ``applied`` (False when refinement did not help and was undone).
    """
    start = time.perf_counter()
    if batch_images and fit_batches and all(torch.is_tensor(b) for b in fit_batches):
        fit_batches = list(torch.cat(list(fit_batches)).split(int(batch_images)))
    with torch.no_grad():
        fit_targets = [reference(b) for b in fit_batches]
        held_targets = [reference(b) for b in heldout_batches]
    if not all(torch.is_tensor(t) for t in fit_targets + held_targets):
        return {"applied": False, "reason": "model outputs are not tensors", "steps": 0, "seconds": 0.0}
    check_batches = heldout_batches or fit_batches
    check_targets = held_targets or fit_targets
    before = _output_error(model, check_batches, check_targets)
    saved = [copy.deepcopy(m.state_dict()) for m in factor_modules]
    params = [p for m in factor_modules for p in m.parameters()]
    flags = {id(p): p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(steps, 1))
    was_training = model.training
    model.eval()
    augment = augment_shift > 0 or augment_flip
    generator = torch.Generator().manual_seed(seed)
    try:
        with torch.enable_grad():
            for step in tqdm(range(steps), desc="output matching", disable=not progress, leave=False):
                index = step % len(fit_batches)
                batch, target = fit_batches[index], fit_targets[index]
                if augment and torch.is_tensor(batch) and batch.ndim == 4:
                    batch = shift_and_flip(batch, augment_shift, augment_flip, generator)
                    with torch.no_grad():
                        target = reference(batch)
                loss = (model(batch) - target).pow(2).sum(dim=tuple(range(1, target.ndim))).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
    finally:
        for p in model.parameters():
            p.requires_grad_(flags[id(p)])
        model.train(was_training)
    after = _output_error(model, check_batches, check_targets)
    applied = after < before
    if not applied:
        for module, state in zip(factor_modules, saved):
            module.load_state_dict(state)
    seconds = time.perf_counter() - start
    log.info("output matching: held-out output error %.4g -> %.4g (%s, %.1f s)", before, after,
             "kept" if applied else "undone", seconds)
    return {"applied": applied, "steps": steps, "seconds": seconds, "heldout_error_before": before,
            "heldout_error_after": after if applied else before, "heldout_error_refined": after}
