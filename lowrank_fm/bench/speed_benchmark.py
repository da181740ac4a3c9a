"""Measured-speed benchmark: the latency users get from approximated models, beside accuracy.

Two kinds of cell:

- ``accuracy`` cells (bundled models on their data): approximate from 1% of the training split, evaluate
  top-1 on the test split, and time original against approximated at each batch size;
- ``speed-only`` cells (torchvision architectures at 224 px): random weights and random input images, ranks
  from a weight-only method (no calibration data exists for them here); no accuracy is measured, and every
  row says so in its ``mode``.

Every row carries its provenance (:mod:`lowrank_fm.bench.provenance`: commit, date, command, CPU, threads, load
before and after, allocator), and speed only as ratios measured in the same process in interleaved rounds:
the original with the same BatchNorm folding as the approximated model, the headline the median of the
per-round ratios with their min-max (:func:`lowrank_fm.latency.measure_speed`). Each cell is timed with freed memory
reused (``"reuse"``, what the command line does) and again with glibc's default (``"system"``, in a
freshly spawned process: a heap that has been retaining memory would still serve some blocks from its
holes), so the table shows both (:mod:`lowrank_fm.allocator` says why they differ). Rows go to a
JSON-lines file as they finish; plots (:mod:`lowrank_fm.bench.plots`) and a Markdown table are made from that file.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset

from ..allocator import use_allocator
from ..api import approximate
from ..config import ApproxConfig
from ..latency import measure_speed
from ..zoo.models import bundled_spec, create_model
from .provenance import append_row, code_state, current_rows, device_label, machine_load

__all__ = ["SpeedRun", "run_speed_benchmark", "SPEED_GRID", "SPEED_GRID_CUDA", "speed_table", "make_plots", "cell_key"]

log = logging.getLogger(__name__)

SPEED_ONLY = "speed-only: random weights, random 224x224 inputs, ranks from the weight-only method; accuracy not measured"


@dataclass(frozen=True)
class SpeedRun:
    """One cell: a model, a method label with its settings, a speedup target and the batch sizes timed."""

    model: str
    label: str
    speedup: float | None  # None: ranks from the settings (e.g. energy 1.0, every layer kept)
    settings: dict = field(default_factory=dict)
    batch_sizes: tuple[int, ...] = (1, 32)
    speed_only: bool = False
    export: bool = False
    rounds: int | None = None  # interleaved timing rounds per batch size (None: the benchmark's)
    allocators: tuple[str, ...] = ("reuse", "system")  # the first is the row's; approximate() runs under it


#: ``auto`` as a user gets it under ``--speedup`` (the default method and allocation, with the speed gate): its
#: layers mix methods, cp's chains among them, whose depthwise convs run slower per MAC on a CPU
_AUTO = {"method": "auto", "allocation": "output"}
#: the same choosing (method, rank) by measured time at the largest batch (``--method auto --budget latency``)
_AUTO_LATENCY = {**_AUTO, "budget": "latency"}


def _fmnist_grid() -> list[SpeedRun]:
    runs = []
    for s in (2.0, 3.0, 4.0):
        runs += [SpeedRun("vgg-fmnist", "fm, rmsprop", s, {"method": "fm"}, export=s == 3.0),
                 SpeedRun("vgg-fmnist", "fm, rmsprop, ranks multiple of 8", s, {"method": "fm", "rank_multiple": 8}),
                 SpeedRun("vgg-fmnist", "svd (weight-only)", s, {"method": "svd", "correction": False}),
                 SpeedRun("vgg-fmnist", "spatial (weight-only)", s, {"method": "spatial", "correction": False}),
                 SpeedRun("vgg-fmnist", "tucker2 (weight-only)", s, {"method": "tucker2", "correction": False}),
                 SpeedRun("vgg-fmnist", "auto, allocation output", s, _AUTO),
                 SpeedRun("vgg-fmnist", "auto, allocation output, latency budget", s, _AUTO_LATENCY)]
    return runs


#: a network with residual sums (its shortcut compensation and the time of the adds are in the measurement)
_RESNET = [SpeedRun("resnet-fmnist", label, 3.0, settings)
           for label, settings in (("fm, rmsprop", {"method": "fm"}), ("auto, allocation output", _AUTO),
                                   ("auto, allocation output, latency budget", _AUTO_LATENCY))]


# the fair-baseline check: nothing approximated must measure 1.00x within noise (three runs of the same cell)
_KEPT = [SpeedRun("vgg-digits", f"every layer kept (energy 1.0), run {i}", None, {"method": "svd", "energy": 1.0},
                  allocators=("reuse",)) for i in (1, 2, 3)]

def _vgg16_cells(batch_sizes: tuple[int, ...], rounds: int, allocators: tuple[str, ...]) -> list[SpeedRun]:
    return [SpeedRun("vgg16", f"svd (weight-only), {budget} budget", 4.0,
                     {"method": "svd", "correction": False, "include": ("features",), "allocation": "uniform",
                      "budget": budget, "rank_multiple": 8, "speed_repeats": 3},
                     batch_sizes=batch_sizes, speed_only=True, rounds=rounds, allocators=allocators)
            for budget in ("macs", "latency")]


SPEED_GRID = {
    "vgg-digits": _KEPT,
    "vgg-fmnist": _fmnist_grid(),
    "resnet-fmnist": _RESNET,
    "vgg16": _vgg16_cells((1, 8), 5, ("reuse", "system")),
}
# on a GPU (``--device cuda``): vgg16 at 4x at batch 64, timed with CUDA events (with the gate, which may keep
# layers, and without it: 4x theoretical); glibc's allocator is moot there
SPEED_GRID_CUDA = {"vgg16": _vgg16_cells((64,), 7, ("reuse",)) + [
    SpeedRun("vgg16", "svd (weight-only), no speed gate", 4.0,
             {"method": "svd", "correction": False, "include": ("features",), "allocation": "uniform",
              "speed_gate": False, "rank_multiple": 8},
             batch_sizes=(64,), speed_only=True, rounds=7, allocators=("reuse",))]}


def _speed_only_data(model_name: str, images: int, seed: int):
    model = create_model(model_name, "none", num_classes=1000)
    generator = torch.Generator().manual_seed(seed)
    batch = torch.randn(images, 3, 224, 224, generator=generator)
    return model, [batch[i:i + 4] for i in range(0, images, 4)], batch, None, None


def _accuracy_data(model_name: str, calib_fraction: float, seed: int, data_dir: str | None):
    from ..cli import calibration_indices
    from ..zoo.models import model_data

    spec = bundled_spec(model_name)
    data = model_data(spec, data_dir)
    model = create_model(model_name)
    indices = calibration_indices(len(data.train), calib_fraction, None, seed)
    loader = DataLoader(Subset(data.train, indices.tolist()), batch_size=64, shuffle=False)
    images = torch.stack([data.test[i][0] for i in range(64)])
    return model, loader, images, data, indices


def _measure_under(allocator: str, threads: int, *args, **kwargs) -> dict:
    torch.set_num_threads(threads)
    use_allocator(allocator)
    return measure_speed(*args, **kwargs)


def _speed_in_fresh_process(allocator: str, original, approximated, images, batch_sizes, rounds: int) -> dict:
    """:func:`measure_speed` in a newly spawned process with ``allocator`` set and this one's thread count."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_measure_under, allocator, torch.get_num_threads(), original, approximated, images,
                           batch_sizes=batch_sizes, rounds=rounds).result()


