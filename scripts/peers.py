"""Peers benchmark: AIMET, Torch-Pruning, TensorLy-Torch and lowrank-fm on the same model, calibration images
and test split, at equal MAC targets, in one run, none fine-tuned (logic: lowrank_fm/bench/peers.py).

    pip install -e ".[peers]"                      # the peers, pinned (never in the core install)
    python scripts/peers.py                        # vgg-fmnist and resnet-fmnist at 2x / 3x / 4x
    python scripts/peers.py --models vgg-fmnist --targets 2 --labels "TensorLy-Torch CP"
    python scripts/peers.py --table                # the table of results/peers.jsonl, runs nothing

Appends one row per cell (with provenance) to --out (default results/peers.jsonl), redraws
results/peers_MODEL.png and prints the table; `python scripts/benchmark.py --readme` puts it in the README.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lowrank_fm.bench.peers import DEFAULT_TARGETS, PEER_METHODS, peers_table, plot_peers, run_bundled  # noqa: E402
from lowrank_fm.bench.provenance import read_rows  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=["vgg-fmnist", "resnet-fmnist"])
    parser.add_argument("--targets", nargs="*", type=float, default=list(DEFAULT_TARGETS), help="MAC reduction targets")
    parser.add_argument("--labels", nargs="*", default=None, choices=[m.label for m in PEER_METHODS],
                        help="only these methods")
    parser.add_argument("--out", default="results/peers.jsonl")
    parser.add_argument("--eval-images", type=int, default=None, help="default: the whole test split")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved latency rounds per batch size")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--table", action="store_true", help="only print the table (and redraw the plots)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    if not args.table:
        for model in args.models:
            run_bundled(model, args.out, targets=args.targets, labels=args.labels, eval_images=args.eval_images,
                        data_dir=args.data_dir, latency_rounds=args.rounds)
    rows = read_rows(args.out)
    try:
        for path in plot_peers(rows, Path(args.out).parent):
            print(f"wrote {path}")
    except ImportError as error:
        print(f"no plot: {error}")
    print(peers_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
