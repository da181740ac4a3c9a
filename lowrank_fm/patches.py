"""Input patches of a layer at chosen output positions: the x of y = W x + b, flattened like the weight.

For a conv with kernel (kh, kw), stride, padding and dilation, the patch behind output position (h, w) is
the (c, kh, kw) block that ``torch.nn.functional.unfold`` puts in column h * W' + w, flattened with c
slowest, the same order as ``weight.reshape(d, -1)``. For a Linear layer the "patch" is the input row.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["output_grid", "patches_at"]


def output_grid(module: nn.Module, inputs: torch.Tensor) -> tuple[int, int]:
    """(H', W') of ``module``'s output for ``inputs``; (tokens, 1) for a Linear layer."""
    if isinstance(module, nn.Conv2d):
        sizes = []
        for axis in (0, 1):
            span = module.dilation[axis] * (module.kernel_size[axis] - 1) + 1
            sizes.append((inputs.shape[2 + axis] + 2 * module.padding[axis] - span) // module.stride[axis] + 1)
        return sizes[0], sizes[1]
    return (inputs[0].numel() // inputs.shape[-1]), 1


def patches_at(module: nn.Module, inputs: torch.Tensor, image: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """Patches of ``inputs`` behind the given output positions.

    Parameters
    ----------
    module : nn.Conv2d (groups = 1) or nn.Linear
    inputs : (B, C, H, W) for a conv; (B, in) or (B, ..., in) for a Linear
    image : (n,) index of each sample's image within this batch
    position : (n, 2) output (row, col) of each sample; for a Linear with middle dims, (p, 0)

    Returns
    -------
    (n, p) with p = C kh kw (conv) or in (Linear), in the weight's dtype order.
    """
    image = image.long()
    position = position.long()
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            raise ValueError(f"patches_at: grouped convs (groups={module.groups}) are not supported")
        # gather only the asked-for windows (unfolding the whole map costs (H' W') / n times more): input row
        # h s_h + i d_h - p_h and column w s_w + j d_w - p_w for kernel offset (i, j), zeros outside
        (kh, kw), (sh, sw), (dh, dw), (ph, pw) = module.kernel_size, module.stride, module.dilation, module.padding
        padded = F.pad(inputs, (pw, pw, ph, ph))
        rows = position[:, :1] * sh + torch.arange(kh, device=inputs.device) * dh  # (n, kh)
        cols = position[:, 1:] * sw + torch.arange(kw, device=inputs.device) * dw  # (n, kw)
        blocks = padded[image[:, None, None], :, rows[:, :, None], cols[:, None, :]]  # (n, kh, kw, C)
        return blocks.permute(0, 3, 1, 2).reshape(image.shape[0], -1)
    flat = inputs.reshape(inputs.shape[0], -1, inputs.shape[-1])
    return flat[image, position[:, 0]]
