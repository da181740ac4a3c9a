"""Build the factorized layers of a plan: in one layer-wise pass shallow to deep (each layer's inputs from
the network approximated so far, its targets from the original network), or one by one when the method
needs no data or the model cannot be traced; then each layer's error on the held-out calibration images."""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np
import torch
from torch import nn

from .batches import batch_size_of
from .methods.base import LayerContext, LayerData, Method
from .patches import patches_at
from .samples import layer_data_from_maps
from .surgery import get_module

__all__ = ["build_layers", "heldout_errors", "corrects", "correct_last_factor"]

log = logging.getLogger(__name__)


@torch.no_grad()
def heldout_errors(reference: nn.Module, replacements: dict[str, nn.Module], inputs: Iterable) -> dict[str, float]:
    """||y - yhat||_F / ||y||_F per replaced layer, over every output position of the held-out inputs.

    y is the original layer's output inside the reference (original, folded) network; yhat is the
    replacement applied to the very same layer input.
    """
    sums = {name: [0.0, 0.0] for name in replacements}
    handles = []
    for name, replacement in replacements.items():
        def hook(_module, args, output, name=name, replacement=replacement):
            approx = replacement(args[0])
            sums[name][0] += float((output.double() - approx.double()).pow(2).sum())
            sums[name][1] += float(output.double().pow(2).sum())

        handles.append(get_module(reference, name).register_forward_hook(hook))
    try:
        for batch in inputs:
            reference(batch)
    finally:
        for handle in handles:
            handle.remove()
    return {name: (np.sqrt(err / ref) if ref > 0 else float(err > 0)) for name, (err, ref) in sums.items()}


def corrects(method: Method, config) -> bool:
    """Whether the layer-wise pass refits the last factor of what ``method`` builds (the whole-model
    correction): on unless ``config.correction`` is off, the method opts out, or it fits data itself."""
    return bool(getattr(config, "correction", True)) and method.output_correction and not method.needs_inputs


def correct_last_factor(layer: nn.Module, replacement: nn.Module, data: LayerData, seed: int = 0) -> dict:
    """Refit ``replacement``'s last factor in place (:func:`lowrank_fm.correction.refit_output_factor`) to
    ``data``'s targets from the last factor's inputs computed from ``data``'s (approximated) input patches;
    returns what was done for the layer's report record (``kept`` says which candidate won on held-out rows)."""
    from .correction import refit_output_factor
    from .layers import last_factor_inputs, last_factor_matrix, last_factor_refittable, set_last_factor

    reason = last_factor_refittable(replacement, layer)
    if reason is not None:
        return {"kept": "original", "reason": reason}
    with torch.no_grad():
        features = last_factor_inputs(replacement.cpu(), layer, data.inputs)
    weight, bias = last_factor_matrix(replacement)
    B, c, done = refit_output_factor(features, data.targets, data.heldout, weight, bias,
                                     activation=data.activation, seed=seed)
    if done["kept"] != "original":
        set_last_factor(replacement, B, c)
    return done


class _LayerSamples:
    """Builds a layer's :class:`LayerData` during the layer-wise pass from the calibration store: the
    stored original responses and positions, and patches of the current (approximated) inputs."""

    def __init__(self, reader, batch_sizes: list[int], n_fit: int) -> None:
        self.reader = reader
        self.starts = np.concatenate([[0], np.cumsum(batch_sizes)])
        self.n_fit = n_fit

    def __call__(self, name: str, module: nn.Module, inputs, activation: str) -> LayerData:
        ordinals = self.reader.image_ordinal(name)
        positions = torch.from_numpy(self.reader.position(name).astype(np.int64))
        targets = torch.from_numpy(self.reader.responses(name)).double()
        rows = []
        for index in range(len(self.starts) - 1):
            lo, hi = np.searchsorted(ordinals, [self.starts[index], self.starts[index + 1]])
            if hi > lo:
                image = torch.from_numpy(ordinals[lo:hi] - self.starts[index])
                rows.append(patches_at(module, inputs[index].detach(), image.to(inputs[index].device),
                                       positions[lo:hi].to(inputs[index].device)).double().cpu())
        heldout = torch.from_numpy(ordinals >= self.n_fit)
        return LayerData(torch.cat(rows), targets, heldout, activation)


