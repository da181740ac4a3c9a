"""Run a fixed set of cells through the command line and record each layer's rank and the top-1, so that a
change meant to leave behaviour alone (a refactor) can be checked: run before, run after, compare.

    python scripts/fixed_cells.py --out /tmp/before.json
    python scripts/fixed_cells.py --out /tmp/after.json --compare /tmp/before.json

Every cell runs without the speed gate (its verdicts are timings, not decisions of the code) on one thread,
so two runs of the same code give the same ranks and top-1.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DIGITS_METHODS = ("alds", "alds-sigma", "cp", "cp-sigma", "fm", "fm-3d", "fm-linear", "spatial", "svd", "svd-sigma",
                  "tucker1", "tucker2", "tucker2-sigma")
CELLS = ([("vgg-digits", method, ["--energy", "0.9"]) for method in DIGITS_METHODS]
         + [("vgg-fmnist", method, ["--speedup", "3"]) for method in ("fm", "fm-3d", "tucker2", "alds")]
         + [("resnet-fmnist", "fm", ["--speedup", "2"])])


def run_cell(model: str, method: str, extra: list[str], out: Path) -> dict:
    command = [sys.executable, str(ROOT / "scripts" / "approximate.py"), model, "--method", method, *extra,
               "--no-speed-gate", "--threads", "1", "--quiet", "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1:]}
    report = json.loads((out / "report.json").read_text())
    return {"ranks": {layer["name"]: (layer["rank"], layer["status"]) for layer in report["layers"]},
            "top1_after": report["accuracy"]["top1_after"], "top1_before": report["accuracy"]["top1_before"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--compare", type=Path, help="an earlier --out to compare with")
    parser.add_argument("--only", nargs="*", help="model names to run (default: all cells)")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        for index, (model, method, extra) in enumerate(CELLS):
            if args.only and model not in args.only:
                continue
            key = f"{model} {method} {' '.join(extra)}"
            results[key] = run_cell(model, method, extra, Path(scratch) / str(index))
            print(key, results[key].get("top1_after", results[key].get("error")), flush=True)
    args.out.write_text(json.dumps(results, indent=1))
    if args.compare is None:
        return 0
    before = json.loads(args.compare.read_text())
    results = json.loads(json.dumps(results))  # tuples as the file holds them (lists)
    same = True
    print(f"{'cell':45s} {'top-1 before':>13s} {'top-1 after':>12s}  ranks")
    for key, now in results.items():
        then = before.get(key, {})
        equal_ranks = now.get("ranks") == then.get("ranks")
        equal_top1 = now.get("top1_after") == then.get("top1_after")
        same &= equal_ranks and equal_top1
        print(f"{key:45s} {then.get('top1_after', float('nan')):13.4f} {now.get('top1_after', float('nan')):12.4f}  "
              f"{'same' if equal_ranks else 'DIFFERENT'}")
    print("every cell the same" if same else "SOME CELLS DIFFER")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
