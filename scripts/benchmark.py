"""Benchmark accuracy against theoretical speedup for every method on the reference models.

    python scripts/benchmark.py                       # the full grid (vgg-fmnist 2/3/4x, resnet-fmnist 1.5/2/3x)
    python scripts/benchmark.py --models vgg-fmnist --speedups 3 4 --out results/quick.jsonl

Writes one JSON line per run to --out (default results/accuracy.jsonl) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lowrank_fm.benchmark import DEFAULT_GRID, BenchmarkRun, markdown_table, run_benchmark  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=list(DEFAULT_GRID), choices=list(DEFAULT_GRID))
    parser.add_argument("--speedups", nargs="*", type=float, default=None, help="override the grid's targets")
    parser.add_argument("--labels", nargs="*", default=None, help="only the runs with these labels")
    parser.add_argument("--out", default="results/accuracy.jsonl")
    parser.add_argument("--eval-images", type=int, default=None)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1, as the README table)")
    parser.add_argument("--table", action="store_true", help="only print the table of an existing --out file")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    if args.table:
        rows = [json.loads(line) for line in Path(args.out).read_text().splitlines() if line.strip()]
        print(markdown_table(rows))
        return 0
    grid = {}
    for model in args.models:
        runs = DEFAULT_GRID[model]
        if args.speedups:
            base = {r.label: r for r in runs}
            runs = [BenchmarkRun(r.label, s, r.settings) for s in args.speedups for r in base.values()]
        if args.labels:
            runs = [r for r in runs if r.label in args.labels]
        grid[model] = runs
    rows = run_benchmark(grid, args.out, eval_images=args.eval_images, data_dir=args.data_dir)
    print(markdown_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
