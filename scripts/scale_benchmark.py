"""Scale benchmark: each stage of approximate() on a 224 px torchvision model, against plain inference over the
same calibration images, with one process or several (torchrun), one torch thread each (``--threads``).

    python scripts/scale_benchmark.py --data-dir DIR --images 64                              # one process
    torchrun --standalone --nproc-per-node 2 scripts/scale_benchmark.py --data-dir DIR --images 64   # two

DIR is an ImageFolder (``DIR/train/<class>/*.jpg``, e.g. CIFAR-10 JPEGs extracted from
``../shared/data/cifar10-jpeg.tar.gz``), resized to ``--image-size``. The model has random weights (``--weights none``
drawn from ``--seed``): the cost of each stage does not depend on the weights. Every rank first times plain
inference over its own shard of the images (the physical limit of calibration and of the layer-wise pass), then
runs approximate() (method fm, ``--energy``, no speed gate unless ``--speed-gate``). Rank 0 appends one row to
``--out`` (default results/scale.jsonl) with the report's per-stage ``timing`` (rank 0's), each rank's peak
resident memory, and the ratios (calibration + layer-wise pass) / inference and layer-wise pass / inference.
"""

from __future__ import annotations

import argparse
import logging
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.utils.data import DataLoader, Subset  # noqa: E402


IMAGENET_1PCT = 12_811  # 1% of ImageNet-1k's training split


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vgg16", help="a torchvision model name (default vgg16)")
    parser.add_argument("--data-dir", required=True, type=Path)
    parser.add_argument("--images", type=int, default=64, help="calibration images (the first N of DIR/train)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--energy", type=float, default=0.95)
    parser.add_argument("--speed-gate", action="store_true", help="time every factorized layer (minutes at 224 px)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    parser.add_argument("--calib-dir", type=Path, default=None, help="where the calibration store goes (every rank sees it)")
    parser.add_argument("--out", default="results/scale.jsonl")
    parser.add_argument("--note", default=None)
    parser.add_argument("--positions-per-image", type=int, default=10, help="response samples per image and layer "
                        "the calibration store keeps (default 10, as approximate())")
    parser.add_argument("--fit-positions", default="64", help="positions per image the layer-wise pass draws, with the "
                        "original network alongside (default 64); 'store': replay the store's samples without it")
    parser.add_argument("--sharded-solvers", action="store_true",
                        help="each rank fits the solvers on its own rows, the sums added over the ranks (default: rank 0 "
                             "solves on the gathered rows)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)

    from calibration import shard_range
    from lowrank_fm import approximate
    from lowrank_fm.distributed import broadcast_object, init_from_env
    from lowrank_fm.zoo.data import load_dataset
    from lowrank_fm.zoo.models import create_model

    from lowrank_fm.bench.provenance import append_row, machine_load

    load_before = machine_load()
    rank, size, device = init_from_env(args.device)
    data = load_dataset("imagefolder", args.data_dir, image_size=args.image_size)
    torch.manual_seed(args.seed)
    model = create_model(args.model, "none", num_classes=data.num_classes).eval().to(device)
    subset = Subset(data.train, list(range(args.images)))
    loader = DataLoader(subset, batch_size=args.batch_size, shuffle=False, num_workers=0)

    # plain inference over this rank's images (each rank its shard, all at once: as the calibration runs)
    start, stop = shard_range(args.images, rank, size) if size > 1 else (0, args.images)
    own = DataLoader(Subset(subset, list(range(start, stop))), batch_size=args.batch_size, shuffle=False)
    batches = [images.to(device) for images, _ in own]
    if device.startswith("cuda"):  # one untimed batch: CUDA context, cuDNN's algorithm choice
        with torch.no_grad():
            model(batches[0])
        torch.cuda.synchronize()
    if size > 1:
        torch.distributed.barrier()
    begin = time.perf_counter()
    with torch.no_grad():
        for batch in batches:
            model(batch)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    inference_s = time.perf_counter() - begin
    del batches
    inference = [inference_s, stop - start]
    if size > 1:
        gathered: list = [None] * size
        torch.distributed.all_gather_object(gathered, inference)
        inference_s = max(s for s, _ in gathered)  # the ranks run together: the slowest one's wall time

    calib_root = args.calib_dir or Path(tempfile.gettempdir())
    calib_file = calib_root / f"scale-{args.model}-{args.images}-{size}p.h5"
    if rank == 0 and calib_file.exists():
        calib_file.unlink()  # a fresh calibration every run: its time is measured
    if size > 1:
        torch.distributed.barrier()
    begin = time.perf_counter()
    _, report = approximate(model, loader, n_images=args.images, calib_file=calib_file, method="fm",
                            energy=args.energy, speed_gate=args.speed_gate, seed=args.seed, device=device,
                            sharded_solvers=args.sharded_solvers, positions_per_image=args.positions_per_image,
                            fit_positions=None if args.fit_positions == "store" else int(args.fit_positions),
                            progress=False, model_name=args.model, dataset_name="imagefolder")
    approximate_wall_s = time.perf_counter() - begin
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    peaks = [peak_mb]
    if size > 1:
        peaks = [None] * size
        torch.distributed.all_gather_object(peaks, peak_mb)
    if rank == 0:
        timing = {k: round(v, 3) for k, v in report.timing.items()}
        pass_s = timing.get("build_s", 0.0)
        growing = {"inference": inference_s, "calibrate": timing.get("calibrate_s", 0.0), "layerwise_pass": pass_s}
        row = {"kind": "scale", "model": args.model, "image_size": args.image_size, "images": args.images,
               "batch_size": args.batch_size, "processes": size, "threads": args.threads, "device": device,
               "energy": args.energy, "speed_gate": args.speed_gate, "method": "fm", "sharded_solvers": args.sharded_solvers,
               "fit_positions": report.config.get("fit_positions"),
               "positions_per_image": report.config.get("positions_per_image"),
               "replaced_layers": sum(1 for r in report.layers if r.status == "approximated"),
               "timing": timing, "approximate_wall_s": round(approximate_wall_s, 3),
               "inference_s": round(inference_s, 3), "inference_images_per_s": round(args.images / inference_s, 3),
               "calibrate_and_pass_over_inference": round((timing.get("calibrate_s", 0.0) + pass_s) / inference_s, 3),
               "pass_over_inference": round(pass_s / inference_s, 3),
               "peak_rss_mb_per_rank": [round(p, 1) for p in peaks],
               "images_per_s": {stage: round(args.images / seconds, 2) for stage, seconds in
                                {**growing, "approximate": approximate_wall_s}.items() if seconds > 0},
               # the stages that grow with the images, per image x 12,811 (statistics: one eigendecomposition
               # per layer whatever the images; the pass's solvers grow with the rows kept, sublinearly)
               "projected_imagenet_1pct_s": {stage: round(seconds * IMAGENET_1PCT / args.images, 1)
                                             for stage, seconds in growing.items()}}
        if device.startswith("cuda"):
            row["gpu"] = torch.cuda.get_device_name()
        if args.note:
            row["note"] = args.note
        append_row(args.out, row, load_before=load_before)
        print(row)
    if size > 1:
        broadcast_object(None)
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
