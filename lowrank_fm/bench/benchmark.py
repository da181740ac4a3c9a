"""Accuracy-versus-speedup benchmark: methods x targets on the reference models, full test split.

Every run of one model shares one calibration store (same images, same positions), so the methods differ
only in what they do with it. Results are appended to a JSON-lines file as they finish (a run that stops
keeps what it measured) and summarised as a Markdown table.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset

from ..api import approximate
from ..config import ApproxConfig
from ..zoo.evaluate import accuracy, drop_standard_error
from ..zoo.models import bundled_spec, create_model, model_data
from .provenance import append_row, code_state, current_rows, machine_load, provenance

__all__ = ["BenchmarkRun", "run_benchmark", "run_cells", "run_config", "markdown_table", "DEFAULT_GRID", "cell_key",
           "rerun_commands"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BenchmarkRun:
    """One cell of the benchmark: a method with its settings at one speedup target."""

    label: str
    speedup: float
    settings: dict = field(default_factory=dict)


#: the methods the whole-model correction applies to (ApproxConfig.correction): their plain labels name the
#: method as it computes its weights (correction off, as those rows were made before the correction existed);
#: "<method> + correction" is the same method with its last factor refitted in the layer-wise pass
_CORRECTED = [("svd (weight-only)", "svd"), ("spatial (weight-only)", "spatial"), ("tucker2 (weight-only)", "tucker2"),
              ("tucker1 (weight-only)", "tucker1"), ("cp (weight-only)", "cp"), ("svd-sigma (data-aware)", "svd-sigma"),
              ("tucker2-sigma (data-aware)", "tucker2-sigma"), ("cp-sigma (data-aware)", "cp-sigma"),
              ("alds (weight-only)", "alds"), ("alds-sigma (data-aware)", "alds-sigma")]


#: the large-run setting: the layer-wise pass replays the calibration store's 64 positions per image instead of
#: drawing 64 with the original network run alongside (one forward less)
_FROM_STORE = {"positions_per_image": 64, "fit_positions": None}


def _grid(speedups: tuple[float, ...]) -> list[BenchmarkRun]:
    runs = []
    for s in speedups:
        runs += [BenchmarkRun(label, s, {"method": method, "correction": False}) for label, method in _CORRECTED[:5]]
        runs += [
            BenchmarkRun("fm-linear (symmetric)", s, {"method": "fm-linear"}),
            BenchmarkRun("fm, no solver, no output matching", s, {"method": "fm", "solver": "none", "output_matching": False}),
            BenchmarkRun("fm, closed-form", s, {"method": "fm", "solver": "closed-form"}),
            BenchmarkRun("fm, rmsprop", s, {"method": "fm", "solver": "rmsprop"}),
            BenchmarkRun("fm, rmsprop + output matching", s, {"method": "fm", "solver": "rmsprop", "output_matching": True}),
            BenchmarkRun("fm, rmsprop, fit from the store", s, _FROM_STORE | {"method": "fm", "solver": "rmsprop"}),
            BenchmarkRun("fm-3d, rmsprop", s, {"method": "fm-3d"}),
            BenchmarkRun("fm-3d, rmsprop, allocation output", s, {"method": "fm-3d", "allocation": "output"}),
        ]
        runs += [BenchmarkRun(label, s, {"method": method, "correction": False}) for label, method in _CORRECTED[5:]]
        runs += [BenchmarkRun(f"{method} + correction", s, {"method": method}) for _, method in _CORRECTED]
        # "auto" and "auto + output matching": the unweighted predicted errors (allocation "auto"), the default of
        # the first auto rows; "auto, allocation output" is what the default has been since commit 52d6415
        runs += [BenchmarkRun("auto", s, {"method": "auto", "allocation": "auto"}),
                 BenchmarkRun("auto + output matching", s, {"method": "auto", "allocation": "auto", "output_matching": True}),
                 BenchmarkRun("auto, allocation output", s, {"method": "auto", "allocation": "output"}),
                 BenchmarkRun("auto, allocation output + output matching", s,
                              {"method": "auto", "allocation": "output", "output_matching": True}),
                 BenchmarkRun("auto, allocation output, fit from the store", s,
                              _FROM_STORE | {"method": "auto", "allocation": "output"})]
        # other sensitivity weightings of the output allocation (the default is s_l^0.5 since commit 5c6d0be;
        # "auto" is gamma = 0): s_l^1 alone (the default before any comparison), and the plans of gamma 0 and 1
        # compared by simulation (the default until commit 5c6d0be)
        runs += [BenchmarkRun("auto, allocation output, sensitivity weights fixed (gamma 1)", s,
                              {"method": "auto", "allocation": "output", "sensitivity_exponents": (1.0,)}),
                 BenchmarkRun("auto, allocation output, gamma 0 and 1 compared", s,
                              {"method": "auto", "allocation": "output", "sensitivity_exponents": (0.0, 1.0)})]
        # before / after the shortcut compensation (on by default; residual networks only)
        runs += [BenchmarkRun("fm, rmsprop, no shortcut compensation", s,
                              {"method": "fm", "solver": "rmsprop", "shortcut_compensation": False}),
                 BenchmarkRun("auto, allocation output, no shortcut compensation", s,
                              {"method": "auto", "allocation": "output", "shortcut_compensation": False})]
    return runs


def _without_gate(runs: list[BenchmarkRun]) -> list[BenchmarkRun]:
    """The same runs without the speed gate (labels "<label>, no speed gate"): on 32 px CIFAR inputs this CPU's
    gate keeps most 16-64-channel layers, so a MAC target is only reached without it."""
    return [BenchmarkRun(f"{r.label}, no speed gate", r.speedup, {**r.settings, "speed_gate": False}) for r in runs]


DEFAULT_GRID = {"vgg-fmnist": _grid((2.0, 3.0, 4.0, 5.0, 6.0)), "resnet-fmnist": _grid((1.5, 2.0, 3.0, 4.0)),
                "vgg-fmnist-narrow": _grid((2.0, 3.0, 4.0)),
                "resnet20-cifar10": _grid((2.0,)) + _without_gate(_grid((2.0,))),
                "resnet56-cifar10": _grid((2.0,)) + _without_gate(_grid((2.0,)))}


def run_benchmark(grid: dict[str, list[BenchmarkRun]], out_path: str | Path, *, calib_fraction: float = 0.01,
                  seed: int = 0, eval_images: int | None = None, data_dir: str | None = None,
                  progress: bool = False, jobs: int = 1) -> list[dict]:
    """Run every cell of ``grid`` (model name -> runs) and append one JSON line per run to ``out_path``.

    ``jobs`` > 1 runs the cells in that many worker processes of one thread each (every worker loads its
    model and measures top-1 before on its own); rows are appended as cells finish, so the file's order is
    the order of completion.
    """
    code_state()  # the commit this process runs, looked up before the tree can change under it
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)

    def write(row: dict) -> None:
        append_row(out_path, row)  # the row carries the provenance of the process that ran it

    settings = dict(calib_fraction=calib_fraction, seed=seed, eval_images=eval_images, data_dir=data_dir)
    if jobs <= 1:
        results = []
        for model_name, runs in grid.items():
            results += run_cells(model_name, runs, progress=progress, on_row=write, **settings)
        return results
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    cells = [(m, r) for m, runs in grid.items() for r in runs]
    cells.sort(key=lambda cell: not any(k in cell[1].settings.get("method", "") for k in ("sigma", "cp")))  # slow first
    results = []
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_one_thread) as pool:
        futures = [pool.submit(run_cells, m, [r], **settings) for m, r in cells]
        for future in as_completed(futures):
            for row in future.result():
                write(row)
                results.append(row)
    return results


def run_config(run: BenchmarkRun, **fields) -> ApproxConfig:
    """The run's configuration: its target, ``fields`` of ApproxConfig, then its settings (fields of the run
    or settings of its method by name, e.g. ``solver``)."""
    return ApproxConfig(speedup=run.speedup, **fields).replace(**run.settings)


def _one_thread() -> None:
    torch.set_num_threads(1)


def run_cells(model_name: str, runs: list[BenchmarkRun], *, calib_fraction: float = 0.01, seed: int = 0,
              eval_images: int | None = None, data_dir: str | None = None, progress: bool = False,
              on_row=None) -> list[dict]:
    """The rows of ``runs`` on one bundled model (calling ``on_row(row)`` as each one finishes)."""
    from ..cli import calibration_indices

    code_state()
    spec = bundled_spec(model_name)
    data = model_data(spec, data_dir)
    model = create_model(model_name)
    indices = calibration_indices(len(data.train), calib_fraction, None, seed)
    loader = DataLoader(Subset(data.train, indices.tolist()), batch_size=64, shuffle=False)
    before = accuracy(model, data.test, eval_images=eval_images, progress=progress, per_image=True)
    top1_before = before["top1"]
    rows = []
    for run in runs:
        load_before = machine_load()
        config = run_config(run, seed=seed, progress=progress)
        start = time.perf_counter()  # each run calibrates afresh (a temporary store), as a CLI run does
        new_model, report = approximate(model, loader, config, n_images=len(indices), image_ids=indices,
                                        model_name=model_name, dataset_name=spec.dataset)
        wall = time.perf_counter() - start
        after = accuracy(new_model, data.test, eval_images=eval_images, progress=progress, per_image=True)
        evaluate = time.perf_counter() - start - wall
        row = {
            "model": model_name, "label": run.label, "target_speedup": run.speedup, "settings": run.settings,
            "theoretical_speedup": report.totals["theoretical_speedup"],
            "top1_before": top1_before, "top1_after": after["top1"],
            "drop_points": 100 * (top1_before - after["top1"]), "eval_images": after["images"],
            "drop_se_points": 100 * drop_standard_error(before["top1_hits"], after["top1_hits"]),
            "approximate_wall_s": wall, "run_wall_s": wall + evaluate, "timing": report.timing, "calib_images": len(indices),
            "output_matching": report.output_matching, "ranks": {l.name: l.rank for l in report.layers},
            "threads": torch.get_num_threads(), "calibration_seed": seed,
        }
        if "speed_gate" in report.selection:  # the layers the gate kept, and how often the plan was made again
            row["speed_gate"] = {k: report.selection["speed_gate"].get(k) for k in ("slower", "replans")}
        row["provenance"] = provenance(load_before)
        log.info("%s %s %.1fx: top-1 %.4f -> %.4f (%.2f points), %.1f s", model_name, run.label,
                 row["theoretical_speedup"], top1_before, after["top1"], row["drop_points"], wall)
        if on_row is not None:
            on_row(row)
        rows.append(row)
    return rows


def cell_key(row: dict) -> tuple:
    """What makes two accuracy rows the same cell: model, method label, speedup target, evaluation images."""
    return row["model"], row["label"], float(row["target_speedup"]), row.get("eval_images")


def markdown_table(rows: list[dict]) -> str:
    """One line per run: model, method, target, achieved speedup, top-1 before/after, drop (with its paired
    standard error, :func:`~lowrank_fm.zoo.evaluate.drop_standard_error`, where the row has one), wall time.

    Only current rows (with ``provenance``) are shown, and a re-run replaces an earlier one: of the rows of
    one cell (:func:`cell_key`) the latest is shown.
    """
    rows = current_rows(rows, cell_key)
    lines = ["| model | method | target | theoretical speedup | top-1 before | top-1 after | drop (points) | "
             "approximate (s) | run incl. evaluation (s) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    order: dict[str, int] = {}
    for runs in DEFAULT_GRID.values():
        for run in runs:
            order.setdefault(run.label, len(order))

    def place(label: str) -> tuple[int, str]:  # a variant "label [note]" right after its label
        return order.get(label.split(" [")[0], len(order)), label

    for r in sorted(rows, key=lambda r: (r["model"], r["target_speedup"], place(r["label"]))):
        lines.append(f"| {r['model']} | {r['label']} | {r['target_speedup']:g}x | {r['theoretical_speedup']:.2f}x | "
                     f"{100 * r['top1_before']:.2f} | {100 * r['top1_after']:.2f} | {_drop(r)} | "
                     f"{r['approximate_wall_s']:.1f} | {r.get('run_wall_s', float('nan')):.1f} |")
    return "\n".join(lines)


def _drop(row: dict) -> str:
    """The drop in points, "0.40 ± 0.09" with the standard error where the row has one (rows since it is kept)."""
    se = row.get("drop_se_points")
    return f"{row['drop_points']:.2f}" + ("" if se is None else f" ± {se:.2f}")


def rerun_commands(rows: list[dict]) -> tuple[list[list[str]], list[tuple]]:
    """The ``scripts/benchmark.py`` command lines that re-run every cell the accuracy table shows (the current
    rows, :func:`cell_key`), one per model and target with its labels in grid order (on the full test split,
    as the grid runs), and the cells that cannot be re-run (a label no longer in :data:`DEFAULT_GRID`):
    ``(commands, orphans)``."""
    groups: dict[tuple, list[str]] = {}
    orphans = []
    for row in current_rows(rows, cell_key):
        model, label, target, _ = cell_key(row)
        if label not in {r.label for r in DEFAULT_GRID.get(model, [])}:
            orphans.append(cell_key(row))
            continue
        groups.setdefault((model, target), []).append(label)
    commands = []
    for (model, target), labels in sorted(groups.items()):
        order = {r.label: i for i, r in enumerate(DEFAULT_GRID[model])}  # the model's own grid order
        commands.append(["benchmark.py", "--models", model, "--speedups", f"{target:g}",
                         "--labels", *sorted(set(labels), key=order.get)])
    return commands, orphans

