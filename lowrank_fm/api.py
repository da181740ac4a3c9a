"""``approximate(model, data, ...) -> (new_model, report)``: the pipeline as a short list of stages.

fold BatchNorm -> calibrate (responses to HDF5) -> statistics -> plan (:mod:`lowrank_fm.planner`, every rank
decision) -> build layer by layer (:mod:`lowrank_fm.building`) -> output matching (optional) -> held-out
errors and the report. The input model is never modified; ``report.timing`` gives each stage's seconds.
"""

from __future__ import annotations

import copy
import dataclasses
import tempfile
import time
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .building import build_layers, layer_errors
from .config import ApproxConfig
from .cost import measure_costs, module_params
from .distributed import split_range
from .inputs import check_reiterable, count_images, default_to_input, iter_inputs, pass_shard, shard_inputs
from .methods import LayerContext, get_method
from .planner import Plan, default_allocation, highest_cheaper_rank, keep_reasons, plan_ranks
from .report import LayerRecord, Report
from .surgery import check_finite_weights, find_layers, fold_batchnorm, get_module, set_module

__all__ = ["approximate", "default_to_input", "check_finite_weights"]


_PLAN_STAGES = ("plan_s", "candidates_s", "layout_s", "latency_model_s", "speed_gate_s")


def _progress(config: ApproxConfig):
    from tqdm.auto import tqdm

    return lambda items, desc: tqdm(items, desc=desc, disable=not config.progress, leave=False)


@contextmanager
def _stage(timing: dict, name: str):
    start = time.perf_counter()
    yield
    timing[f"{name}_s"] = timing.get(f"{name}_s", 0.0) + time.perf_counter() - start


def _timed(timing: dict, name: str, function: Callable) -> Callable:
    """``function`` with its seconds added to ``timing[name + "_s"]`` (measurements inside the plan stage)."""
    def timed(*args, **kwargs):
        with _stage(timing, name):
            return function(*args, **kwargs)
    return timed


def _plan(method, layers, contexts, costs, reasons, work, example, data, to_input, n_fit, config, timing
          ) -> tuple[Plan, dict]:
    """The plan stage: what the planner needs measured (output errors, the latency model, the whole-plan
    timer, the speed gate), then :func:`plan_ranks`. Measurements are timed apart from the planning. Returns
    the plan and the speed gate's :class:`~lowrank_fm.speedgate.LayerTiming` per layer it timed."""
    from .sensitivity import joint_output_divergence, output_errors_for
    from .speedgate import SpeedGate, latency_model, plan_timer, timing_layout

    start, measured_before = time.perf_counter(), sum(timing.get(k, 0.0) for k in _PLAN_STAGES[1:])
    macs = {n: c.macs for n, c in costs.items()}
    progress = _progress(config)
    output_errors, divergence, n_divergence = None, None, 0
    if config.speedup is not None and (config.allocation or default_allocation(method)) == "output" and contexts:
        n_sensitivity = min(n_fit, config.sensitivity_images or method.sensitivity_images)
        sample = list(iter_inputs(data, to_input, 0, n_sensitivity, config.device))
        output_errors = output_errors_for(method, work, contexts, macs, sample, config)
        n_divergence = min(method.divergence_images(), n_fit - n_sensitivity)
        if output_errors is not None and n_divergence > 0:
            held_out = list(iter_inputs(data, to_input, n_sensitivity, n_sensitivity + n_divergence, config.device))
            divergence = partial(joint_output_divergence, work, {n: get_module(work, n) for n in output_errors},
                                 {n: contexts[n].stats for n in output_errors}, batches=held_out)
    layout = _timed(timing, "layout", timing_layout)(work, example, config) if contexts else {"layout": "nchw"}
    latency, measure_plan = None, None
    if config.budget == "latency":
        targets = {n: {key: (variant, highest_cheaper_rank(method, variant, macs[n]))
                       for key, variant in method.timing_variants(c).items()}
                   for n, c in contexts.items() if n not in config.layer_ranks}
        latency = _timed(timing, "latency_model", latency_model)(method, targets, work, example, config, layout,
                                                                  progress)
        measure_plan = _timed(timing, "latency_model", plan_timer(method, work, example, config, layout))
    gate, speed_gate = None, None
    if config.speed_gate:
        speed_gate = SpeedGate(config.speed_batch, repeats=config.speed_repeats, device=config.device,
                               channels_last=layout["layout"] == "channels_last")
        # the gate times shapes: each layer's timing module (an iterative method's unfitted factors)
        gate = _timed(timing, "speed_gate", lambda name, ctx, rank: speed_gate.check(
            name, ctx.module, method.timing_module(ctx, rank), ctx.in_shape))
    plan = plan_ranks(method, layers, contexts, macs, reasons, config, latency=latency, output_errors=output_errors,
                      measure_plan=measure_plan, gate=gate, progress=progress, divergence=divergence)
    if gate is not None:
        plan.selection["speed_gate"].update(batch=config.speed_batch, repeats=config.speed_repeats, **layout)
    if latency is not None:  # the latency model's parts: what the plan was made from
        plan.selection["latency_model"] = {**layout, "rest_ms": latency[1],
                                           "layers_original_ms": sum(next(iter(c.values())).original_ms
                                                                         for c in latency[0].values())}
    if output_errors is not None:
        plan.selection["allocation_signal"] = f"output error on {n_sensitivity} calibration images" + (
            f", plans compared on {n_divergence} more" if divergence is not None else "")
    if "auto" in plan.selection:  # auto's candidate curves: a stage of their own
        timing["candidates_s"] = plan.selection["auto"]["curves_s"]
    measured = sum(timing.get(k, 0.0) for k in _PLAN_STAGES[1:]) - measured_before
    timing["plan_s"] = time.perf_counter() - start - measured
    return plan, ({} if speed_gate is None else speed_gate.timings_)