def _traceable_root(work: nn.Module, names: list[str], batches: list):
    """The traced module that holds every target layer, its name prefix, and its input per batch.

    The whole model is traced when possible. Otherwise (a detector's control flow) the deepest submodule that
    contains all targets (e.g. ``backbone``) is traced, and its inputs are captured by running the model.
    Returns None when nothing traceable holds the targets.
    """
    from .layerwise import NotTraceableError, trace

    try:
        return trace(work), "", batches
    except NotTraceableError as error:
        first_error = error
    parts = [name.split(".") for name in names]
    common = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    for depth in range(min(len(common), min(len(p) for p in parts) - 1), 0, -1):
        prefix = ".".join(common[:depth])
        sub = get_module(work, prefix)
        try:
            graph_module = trace(sub)
        except NotTraceableError:
            continue
        captured: list = []
        handle = sub.register_forward_pre_hook(lambda _m, args, kwargs: captured.append(args), with_kwargs=True)
        try:
            with torch.no_grad():
                for batch in batches:
                    work(batch)
        finally:
            handle.remove()
        if len(captured) != len(batches) or any(len(args) != 1 or not torch.is_tensor(args[0]) for args in captured):
            continue  # called more than once per forward, or with other than one tensor
        return graph_module, prefix + ".", [args[0] for args in captured]
    log.warning("%s; layers are approximated one by one without whole-model correction", first_error)
    return None


def _build_layerwise(work: nn.Module, method: Method, contexts: dict[str, LayerContext], ranks: dict[str, int],
                     batches: list, reader, n_fit: int, config) -> tuple[dict[str, nn.Module], dict]:
    """Approximate the layers shallow to deep in one pass: each layer's inputs come from the network
    approximated so far, its targets from the original network (run alongside, or the store). Methods with
    ``needs_inputs`` fit these samples themselves; for the others the last factor of what they build is
    refitted to them when :func:`corrects` says so (``info[name]["correction"]``)."""
    from .layerwise import LayerwisePass, activation_after

    root = _traceable_root(work, list(ranks), batches)
    if root is None:
        return _build_one_by_one(method, contexts, ranks, config)
    graph_module, prefix, root_inputs = root
    dense = config.fit_positions is not None
    samples = None if dense else _LayerSamples(reader, [batch_size_of(b) for b in batches], n_fit)
    replacements: dict[str, nn.Module] = {}
    info: dict[str, dict] = {}

    def on_layer(local_name, module, inputs, reference_inputs=None):
        name = prefix + local_name
        activation = activation_after(graph_module, local_name)
        if dense:
            data = layer_data_from_maps(name, module, inputs, reference_inputs, n_fit, config.fit_positions,
                                        config.seed, activation)
        else:
            data = samples(name, module, inputs, activation)
        info[name] = {}
        if method.needs_inputs:
            replacement = method.build(contexts[name], ranks[name], data, info[name])
        else:
            replacement = method.build(contexts[name], ranks[name], None, info[name])
            info[name]["correction"] = correct_last_factor(contexts[name].module, replacement, data, config.seed)
        replacement = replacement.to(config.device).eval()
        info[name]["activation"] = activation
        replacements[name] = replacement
        return replacement

    local_targets = [name[len(prefix):] for name in ranks]
    LayerwisePass(graph_module, root_inputs, device=config.device, progress=config.progress,
                  with_reference=dense).run(local_targets, on_layer)
    return replacements, info


def build_layers(work: nn.Module, method: Method, contexts: dict[str, LayerContext], ranks: dict[str, int],
                 batches: list | None, reader, n_fit: int, config) -> tuple[dict[str, nn.Module], dict[str, dict]]:
    """The factorized module of every layer in ``ranks`` and what each build did (for its report record).
    ``batches`` (every calibration batch) and ``reader`` (the open calibration store, needed only when
    ``config.fit_positions`` is None) serve methods with ``needs_inputs`` and the whole-model correction
    (:func:`corrects`); otherwise layers are built one by one from their contexts."""
    if (method.needs_inputs or corrects(method, config)) and ranks and batches is not None:
        return _build_layerwise(work, method, contexts, ranks, batches, reader, n_fit, config)
    return _build_one_by_one(method, contexts, ranks, config)


def _build_one_by_one(method, contexts, ranks, config):
    replacements, info = {}, {}
    for name, rank in ranks.items():
        info[name] = {}
        replacements[name] = method.build(contexts[name], rank, None, info[name]).to(config.device).eval()
        if corrects(method, config):
            info[name]["correction"] = {"kept": "original", "reason": "no layer-wise pass (model not traceable, or "
                                                                      "no samples: fit_positions=None without a store)"}
    return replacements, info
