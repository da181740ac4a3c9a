"""Train a bundled reference model and write its checkpoint + a JSON record (seed, command, accuracy).

    python scripts/train_reference.py vgg-fmnist
    python scripts/train_reference.py resnet-fmnist --epochs 12
    python scripts/train_reference.py resnet20-cifar10 --device cuda --epochs 60 --lr 0.1
    python scripts/train_reference.py densenet161-cifar10 --device cuda --time-budget 330

The checkpoint goes to lowrank_fm/zoo/checkpoints/NAME.pt (state_dict, loads with weights_only=True); the CIFAR-10
torchvision models, too large to ship, go to the cache folder ($LOWRANK_FM_CACHE, default ~/.cache/lowrank_fm).
CIFAR-10 models train with the data resident on the device (lowrank_fm.zoo.image_training: random crop and flip,
bfloat16 autocast on CUDA, warm-up epoch then cosine); --time-budget S fixes the number of epochs after the
first one from its duration (at most --epochs) and records it, so --epochs N reproduces the schedule.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lowrank_fm.zoo.data import load_dataset  # noqa: E402
from lowrank_fm.zoo.evaluate import accuracy  # noqa: E402
from lowrank_fm.zoo.models import CHECKPOINT_DIR, bundled_spec, list_models  # noqa: E402
from lowrank_fm.zoo.training import TrainSettings, train_classifier  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", choices=[m for m in list_models() if bundled_spec(m).weights in ("checkpoint", "cache")])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (the shipped vgg-fmnist was trained on a GPU)")
    parser.add_argument("--half", action="store_true",
                        help="store floating-point tensors in float16 (half the file; the shipped vgg-fmnist)")
    parser.add_argument("--out-dir", default=None, help="default: lowrank_fm/zoo/checkpoints (cache folder for "
                        "the CIFAR-10 torchvision models)")
    parser.add_argument("--time-budget", type=float, default=None,
                        help="CIFAR-10 models: seconds of training; epochs set after the first (at most --epochs)")
    parser.add_argument("--max-images", type=int, default=None, help="CIFAR-10 models: train on a seeded subset of N")
    parser.add_argument("--results", default=None,
                        help="CIFAR-10 models: also append the record, with its provenance, to this JSONL file "
                             "(results/reference_training.jsonl)")
    return parser


def _train_cifar(args, spec) -> int:
    """CIFAR-10 models: data on the device, see lowrank_fm.zoo.image_training."""
    from lowrank_fm.zoo.cifar10_jpeg import read_cifar10_jpeg
    from lowrank_fm.zoo.image_training import ImageTrainSettings, evaluate_on_device, train_on_device
    from lowrank_fm.zoo.models import cache_dir

    from lowrank_fm.bench.provenance import machine_load

    load_before = machine_load()
    arrays = read_cifar10_jpeg(args.data_dir)
    torch.manual_seed(args.seed)
    model = spec.build()
    settings = ImageTrainSettings(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                                  device=args.device, input_size=spec.input_size or 32,
                                  time_budget_s=args.time_budget, max_images=args.max_images)
    record = train_on_device(model, torch.from_numpy(arrays["train_images"]), torch.from_numpy(arrays["train_labels"]),
                             torch.from_numpy(arrays["val_images"]), torch.from_numpy(arrays["val_labels"]), settings)
    out = Path(args.out_dir) if args.out_dir else (CHECKPOINT_DIR if spec.weights == "checkpoint" else cache_dir())
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{args.model}.pt"
    state = model.state_dict()
    if args.half:
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
        model.load_state_dict(state)  # the accuracy recorded is the stored file's
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)
    device = torch.device(args.device)
    top1 = evaluate_on_device(model.to(device), torch.from_numpy(arrays["val_images"]).to(device),
                              torch.from_numpy(arrays["val_labels"]).to(device), settings.input_size)
    model.to("cpu")
    record.update({
        "model": args.model,
        "dataset": spec.dataset,
        "input_size": settings.input_size,
        "test_top1": top1,
        "test_images": int(len(arrays["val_labels"])),
        "params": sum(p.numel() for p in model.parameters()),
        "seed": args.seed,
        "command": "python scripts/train_reference.py " + " ".join(sys.argv[1:]),
        "reproduce": f"python scripts/train_reference.py {args.model} --device {args.device} --epochs "
                     f"{record['epochs']} --lr {args.lr} --batch-size {args.batch_size}" + (" --half" if args.half else ""),
        "stored_dtype": "float16" if args.half else "float32",
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "torch": torch.__version__,
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "note": "GPU training (bfloat16 autocast) is not bit-reproducible",
    })
    (out / f"{args.model}.json").write_text(json.dumps(record, indent=2) + "\n")
    if args.results:
        from lowrank_fm.bench.provenance import append_row

        append_row(args.results, {k: v for k, v in record.items() if k not in ("loss", "epoch_seconds")},
                   load_before=load_before)
    logging.info("%s: val top-1 %.4f, %d epochs, %.0f s -> %s", args.model, top1, record["epochs"],
                 record["train_seconds"], path)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    spec = bundled_spec(args.model)
    if spec.dataset == "cifar10-jpeg":
        return _train_cifar(args, spec)
    if args.out_dir is None:
        args.out_dir = str(CHECKPOINT_DIR)
    data = load_dataset(spec.dataset, args.data_dir)
    torch.manual_seed(args.seed)
    model = spec.build()
    settings = TrainSettings(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                             device=args.device)
    start = time.time()
    history = train_classifier(model, data.train, data.test, settings)
    seconds = time.time() - start
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{args.model}.pt"
    state = model.state_dict()
    if args.half:  # loading copies them back into the float32 model
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
        model.load_state_dict(state)  # the accuracy recorded is the stored file's
    torch.save(state, path)
    result = accuracy(model, data.test, progress=False)
    record = {
        "model": args.model,
        "dataset": spec.dataset,
        "test_top1": result["top1"],
        "test_images": result["images"],
        "seed": args.seed,
        "settings": settings.__dict__,
        "command": "python scripts/train_reference.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "train_seconds": round(seconds, 1),
        "threads": args.threads,
        "stored_dtype": "float16" if args.half else "float32",
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "torch": torch.__version__,
        "machine": platform.machine(),
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "history": history,
    }
    (out / f"{args.model}.json").write_text(json.dumps(record, indent=2) + "\n")
    logging.info("%s: test top-1 %.4f, %.0f s -> %s", args.model, result["top1"], seconds, path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
