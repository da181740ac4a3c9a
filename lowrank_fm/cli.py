"""The ``approximate`` command line: parse, load model and data, run :func:`lowrank_fm.approximate`,
measure accuracy and latency, write OUT/report.json, the model (state_dict + manifest) and the run's
arguments. ``scripts/approximate.py`` is a thin wrapper around :func:`main`, which is also the ``lowrank-fm``
console command of an installed package (and ``python -m lowrank_fm.cli``). The reference models and data
sets come from :mod:`lowrank_fm.zoo`, imported inside the functions that need them.

Exit status: 0 on success, 2 on bad arguments (argparse), 1 on a runtime failure with one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from .config import default_method
from .allocator import ALLOCATORS, use_allocator
from .planner import ALLOCATIONS

__all__ = ["build_parser", "main", "calibration_indices"]

log = logging.getLogger("lowrank_fm")

MIN_CALIB_IMAGES = 128
DEFAULT_MODEL, DEFAULT_DATASET = "vgg-fmnist", "fashion-mnist-sample"  # the first run: real model, embedded data


def _energy(text: str) -> float:
    value = float(text)
    if not (0.0 < value <= 1.0):
        raise argparse.ArgumentTypeError(f"must satisfy 0 < E <= 1, got {value}")
    return value


def _speedup(text: str) -> float:
    value = float(text)
    if not (value >= 1.0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 1 (a MAC reduction factor), got {value}")
    return value


def _calib_images(text: str) -> int:
    value = int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"must be >= 2 (at least one image to fit and one held out), got {value}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not (0.0 < value <= 1.0):
        raise argparse.ArgumentTypeError(f"must satisfy 0 < F <= 1, got {value}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _fit_positions(text: str) -> int | None:
    """``--fit-positions``: a positive count, or ``store`` (None: replay the calibration store's samples)."""
    return None if text == "store" else _positive_int(text)


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _method_setting(text: str) -> tuple[str, object]:
    """NAME=VALUE: VALUE as an int, a float, a comma-separated tuple of those, None, true/false, or text."""
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE (e.g. restarts=5), got {text!r}")

    def parse(item: str):
        item = item.strip()
        if item.lower() in ("none", "true", "false"):
            return {"none": None, "true": True, "false": False}[item.lower()]
        for kind in (int, float):
            try:
                return kind(item)
            except ValueError:
                pass
        return item

    return name.strip(), tuple(parse(v) for v in value.split(",")) if "," in value else parse(value)


def build_parser() -> argparse.ArgumentParser:
    from .methods import list_methods
    from .zoo.models import list_models

    parser = argparse.ArgumentParser(  # prog: how it was called (approximate.py, or the lowrank-fm command)
        description="Approximate a trained CNN by low-rank layers from a small calibration set, without retraining.",
    )
    parser.add_argument("model", nargs="?", default=None,
                        help=f"bundled model ({', '.join(list_models())}) or a torchvision name (default "
                             f"{DEFAULT_MODEL} on the embedded {DEFAULT_DATASET})")
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--energy", type=_energy, default=None, help="energy kept per layer, 0 < E <= 1 (default 0.95)")
    target.add_argument("--speedup", type=_speedup, default=None, help="whole-model MAC reduction target S >= 1")
    parser.add_argument("--method", default=None, choices=list_methods(),
                        help="default: auto with --speedup (each layer's decomposition chosen under the budget), fm "
                             "otherwise (the output-feature-map method: asymmetric + nonlinear); fm-linear: symmetric")
    parser.add_argument("--solver", choices=["rmsprop", "closed-form", "none"], default=None,
                        help="nonlinear refinement of methods fm and fm-3d (default rmsprop); the same as "
                             "--method-setting solver=NAME")
    parser.add_argument("--method-setting", dest="method_settings", action="append", default=[], metavar="NAME=VALUE",
                        type=_method_setting,
                        help="a setting of the method by name, e.g. restarts=5 for cp, solver_steps=100 for fm, "
                             "group_options=1,2 for alds (repeatable; unknown names are refused)")
    parser.add_argument("--ranks", choices=["energy", "vbmf"], default="energy",
                        help="vbmf: each layer's rank from empirical VBMF (tucker2, tucker1)")
    parser.add_argument("--allocation", choices=list(ALLOCATIONS), default=None,
                        help="how --speedup is shared among layers (default error; alds and alds-sigma: alds-minmax)")
    matching = parser.add_mutually_exclusive_group()
    matching.add_argument("--output-matching", dest="output_matching", action="store_true", default=False,
                          help="refine all factors jointly to match the original outputs on the calibration images")
    matching.add_argument("--no-output-matching", dest="output_matching", action="store_false",
                          help="skip output matching (the default)")
    parser.add_argument("--matching-steps", type=_positive_int, default=300)
    parser.add_argument("--dataset", default=None, help="digits, fashion-mnist, imagefolder, cifar10 (default: the model's)")
    parser.add_argument("--data-dir", default=None, help="where the data set lies (ImageFolder: train/ and val/)")
    parser.add_argument("--weights", default="default", help="default, none, or PATH to a state_dict")
    parser.add_argument("--num-classes", type=_positive_int, default=None, help="classifier size of a torchvision model")
    parser.add_argument("--image-size", type=_positive_int, default=None,
                        help="input size (default: the bundled model's, else 224 for imagefolder)")
    calib = parser.add_mutually_exclusive_group()
    calib.add_argument("--calib-fraction", type=_fraction, default=0.01,
                       help=f"share of the training split used to calibrate (default 0.01, at least {MIN_CALIB_IMAGES} images)")
    calib.add_argument("--calib-images", type=_calib_images, default=None,
                       help=f"number of calibration images (at least 2; fewer than {MIN_CALIB_IMAGES} warns)")
    parser.add_argument("--calib-file", default=None, help="calibration HDF5 to write, resume or reuse (default OUT/calibration.h5)")
    parser.add_argument("--positions-per-image", type=_positive_int, default=10)
    parser.add_argument("--fit-positions", type=_fit_positions, default=64,
                        help="positions per image drawn from whole feature maps for the solvers of the layer-wise pass, "
                             "with the original network run alongside for the targets (default 64); 'store': replay "
                             "the calibration store's --positions-per-image samples instead, without the original "
                             "network (one forward less: for large runs, with --positions-per-image 64)")
    parser.add_argument("--covariance", choices=["streaming", "ipca"], default="streaming")
    parser.add_argument("--include", nargs="*", default=None, help="only approximate layers under these names")
    parser.add_argument("--exclude", nargs="*", default=[], help="never approximate layers under these names")
    parser.add_argument("--out", default=None, help="output directory (default runs/MODEL-METHOD)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-images", type=_positive_int, default=None, help="evaluate on the first N test images (default all)")
    parser.add_argument("--batch-size", type=_positive_int, default=64, help="calibration and evaluation batch size")
    parser.add_argument("--latency-batch", type=_positive_int, default=32, help="batch size of the latency measurement")
    parser.add_argument("--no-speed-gate", dest="speed_gate", action="store_false", default=True,
                        help="factorize layers even when they are not faster than the original (timed at --latency-batch)")
    parser.add_argument("--budget", choices=["macs", "latency"], default="macs",
                        help="what --speedup counts: MACs (default) or measured per-layer latency (with --method "
                             "auto: every candidate method timed; fm is the default method under it)")
    parser.add_argument("--allocator", choices=list(ALLOCATORS), default="reuse",
                        help="reuse (default): freed tensor memory stays in the process for the next forward, as it "
                             "would under jemalloc; system: glibc returns it and large outputs are page-faulted on "
                             "every forward (slows factorized layers most; the latency report records which)")
    parser.add_argument("--no-correction", dest="correction", action="store_false", default=True,
                        help="skip the whole-model correction of the last factor for methods other than fm / fm-3d "
                             "(default: refit it to the original responses from the approximated inputs)")
    parser.add_argument("--no-shortcut-compensation", dest="shortcut_compensation", action="store_false", default=True,
                        help="fit a layer before a residual sum to its own original output, not to the original sum "
                             "minus the approximated shortcut (default: compensate the shortcut's error)")
    parser.add_argument("--sharded-solvers", action="store_true", default=False,
                        help="under torchrun: each rank fits its own rows and the solvers add their sums over the ranks "
                             "(faster; equal to one process only up to summation order); default: rank 0 solves")
    parser.add_argument("--solver-threads", type=_positive_int, default=None,
                        help="under torchrun: threads of rank 0 while it solves a layer and the other processes wait "
                             "(default: its threads times the processes on the machine, at most its cores)")
    parser.add_argument("--rank-multiple", type=_positive_int, default=1, help="round every rank to a multiple of N")
    parser.add_argument("--export", action="store_true",
                        help="also write TorchScript and ONNX forms to OUT, with a parity check and their latency")
    parser.add_argument("--workers", type=int, default=None,
                        help="DataLoader workers (default: 4 for image files (imagefolder, cifar10), 0 for in-memory data)")
    parser.add_argument("--threads", type=_positive_int, default=None,
                        help="torch threads (default: half the cores this process may use, 1 to 4; recorded in the report)")
    parser.add_argument("--finetune-epochs", type=_non_negative_int, default=0,
                        help="after approximation, train the approximated model's factors for N epochs on the training "
                             "split, keeping its ranks (default 0: no fine-tuning)")
    parser.add_argument("--finetune", choices=["labels", "distill"], default=None,
                        help="labels (default): cross-entropy with the training labels; distill: label-free, learn the "
                             "original model's outputs on the training images")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def calibration_indices(n_train: int, fraction: float, images: int | None, seed: int) -> np.ndarray:
    """Seeded random training-split indices: ``images`` of them, or ``fraction`` of the split (at least
    MIN_CALIB_IMAGES, or the whole split when it is smaller)."""
    count = images if images is not None else max(int(round(fraction * n_train)), MIN_CALIB_IMAGES)
    count = min(count, n_train)
    order = np.random.default_rng(seed).permutation(n_train)
    return np.sort(order[:count])


def _run(args: argparse.Namespace) -> int:
    from .distributed import init_from_env
    from .zoo.models import bundled_spec

    args.threads = args.threads or default_threads()
    torch.set_num_threads(args.threads)
    energy = 0.95 if args.energy is None else args.energy
    use_allocator(args.allocator)  # process-wide: the speed gate's and the latency report's timings run under it
    spec = bundled_spec(args.model)
    dataset_name = args.dataset or (spec.dataset if spec else "imagefolder")
    rank, world_size, args.device = init_from_env(args.device)  # under torchrun: one calibration shard per rank
    if args.workers is None:
        args.workers = min(4, os.cpu_count() or 1) if dataset_name in ("imagefolder", "cifar10") else 0
    method = args.method or default_method(args.speedup, args.budget, args.allocation, args.ranks,  # as ApproxConfig
                                           {**dict(args.method_settings), **({"solver": args.solver} if args.solver else {})})
    out = Path(args.out or f"runs/{args.model}-{method}")
    out.mkdir(parents=True, exist_ok=True)
    if args.data_dir is not None and dataset_name in ("digits", "fashion-mnist-sample"):
        log.warning("--data-dir %s is ignored: dataset %s is embedded and reads no files", args.data_dir, dataset_name)
    if args.calib_images is not None and args.calib_images < MIN_CALIB_IMAGES:
        log.warning("--calib-images %d is below %d: too few images to estimate each layer's responses (the ranks "
                    "and the refinement fit these few images and do not generalise); expect a large accuracy drop",
                    args.calib_images, MIN_CALIB_IMAGES)
    # this run's outputs are written to a staging folder inside OUT and moved in together at the end: a failed
    # or interrupted run leaves an earlier run's args, report and model as they were
    stage = Path(tempfile.mkdtemp(prefix=".incomplete-", dir=out)) if rank == 0 else None
    try:
        return _run_into(args, out, stage, spec, dataset_name, rank, world_size, energy)
    finally:
        if stage is not None:
            shutil.rmtree(stage, ignore_errors=True)


def _run_into(args: argparse.Namespace, out: Path, stage: Path | None, spec, dataset_name: str, rank: int,
              world_size: int, energy: float) -> int:
    from . import approximate, save_approximated
    from .config import ApproxConfig
    from .latency import measure_speed
    from .zoo.data import load_dataset
    from .zoo.evaluate import accuracy
    from .zoo.models import create_model

    if args.image_size is None:
        args.image_size = spec.input_size if spec and spec.input_size else 224
    data = load_dataset(dataset_name, args.data_dir, image_size=args.image_size)
    torch.manual_seed(args.seed)  # --weights none: the same random weights (and a reusable --calib-file) every run
    model = create_model(args.model, args.weights, num_classes=None if spec else (args.num_classes or data.num_classes))
    model = model.to(args.device)
    positions, indices = _calibration_images(data, args)
    pin = args.device.startswith("cuda")
    loader = DataLoader(Subset(data.train, positions.tolist()), batch_size=args.batch_size, shuffle=False,
                        num_workers=args.workers, pin_memory=pin)
    config = ApproxConfig(
        method=args.method, energy=energy, speedup=args.speedup, ranks=args.ranks, allocation=args.allocation,
        method_settings={**dict(args.method_settings), **({"solver": args.solver} if args.solver else {})},
        output_matching=args.output_matching, matching_steps=args.matching_steps,
        include=args.include, exclude=tuple(args.exclude),
        positions_per_image=args.positions_per_image, fit_positions=args.fit_positions, covariance=args.covariance, seed=args.seed,
        device=args.device, progress=not args.quiet,
        speed_gate=args.speed_gate, speed_batch=args.latency_batch, budget=args.budget, rank_multiple=args.rank_multiple,
        correction=args.correction, shortcut_compensation=args.shortcut_compensation,
        sharded_solvers=args.sharded_solvers,
        solver_threads=args.solver_threads,
    )
    calib_file = Path(args.calib_file) if args.calib_file else out / "calibration.h5"
    target = f"speedup {args.speedup}x" if args.speedup else f"energy {energy}"
    log.info("%s on %s: %d calibration images, method %s, %s", args.model, dataset_name, len(indices), config.method_name,
             target)
    new_model, report = approximate(model, loader, config, n_images=len(indices), calib_file=calib_file,
                                    image_ids=indices, model_name=args.model, dataset_name=dataset_name)
    if rank != 0:  # every rank holds the same model; rank 0 evaluates and writes it
        return 0
    report.calibration["processes"] = world_size

    start = time.perf_counter()
    before = accuracy(model, data.test, eval_images=args.eval_images, batch_size=256, device=args.device,
                      num_workers=args.workers, progress=not args.quiet, desc="evaluate original")
    after = accuracy(new_model, data.test, eval_images=args.eval_images, batch_size=256, device=args.device,
                     num_workers=args.workers, progress=not args.quiet, desc="evaluate approximated")
    report.timing["evaluate_s"] = time.perf_counter() - start
    report.config["run"] = {k: v for k, v in vars(args).items() if k not in report.config}
    report.accuracy = {"top1_before": before["top1"], "top1_after": after["top1"], "top5_before": before["top5"],
                       "top5_after": after["top5"], "eval_images": before["images"]}
    if args.finetune_epochs:
        new_model = _finetune(new_model, model, data, args, report)

    images = torch.stack([data.test[i][0] for i in range(min(args.latency_batch, len(data.test)))]).to(args.device)
    speed = measure_speed(model, new_model, images, batch_sizes=sorted({1, args.latency_batch}), device=args.device)
    main_batch = speed["batches"][str(args.latency_batch)]
    report.latency = {"before_ms": main_batch["before_ms"], "after_ms": main_batch["after_ms"],
                      "measured_speedup": main_batch["measured_speedup"], "speedup_min": main_batch["speedup_min"],
                      "speedup_max": main_batch["speedup_max"], "rounds": main_batch["rounds"],
                      "baseline": speed["baseline"], "folded_batchnorm": speed["folded_batchnorm"],
                      "batch_size": args.latency_batch, "threads": speed["threads"], "device": args.device,
                      "memory_format": main_batch["after_memory_format"], "load": speed["load"],
                      "load_after": speed["load_after"], "allocator": speed["allocator"], "batches": speed["batches"]}
    for key in ("before_unfolded_ms", "speedup_vs_unfolded"):  # the original as loaded: an extra, not the baseline
        if key in main_batch:
            report.latency[key] = main_batch[key]
    if args.export:
        from .export import export_and_check

        report.latency["export"] = export_and_check(new_model, images.cpu(), stage, original=model)
        for form in report.latency["export"].values():  # the paths the files will have once moved into OUT
            if isinstance(form, dict) and form.get("path"):
                form["path"] = str(out / Path(form["path"]).name)

    kwargs = {} if spec else {"num_classes": args.num_classes or data.num_classes}
    save_approximated(new_model, stage, folded=report.folded_batchnorm, model_name=args.model, model_kwargs=kwargs)
    picture = _picture(report, stage, out, args.model)
    report.save_json(stage / "report.json")
    (stage / "args.json").write_text(json.dumps(vars(args), indent=2) + "\n")
    _commit_outputs(stage, out)
    print(report.format_table())
    print(f"wrote {out / 'report.json'}, the model ({out / 'manifest.json'} + model_state.pt), {calib_file}"
          + (f" and the picture {picture}" if picture else ""))
    return 0


INCOMPLETE_MARKER = "INCOMPLETE"


def _commit_outputs(stage: Path, out: Path) -> None:
    """Move every file of ``stage`` into ``out`` (renames on one file system), args.json and report.json last.
    While they move, ``out/INCOMPLETE`` says so: if it stays, the move was interrupted and ``out`` mixes two
    runs."""
    marker = out / INCOMPLETE_MARKER
    marker.write_text("a run was moving its outputs into this folder and did not finish: the files here may "
                      "come from two runs; run it again\n")
    last = ("report.json", "args.json")  # the files that say which run the folder holds go in last
    names = sorted((p.name for p in stage.iterdir() if p.is_file()), key=lambda n: last.index(n) + 1 if n in last else 0)
    for name in names:
        os.replace(stage / name, out / name)
    marker.unlink()


def _check_names(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Unknown model and data set names are argument errors (exit 2), named with the accepted ones."""
    from .zoo.data import list_datasets
    from .zoo.models import bundled_spec, list_models

    if bundled_spec(args.model) is None:
        import torchvision

        known = torchvision.models.list_models()
        if args.model not in known:
            examples = ", ".join(n for n in ("vgg16", "resnet18", "alexnet", "mobilenet_v2") if n in known)
            parser.error(f"unknown model {args.model!r}: use a bundled model ({', '.join(list_models())}) or a "
                         f"torchvision classification name ({examples}, ...)")
    if args.dataset is not None and args.dataset not in list_datasets() + ["fmnist"]:
        parser.error(f"--dataset: unknown data set {args.dataset!r}; choose one of {', '.join(list_datasets())}")


def default_threads() -> int:
    """Half the cores this process may use, at most 4, at least 1: the rest stays free for data loading and
    whatever else runs. On a shared 2-core machine a second thread made vgg-fmnist's batch-32 forward 10x
    slower (355 ms against 34 ms with one, 2026-11-25), so there the default is 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(4, cores // 2))


def _calibration_images(data, args) -> tuple[np.ndarray, np.ndarray]:
    """(positions in data.train, image ids) of the calibration images. A data set whose train split is an
    already-drawn calibration sample (the embedded Fashion-MNIST) gives all of it, or ``--calib-images N``
    of it; its ids are the images' indices in the full training split."""
    if data.calibration_sample is None:
        indices = calibration_indices(len(data.train), args.calib_fraction, args.calib_images, args.seed)
        return indices, indices
    available = len(data.calibration_sample)
    if args.calib_images is not None and args.calib_images > available:
        raise ValueError(f"--calib-images {args.calib_images}: the embedded {data.name} holds {available} calibration "
                         "images; for more, install the full data set (apt-get install dataset-fashion-mnist) and "
                         "pass --dataset fashion-mnist")
    if args.calib_images is None and args.seed != 0:
        log.warning("%s holds the seed-0 calibration draw; --seed %d changes the other random choices only",
                    data.name, args.seed)
    positions = (np.arange(available) if args.calib_images is None
                 else calibration_indices(available, 1.0, args.calib_images, args.seed))
    return positions, data.calibration_sample[positions]


def _finetune(new_model, model, data, args, report):
    """Fine-tune the approximated model (``--finetune-epochs N``, ``--finetune labels|distill``) on the training
    split, evaluated on the test split after each epoch; fills ``report.finetune``, ``report.timing["finetune_s"]``
    and the accuracy after fine-tuning (``top1_approximated`` keeps the accuracy before it)."""
    from .finetune import finetune
    from .zoo.evaluate import accuracy

    if data.calibration_sample is not None:
        log.warning("fine-tuning on the %d images of %s's training split, its calibration sample: no other "
                    "training images are available, and training on the images the approximation was fitted to "
                    "can lower test accuracy (for the whole training split: apt-get install dataset-fashion-mnist, "
                    "then --dataset fashion-mnist)", len(data.train), data.name)
    mode = args.finetune
    epochs_done = []

    def evaluate(student):  # top-1/top-5 on the test split after each epoch
        epochs_done.append(1)
        return accuracy(student, data.test, eval_images=args.eval_images, batch_size=256, device=args.device,
                        num_workers=args.workers, progress=not args.quiet, desc=f"evaluate epoch {len(epochs_done)}")

    tuned, record = finetune(new_model, data.train, epochs=args.finetune_epochs, mode=mode,
                             teacher=model if mode == "distill" else None, evaluate=evaluate,
                             start_top1=report.accuracy["top1_after"], device=args.device,
                             seed=args.seed, progress=not args.quiet)
    report.timing["finetune_s"] = record["seconds"]
    report.finetune = {"mode": mode, "epochs": args.finetune_epochs, "top1": record["top1"],
                       "kept_start": record["kept_start"], "record": record}
    scores = report.accuracy
    scores.update({"top1_approximated": scores["top1_after"], "top5_approximated": scores["top5_after"]})
    if not record["kept_start"]:  # else the saved model is the approximated one, and so are its scores
        scores.update({"top1_after": record["top1"][-1], "top5_after": record["top5"][-1]})
    return tuned


def _picture(report, stage: Path, out: Path, model_name: str) -> Path | None:
    """OUT/spectra.png (drawn into ``stage``, moved with the other outputs): each approximated layer's response
    spectrum with its chosen rank (needs matplotlib)."""
    from .bench.plots import matplotlib_available, plot_spectra

    ranks = {layer.name: layer.rank for layer in report.layers if layer.status == "approximated"}
    spectra = {name: values for name, values in report.spectra.items() if name in ranks}
    if not spectra:
        return None
    missing = matplotlib_available()
    if missing:
        log.info("no picture: %s", missing)
        return None
    totals, accuracy = report.totals, report.accuracy or {}
    top1 = (f", top-1 {100 * accuracy['top1_before']:.2f} -> {100 * accuracy['top1_after']:.2f}"
            if "top1_after" in accuracy else "")
    plot_spectra(spectra, ranks, stage / "spectra.png",
                 title=f"{model_name}: response spectra, dots at the kept ranks\n"
                       f"({totals['theoretical_speedup']:.2f}x fewer MACs{top1})")
    return out / "spectra.png"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.budget == "latency" and args.speedup is None:
        parser.error("--budget latency needs --speedup S (a measured-latency target)")
    if args.model is None:
        args.model, args.dataset = DEFAULT_MODEL, args.dataset or DEFAULT_DATASET
    _check_names(parser, args)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.finetune is not None and not args.finetune_epochs:
        log.warning("--finetune %s has no effect without --finetune-epochs N", args.finetune)
    args.finetune = args.finetune or "labels"
    try:
        return _run(args)
    except KeyboardInterrupt:
        print("error: interrupted (the calibration file can be resumed with the same --calib-file)", file=sys.stderr)
        return 1
    except Exception as error:  # one clear line, no traceback, for any runtime failure
        log.debug("failure", exc_info=True)
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        print(f"error: {message}", file=sys.stderr)
        return 1
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":  # python -m lowrank_fm.cli; installed, the same main is the `lowrank-fm` command
    sys.exit(main())
