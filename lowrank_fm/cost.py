"""Parameter and multiply-accumulate (MAC) counts of Conv2d and Linear layers, measured by one forward pass.

MACs of a conv per image = output positions * out_channels * (in_channels / groups) * kh * kw;
of a Linear = output positions * out_features * in_features. Other modules (BatchNorm, pooling,
activations) are not counted: the report's totals are sums over conv and linear layers.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .batches import batch_size_of
from .surgery import run_with_hooks

__all__ = ["LayerCost", "measure_costs", "module_params"]


@dataclass(frozen=True)
class LayerCost:
    """Cost of one leaf Conv2d/Linear per image: ``macs``, ``positions`` (output positions of its first call),
    ``out_shape`` / ``in_shape`` (per image), and ``calls`` (how many times it ran in one forward; shared
    layers run more than once)."""

    macs: int
    positions: int
    out_shape: tuple[int, ...]
    calls: int = 1
    in_shape: tuple[int, ...] = ()


def module_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def measure_costs(model: nn.Module, example_input) -> dict[str, LayerCost]:
    """Per-image cost of every leaf Conv2d / Linear (by qualified name) from one forward pass.

    A layer called several times in one forward has its costs summed.
    """
    batch = batch_size_of(example_input)
    names = {id(m): n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    costs: dict[str, LayerCost] = {}

    def hook(module, inputs, output):
        name = names[id(module)]
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            positions = output.numel() // (output.shape[0] * module.out_channels)
            macs = positions * module.out_channels * (module.in_channels // module.groups) * kh * kw
        else:
            positions = output.numel() // (output.shape[0] * module.out_features) if output.ndim > 1 else 1
            macs = positions * module.out_features * module.in_features
        # a detector may run a head on a different number of items than images: normalise by images
        scale = output.shape[0] / batch if output.ndim > 1 else 1.0
        previous = costs.get(name)
        if previous is None:
            costs[name] = LayerCost(int(round(macs * scale)), positions, tuple(output.shape[1:]),
                                    in_shape=tuple(inputs[0].shape[1:]))
        else:
            costs[name] = LayerCost(previous.macs + int(round(macs * scale)), previous.positions, previous.out_shape,
                                    previous.calls + 1, previous.in_shape)

    run_with_hooks(model, example_input, forward_hooks={m: hook for m in model.modules() if id(m) in names})
    return costs