def approximate(
    model: nn.Module,
    data: Iterable,
    config: ApproxConfig | None = None,
    *,
    n_images: int | None = None,
    calib_file: str | Path | None = None,
    image_ids: np.ndarray | None = None,
    to_input: Callable | None = None,
    model_name: str | None = None,
    dataset_name: str | None = None,
    **settings,
) -> tuple[nn.Module, Report]:
    """Approximate ``model``'s Conv2d/Linear layers by low rank from calibration ``data``.

    Parameters
    ----------
    model : any ``nn.Module`` (left untouched; a copy is approximated).
    data : an iterable of batches, iterated in the same order each time (a DataLoader without shuffling):
        ``(images, labels)`` pairs, image tensors (N, C, H, W), or lists of image tensors (detectors).
        It is read several times: to calibrate, for the layer-wise pass and for its held-out tail.
    config : an :class:`ApproxConfig`; ``settings`` override its fields (``energy=0.9``) or set its method's
        settings by name (``solver="none"``).
    n_images : calibration images in ``data`` (default: ``len(data.dataset)``).
    calib_file : HDF5 file to write, resume or reuse (default: a temporary file, deleted afterwards).
    image_ids : an identifier per calibration image stored in the file (e.g. indices in the training set).
    to_input : maps a loader item to the model input (default :func:`default_to_input`).

    Returns
    -------
    new_model : the approximated copy, in eval mode.
    report : a :class:`~lowrank_fm.report.Report` (accuracy and latency left for the caller to measure).
    """
    from calibration import calibrate, shard_range  # lazy: lowrank_fm must not import h5py

    from .distributed import computed_on_rank_zero, world
    from .layer_stats import read_layer_stats

    config = (config or ApproxConfig()).replace(**settings) if settings else (config or ApproxConfig())
    method = get_method(config.method_name, config.method_settings, seed=config.seed)
    to_input = to_input or default_to_input
    check_reiterable(data)
    total_images = count_images(data, n_images)
    if total_images < 2:
        raise ValueError(f"approximate needs at least 2 calibration images (fit + held out), got {total_images}")
    n_heldout = max(1, int(round(config.heldout_fraction * total_images)))
    n_fit = total_images - n_heldout
    timing: dict[str, float] = {}
    check_finite_weights(model)

    with _stage(timing, "fold"):
        example = next(iter(iter_inputs(data, to_input, 0, None, config.device)), None)
        if example is None:
            raise ValueError(f"data yielded no batches but n_images={total_images} calibration images were expected: "
                             f"pass a loader (or list) of the calibration batches")
        work = copy.deepcopy(model).eval().to(config.device)
        # shapes and per-image costs from one image (not two forwards of a batch); a detector's lists as they come
        probe = example[:1] if torch.is_tensor(example) and example.ndim == 4 else example
        folded = fold_batchnorm(work, probe) if config.fold_batchnorm else []
        if folded:
            check_finite_weights(work, "after folding BatchNorm into the convolutions (check the BatchNorm running "
                                       "statistics: a negative running_var gives NaN)")
        reference = copy.deepcopy(work)
        costs = measure_costs(work, probe)
        layers = {name: module for name, module in find_layers(work).items() if name in costs}
    reasons = keep_reasons(layers, costs, method, config)
    targets = [name for name, reason in reasons.items() if reason is None]

    rank, size = world()  # under torchrun: each rank calibrates and runs the layer-wise pass on one shard of the images
    shard = shard_range(total_images, rank, size) if size > 1 else (0, total_images)
    temp_dir = None
    covariance_layers = [name for name in targets if method.input_covariance_for(layers[name])]
    calibrated = (method.needs_responses or bool(covariance_layers)) and bool(targets)
    stats, inputs = {}, {}
    if calibrated:
        if calib_file is None and size > 1:
            raise ValueError("a multi-process run needs calib_file= on a file system that every rank sees")
        if calib_file is None:
            temp_dir = tempfile.TemporaryDirectory(prefix="lowrank_fm_")
            calib_file = Path(temp_dir.name) / "calibration.h5"
        with _stage(timing, "calibrate"):
            images = shard_inputs(data, to_input, shard, size, config.device)
            calibrate(work, images, targets, str(calib_file), n_images=total_images, seed=config.seed,
                      positions_per_image=config.positions_per_image, image_ids=image_ids,
                      meta={"model": model_name or type(model).__name__, "folded_batchnorm": [list(p) for p in folded]},
                      device=config.device, progress=config.progress, input_stats=covariance_layers,
                      input_rows=method.input_covariance_rows())
        with _stage(timing, "statistics"):
            stats, inputs = read_layer_stats(calib_file, targets, method, n_fit, config.covariance,
                                             shard if size > 1 else None, config.progress, covariance_layers)

    # the methods' math runs in float64 on the CPU: on another device they see a CPU copy of each layer
    on_cpu = {name: layers[name] if str(config.device) == "cpu" else copy.deepcopy(layers[name]).cpu() for name in targets}
    contexts = {name: LayerContext(name, on_cpu[name], costs[name].positions, stats.get(name), costs[name].in_shape,
                                  costs[name].out_shape, inputs.get(name)) for name in targets}
    def plan_stage():  # under torchrun rank 0 plans (its speed gate times alone) and every rank takes its plan
        plan, timings = _plan(method, layers, contexts, costs, reasons, work, example, data, to_input, n_fit, config, timing)
        return plan, timings, {k: v for k, v in timing.items() if k in _PLAN_STAGES}

    plan, timings, planned = computed_on_rank_zero(plan_stage)
    timing.update(planned)
    records = {name: LayerRecord.planned(module, plan.layers[name], timings.get(name)) for name, module in layers.items()}
    ranks = plan.ranks
    contexts = {name: dataclasses.replace(contexts[name], options=plan.layers[name].options) for name in ranks}

    with _stage(timing, "build"):  # under torchrun each rank's layer-wise pass runs its own shard of the images
        own = pass_shard(data, to_input, total_images, rank, size)
        replacements, info = build_layers(work, method, contexts, ranks,
                                          lambda: shard_inputs(data, to_input, own, size, config.device),
                                          calib_file if calibrated else None, n_fit, config, first_ordinal=own[0])
    for name, replacement in replacements.items():
        records[name].params_after = module_params(replacement)
        records[name].extra.update(info.get(name, {}))
        set_module(work, name, replacement)
    timing["approximate_s"] = sum(timing.get(k, 0.0) for k in ("statistics_s", *_PLAN_STAGES, "build_s"))
    matching: dict = {}
    if replacements and config.output_matching:
        from .output_matching import match_outputs

        matching = match_outputs(reference, work, list(replacements.values()),
                                 list(iter_inputs(data, to_input, 0, n_fit, config.device)),
                                 list(iter_inputs(data, to_input, n_fit, total_images, config.device)),
                                 steps=config.matching_steps, lr=config.matching_lr,
                                 batch_images=config.matching_batch, augment_shift=config.matching_shift,
                                 augment_flip=config.matching_flip, seed=config.seed, progress=config.progress)
        timing["output_matching_s"] = matching["seconds"]
    if temp_dir is not None:
        temp_dir.cleanup()

    if replacements:
        with _stage(timing, "heldout_error"):  # under torchrun: each rank its part, the sums reduced
            part = split_range(n_fit, total_images, rank, size) if size > 1 else (n_fit, total_images)
            heldout = shard_inputs(data, to_input, part, size, config.device)
            alone, in_network = layer_errors(reference, work, replacements, heldout, reduce=size > 1)
            for name in replacements:
                records[name].rel_error, records[name].rel_error_network = alone[name], in_network[name]
            after = measure_costs(work, probe)
            for name in replacements:  # the MACs actually counted in the new model's forward
                records[name].macs_after = sum(c.macs for n, c in after.items() if n.startswith(name + "."))

    report = Report(
        model=model_name or type(model).__name__, dataset=dataset_name, method=config.method_name, config=config.to_dict(),
        layers=list(records.values()), timing=timing,
        calibration={"images": total_images, "fit_images": n_fit, "heldout_images": n_heldout,
                     "positions_per_image": config.positions_per_image,
                     "file": None if temp_dir is not None else (str(calib_file) if calib_file else None)},
        folded_batchnorm=[list(p) for p in folded], selection=plan.selection, output_matching=matching,
        spectra=plan.spectra,
    )
    return work.eval(), report
