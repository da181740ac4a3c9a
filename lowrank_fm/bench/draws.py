"""The same accuracy cells over several calibration draws: how much of a difference between two methods is the
draw of the calibration images (and of the test images' luck), and how much is the method.

One run of a cell gives one drop d (points of top-1); its paired standard error on the test split (the
accuracy table's "±") says nothing about another calibration draw. With the same cell run on draws
s = 1..n (``scripts/benchmark.py --seeds``: seed s draws the 1% calibration subset and seeds the method), the
table gives per method

    mean drop  d_bar = (1/n) sum_s d_s,    its standard error  SE = std(d_s, ddof=1) / sqrt(n),

and, against a reference method R run on the same draws, the paired difference

    delta_s = d_s - d^R_s,    delta_bar = (1/n) sum_s delta_s,    SE(delta_bar) = std(delta_s, ddof=1) / sqrt(n)

(positive: the method loses more than R). Pairing removes what the two methods share on a draw (its
calibration images, its test-split luck), so it resolves smaller differences than two separate means.
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np

from .provenance import current_rows

__all__ = ["draw_key", "draw_summary", "draws_table", "REFERENCE_LABEL"]

#: the method every other one is compared with, draw by draw (the default a user gets)
REFERENCE_LABEL = "auto, allocation output"


def draw_key(row: dict) -> tuple:
    """What makes two rows the same run: the accuracy cell (model, label, target, evaluation images) and its
    calibration draw (``calibration_seed``; rows written before the field existed drew with seed 0)."""
    return (row["model"], row["label"], float(row["target_speedup"]), row.get("eval_images"),
            int(row.get("calibration_seed", 0)))


def _mean_and_se(values: list[float]) -> tuple[float, float]:
    """(mean, std(ddof=1) / sqrt(n)); the standard error is nan for a single value."""
    array = np.asarray(values, dtype=float)
    se = float(array.std(ddof=1) / math.sqrt(array.size)) if array.size > 1 else math.nan
    return float(array.mean()), se


def draw_summary(rows: list[dict], reference: str = REFERENCE_LABEL) -> list[dict]:
    """Per (model, target, label) with rows on at least two draws: ``seeds`` and ``drops`` (in seed order),
    ``mean`` and ``se`` of the drop over draws, ``approximate_s`` (mean wall time of approximate()), and,
    where ``reference`` has rows on the same model and target, ``paired`` = (mean, se, draws) of
    d_s - d^reference_s over the draws both have (None for the reference itself or without common draws).
    Only current rows count (the latest per :func:`draw_key`)."""
    cells: dict[tuple, dict[int, dict]] = defaultdict(dict)
    for row in current_rows(rows, draw_key):
        model, label, target, _, seed = draw_key(row)
        cells[(model, target, label)][seed] = row
    summaries = []
    for (model, target, label), by_seed in sorted(cells.items(), key=lambda item: (item[0][0], item[0][1])):
        if len(by_seed) < 2:
            continue
        seeds = sorted(by_seed)
        drops = [float(by_seed[s]["drop_points"]) for s in seeds]
        mean, se = _mean_and_se(drops)
        paired = None
        base = cells.get((model, target, reference), {})
        common = [s for s in seeds if s in base]
        if label != reference and len(common) >= 2:
            deltas = [float(by_seed[s]["drop_points"]) - float(base[s]["drop_points"]) for s in common]
            paired = (*_mean_and_se(deltas), len(common))
        runs = [by_seed[seed] for seed in seeds]
        summaries.append({"model": model, "target": target, "label": label, "seeds": seeds, "drops": drops,
                          "mean": mean, "se": se, "paired": paired,
                          "speedups": [float(r["theoretical_speedup"]) for r in runs],
                          "approximate_s": float(np.mean([r["approximate_wall_s"] for r in runs])),
                          "commits": sorted({(r["provenance"].get("commit") or "?")[:8] for r in runs}),
                          "latest_date": max(r["provenance"].get("date_utc") or "" for r in runs)[:10]})
    return summaries


def draws_table(rows: list[dict], reference: str = REFERENCE_LABEL) -> str:
    """The Markdown table of :func:`draw_summary`: one line per method and cell."""
    lines = ["| model | target | method | draws (seeds) | drop per draw (points) | mean drop ± SE | "
             f"minus `{reference}`, paired ± SE | theoretical speedups | approximate (s), mean | commit(s), latest date |",
             "|" + " --- |" * 10]
    for s in draw_summary(rows, reference):
        paired = "-" if s["paired"] is None else f"{s['paired'][0]:+.2f} ± {s['paired'][1]:.2f}"
        lines.append(f"| {s['model']} | {s['target']:g}x | {s['label']} | {len(s['seeds'])} "
                     f"({', '.join(map(str, s['seeds']))}) | {' / '.join(f'{d:.2f}' for d in s['drops'])} | "
                     f"{s['mean']:.2f} ± {s['se']:.2f} | {paired} | "
                     f"{min(s['speedups']):.2f}x-{max(s['speedups']):.2f}x | {s['approximate_s']:.1f} | "
                     f"{' / '.join(s['commits'])}, {s['latest_date']} |")
    return "\n".join(lines)
