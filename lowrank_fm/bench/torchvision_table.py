"""The torchvision-architectures table of issue 19: the Tucker-2 design's experiment (AlexNet, ResNet-18,
VGG-16, ShuffleNet V2, DenseNet-161 trained on CIFAR-10) with lowrank-fm's default method beside it.

For every architecture whose trained checkpoint is in the cache folder (``scripts/train_reference.py NAME``
writes it), each cell approximates the model, measures top-1 on the val split before and after, fine-tunes
the approximated model for one epoch with labels and, separately, by distillation from the original (no
labels), and times the original against the approximated model at batch 1 and 32. One JSON line per cell,
with its provenance (:func:`lowrank_fm.bench.provenance.append_row`). An architecture without a checkpoint
gets no row, only a line saying which command makes it.

    python scripts/benchmark.py --torchvision                 # every architecture whose checkpoint is cached
    python scripts/benchmark.py --torchvision --table         # the table of results/torchvision.jsonl
    python scripts/benchmark.py --torchvision --models vgg16_bn-cifar10 --labels "default (auto), speed gate" \
        --device cuda --latency-seconds 0.3                   # one cell, on a GPU
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset

__all__ = ["TableCell", "TORCHVISION_MODELS", "TABLE_CELLS", "select_cells", "missing_checkpoint_line", "train_command",
           "run_table_cells", "run_torchvision_table", "torchvision_table", "table_key"]

log = logging.getLogger(__name__)

# the design's five architectures, as bundled (10-class heads, AlexNet at 64 px, the others at 32 px)
TORCHVISION_MODELS = ("alexnet-cifar10", "resnet18-cifar10", "vgg16_bn-cifar10", "shufflenet_v2_x1_0-cifar10",
                      "densenet161-cifar10")


@dataclass(frozen=True)
class TableCell:
    """One row of the table: a method with its settings, at a MAC target (None: the method picks its ranks)."""

    label: str
    speedup: float | None
    settings: dict = field(default_factory=dict)


TABLE_CELLS = (
    TableCell("tucker2, vbmf ranks", None, {"method": "tucker2", "ranks": "vbmf", "speed_gate": False}),
    TableCell("default (auto), no speed gate", 2.0, {"speed_gate": False}),
    TableCell("default (auto), no speed gate", 3.0, {"speed_gate": False}),
    TableCell("default (auto), speed gate", 2.0, {}),  # as users get it: the gate may keep slower layers
)

TRAIN_HINT = "python scripts/train_reference.py {name} --device cuda --time-budget 300 --half " \
             "--results results/reference_training.jsonl"


_RESULTS = Path(__file__).resolve().parents[2] / "results"
TRAINING_RECORDS = (_RESULTS / "archive" / "reference_training.jsonl", _RESULTS / "reference_training.jsonl")


def train_command(name: str, records=TRAINING_RECORDS) -> str:
    """The command that makes ``name``'s checkpoint: the ``reproduce`` field of its latest training record
    (the last line naming it in ``records``, read in order), with ``--results``; else a generic one."""
    from .provenance import read_rows

    command = None
    for path in records:
        for row in read_rows(path):
            if row.get("model") == name and row.get("reproduce"):
                command = row["reproduce"]
    if command is None:
        return TRAIN_HINT.format(name=name)
    return command if "--results" in command else command + " --results results/reference_training.jsonl"


def missing_checkpoint_line(name: str, records=TRAINING_RECORDS) -> str | None:
    """None when ``name``'s trained checkpoint is in the cache folder, else one line saying which command
    makes it."""
    from ..zoo.models import cache_dir

    path = cache_dir() / f"{name}.pt"
    if path.is_file():
        return None
    return f"{name}: no checkpoint at {path}, no row; make it with: {train_command(name, records)}"


def select_cells(cells, labels=None, speedups=None) -> list[TableCell]:
    """The cells whose label is in ``labels`` and whose target is in ``speedups`` (None: any), in their order."""
    return [c for c in cells if (labels is None or c.label in labels) and (speedups is None or c.speedup in speedups)]


def _measured(speed: dict, batch: int) -> float | None:
    entry = speed["batches"].get(str(batch))
    return None if entry is None else entry["measured_speedup"]


def run_table_cells(
    model_name: str, model: torch.nn.Module, data, cells=TABLE_CELLS, *, calib_fraction: float = 0.01,
    calib_images: int | None = None, seed: int = 0, eval_images: int | None = None, finetune_epochs: int = 1,
    finetune_images: int | None = None, latency_batches=(1, 32), latency_rounds: int = 7,
    latency_min_seconds: float = 3.0, device: str = "cpu", progress: bool = False,
    on_row: Callable[[dict], None] | None = None, dataset_name: str | None = None,
) -> list[dict]:
    """The rows of ``cells`` on ``model`` (trained) with ``data`` (a :class:`~lowrank_fm.zoo.data.DataSplits`).

    Calibration: ``calib_fraction`` of the training split (or ``calib_images``), drawn as the CLI draws them.
    Top-1 on the first ``eval_images`` val images (all by default). Fine-tuning: ``finetune_epochs`` over the
    training split (its first ``finetune_images`` when given), once with labels and once by distillation
    from ``model``, each from the approximated model. Latency: :func:`lowrank_fm.latency.measure_speed` at
    ``latency_batches``. ``on_row(row)`` is called as each row is finished (before the next cell runs).
    """
    from ..api import approximate
    from ..cli import calibration_indices
    from ..config import ApproxConfig
    from ..finetune import finetune
    from ..latency import measure_speed
    from ..zoo.evaluate import accuracy
    from .provenance import code_state, machine_load, provenance

    code_state()
    model = model.eval().to(device)
    indices = calibration_indices(len(data.train), calib_fraction, calib_images, seed)
    loader = DataLoader(Subset(data.train, indices.tolist()), batch_size=64, shuffle=False)
    train = data.train if finetune_images is None else Subset(data.train, range(min(finetune_images, len(data.train))))

    def top1(m: torch.nn.Module) -> dict:
        return accuracy(m, data.test, eval_images=eval_images, device=device, progress=progress)

    before = top1(model)
    images = torch.stack([data.test[i][0] for i in range(min(max(latency_batches), len(data.test)))]).to(device)
    rows = []
    for cell in cells:
        load_before = machine_load()
        config = ApproxConfig(speedup=cell.speedup, seed=seed, progress=progress, device=device).replace(**cell.settings)
        start = time.perf_counter()
        new_model, report = approximate(model, loader, config, n_images=len(indices), image_ids=indices,
                                        model_name=model_name, dataset_name=dataset_name or data.name)
        approximate_s = time.perf_counter() - start
        after = top1(new_model)
        tuned = {}
        for mode in ("labels", "distill"):
            if not finetune_epochs:
                break
            try:
                _, record = finetune(new_model, train, epochs=finetune_epochs, mode=mode,
                                     teacher=model if mode == "distill" else None, evaluate=top1,
                                     start_top1=after["top1"], device=device,
                                     seed=seed, progress=progress)
            except FloatingPointError as error:  # a diverging loss: the row says so, the other cells still run
                log.warning("%s %s: fine-tuning (%s) failed: %s", model_name, cell.label, mode, error)
                tuned[mode] = {"top1": None, "error": str(error)}
                continue
            tuned[mode] = {"top1": record["top1_returned"], "top1_per_epoch": record["top1"],
                           "kept_start": record["kept_start"], "final_check": record.get("final_check"),
                           "seconds": record["seconds"],
                           "images_per_epoch": record["images"], "lr": record["lr"],
                           "lr_per_tensor": record["lr_per_tensor"], "restarts": record["restarts"]}
        speed = measure_speed(model, new_model, images, batch_sizes=tuple(latency_batches), rounds=latency_rounds,
                              min_seconds=latency_min_seconds, device=device)
        totals = report.totals
        kept: dict[str, int] = {}
        for layer in report.layers:
            if layer.status != "approximated":
                kept[layer.reason or "kept"] = kept.get(layer.reason or "kept", 0) + 1
        row = {
            "model": model_name, "label": cell.label, "target_speedup": cell.speedup, "settings": cell.settings,
            "method": report.config.get("method") or config.method_name,
            "params_before": totals["params_before"], "params_after": totals["params_after"],
            "params_ratio": totals["compression"], "macs_before": totals["macs_before"],
            "macs_after": totals["macs_after"], "macs_ratio": totals["theoretical_speedup"],
            "layers_approximated": totals["layers_approximated"], "layers": len(report.layers), "kept_reasons": kept,
            "top1_before": before["top1"], "top1_after": after["top1"],
            "top1_finetuned_labels": tuned.get("labels", {}).get("top1"),
            "top1_finetuned_distill": tuned.get("distill", {}).get("top1"),
            "finetune": {"epochs": finetune_epochs, **tuned}, "eval_images": after["images"],
            "calib_images": len(indices), "approximate_wall_s": approximate_s, "timing": report.timing,
            "measured_speedup": {str(b): _measured(speed, b) for b in latency_batches}, "latency": speed,
            "ranks": {layer.name: layer.rank for layer in report.layers}, "device": str(device),
            "threads": torch.get_num_threads(),
        }
        if str(device).startswith("cuda"):
            row["gpu"] = torch.cuda.get_device_name(torch.device(device))
        row["provenance"] = provenance(load_before)
        log.info("%s %s: %.2fx MACs, top-1 %.4f -> %.4f", model_name, cell.label, row["macs_ratio"],
                 before["top1"], after["top1"])
        if on_row is not None:
            on_row(row)
        rows.append(row)
    return rows


def run_torchvision_table(
    out_path: str | Path, models=TORCHVISION_MODELS, cells=TABLE_CELLS, *, data_dir: str | None = None,
    say: Callable[[str], None] = print, **settings,
) -> list[dict]:
    """Every cell on every architecture of ``models`` whose checkpoint is cached, appended to ``out_path``;
    for one without a checkpoint, ``say`` gets one line naming the command that makes it, and no row."""
    from ..zoo.models import bundled_spec, create_model, model_data
    from .provenance import append_row, code_state

    code_state()
    rows: list[dict] = []
    for name in models:
        line = missing_checkpoint_line(name)
        if line is not None:
            say(line)
            continue
        spec = bundled_spec(name)
        data = model_data(spec, data_dir)
        model = create_model(name)
        rows += run_table_cells(name, model, data, cells, on_row=lambda row: append_row(out_path, row),
                                dataset_name=spec.dataset, **settings)
    return rows


def table_key(row: dict) -> tuple:
    """What makes two rows the same cell: model, label, target, evaluation images, fine-tuning epochs."""
    return (row["model"], row["label"], row["target_speedup"], row.get("eval_images"),
            row.get("finetune", {}).get("epochs"))


def torchvision_table(rows: list[dict]) -> str:
    """The Markdown table of the rows with provenance (of one cell, the latest)."""
    from .provenance import current_rows, device_label

    def pct(value) -> str:
        return "-" if value is None else f"{100 * value:.2f}"

    def ratio(value) -> str:
        return "-" if value is None else f"{value:.2f}x"

    def tuned(row, mode) -> str:  # "(start kept)": training raised the training loss, the start came back
        kept = (row.get("finetune", {}).get(mode) or {}).get("kept_start")
        return pct(row.get(f"top1_finetuned_{mode}")) + (" (start kept)" if kept else "")

    def rates(row) -> str:  # the learning rate each fine-tune finished at; "x RMS": relative to each tensor
        parts = []
        for mode in ("labels", "distill"):
            entry = row.get("finetune", {}).get(mode) or {}
            if entry.get("lr") is None:
                parts.append("-")
            else:
                parts.append(f"{entry['lr']:.0e}" + (" x RMS" if entry.get("lr_per_tensor") else ""))
        return " / ".join(parts)

    lines = ["| model | method | target | params ratio | MACs ratio | top-1 before | after | fine-tuned (labels) | "
             "fine-tuned (distill) | fine-tune lr (labels / distill) | measured speedup (batch) | device | "
             "val images |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    order = {name: i for i, name in enumerate(TORCHVISION_MODELS)}
    rows = current_rows(rows, table_key)
    for r in sorted(rows, key=lambda r: (order.get(r["model"], len(order)), r["model"], r["label"],
                                          r["target_speedup"] or 0)):
        target = "vbmf" if r["target_speedup"] is None else f"{r['target_speedup']:g}x"
        speed = ", ".join(f"{ratio(v)} ({b})" for b, v in sorted(r.get("measured_speedup", {}).items(),
                                                                key=lambda item: int(item[0])))
        lines.append(f"| {r['model']} | {r['label']} | {target} | {ratio(r['params_ratio'])} | {ratio(r['macs_ratio'])} | "
                     f"{pct(r['top1_before'])} | {pct(r['top1_after'])} | {tuned(r, 'labels')} | "
                     f"{tuned(r, 'distill')} | {rates(r)} | {speed or '-'} | {device_label(r)} | "
                     f"{r.get('eval_images')} |")
    return "\n".join(lines)