def run_speed_benchmark(runs: list[SpeedRun], out_path: str | Path, *, seed: int = 0, calib_fraction: float = 0.01,
                        eval_images: int | None = None, data_dir: str | None = None, rounds: int = 7,
                        export_dir: str | Path | None = None, progress: bool = False, device: str = "cpu") -> list[dict]:
    """Run every cell and append one JSON line per run, with its provenance, to ``out_path``; returns the rows.

    ``device``: where approximate() calibrates and both models are timed (CUDA: with CUDA events); the row
    names it, and the GPU.

    The speed gate times each layer at the largest batch size of the cell. The first of a run's
    ``allocators`` is set in this process (:func:`lowrank_fm.allocator.use_allocator`; it stays in effect)
    for ``approximate()`` and the row's ``speed``; each other one is timed in a freshly spawned process.
    """
    from ..zoo.evaluate import accuracy

    code_state()  # the commit this process runs, looked up before the tree can change under it
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    rows, loaded = [], {}
    for run in runs:
        load_before = machine_load()
        if run.model not in loaded:
            loaded.clear()  # one model's data in memory at a time
            loaded[run.model] = (_speed_only_data(run.model, 8, seed) if run.speed_only
                                 else _accuracy_data(run.model, calib_fraction, seed, data_dir))
            if not run.speed_only:
                model, _, _, data, _ = loaded[run.model]
                loaded["top1_before"] = accuracy(model, data.test, eval_images=eval_images, progress=progress)["top1"]
        model, loader, images, data, indices = loaded[run.model]
        n_images = len(indices) if indices is not None else sum(len(b) for b in loader)
        config = ApproxConfig(speedup=run.speedup, seed=seed, progress=progress, device=device,
                              speed_batch=max(run.batch_sizes)).replace(**run.settings)  # method settings by name
        main_allocator = use_allocator(run.allocators[0])["allocator"]  # "system" where reuse cannot be set
        start = time.perf_counter()
        new_model, report = approximate(model, loader, config, n_images=n_images, image_ids=indices,
                                        model_name=run.model, dataset_name=None if data is None else data.name)
        wall = time.perf_counter() - start
        speed = measure_speed(model.to(device), new_model, images, batch_sizes=run.batch_sizes,
                              rounds=run.rounds or rounds, device=device)
        model.to("cpu")  # approximate() reads the original where the caller keeps it
        by_allocator = {main_allocator: speed}  # keyed by the setting in effect
        for allocator in run.allocators[1:]:
            other = _speed_in_fresh_process(allocator, model, new_model, images, run.batch_sizes, run.rounds or rounds)
            by_allocator.setdefault(other["allocator"]["allocator"], other)
        row = {
            "model": run.model, "label": run.label, "target_speedup": run.speedup,
            "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in run.settings.items()},
            "mode": SPEED_ONLY if run.speed_only else "accuracy: trained weights, test split",
            "theoretical_speedup": report.totals["theoretical_speedup"],
            "measured_speedup": {b: e["measured_speedup"] for b, e in speed["batches"].items()},
            "speedup_spread": {b: [e["speedup_min"], e["speedup_max"]] for b, e in speed["batches"].items()},
            "speed": speed, "approximate_wall_s": wall,
            "measured_speedup_by_allocator": {a: {b: e["measured_speedup"] for b, e in sp["batches"].items()}
                                              for a, sp in by_allocator.items()}, "selection": report.selection,
            "layers": [{k: v for k, v in l.to_dict().items() if k in ("name", "rank", "status", "reason", "macs_before",
                                                                      "macs_after", "original_ms", "factorized_ms")}
                       for l in report.layers],
            "threads": torch.get_num_threads(), "device": device,
        }
        if str(device).startswith("cuda"):
            row["gpu"] = torch.cuda.get_device_name()
        if not run.speed_only:
            row["top1_before"] = loaded["top1_before"]
            row["top1_after"] = accuracy(new_model, data.test, eval_images=eval_images, progress=progress)["top1"]
            row["spectra"] = {n: [float(v) for v in s] for n, s in report.spectra.items()}
        if run.export:
            from ..export import export_and_check

            with tempfile.TemporaryDirectory(prefix="lowrank_fm_export_") as tmp:
                row["export"] = export_and_check(new_model, images[: max(run.batch_sizes)], export_dir or tmp,
                                                 original=model, rounds=run.rounds or rounds)
        log.info("%s %s %sx: theoretical %.2fx, measured %s", run.model, run.label, run.speedup,
                 row["theoretical_speedup"], {b: round(v, 2) for b, v in row["measured_speedup"].items()})
        rows.append(append_row(out_path, row, load_before=load_before))
    return rows


