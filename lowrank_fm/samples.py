"""Fitting samples for data-driven solvers, drawn during the layer-wise pass from whole feature maps.

For each calibration image a fixed number of output positions is drawn (seeded by the run's seed and the
layer's name, one stream per layer consumed image after image, so the draws of an image depend only on its
ordinal: a shard of the images starting at ordinal s skips the stream of the s images before it and draws
exactly what one process draws for those images, whatever the batch sizes); at each one the patch of the layer's input in the APPROXIMATED network (xhat) is the
regressor and the ORIGINAL layer's response y = W x + b, with x the patch of the layer's input in the
original network at the same position, is the target. Unlike the calibration store, which keeps a few
positions per image, any number of positions can be drawn here: the original network runs alongside.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import torch
from torch import nn

from .methods.base import LayerData, unfold_weight
from .patches import output_grid, patches_at

__all__ = ["draw_positions", "layer_data_from_maps", "skip_draws"]

_SKIP_CHUNK = 1 << 22  # random numbers drawn per step when skipping the draws of earlier images


def skip_draws(n_images: int, grid: tuple[int, int], per_image: int, generator: torch.Generator) -> None:
    """Advance ``generator`` past what :func:`draw_positions` draws for ``n_images`` images (a shard's offset).

    CPU torch random numbers are drawn one after another, so ``torch.rand(a, c)`` then ``torch.rand(b, c)``
    give the numbers of ``torch.rand(a + b, c)``: skipping ``n_images * cells`` numbers puts the stream where one
    process is at that image. Nothing is drawn when every position is taken. Drawn in chunks: bounded memory.
    """
    cells = grid[0] * grid[1]
    if min(int(per_image), cells) == cells:
        return
    left = int(n_images) * cells
    while left > 0:
        step = min(left, _SKIP_CHUNK)
        torch.rand(step, generator=generator)
        left -= step


def draw_positions(n_images: int, grid: tuple[int, int], per_image: int, generator: torch.Generator
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``per_image`` distinct output positions per image (all of them when the grid is smaller).

    Returns
    -------
    image : (n,) index of each sample's image, 0 <= image < n_images
    position : (n, 2) (row, col) of each sample
    """
    cells = grid[0] * grid[1]
    k = min(int(per_image), cells)
    if k == cells:
        flat = torch.arange(cells).expand(n_images, cells)
    else:
        flat = torch.rand(n_images, cells, generator=generator).argsort(dim=1)[:, :k]
    image = torch.arange(n_images).repeat_interleave(k)
    flat = flat.reshape(-1)
    return image, torch.stack([flat // grid[1], flat % grid[1]], dim=1)


@torch.no_grad()
def layer_data_from_maps(name: str, module: nn.Module, inputs: Sequence[torch.Tensor],
                         reference_inputs: Sequence[torch.Tensor], n_fit: int, per_image: int, seed: int,
                         activation: str, first_ordinal: int = 0,
                         shortcut_shift: Sequence[torch.Tensor] | None = None,
                         shortcut_value: Sequence[torch.Tensor] | None = None) -> LayerData:
    """A layer's :class:`LayerData` from its input maps in the approximated and the original network.

    Parameters
    ----------
    name : the layer's qualified name (seeds the positions with ``seed``)
    module : the ORIGINAL (folded) layer, nn.Conv2d (groups = 1) or nn.Linear; W (d, p), b (d,)
    inputs : per batch, the layer's input in the approximated network, (B, C, H, W) or (B, in)
    reference_inputs : per batch, the layer's input in the original network (same shapes)
    n_fit : images with ordinal >= n_fit (counted over the batches in order) are held out
    per_image : positions drawn per image
    activation : the nonlinearity after the layer, stored in the result
    first_ordinal : the ordinal of the first image of ``inputs`` among all calibration images (a rank's shard
        under torch.distributed): positions are drawn as one process draws them for these images, and the
        held-out rows are those with ordinal >= n_fit
    shortcut_shift : per batch, for a layer whose output y feeds a residual sum s = y + v, the tensor v - vhat
        shaped as the layer's output (v in the original network, vhat in the approximated one; see
        :class:`~lowrank_fm.layerwise.LayerwisePass`), or None
    shortcut_value : per batch vhat (same shapes), or None: its rows become the result's ``offset``, so that
        ``activation`` (then the one after the sum) can be applied to the sums

    Returns
    -------
    LayerData with inputs (n, p) = xhat patches in the network's precision (float32: 64 positions x p
    values per image add up), targets (n, d) = x patches @ W^T + b in float64, plus v - vhat at the same
    positions with ``shortcut_shift``: a layer that reaches these targets from xhat makes the sum the next
    layers see, yhat + vhat, equal to the original's y + v.
    """
    weight32 = unfold_weight(module).to(module.weight.dtype)
    bias = None if module.bias is None else module.bias.detach().double().cpu()
    generator = torch.Generator().manual_seed((int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
    xs, ys, held, offsets = [], [], [], []
    seen = int(first_ordinal)
    for index, (approx, original) in enumerate(zip(inputs, reference_inputs)):
        n_images = approx.shape[0]
        if index == 0 and seen > 0:  # a shard: skip the earlier images' draws (they depend on ordinals only)
            skip_draws(seen, output_grid(module, approx), per_image, generator)
        image, position = draw_positions(n_images, output_grid(module, approx), per_image, generator)
        image, position = image.to(approx.device), position.to(approx.device)
        xs.append(patches_at(module, approx, image, position).cpu())  # the network's precision (float32)
        # the targets in the layer's own precision (as the network computes them), then float64
        target = (patches_at(module, original, image, position).cpu() @ weight32.T).double()
        if bias is not None:
            target = target + bias
        if shortcut_shift is not None:
            target = target + _rows_at(module, shortcut_shift[index], image, position).cpu().double()
        if shortcut_value is not None:
            offsets.append(_rows_at(module, shortcut_value[index], image, position).cpu().double())
        ys.append(target)
        held.append((image.cpu() + seen) >= n_fit)
        seen += n_images
    return LayerData(torch.cat(xs), torch.cat(ys), torch.cat(held), activation,
                     offset=torch.cat(offsets) if offsets else None)


def _rows_at(module: nn.Module, output: torch.Tensor, image: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """(n, d): a layer's output-shaped tensor at the sampled output positions (conv: (B, d, H', W');
    Linear: (B, d) or (B, ..., d) with the middle dims flattened into tokens, ``position[:, 0]``)."""
    if isinstance(module, nn.Conv2d):
        return output[image, :, position[:, 0], position[:, 1]]
    return output.reshape(output.shape[0], -1, output.shape[-1])[image, position[:, 0]]
