"""The README's tables, made from the committed results files.

Every table in README.md sits between two markers that name what produces it::

    <!-- generated: accuracy vgg-fmnist resnet-fmnist -->
    | model | ... |
    <!-- end generated -->

``python scripts/benchmark.py --readme`` rewrites every marked region from ``results/`` and
``tests/test_readme.py`` fails when a region differs from what that command would write. A table reads only
current rows (:func:`lowrank_fm.bench.provenance.current_rows`): rows with provenance, the latest per cell.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from .provenance import current_rows, device_label, read_rows

__all__ = ["TABLES", "render_table", "render_readme", "generated_regions"]

_REGION = re.compile(r"(<!-- generated: (?P<spec>[^>]*?) -->\n)(?P<body>.*?)(<!-- end generated -->)", re.DOTALL)


def _accuracy(results: Path, *models: str) -> str:
    from .benchmark import markdown_table

    rows = read_rows(results / "accuracy.jsonl")
    return markdown_table([r for r in rows if not models or r["model"] in models])


def _speed(results: Path, *models: str) -> str:
    from .speed_benchmark import speed_table

    rows = read_rows(results / "latency.jsonl")
    return speed_table([r for r in rows if not models or r["model"] in models])


def _header(*columns: str) -> list[str]:
    """A Markdown table's header and rule lines."""
    return ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]


def _stamp(provenance: dict) -> str:
    """``commit, date`` of a row: the commit's first 8 characters and the UTC day."""
    return f"{(provenance['commit'] or '?')[:8]}, {provenance['date_utc'][:10]}"


def _calibration(results: Path) -> str:
    lines = _header("model", "images", "batch", "calibrated layers", "inference (img/s)", "calibration (img/s)",
                    "calibration / inference", "device, threads", "load before", "commit, date")
    rows = current_rows(read_rows(results / "calibration.jsonl"), lambda r: (r["model"], r["images"], r["batch_size"]))
    for r in rows:
        p = r["provenance"]
        load = p.get("load_before")
        lines.append(f"| {r['model']} | {r['images']:,} | {r['batch_size']} | {len(r['layers'])}, "
                     f"{r['positions_per_image']} positions | {r['inference_images_per_s']:.0f} | "
                     f"{r['calibration_images_per_s']:.0f} | {r['ratio']:.2f} | {device_label(r)}, "
                     f"{p['threads']} | {load[0] if load else '?'} | {_stamp(p)} |")
    return "\n".join(lines)


def _scale_key(row: dict) -> tuple:
    return (row["model"], row["image_size"], row["images"], row["processes"], row.get("device", "cpu"),
            bool(row.get("sharded_solvers")), row.get("fit_positions"), row.get("positions_per_image", 10))


def _scale(results: Path, *models: str) -> str:
    """Each stage of approximate() at scale against plain inference over the same images (scripts/scale_benchmark.py)."""
    lines = _header("model, px", "images", "processes", "the pass fits", "calibration (s)", "statistics (s)",
                    "layer-wise pass (s)", "plain inference (s)", "(calibration + pass) / inference", "pass / inference",
                    "peak memory per rank (GB)", "device, threads", "load before", "commit, date")
    rows = current_rows(read_rows(results / "scale.jsonl"), _scale_key)
    for r in sorted((r for r in rows if not models or r["model"] in models), key=lambda r: _scale_key(r)[:4]):
        p, t = r["provenance"], r["timing"]
        load = p.get("load_before")
        fit = (f"{r['fit_positions']} drawn positions, original alongside" if r.get("fit_positions") is not None
               else f"the store's {r.get('positions_per_image', 10)} positions")
        fit += ", sharded solvers" if r.get("sharded_solvers") else ""
        peaks = "/".join(f"{m / 1024:.1f}" for m in r["peak_rss_mb_per_rank"])
        lines.append(f"| {r['model']}, {r['image_size']} | {r['images']:,} | {r['processes']} | {fit} | "
                     f"{t.get('calibrate_s', 0):.1f} | {t.get('statistics_s', 0):.1f} | {t.get('build_s', 0):.1f} | "
                     f"{r['inference_s']:.1f} | **{r['calibrate_and_pass_over_inference']:.2f}x** | "
                     f"{r['pass_over_inference']:.2f}x | {peaks} | {device_label(r)}, {r['threads']} | "
                     f"{load[0] if load else '?'} | {_stamp(p)} |")
    return "\n".join(lines)


