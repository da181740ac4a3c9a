"""Build the factorized layers of a plan: in one layer-wise pass shallow to deep (each layer's inputs from
the network approximated so far, its targets from the original network), or one by one when the method
needs no data or the model cannot be traced; then each layer's error on the held-out calibration images."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable

import numpy as np
import torch
from torch import nn

from .batches import batch_size_of
from .methods.base import LayerContext, LayerData, Method
from .patches import patches_at
from .samples import layer_data_from_maps
from .surgery import get_module

__all__ = ["build_layers", "layer_errors", "corrects", "correct_last_factor"]

log = logging.getLogger(__name__)


IN_NETWORK_CHUNK = 8  # images per forward in :func:`layer_errors` (it holds every replaced layer's output)


def _ratios(sums: dict[str, list[float]], reduce: bool) -> dict[str, float]:
    """sqrt(err / ref) per name from its [err, ref] sums of squares (added over the ranks with ``reduce``)."""
    from .distributed import all_reduce_sums

    if reduce:
        flat = all_reduce_sums([value for pair in sums.values() for value in pair])
        sums = {name: flat[2 * i:2 * i + 2] for i, name in enumerate(sums)}
    return {name: (np.sqrt(err / ref) if ref > 0 else float(err > 0)) for name, (err, ref) in sums.items()}


@torch.no_grad()
def layer_errors(reference: nn.Module, approximated: nn.Module | None, replacements: dict[str, nn.Module | None],
                 inputs: Iterable, reduce: bool = False) -> tuple[dict[str, float], dict[str, float]]:
    """Two relative errors per replaced layer l over every output position of the held-out inputs, from one
    forward of the reference (original, folded) network and one of ``approximated`` per chunk of images:

        alone_l      = ||y_l - R_l(x_l)||_F / ||y_l||_F   (R_l = ``replacements[l]`` on the reference's own input
                                                           x_l of layer l; layers whose replacement is None skip it)
        in_network_l = ||y_l - yhat_l||_F / ||y_l||_F     (yhat_l: layer l's output inside ``approximated`` fed the
                                                           same images; none when ``approximated`` is None)

    y_l is layer l's output inside the reference. yhat_l carries the error of every layer before l: for a layer
    whose last factor was refitted to the approximated network's inputs (the whole-model correction) alone_l can
    be large while in_network_l is small. A tensor batch is run in chunks of ``IN_NETWORK_CHUNK`` images when
    ``approximated`` is given (every replaced layer's output of a chunk is kept until the second network has run).
    With ``reduce`` (under torch.distributed, each rank given its own part of the held-out images) the sums of
    squares are added over the ranks before the ratios. Returns ``(alone, in_network)``."""
    names = list(replacements)
    alone_sums = {name: [0.0, 0.0] for name in names if replacements[name] is not None}
    network_sums = {name: [0.0, 0.0] for name in names} if approximated is not None else {}
    kept: dict[str, list[torch.Tensor]] = {name: [] for name in names}  # a module called twice: two outputs

    def observe(_module, args, output, name):
        if name in alone_sums:
            approx = replacements[name](args[0])
            alone_sums[name][0] += float((output.double() - approx.double()).pow(2).sum())
            alone_sums[name][1] += float(output.double().pow(2).sum())
        if network_sums:  # a copy: an in-place activation after the layer would change it
            kept[name].append(output.clone())

    def compare(_module, _args, output, name):
        y = kept[name].pop(0).double()
        network_sums[name][0] += float((y - output.double()).pow(2).sum())
        network_sums[name][1] += float(y.pow(2).sum())

    def run(network, hook, batch):
        handles = [get_module(network, name).register_forward_hook(lambda m, a, o, name=name: hook(m, a, o, name))
                   for name in names]
        try:
            network(batch)
        finally:
            for handle in handles:
                handle.remove()

    for batch in inputs:
        chunks = batch.split(IN_NETWORK_CHUNK) if torch.is_tensor(batch) and network_sums else [batch]
        for chunk in chunks:
            run(reference, observe, chunk)
            if network_sums:
                run(approximated, compare, chunk)
    return _ratios(alone_sums, reduce), _ratios(network_sums, reduce)


def corrects(method: Method, config) -> bool:
    """Whether the layer-wise pass refits the last factor of what ``method`` builds (the whole-model
    correction): on unless ``config.correction`` is off, the method opts out, or it fits data itself."""
    return bool(getattr(config, "correction", True)) and method.output_correction and not method.needs_inputs


def correct_last_factor(layer: nn.Module, replacement: nn.Module, data: LayerData, seed: int = 0) -> dict:
    """Refit ``replacement``'s last factor in place (:func:`lowrank_fm.correction.refit_output_factor`) to
    ``data``'s targets from the last factor's inputs computed from ``data``'s (approximated) input patches;
    returns what was done for the layer's report record (``kept`` says which candidate won on held-out rows).
    With ``data.shards`` (each rank its own rows) every rank calls this in lockstep with the same ``replacement``."""
    from .correction import refit_output_factor
    from .layers import last_factor_inputs, last_factor_matrix, last_factor_refittable, set_last_factor

    reason = last_factor_refittable(replacement, layer)
    if reason is not None:
        return {"kept": "original", "reason": reason}
    with torch.no_grad():
        features = last_factor_inputs(replacement.cpu(), layer, data.inputs)
    weight, bias = last_factor_matrix(replacement)
    B, c, done = refit_output_factor(features, data.targets, data.heldout, weight, bias,
                                     activation=data.activation, seed=seed, shards=data.shards, offset=data.offset)
    if done["kept"] != "original":
        set_last_factor(replacement, B, c)
    return done


class _LayerSamples:
    """Builds a layer's :class:`LayerData` during the layer-wise pass from the calibration store: the
    stored original responses and positions, and patches of the current (approximated) inputs. The batches
    hold the images from ordinal ``first_ordinal`` on (a rank's shard): only their rows are read."""

    def __init__(self, reader, batch_sizes: list[int], n_fit: int, first_ordinal: int = 0) -> None:
        self.reader = reader
        self.starts = first_ordinal + np.concatenate([[0], np.cumsum(batch_sizes)]).astype(np.int64)
        self.n_fit = n_fit

    def __call__(self, name: str, module: nn.Module, inputs, activation: str) -> LayerData:
        every = self.reader.image_ordinal(name)
        first, last = (int(v) for v in np.searchsorted(every, [self.starts[0], self.starts[-1]]))
        rows = slice(first, last)  # the shard's rows (all of them in one process)
        ordinals = every[rows]
        positions = torch.from_numpy(self.reader.position(name, rows).astype(np.int64))
        targets = torch.from_numpy(self.reader.responses(name, rows)).double()
        patches = []
        for index in range(len(self.starts) - 1):
            lo, hi = np.searchsorted(ordinals, [self.starts[index], self.starts[index + 1]])
            if hi > lo:
                image = torch.from_numpy(ordinals[lo:hi] - self.starts[index])
                # the network's precision (float32), as drawn positions keep it: exact, and half the rows to gather
                patches.append(patches_at(module, inputs[index].detach(), image.to(inputs[index].device),
                                          positions[lo:hi].to(inputs[index].device)).cpu())
        heldout = torch.from_numpy(ordinals >= self.n_fit)
        return LayerData(torch.cat(patches), targets, heldout, activation)


def _gather_layer_data(data: LayerData) -> LayerData | None:
    """Every rank's rows of a layer in image order, on rank 0 (None on the others)."""
    from .distributed import gather_rows

    parts = [gather_rows(t) for t in (data.inputs, data.targets, data.heldout)]
    offset = None if data.offset is None else gather_rows(data.offset)
    return None if parts[0] is None else LayerData(*parts, data.activation, offset=offset)


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
                     batches: list, reader, n_fit: int, config, first_ordinal: int = 0
                     ) -> tuple[dict[str, nn.Module], dict]:
    """Approximate the layers shallow to deep in one pass: each layer's inputs come from the network
    approximated so far, its targets from the original network (run alongside, or the store). Methods with
    ``needs_inputs`` fit these samples themselves; for the others the last factor of what they build is
    refitted to them when :func:`corrects` says so (``info[name]["correction"]``).

    Under torch.distributed ``batches`` are this rank's shard (images from ``first_ordinal`` on) and each rank
    takes its rows of every layer. Where the solver adds its row sums over the ranks (``method.solves_shards``,
    and the correction of any method's last factor) the rows stay where they are: every rank solves on its own
    rows in lockstep (the method's data-free build runs on rank 0 and is broadcast first). Otherwise rank 0
    gathers every row in image order and solves alone, with the threads of the processes waiting for it
    (``config.solver_threads``). Either way rank 0's built layer (with what the build
    did) is broadcast, so every rank goes on through its shard with the very same layer."""
    from .distributed import computed_on_rank_zero, distributed_shards, solver_threads, world
    from .layerwise import LayerwisePass, activation_after, activation_after_sum

    root = _traceable_root(work, list(ranks), batches)
    if root is None:
        return _build_one_by_one(method, contexts, ranks, config)
    graph_module, prefix, root_inputs = root
    dense = config.fit_positions is not None
    samples = None if dense else _LayerSamples(reader, [batch_size_of(b) for b in batches], n_fit, first_ordinal)
    replacements: dict[str, nn.Module] = {}
    info: dict[str, dict] = {}
    rank, size = world()

    compensate = dense and config.shortcut_compensation

    def on_layer(local_name, module, inputs, reference_inputs=None, shortcut_shift=None, shortcut_value=None):
        name = prefix + local_name
        layer_method = method.for_layer(contexts[name])  # auto: the method chosen for this layer
        # the correction compares the sums through the activation after them (fm's own solvers fit y + v - vhat)
        on_sum = shortcut_shift is not None and not layer_method.needs_inputs
        activation = (activation_after_sum if on_sum else activation_after)(graph_module, local_name)
        if dense:
            data = layer_data_from_maps(name, module, inputs, reference_inputs, n_fit, config.fit_positions,
                                        config.seed, activation, first_ordinal, shortcut_shift,
                                        shortcut_value if on_sum else None)
        else:
            data = samples(name, module, inputs, activation)
        corrected = not layer_method.needs_inputs and corrects(layer_method, config)
        if size > 1 and config.sharded_solvers and (layer_method.solves_shards or corrected):
            # every rank fits its own rows, the solvers adding their sums over the ranks
            data = dataclasses.replace(data, shards=distributed_shards())
            built, done = _solve_on_every_rank(method, layer_method, contexts[name], ranks[name], data, config.seed)
        else:
            if size > 1:  # rank 0 gets every row: the layer is the one a single process builds, bit for bit
                data = _gather_layer_data(data)

            def solve() -> tuple[nn.Module, dict]:  # rank 0 solves; every rank goes on with its layer
                done: dict = {}
                if layer_method.needs_inputs:
                    built = method.build(contexts[name], ranks[name], data, done)
                else:
                    built = method.build(contexts[name], ranks[name], None, done)
                    if corrected:
                        done["correction"] = correct_last_factor(contexts[name].module, built, data, config.seed)
                return (built.cpu() if size > 1 else built), done

            built, done = computed_on_rank_zero(solve, threads=solver_threads(config.solver_threads))
        replacement = built.to(config.device).eval()
        info[name] = {**done, "activation": activation, "shortcut_compensated": shortcut_shift is not None}
        replacements[name] = replacement
        return replacement

    local_targets = [name[len(prefix):] for name in ranks]
    LayerwisePass(graph_module, root_inputs, device=config.device, progress=config.progress,
                  with_reference=dense, shortcut_shifts=compensate).run(local_targets, on_layer)
    return replacements, info


def _solve_on_every_rank(method: Method, layer_method: Method, ctx: LayerContext, rank: int, data: LayerData,
                         seed: int) -> tuple[nn.Module, dict]:
    """Every rank fits ``data`` (its own rows, ``data.shards`` adding the sums) in lockstep; rank 0's layer and
    record are broadcast (the ranks' results agree up to the collectives' rounding; this makes them identical).
    A method that fits data itself builds on every rank; any other builds on rank 0 (broadcast) and every
    rank refits its last factor (``layer_method``: the method that builds this layer, for ``auto``). An error
    on rank 0 is raised on every rank."""
    from .distributed import broadcast_object, computed_on_rank_zero, world

    done: dict = {}
    result, failure = None, None
    try:
        if layer_method.needs_inputs:
            built = method.build(ctx, rank, data, done)
        else:
            built, done = computed_on_rank_zero(lambda: (method.build(ctx, rank, None, done).cpu(), done))
            done = dict(done)
            done["correction"] = correct_last_factor(ctx.module, built, data, seed)
        result = (built.cpu(), done)
    except Exception as error:  # raised on every rank below
        failure = error
    first = broadcast_object((result, failure) if world()[0] == 0 else None)
    if first[1] is not None:
        raise first[1]
    if failure is not None:
        raise failure
    return first[0]


def build_layers(work: nn.Module, method: Method, contexts: dict[str, LayerContext], ranks: dict[str, int],
                 batches: Callable[[], Iterable], calib_file, n_fit: int, config, first_ordinal: int = 0
                 ) -> tuple[dict[str, nn.Module], dict[str, dict]]:
    """The factorized module of every layer in ``ranks`` and what each build did (for its report record).

    Methods with ``needs_inputs`` and the whole-model correction (:func:`corrects`) get the layer-wise pass
    over ``batches()`` (the calibration batches: under torch.distributed this rank's shard, whose first image
    has ordinal ``first_ordinal``), sampling the original network alongside, or replaying the calibration
    store ``calib_file`` when ``config.fit_positions`` is None (the correction needs a store then). Otherwise
    the layers are built one by one from their contexts."""
    from calibration import open_calibration  # lazy: lowrank_fm must not import h5py

    samples_there = config.fit_positions is not None or calib_file is not None
    if not ranks or not (method.needs_inputs or (corrects(method, config) and samples_there)):
        return _build_one_by_one(method, contexts, ranks, config)
    images = list(batches())
    if calib_file is None:
        return _build_layerwise(work, method, contexts, ranks, images, None, n_fit, config, first_ordinal)
    with open_calibration(str(calib_file)) as reader:
        return _build_layerwise(work, method, contexts, ranks, images, reader, n_fit, config, first_ordinal)


def _build_one_by_one(method, contexts, ranks, config):
    replacements, info = {}, {}
    for name, rank in ranks.items():
        info[name] = {}
        replacements[name] = method.build(contexts[name], rank, None, info[name]).to(config.device).eval()
        if corrects(method.for_layer(contexts[name]), config):
            info[name]["correction"] = {"kept": "original", "reason": "no layer-wise pass (model not traceable, or "
                                                                      "no samples: fit_positions=None without a store)"}
    return replacements, info
