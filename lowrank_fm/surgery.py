"""Module surgery: find layers by qualified name, fold BatchNorm into convs, swap modules.

Nothing here computes a decomposition; the math lives in :mod:`lowrank_fm.methods`.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterable

import torch
from torch import nn

__all__ = [
    "get_module",
    "set_module",
    "find_layers",
    "fold_batchnorm",
    "folded_copy",
    "apply_folds",
    "trace_conv_bn_pairs",
    "run_model",
    "run_with_hooks",
    "check_finite_weights",
]

log = logging.getLogger(__name__)

try:  # torchvision's detection backbones use a BatchNorm with frozen statistics
    from torchvision.ops.misc import FrozenBatchNorm2d as _FrozenBN
except Exception:  # pragma: no cover - torchvision is a dependency, but surgery does not need it
    _FrozenBN = ()

_BN_TYPES = (nn.BatchNorm2d,) + ((_FrozenBN,) if isinstance(_FrozenBN, type) else ())


def get_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule at a qualified name ("features.3", "backbone.body.layer1.0.conv1")."""
    return model.get_submodule(name) if name else model


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at qualified ``name`` by ``module`` (``setattr`` on its parent)."""
    parent_name, _, child = name.rpartition(".")
    setattr(get_module(model, parent_name), child, module)


def find_layers(model: nn.Module, kinds: tuple[type, ...] = (nn.Conv2d, nn.Linear)) -> dict[str, nn.Module]:
    """Every submodule of one of ``kinds``, by qualified name, in registration order (subclasses too)."""
    return {name: module for name, module in model.named_modules() if name and isinstance(module, kinds)}


def run_model(model: nn.Module, batch) -> object:
    """Call ``model`` on one input batch under no_grad (a Tensor, or a list of tensors for detectors)."""
    with torch.no_grad():
        return model(batch)


def run_with_hooks(model: nn.Module, batch, forward_hooks: dict[nn.Module, Callable] | None = None,
                   pre_hooks: dict[nn.Module, Callable] | None = None) -> object:
    """One eval-mode forward of ``model`` with the given hooks installed, removed afterwards (the model's
    training flag is restored)."""
    handles = [m.register_forward_hook(fn) for m, fn in (forward_hooks or {}).items()]
    handles += [m.register_forward_pre_hook(fn) for m, fn in (pre_hooks or {}).items()]
    was_training = model.training
    model.eval()
    try:
        return run_model(model, batch)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)


def trace_conv_bn_pairs(model: nn.Module, example_input) -> list[tuple[str, str]]:
    """(conv name, BatchNorm name) pairs where the BatchNorm consumes exactly the conv's output tensor.

    Found by one forward pass with hooks, so it works on any model (no symbolic tracing): a BatchNorm2d (or
    torchvision's FrozenBatchNorm2d) whose input *is* the output tensor of a Conv2d is paired with it.
    Convs or BatchNorms called more than once per forward (shared weights) are never paired.
    """
    conv_names = {id(m): n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    bn_names = {id(m): n for n, m in model.named_modules() if isinstance(m, _BN_TYPES)}
    outputs: dict[int, tuple[str, torch.Tensor]] = {}
    calls: dict[str, int] = {}
    pairs: list[tuple[str, str]] = []

    def on_conv(module, _inputs, output):
        name = conv_names[id(module)]
        calls[name] = calls.get(name, 0) + 1
        outputs[id(output)] = (name, output)  # keep the tensor alive so its id stays unique

    def on_bn(module, inputs):
        name = bn_names[id(module)]
        calls[name] = calls.get(name, 0) + 1
        hit = outputs.get(id(inputs[0]))
        if hit is not None and hit[1] is inputs[0]:
            pairs.append((hit[0], name))

    run_with_hooks(model, example_input,
                   forward_hooks={m: on_conv for m in model.modules() if isinstance(m, nn.Conv2d)},
                   pre_hooks={m: on_bn for m in model.modules() if isinstance(m, _BN_TYPES)})
    return [(conv, bn) for conv, bn in pairs if calls[conv] == 1 and calls[bn] == 1]


def _fold_one(conv: nn.Conv2d, bn: nn.Module) -> None:
    """W' = W * g / sqrt(v + eps) per output channel; b' = (b - m) * g / sqrt(v + eps) + beta."""
    with torch.no_grad():
        weight64 = conv.weight.double()
        mean, var = bn.running_mean.double(), bn.running_var.double()
        gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(mean)
        beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(mean)
        scale = gamma / torch.sqrt(var + bn.eps)
        bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(mean)
        conv.weight.copy_((weight64 * scale.view(-1, 1, 1, 1)).to(conv.weight.dtype))
        new_bias = ((bias - mean) * scale + beta).to(conv.weight.dtype)
        if conv.bias is None:
            conv.bias = nn.Parameter(new_bias)
        else:
            conv.bias.copy_(new_bias)


def apply_folds(model: nn.Module, pairs: Iterable[tuple[str, str]]) -> None:
    """Fold each BatchNorm into its conv and replace the BatchNorm by ``nn.Identity`` (in place)."""
    for conv_name, bn_name in pairs:
        bn = get_module(model, bn_name)
        if getattr(bn, "running_mean", None) is None:
            raise ValueError(f"cannot fold {bn_name}: it keeps no running statistics (track_running_stats=False)")
        _fold_one(get_module(model, conv_name), bn)
        set_module(model, bn_name, nn.Identity())


def fold_batchnorm(model: nn.Module, example_input) -> list[tuple[str, str]]:
    """Fold every BatchNorm that directly follows a conv into it, in place; returns the folded pairs.

    The model must be in eval mode semantics (running statistics are used). BatchNorms without running
    statistics, or not fed directly by a conv, are left alone.
    """
    pairs = [
        (c, b) for c, b in trace_conv_bn_pairs(model, example_input) if getattr(get_module(model, b), "running_mean", None) is not None
    ]
    apply_folds(model, pairs)
    log.info("folded %d BatchNorm layers into their convs", len(pairs))
    return pairs


def folded_copy(model: nn.Module, example_input) -> tuple[nn.Module, list[tuple[str, str]]]:
    """An eval-mode copy of ``model`` with its BatchNorms folded (:func:`fold_batchnorm`), and the folded
    pairs; ``model`` itself is not touched."""
    folded = copy.deepcopy(model).eval()
    return folded, fold_batchnorm(folded, example_input)


def name_filter(include: Iterable[str] | None, exclude: Iterable[str] = ()) -> Callable[[str], bool]:
    """A predicate on qualified names: included when equal to or under an ``include`` prefix (all when None),
    and not equal to or under an ``exclude`` prefix."""
    include = None if include is None else tuple(include)
    exclude = tuple(exclude)

    def under(name: str, prefix: str) -> bool:
        return name == prefix or name.startswith(prefix + ".")

    def keep(name: str) -> bool:
        if include is not None and not any(under(name, p) for p in include):
            return False
        return not any(under(name, p) for p in exclude)

    return keep


def check_finite_weights(model: nn.Module, when: str = "") -> None:
    """Raise ValueError naming the first layer of ``model`` whose parameters or floating buffers hold NaN or
    infinite values (``when`` says at which stage, for the message)."""
    for kind, named in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, tensor in named:
            if not tensor.is_floating_point() or bool(torch.isfinite(tensor).all()):
                continue
            layer = name.rpartition(".")[0]
            bad = int((~torch.isfinite(tensor)).sum())
            nans = int(torch.isnan(tensor).sum())
            raise ValueError(
                f"layer {layer or '(root)'!r} has non-finite weights{' ' + when if when else ''}: {kind} {name} holds "
                f"{bad} of {tensor.numel()} values NaN or infinite ({nans} NaN); fix the checkpoint (--weights) "
                f"before approximating, nothing was computed from it"
            )