def _training(results: Path, *models: str) -> str:
    """The reference models trained by scripts/train_reference.py --results (the latest row per model)."""
    lines = _header("model", "input (px)", "val top-1", "epochs", "batch, lr", "training (s)", "device", "stored",
                    "reproduce", "commit, date")
    rows = current_rows(read_rows(results / "reference_training.jsonl"), lambda r: r["model"])
    for r in sorted((r for r in rows if not models or r["model"] in models), key=lambda r: r["model"]):
        p, settings = r["provenance"], r.get("settings", {})
        lines.append(f"| {r['model']} | {r['input_size']} | {r['test_top1']:.4f} ({r['test_images']:,} images) | "
                     f"{r['epochs']} | {settings.get('batch_size')}, {settings.get('lr')} | {r['train_seconds']:.0f} | "
                     f"{r['device']}, {p['threads']} thread(s) | {r['stored_dtype']} | `{r['reproduce']}` | "
                     f"{_stamp(p)} |")
    return "\n".join(lines)


def _torchvision(results: Path) -> str:
    from .torchvision_table import torchvision_table

    return torchvision_table(read_rows(results / "torchvision.jsonl"))


_PAIRS = (("tucker2 (weight-only)", "tucker2-sigma (data-aware)"), ("cp (weight-only)", "cp-sigma (data-aware)"),
          ("svd (weight-only)", "svd-sigma (data-aware)"), ("alds (weight-only)", "alds-sigma (data-aware)"))


def _sigma(results: Path, *models: str) -> str:
    """Weight-only against data-aware (Sigma-norm) method in the same cell, wherever both rows are current."""
    from .benchmark import cell_key

    rows = current_rows(read_rows(results / "accuracy.jsonl"), cell_key)
    by_cell = {(r["model"], r["label"], r["target_speedup"]): r for r in rows if not models or r["model"] in models}
    lines = ["| model | target | weight-only | theoretical | drop (points) | approximate (s) | data-aware | theoretical | "
             "drop (points) | approximate (s) |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for model, label, target in sorted(by_cell, key=lambda k: (k[0], k[2])):
        for plain, aware in _PAIRS:
            if label == plain and (model, aware, target) in by_cell:
                a, b = by_cell[(model, plain, target)], by_cell[(model, aware, target)]
                lines.append(f"| {model} | {target:g}x | {plain.split(' (')[0]} | {a['theoretical_speedup']:.2f}x | "
                             f"{a['drop_points']:.2f} | {a['approximate_wall_s']:.1f} | {aware.split(' (')[0]} | "
                             f"{b['theoretical_speedup']:.2f}x | {b['drop_points']:.2f} | {b['approximate_wall_s']:.1f} |")
    return "\n".join(lines)


def _draws(results: Path, *models: str) -> str:
    from .draws import draws_table

    rows = read_rows(results / "draws.jsonl")
    return draws_table([r for r in rows if not models or r["model"] in models])


def _peers(results: Path, *models: str) -> str:
    from .peers import peers_table

    rows = read_rows(results / "peers.jsonl")
    return peers_table([r for r in rows if not models or r["model"] in models])


TABLES: dict[str, Callable[..., str]] = {"accuracy": _accuracy, "speed": _speed, "calibration": _calibration,
                                         "sigma": _sigma, "peers": _peers, "draws": _draws,
                                         "scale": _scale, "training": _training, "torchvision": _torchvision}


def render_table(spec: str, results: str | Path) -> str:
    """The Markdown of one region: ``spec`` = "NAME [ARG ...]" (e.g. "accuracy vgg-fmnist")."""
    name, *args = spec.split()
    if name not in TABLES:
        raise ValueError(f"unknown README table {name!r}: use one of {sorted(TABLES)}")
    return TABLES[name](Path(results), *args)


def generated_regions(text: str) -> list[tuple[str, str]]:
    """(spec, body without the markers) of every marked region of ``text``, in order."""
    return [(m["spec"], m["body"]) for m in _REGION.finditer(text)]


def render_readme(text: str, results: str | Path) -> str:
    """``text`` with every marked region's body replaced by its table made from ``results``."""
    return _REGION.sub(lambda m: m.group(1) + render_table(m["spec"], results) + "\n" + m.group(4), text)
