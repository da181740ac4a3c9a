"""The ``approximate`` command line: parse, load model and data, run :func:`lowrank_fm.approximate`,
measure accuracy and latency, write OUT/report.json, the model (state_dict + manifest) and the run's
arguments. ``scripts/approximate.py`` is a thin wrapper around :func:`main`.

Exit status: 0 on success, 2 on bad arguments (argparse), 1 on a runtime failure with one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from .allocator import ALLOCATORS, use_allocator
from .config import ALLOCATIONS

__all__ = ["build_parser", "main", "calibration_indices"]

log = logging.getLogger("lowrank_fm")

MIN_CALIB_IMAGES = 128


def _energy(text: str) -> float:
    value = float(text)
    if not (0.0 < value <= 1.0):
        raise argparse.ArgumentTypeError(f"must satisfy 0 < E <= 1, got {value}")
    return value


def _speedup(text: str) -> float:
    value = float(text)
    if not value >= 1.0:
        raise argparse.ArgumentTypeError(f"must be >= 1 (a MAC reduction factor), got {value}")
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


def build_parser() -> argparse.ArgumentParser:
    from .methods import list_methods
    from .models import list_models

    parser = argparse.ArgumentParser(
        prog="approximate.py",
        description="Approximate a trained CNN by low-rank layers from a small calibration set, without retraining.",
    )
    parser.add_argument("model", nargs="?", default="vgg-digits",
                        help=f"bundled model ({', '.join(list_models())}) or a torchvision name (default vgg-digits)")
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--energy", type=_energy, default=None, help="energy kept per layer, 0 < E <= 1 (default 0.95)")
    target.add_argument("--speedup", type=_speedup, default=None, help="whole-model MAC reduction target S >= 1")
    parser.add_argument("--method", default="fm", choices=list_methods(),
                        help="fm (default: asymmetric + nonlinear + output matching), fm-linear (symmetric, linear)")
    parser.add_argument("--solver", choices=["rmsprop", "closed-form", "none"], default="rmsprop",
                        help="nonlinear refinement of method fm (default rmsprop)")
    parser.add_argument("--ranks", choices=["energy", "vbmf"], default="energy",
                        help="vbmf: each layer's rank from empirical VBMF (tucker2, tucker1)")
    parser.add_argument("--allocation", choices=list(ALLOCATIONS), default="error",
                        help="how --speedup is shared among layers (default error)")
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
    parser.add_argument("--image-size", type=_positive_int, default=224, help="ImageFolder crop size")
    calib = parser.add_mutually_exclusive_group()
    calib.add_argument("--calib-fraction", type=_fraction, default=0.01,
                       help=f"share of the training split used to calibrate (default 0.01, at least {MIN_CALIB_IMAGES} images)")
    calib.add_argument("--calib-images", type=_positive_int, default=None, help="number of calibration images")
    parser.add_argument("--calib-file", default=None, help="calibration HDF5 to write, resume or reuse (default OUT/calibration.h5)")
    parser.add_argument("--positions-per-image", type=_positive_int, default=10)
    parser.add_argument("--fit-positions", type=_positive_int, default=64,
                        help="positions per image drawn from whole feature maps for the solvers of fm / fm-3d (default 64)")
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
                        help="what --speedup counts: MACs (default) or measured per-layer latency")
    parser.add_argument("--allocator", choices=list(ALLOCATORS), default="reuse",
                        help="reuse (default): freed tensor memory stays in the process for the next forward, as it "
                             "would under jemalloc; system: glibc returns it and large outputs are page-faulted on "
                             "every forward (slows factorized layers most; the latency report records which)")
    parser.add_argument("--rank-multiple", type=_positive_int, default=1, help="round every rank to a multiple of N")
    parser.add_argument("--export", action="store_true",
                        help="also write TorchScript and ONNX forms to OUT, with a parity check and their latency")
    parser.add_argument("--workers", type=int, default=None,
                        help="DataLoader workers (default: 4 for image files (imagefolder, cifar10), 0 for in-memory data)")
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
    from . import approximate, save_approximated
    from .config import ApproxConfig
    from .data import load_dataset
    from .evaluate import accuracy
    from .latency import measure_speed
    from .models import bundled_spec, create_model

    from .distributed import init_from_env

    energy = 0.95 if args.energy is None else args.energy
    use_allocator(args.allocator)  # process-wide: the speed gate's and the latency report's timings run under it
    spec = bundled_spec(args.model)
    dataset_name = args.dataset or (spec.dataset if spec else "imagefolder")
    rank, world_size, args.device = init_from_env(args.device)  # under torchrun: one calibration shard per rank
    if args.workers is None:
        args.workers = min(4, os.cpu_count() or 1) if dataset_name in ("imagefolder", "cifar10") else 0
    out = Path(args.out or f"runs/{args.model}-{args.method}")
    out.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        (out / "args.json").write_text(json.dumps(vars(args), indent=2) + "\n")

    data = load_dataset(dataset_name, args.data_dir, image_size=args.image_size)
    model = create_model(args.model, args.weights, num_classes=None if spec else (args.num_classes or data.num_classes))
    model = model.to(args.device)
    indices = calibration_indices(len(data.train), args.calib_fraction, args.calib_images, args.seed)
    pin = args.device.startswith("cuda")
    loader = DataLoader(Subset(data.train, indices.tolist()), batch_size=args.batch_size, shuffle=False,
                        num_workers=args.workers, pin_memory=pin)
    config = ApproxConfig(
        method=args.method, energy=energy, speedup=args.speedup, ranks=args.ranks, allocation=args.allocation,
        solver=args.solver,
        output_matching=args.output_matching, matching_steps=args.matching_steps,
        include=args.include, exclude=tuple(args.exclude),
        positions_per_image=args.positions_per_image, fit_positions=args.fit_positions, covariance=args.covariance, seed=args.seed,
        device=args.device, progress=not args.quiet,
        speed_gate=args.speed_gate, speed_batch=args.latency_batch, budget=args.budget, rank_multiple=args.rank_multiple,
    )
    calib_file = Path(args.calib_file) if args.calib_file else out / "calibration.h5"
    target = f"speedup {args.speedup}x" if args.speedup else f"energy {energy}"
    log.info("%s on %s: %d calibration images, method %s, %s", args.model, dataset_name, len(indices), args.method, target)
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

        report.latency["export"] = export_and_check(new_model, images.cpu(), out, original=model)

    kwargs = {} if spec else {"num_classes": args.num_classes or data.num_classes}
    save_approximated(new_model, out, folded=report.folded_batchnorm, model_name=args.model, model_kwargs=kwargs)
    report.save_json(out / "report.json")
    print(report.format_table())
    print(f"wrote {out / 'report.json'}, the model ({out / 'manifest.json'} + model_state.pt) and {calib_file}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.budget == "latency" and args.speedup is None:
        parser.error("--budget latency needs --speedup S (a measured-latency target)")
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
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