def cell_key(row: dict) -> tuple:
    """What makes two speed rows the same cell: model, method label, target, batch sizes timed, device."""
    target = row["target_speedup"]
    return (row["model"], row["label"], None if target is None else float(target),
            tuple(sorted(row["measured_speedup"], key=int)), device_label(row))


def speed_table(rows: list[dict]) -> str:
    """Markdown: model, method, target, theoretical and measured speedup per batch (freed memory reused:
    median of the rounds with min-max; glibc's default allocator: median), layouts, slower layers, top-1
    before/after (or 'speed only'), device, threads and load. Only current rows (with provenance), the latest per
    cell (:func:`cell_key`)."""
    lines = ["| model | method | target | theoretical | measured, memory reused (batch: median, min-max) | "
             "measured, system allocator | layout (original / approximated) | "
             "top-1 before -> after | layers kept as slower | device, threads, load |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in current_rows(rows, cell_key):
        batches = r["speed"]["batches"]
        by_allocator = r.get("measured_speedup_by_allocator") or {r["speed"]["allocator"]["allocator"]: r["measured_speedup"]}
        main = r["speed"]["allocator"]["allocator"]
        measured = {}
        for a in ("reuse", "system"):
            if a not in by_allocator:
                measured[a] = "-"
            elif a == main:
                measured[a] = ", ".join(f"{b}: {e['measured_speedup']:.2f}x ({e['speedup_min']:.2f}-{e['speedup_max']:.2f})"
                                        for b, e in batches.items())
            else:
                measured[a] = ", ".join(f"{b}: {v:.2f}x" for b, v in by_allocator[a].items())
        last = batches[max(batches, key=int)]
        layout = f"{last['before_memory_format']} / {last['after_memory_format']}"
        top1 = (f"{100 * r['top1_before']:.2f} -> {100 * r['top1_after']:.2f}" if "top1_after" in r else "speed only")
        slower = len(r["selection"].get("speed_gate", {}).get("slower", []))
        load = r["provenance"].get("load_before")
        target = "-" if r["target_speedup"] is None else f"{r['target_speedup']:g}x"
        lines.append(f"| {r['model']} | {r['label']} | {target} | {r['theoretical_speedup']:.2f}x | "
                     f"{measured['reuse']} | {measured['system']} | {layout} | {top1} | {slower} | "
                     f"{device_label(r)}, {r['threads']}, {load[0] if load else '?'} |")
    return "\n".join(lines)


def make_plots(rows: list[dict], out_dir: str | Path) -> list[Path]:
    """accuracy_vs_speedup_MODEL.png per accuracy model (measured speedup at its largest batch) and
    spectra_MODEL_METHOD_S.png for each row that carries spectra and exported (the reference cell)."""
    from .plots import plot_accuracy_vs_speedup, plot_spectra

    rows = [r for r in current_rows(rows, cell_key) if r["target_speedup"] is not None]
    out_dir = Path(out_dir)
    written = []
    for model in dict.fromkeys(r["model"] for r in rows if "top1_after" in r):
        mine = []
        for r in rows:
            if r["model"] == model and "top1_after" in r:
                batch = max(r["measured_speedup"], key=int)
                mine.append({**r, "measured_speedup": r["measured_speedup"][batch]})
        written.append(plot_accuracy_vs_speedup(
            mine, out_dir / f"accuracy_vs_speedup_{model}.png",
            title=f"{model}: top-1 vs speedup (measured at batch {batch}, {mine[0]['threads']} CPU thread(s))"))
    for r in rows:
        if r.get("spectra") and r.get("export"):
            ranks = {l["name"]: l["rank"] for l in r["layers"] if l["status"] == "approximated"}
            method = r["settings"].get("method", "fm")
            written.append(plot_spectra(r["spectra"], ranks,
                                        out_dir / f"spectra_{r['model']}_{method}_{r['target_speedup']:g}x.png",
                                        title=f"{r['model']} {r['label']} {r['target_speedup']:g}x: response spectra"))
    return written
