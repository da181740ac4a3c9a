"""Calibration throughput against plain inference on the same model and images, in one run.

    python scripts/calibration_benchmark.py                      # vgg-fmnist, 6,000 training images (10%)
    python scripts/calibration_benchmark.py --images 600 --repeats 5 --device cuda

Appends one JSON line to --out (default results/calibration.jsonl) with images/s of both and their ratio.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from lowrank_fm.cli import calibration_indices  # noqa: E402
from lowrank_fm.zoo.data import load_dataset  # noqa: E402
from lowrank_fm.zoo.models import bundled_spec, create_model  # noqa: E402
from lowrank_fm.bench.provenance import append_row, machine_load  # noqa: E402
from lowrank_fm.bench.throughput import calibration_throughput  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vgg-fmnist")
    parser.add_argument("--images", type=int, default=6000, help="calibration images from the training split")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--positions-per-image", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved inference/calibration repeats")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--weights", default="default", help="default|none|PATH (torchvision names need none or PATH)")
    parser.add_argument("--image-size", type=int, default=224, help="imagefolder crop size")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", default="results/calibration.jsonl")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    spec = bundled_spec(args.model)
    data = load_dataset(spec.dataset if spec else "imagefolder", args.data_dir, image_size=args.image_size)
    indices = calibration_indices(len(data.train), 1.0, args.images, seed=0)
    images = torch.stack([data.train[int(i)][0] for i in indices])
    batches = list(torch.split(images, args.batch_size))
    if args.device.startswith("cuda"):
        batches = [b.pin_memory() for b in batches]
    model = create_model(args.model, args.weights, num_classes=None if spec else data.num_classes)
    load_before = machine_load()
    result = calibration_throughput(model, batches, positions_per_image=args.positions_per_image,
                                    repeats=args.repeats, device=args.device)
    result = {"kind": "throughput", **result, "model": args.model, "batch_size": args.batch_size,
              "load_average": list(os.getloadavg())}
    if args.device.startswith("cuda"):
        result["gpu"] = torch.cuda.get_device_name(torch.device(args.device))
    out = Path(args.out)
    append_row(out, result, load_before=load_before)  # commit, date, machine, threads: lowrank_fm.bench.provenance
    print(f"{args.model}, {result['images']} images, {args.device}: inference {result['inference_images_per_s']:.0f} "
          f"img/s, calibration {result['calibration_images_per_s']:.0f} img/s, ratio {result['ratio']:.2f} "
          f"(load average {result['load_average'][0]:.2f}); appended to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
