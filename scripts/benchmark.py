"""Benchmark accuracy against theoretical speedup for every method on the reference models.

    python scripts/benchmark.py                       # the full grid (vgg-fmnist 2/3/4x, resnet-fmnist 1.5/2/3x)
    python scripts/benchmark.py --models vgg-fmnist --speedups 3 4 --out results/quick.jsonl
    python scripts/benchmark.py --jobs 15                 # the grid in 15 one-thread processes (many cores)
    python scripts/benchmark.py --speed                # measured latency: vgg-fmnist grid + vgg16 speed-only
    python scripts/benchmark.py --speed --models vgg16 # only the vgg16 speed-only cell (random weights)
    python scripts/benchmark.py --readme               # rewrite the README's tables and the peers plots from results/
                                                       # (runs nothing; the peers run itself: scripts/peers.py)
    python scripts/benchmark.py --models resnet-fmnist --speedups 4 --seeds 0 1 2 3 4 --labels "cp + correction"
                                                       # a cell on 5 calibration draws -> results/draws.jsonl
    python scripts/benchmark.py --all                  # re-run everything the README shows, then --readme
    python scripts/benchmark.py --torchvision          # issue 19's table: the five torchvision architectures
                                                       # whose CIFAR-10 checkpoints are cached (the others: one
                                                       # line naming the train_reference.py command), -> results/torchvision.jsonl

Writes one JSON line per run to --out (default results/accuracy.jsonl; with --speed results/latency.jsonl,
plus results/*.png plots) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lowrank_fm.bench.benchmark import DEFAULT_GRID, BenchmarkRun, markdown_table, run_benchmark  # noqa: E402
from lowrank_fm.bench.speed_benchmark import SPEED_GRID, SPEED_GRID_CUDA, make_plots, run_speed_benchmark, speed_table  # noqa: E402
from lowrank_fm.bench.torchvision_table import TORCHVISION_MODELS  # noqa: E402


# the runs --all makes besides the accuracy cells (those are every current row of results/accuracy.jsonl, see
# lowrank_fm.bench.benchmark.rerun_commands), in this order (scripts/ paths, from the repository root)
OTHER_README_RUNS = [
    ["benchmark.py", "--speed", "--models", "vgg-digits"],
    ["benchmark.py", "--speed", "--models", "vgg-fmnist", "--speedups", "3"],
    ["benchmark.py", "--speed", "--models", "resnet-fmnist"],
    ["benchmark.py", "--speed", "--models", "vgg16"],
    ["calibration_benchmark.py", "--model", "vgg-fmnist-narrow"],
    ["peers.py", "--models", "vgg-fmnist", "resnet-fmnist"],  # needs the extra "peers"
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=None, choices=sorted(set(DEFAULT_GRID) | set(SPEED_GRID) | set(TORCHVISION_MODELS)))
    parser.add_argument("--speed", action="store_true",
                        help="measured-latency benchmark (original vs approximated, batch 1 and 32 / 8) and plots")
    parser.add_argument("--rounds", type=int, default=7,
                        help="--speed: interleaved timing rounds per batch size (the headline is their median; >= 5)")
    parser.add_argument("--plots", action="store_true", help="--speed: only redraw the plots from an existing --out")
    parser.add_argument("--speedups", nargs="*", type=float, default=None,
                        help="override the grid's targets (--torchvision: only the cells at these targets)")
    parser.add_argument("--labels", nargs="*", default=None, help="only the runs (--torchvision: cells) with these labels")
    parser.add_argument("--out", default=None, help="default results/accuracy.jsonl (--speed: results/latency.jsonl; "
                        "--seeds: results/draws.jsonl)")
    parser.add_argument("--seeds", nargs="+", type=int, default=None,
                        help="run the cells once per calibration draw (seed s draws the 1%% subset and seeds the "
                             "method; the accuracy table's rows are seed 0), rows to results/draws.jsonl, whose "
                             "README table gives each method's mean drop over the draws and its paired difference "
                             "from auto's")
    parser.add_argument("--eval-images", type=int, default=None)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1, as the README table)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="run the accuracy cells in this many processes of one thread each (a many-core machine)")
    parser.add_argument("--torchvision", action="store_true",
                        help="the torchvision-architectures table (issue 19): tucker2 + VBMF ranks and the default "
                             "method at 2x / 3x MACs, top-1 before / after / after fine-tuning (labels, distill), "
                             "measured speedup at batch 1 and 32; architectures without a cached checkpoint are "
                             "named with the command that trains them")
    parser.add_argument("--finetune-epochs", type=int, default=1, help="--torchvision: fine-tuning epochs (default 1)")
    parser.add_argument("--device", default="cpu", help="--torchvision, --speed: cpu or cuda (--speed on cuda: vgg16 "
                        "at 4x, batch 64)")
    parser.add_argument("--latency-seconds", type=float, default=3.0,
                        help="--torchvision: least seconds of each timing sample (default 3; a GPU needs far less)")
    parser.add_argument("--table", action="store_true", help="only print the table of an existing --out file")
    parser.add_argument("--readme", action="store_true",
                        help="rewrite the generated tables of README.md from results/ (runs nothing)")
    parser.add_argument("--all", action="store_true",
                        help="re-run every cell the README shows (each current row of results/accuracy.jsonl, then "
                             "OTHER_README_RUNS), then rewrite its tables")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    if args.readme:
        return _readme()
    if args.all:
        return _all(args)
    if args.speed:
        return _speed(args)
    if args.torchvision:
        return _torchvision(args)
    args.out = args.out or ("results/draws.jsonl" if args.seeds else "results/accuracy.jsonl")
    if args.table:
        rows = [json.loads(line) for line in Path(args.out).read_text().splitlines() if line.strip()]
        print(markdown_table([r for r in rows if not args.models or r["model"] in args.models]))
        return 0
    args.models = args.models or list(DEFAULT_GRID)
    grid = {}
    for model in args.models:
        runs = DEFAULT_GRID[model]
        if args.speedups:
            base = {r.label: r for r in runs}
            runs = [BenchmarkRun(r.label, s, r.settings) for s in args.speedups for r in base.values()]
        if args.labels:
            runs = [r for r in runs if r.label in args.labels]
        grid[model] = runs
    rows = []
    for seed in args.seeds or [0]:
        rows += run_benchmark(grid, args.out, seed=seed, eval_images=args.eval_images, data_dir=args.data_dir,
                              jobs=args.jobs)
    if args.seeds:
        from lowrank_fm.bench.draws import draws_table
        from lowrank_fm.bench.provenance import read_rows

        print(draws_table(read_rows(Path(args.out))))
        return 0
    print(markdown_table(rows))
    return 0


def _torchvision(args: argparse.Namespace) -> int:
    from lowrank_fm.bench.provenance import read_rows
    from lowrank_fm.bench.torchvision_table import TABLE_CELLS, run_torchvision_table, select_cells, torchvision_table

    out = Path(args.out or "results/torchvision.jsonl")
    if not args.table:
        models = [m for m in (args.models or TORCHVISION_MODELS) if m in TORCHVISION_MODELS]
        cells = select_cells(TABLE_CELLS, args.labels, args.speedups)
        if not cells:
            raise SystemExit(f"no table cell has label in {args.labels} and target in {args.speedups}; the cells are: "
                             + "; ".join(f"{c.label!r} at {c.speedup}" for c in TABLE_CELLS))
        run_torchvision_table(out, models, cells, data_dir=args.data_dir, eval_images=args.eval_images,
                              finetune_epochs=args.finetune_epochs, device=args.device,
                              latency_rounds=args.rounds, latency_min_seconds=args.latency_seconds)
    print(torchvision_table(read_rows(out)))
    return 0


def _readme() -> int:
    from lowrank_fm.bench.readme import generated_regions, render_readme

    root = Path(__file__).resolve().parents[1]
    text = (root / "README.md").read_text()
    new = render_readme(text, root / "results")
    if new != text:
        (root / "README.md").write_text(new)
    print(f"README.md: {len(generated_regions(new))} generated tables, {'rewritten' if new != text else 'unchanged'}")
    _peers_plots(root / "results")
    return 0


def _peers_plots(results: Path) -> None:
    """Redraw results/peers_MODEL.png from results/peers.jsonl (the README shows them beside the peers table)."""
    from lowrank_fm.bench.peers import plot_peers
    from lowrank_fm.bench.plots import matplotlib_available
    from lowrank_fm.bench.provenance import read_rows

    rows = read_rows(results / "peers.jsonl")
    if not rows:
        return
    reason = matplotlib_available()
    if reason:
        print(f"peers plots not redrawn: {reason}")
        return
    for path in plot_peers(rows, results):
        print(f"wrote {path}")


def _all(args: argparse.Namespace) -> int:
    """Every cell whose row a README table shows, one after the other, then --readme: the accuracy cells are
    the current rows of results/accuracy.jsonl (:func:`~lowrank_fm.bench.benchmark.rerun_commands`, several
    CPU-hours on 2 cores), then OTHER_README_RUNS."""
    import subprocess

    from lowrank_fm.bench.benchmark import rerun_commands
    from lowrank_fm.bench.provenance import read_rows

    root = Path(__file__).resolve().parents[1]
    commands, orphans = rerun_commands(read_rows(root / "results" / "accuracy.jsonl"))
    for cell in orphans:
        logging.warning("not re-run (its label is no longer in the grid; archive its row): %s", cell)
    for script, *argv in commands + OTHER_README_RUNS:
        command = [sys.executable, str(root / "scripts" / script), *argv, "--threads", str(args.threads)]
        logging.info("running %s", " ".join(command[1:]))
        code = subprocess.run(command, cwd=root).returncode
        if code:
            return code
    return _readme()


def _speed(args: argparse.Namespace) -> int:
    import torch

    out = Path(args.out or "results/latency.jsonl")
    if not (args.table or args.plots):
        torch.set_num_threads(1)  # a shared 2-core machine: one thread gives the steadiest ratios
        grid = SPEED_GRID_CUDA if args.device.startswith("cuda") else SPEED_GRID
        runs = [r for m in (args.models or list(grid)) for r in grid.get(m, [])]
        if args.speedups:
            runs = [r for r in runs if r.speedup in args.speedups]
        if args.labels:
            runs = [r for r in runs if r.label in args.labels]
        run_speed_benchmark(runs, out, eval_images=args.eval_images, data_dir=args.data_dir, rounds=args.rounds,
                            device=args.device)
    rows = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    if not args.table:
        for path in make_plots(rows, out.parent):
            print(f"wrote {path}")
    print(speed_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
