"""Peers benchmark: the tools a user would pick instead of lowrank-fm, on the same model, calibration images and
test split, at the same whole-model MAC targets, in one run, none fine-tuned.

Peers (the optional extra ``peers``; each is used through its documented public API, and a peer that is not
installed, cannot reach a target or fails on a layer kind gives a row with its error instead of a gap):

- TensorLy-Torch (``tltorch``): ``FactorizedConv.from_conv(conv, rank=r, factorization='cp' | 'tucker',
  implementation='factorized')`` on every conv but the first (<= 3 input channels, which lowrank-fm keeps too);
  one rank fraction ``r`` (tltorch's float rank: the share of the conv's parameters) for all of them, the
  largest that meets the MAC target (bisection on the MACs of the factorized model).
- Torch-Pruning (``torch_pruning``): ``MetaPruner`` with ``GroupMagnitudeImportance(p=2)`` or
  ``GroupTaylorImportance()`` (the gradient of the cross-entropy on the calibration images, one batch per step),
  ``pruning_ratio=1.0`` over ``iterative_steps=200`` (linear schedule), the classifier's last Linear ignored,
  stepping until the MAC target is met, as its benchmark's progressive pruning does.
- AIMET (``aimet_torch``): ``ModelCompressor.compress_model`` with spatial SVD and channel pruning (its weight
  reconstruction from the calibration loader), auto mode with the greedy per-layer ratio search at
  ``target_comp_ratio = 1 / S`` of the MACs, ``CostMetric.mac``; the evaluation callback is top-1 on the
  calibration images; the first conv ignored.
- lowrank-fm: ``approximate(model, calibration loader, ApproxConfig(speedup=S))``, every other setting its default
  (method ``auto``); the rows of the former default are labelled "lowrank-fm default (fm)" (``method="fm"``).

Every peer starts from the same BatchNorm-folded original (the model lowrank-fm folds internally and the
latency baseline of :func:`lowrank_fm.latency.measure_speed`). MACs and parameters of every result are
counted by :func:`count_macs`: :func:`lowrank_fm.cost.measure_costs` over the Conv2d / Linear modules, and,
for the modules it cannot see into (TensorLy-Torch's factorized convs run functional convolutions), torch's
FLOP counter over those modules' calls (MACs = FLOPs / 2).
"""

from __future__ import annotations

import copy
import importlib.metadata
import itertools
import logging
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset

from ..cost import measure_costs
from ..surgery import folded_copy, get_module, set_module
from .provenance import append_row, code_state, current_rows, machine_load, provenance

__all__ = ["PEER_METHODS", "PeerMethod", "count_macs", "count_params", "peer_versions", "run_peers", "peers_table",
           "peers_cell_key", "plot_peers", "DEFAULT_TARGETS"]

log = logging.getLogger(__name__)

DEFAULT_TARGETS = (2.0, 3.0, 4.0)
PRUNING_STEPS = 200
_DISTRIBUTIONS = {"tensorly-torch": "tensorly-torch", "tensorly": "tensorly", "torch-pruning": "torch-pruning",
                  "aimet-torch": "aimet-torch"}


def peer_versions() -> dict[str, str | None]:
    """Installed version of each peer distribution (None: not installed)."""
    versions = {}
    for name, dist in _DISTRIBUTIONS.items():
        try:
            versions[name] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


# ---------------------------------------------------------------------------------------------- counting


def _functional_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules whose convolutions measure_costs cannot see (they hold no Conv2d / Linear but compute with
    functional convs): TensorLy-Torch's factorized layers."""
    found = []
    for name, module in model.named_modules():
        if type(module).__module__.startswith("tltorch") and isinstance(getattr(module, "weight", None), nn.Module):
            if not any(name.startswith(f + ".") for f, _ in found):
                found.append((name, module))
    return found


def count_macs(model: nn.Module, example_input: torch.Tensor) -> int:
    """MACs per image of ``model``: :func:`lowrank_fm.cost.measure_costs` (every Conv2d / Linear), plus torch's
    FLOP counter / 2 over the convolutions of modules that compute with functional convolutions
    (TensorLy-Torch factorized layers), so that every tool's result is counted the same way."""
    model = model.eval()
    with torch.no_grad():
        total = sum(c.macs for c in measure_costs(model, example_input).values())
        functional = _functional_modules(model)
        if functional:
            from torch.utils.flop_counter import FlopCounterMode

            counter = FlopCounterMode(display=False)
            with counter:
                model(example_input)
            counts = counter.get_flop_counts()
            batch = example_input.shape[0]
            root = type(model).__name__
            for name, _module in functional:
                ops = counts.get(f"{root}.{name}" if name else root, {})
                # the convolutions on the activations; the small weight contractions a Tucker layer does once
                # per forward (not per image) are left out
                flops = sum(v for op, v in ops.items() if "convolution" in str(op))
                total += int(round(flops / 2 / batch))
    return int(total)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------- peers


@dataclass(frozen=True)
class PeerMethod:
    """One row label: ``tool`` (distribution), ``label``, ``compress(model, ctx, target_macs) -> model``."""

    tool: str
    label: str
    compress: Callable


@dataclass
class PeerContext:
    """What every peer gets: the folded original, an example batch of one, the calibration loader of
    (images, labels) batches, the calibration indices, the target speedup, the model's name, the seed."""

    example: torch.Tensor
    loader: DataLoader
    indices: object
    speedup: float
    model_name: str = "model"
    dataset_name: str = ""
    seed: int = 0


def _factorizable_convs(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups == 1 and m.in_channels > 3]


def _tltorch(factorization: str) -> Callable:
    def compress(model: nn.Module, ctx: PeerContext, target_macs: int) -> nn.Module:
        import tltorch

        names = _factorizable_convs(model)
        if not names:
            raise ValueError("no conv to factorize (every conv has <= 3 input channels or groups)")

        def build(fraction: float) -> nn.Module:
            new = copy.deepcopy(model)
            for name in names:
                conv = get_module(new, name)
                torch.manual_seed(ctx.seed)  # tensorly's decompositions start from random factors
                set_module(new, name, tltorch.FactorizedConv.from_conv(
                    conv, rank=fraction, factorization=factorization, implementation="factorized",
                    decompose_weights=True, **_fixed(factorization)))
            return new.eval()

        def macs_of(fraction: float) -> int:
            return count_macs(_rank_only(model, names, fraction, factorization), ctx.example)

        # the smallest rank fraction tltorch accepts (a fraction whose rank rounds to 0 raises ZeroDivisionError)
        low = next((f for f in (0.01, 0.02, 0.05, 0.1, 0.2, 0.5) if _valid(macs_of, f)), None)
        if low is None:
            raise ValueError("no rank fraction up to 0.5 gives every conv a rank >= 1")
        high = 1.0
        if macs_of(low) > target_macs:
            raise ValueError(f"target {ctx.speedup:g}x unreachable: at rank fraction {low:g} the model still has "
                             f"{macs_of(low):,} MACs > {target_macs:,}")
        for _ in range(20):  # the largest rank fraction meeting the target
            middle = (low + high) / 2
            low, high = (middle, high) if macs_of(middle) <= target_macs else (low, middle)
        return build(low)

    return compress


def _valid(macs_of: Callable, fraction: float) -> bool:
    try:
        macs_of(fraction)
    except ZeroDivisionError:
        return False
    return True


def _rank_only(model: nn.Module, names: list[str], fraction: float, factorization: str) -> nn.Module:
    """The model with each conv replaced by a tltorch factorized conv of the given rank fraction, weights not
    decomposed (random): only for counting MACs during the rank search."""
    import tltorch

    new = copy.deepcopy(model)
    for name in names:
        conv = get_module(new, name)
        set_module(new, name, tltorch.FactorizedConv.from_conv(conv, rank=fraction, factorization=factorization,
                                                               implementation="factorized", decompose_weights=False,
                                                               **_fixed(factorization)))
    return new.eval()


def _fixed(factorization: str) -> dict:
    """Tucker keeps the spatial modes whole (Tucker-2 of a conv: tltorch's ``fixed_rank_modes``); otherwise
    tensorly's rank fraction shrinks the kernel's own 3x3 modes too."""
    return {"fixed_rank_modes": (2, 3)} if factorization == "tucker" else {}


def _classifier_head(model: nn.Module) -> list[nn.Module]:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1:]


def _torch_pruning(importance: str) -> Callable:
    def compress(model: nn.Module, ctx: PeerContext, target_macs: int) -> nn.Module:
        import torch_pruning as tp

        model = copy.deepcopy(model).eval()
        imp = tp.importance.GroupMagnitudeImportance(p=2) if importance == "magnitude" else \
            tp.importance.GroupTaylorImportance()
        pruner = tp.pruner.MetaPruner(model, ctx.example, importance=imp, pruning_ratio=1.0,
                                      iterative_steps=PRUNING_STEPS, ignored_layers=_classifier_head(model))
        batches = itertools.cycle(ctx.loader)
        for _ in range(PRUNING_STEPS):
            if count_macs(model, ctx.example) <= target_macs:
                return model
            if importance == "taylor":
                images, labels = next(batches)
                model.zero_grad()
                F.cross_entropy(model(images), labels).backward()
            pruner.step()
        if count_macs(model, ctx.example) <= target_macs:
            return model
        raise ValueError(f"target {ctx.speedup:g}x not reached after {PRUNING_STEPS} pruning steps")

    return compress


def _aimet(scheme: str) -> Callable:
    def compress(model: nn.Module, ctx: PeerContext, target_macs: int) -> nn.Module:
        from decimal import Decimal

        from aimet_torch.common.defs import CompressionScheme, CostMetric, GreedySelectionParameters
        from aimet_torch.compress import ModelCompressor
        from aimet_torch.defs import ChannelPruningParameters, SpatialSvdParameters

        model = copy.deepcopy(model).eval()
        first = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.in_channels <= 3]
        greedy = GreedySelectionParameters(target_comp_ratio=Decimal(1 / ctx.speedup), num_comp_ratio_candidates=10)

        def evaluate(m: nn.Module, iterations=None, use_cuda=False) -> float:
            m.eval()
            correct = total = 0
            with torch.no_grad():
                for images, labels in ctx.loader:
                    correct += int((m(images).argmax(1) == labels).sum())
                    total += len(labels)
            return correct / total

        if scheme == "spatial svd":
            params = SpatialSvdParameters(SpatialSvdParameters.Mode.auto, SpatialSvdParameters.AutoModeParams(
                greedy, modules_to_ignore=first))
            compression = CompressionScheme.spatial_svd
        else:
            params = ChannelPruningParameters(
                data_loader=ctx.loader, num_reconstruction_samples=len(ctx.loader.dataset),
                allow_custom_downsample_ops=False, mode=ChannelPruningParameters.Mode.auto,
                params=ChannelPruningParameters.AutoModeParams(greedy, modules_to_ignore=first))
            compression = CompressionScheme.channel_pruning
        compressed, _stats = ModelCompressor.compress_model(
            model, eval_callback=evaluate, eval_iterations=1, input_shape=tuple(ctx.example.shape),
            compress_scheme=compression, cost_metric=CostMetric.mac, parameters=params)
        return compressed.eval()

    return compress


def _lowrank_fm(method: str | None):
    """lowrank-fm at the target: ``ApproxConfig(speedup=S)`` with every other setting its default (``method=None``:
    the default method, ``auto`` under a MAC budget; ``"fm"``: the default before ``auto``, for the older rows)."""
    def compress(model: nn.Module, ctx: PeerContext, target_macs: int) -> nn.Module:
        from ..api import approximate
        from ..config import ApproxConfig

        config = ApproxConfig(method=method, speedup=ctx.speedup, seed=ctx.seed)
        new_model, _report = approximate(model, ctx.loader, config, n_images=len(ctx.indices), image_ids=ctx.indices,
                                         model_name=ctx.model_name, dataset_name=ctx.dataset_name)
        return new_model

    return compress


PEER_METHODS: list[PeerMethod] = [
    PeerMethod("lowrank-fm", "lowrank-fm default (auto)", _lowrank_fm(None)),
    PeerMethod("lowrank-fm", "lowrank-fm default (fm)", _lowrank_fm("fm")),
    PeerMethod("aimet-torch", "AIMET spatial SVD", _aimet("spatial svd")),
    PeerMethod("aimet-torch", "AIMET channel pruning", _aimet("channel pruning")),
    PeerMethod("torch-pruning", "Torch-Pruning magnitude (L2)", _torch_pruning("magnitude")),
    PeerMethod("torch-pruning", "Torch-Pruning Taylor", _torch_pruning("taylor")),
    PeerMethod("tensorly-torch", "TensorLy-Torch CP", _tltorch("cp")),
    PeerMethod("tensorly-torch", "TensorLy-Torch Tucker", _tltorch("tucker")),
]
_IMPORTS = {"aimet-torch": "aimet_torch", "torch-pruning": "torch_pruning", "tensorly-torch": "tltorch"}


def _missing(tool: str) -> str | None:
    """Why ``tool`` cannot run here (None: it imports)."""
    module = _IMPORTS.get(tool)
    if module is None:
        return None
    try:
        __import__(module)
    except Exception as error:  # an ImportError, or a peer that breaks on import with this torch
        return f"{tool} does not import: {type(error).__name__}: {error}"[:500]
    return None


# ---------------------------------------------------------------------------------------------- the run


def run_peers(model: nn.Module, train_calibration, test_set, out_path: str | Path | None, *, model_name: str,
              dataset_name: str = "", indices=None, targets: Iterable[float] = DEFAULT_TARGETS,
              labels: Iterable[str] | None = None, seed: int = 0, eval_images: int | None = None,
              latency_rounds: int = 5, latency_seconds: float = 1.0, batch_sizes=(1, 32), progress: bool = False,
              methods: list[PeerMethod] | None = None) -> list[dict]:
    """Every peer method at every MAC target on ``model``; one row per cell, appended to ``out_path`` (with
    provenance) as it finishes.

    ``train_calibration``: the calibration images as a data set of (image, label) (the same for every peer);
    ``indices``: their indices in the training split (recorded; lowrank-fm's calibration store keys them).
    """
    from ..latency import measure_speed
    from ..zoo.evaluate import accuracy

    code_state()
    torch.manual_seed(seed)
    loader = DataLoader(train_calibration, batch_size=64, shuffle=False)
    images = torch.stack([train_calibration[i][0] for i in range(min(64, len(train_calibration)))])
    example = images[:1]
    folded, _pairs = folded_copy(model, example)
    macs_before, params_before = count_macs(folded, example), count_params(folded)
    top1_before = accuracy(folded, test_set, eval_images=eval_images, progress=progress)["top1"]
    indices = list(range(len(train_calibration))) if indices is None else indices
    versions = peer_versions()
    methods = [m for m in (methods or PEER_METHODS) if labels is None or m.label in set(labels)]
    rows = []
    for speedup in targets:
        target_macs = int(macs_before / speedup)
        for method in methods:
            load_before = machine_load()
            row = {"model": model_name, "tool": method.tool, "label": method.label, "target_speedup": float(speedup),
                   "version": versions.get(method.tool) if method.tool != "lowrank-fm" else _own_version(),
                   "macs_before": macs_before, "params_before": params_before, "target_macs": target_macs,
                   "top1_before": top1_before, "calib_images": len(train_calibration), "fine_tuned": False}
            error = _missing(method.tool)
            if error is None:
                ctx = PeerContext(example=example, loader=loader, indices=indices, speedup=float(speedup),
                                  model_name=model_name, dataset_name=dataset_name, seed=seed)
                start = time.perf_counter()
                try:
                    new_model = method.compress(copy.deepcopy(folded), ctx, target_macs)
                    row["compress_wall_s"] = time.perf_counter() - start
                    row["macs_after"] = count_macs(new_model, example)
                    row["params_after"] = count_params(new_model)
                    row["achieved_speedup"] = macs_before / row["macs_after"]
                    after = accuracy(new_model, test_set, eval_images=eval_images, progress=progress)
                    row["top1_after"], row["eval_images"] = after["top1"], after["images"]
                    row["drop_points"] = 100 * (top1_before - after["top1"])
                    speed = measure_speed(folded, new_model, images, batch_sizes=batch_sizes, rounds=latency_rounds,
                                          min_seconds=latency_seconds, time_unfolded=False)
                    row["latency"] = {str(b): {k: speed["batches"][str(b)][k] for k in (
                        "before_ms", "after_ms", "measured_speedup", "speedup_min", "speedup_max",
                        "before_memory_format", "after_memory_format")} for b in batch_sizes}
                    row["latency_rounds"] = latency_rounds
                    if row["macs_after"] > target_macs * 1.0001:
                        row["note"] = f"achieved {row['achieved_speedup']:.2f}x, short of the {speedup:g}x target"
                except Exception as exc:  # a peer that fails gives its error, not a gap
                    error = f"{type(exc).__name__}: {exc}"[:800]
                    row["compress_wall_s"] = time.perf_counter() - start
                    log.debug("%s", traceback.format_exc())
            if error is not None:
                row["error"] = error
            row["provenance"] = provenance(load_before)
            log.info("%s %s %gx: %s", model_name, method.label, speedup, row.get("error") or
                     f"{row['achieved_speedup']:.2f}x MACs, top-1 {100 * top1_before:.2f} -> {100 * row['top1_after']:.2f}, "
                     f"measured {row['latency']['1']['measured_speedup'] if '1' in row['latency'] else float('nan'):.2f}x "
                     f"(b1), {row['compress_wall_s']:.1f} s")
            if out_path is not None:
                append_row(out_path, row)
            rows.append(row)
    return rows


def _own_version() -> str:
    from .. import __version__

    return __version__


def run_bundled(model_name: str, out_path: str | Path | None, *, calib_fraction: float = 0.01, seed: int = 0,
                data_dir: str | None = None, **kwargs) -> list[dict]:
    """:func:`run_peers` on a bundled model (``vgg-fmnist``, ``resnet-fmnist``, ...) with its data set: the
    calibration images of a CLI run (``calib_fraction`` of the training split, seeded) and the whole test split."""
    from ..cli import calibration_indices
    from ..zoo.models import bundled_spec, create_model, model_data

    spec = bundled_spec(model_name)
    data = model_data(spec, data_dir)
    indices = calibration_indices(len(data.train), calib_fraction, None, seed)
    return run_peers(create_model(model_name), Subset(data.train, indices.tolist()), data.test, out_path,
                     model_name=model_name, dataset_name=spec.dataset, indices=indices, seed=seed, **kwargs)


# ---------------------------------------------------------------------------------------------- table, plot


def peers_cell_key(row: dict) -> tuple:
    return row["model"], row["label"], float(row["target_speedup"])


def _order(label: str) -> int:
    labels = [m.label for m in PEER_METHODS]
    return labels.index(label) if label in labels else len(labels)


def peers_table(rows: list[dict]) -> str:
    """One line per cell (the latest current row of each), grouped by model and target."""
    rows = current_rows(rows, peers_cell_key)
    lines = ["| model | target | tool | version | MACs (M) | achieved | params (k) | top-1 before | top-1 after | "
             "drop (points) | measured speedup b1 | b32 | compression (s) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in sorted(rows, key=lambda r: (r["model"], r["target_speedup"], _order(r["label"]))):
        head = f"| {r['model']} | {r['target_speedup']:g}x | {r['label']} | {r.get('version') or 'not installed'} |"
        if r.get("error"):
            message = r["error"].replace("|", "/").replace("\n", " ")
            if len(message) > 160:
                message = message[:157] + "..."
            lines.append(f"{head} error: {message} | | | {100 * r['top1_before']:.2f} | | | | | "
                         f"{r.get('compress_wall_s', float('nan')):.1f} |")
            continue
        lat = r["latency"]
        lines.append(f"{head} {r['macs_after'] / 1e6:.1f} | {r['achieved_speedup']:.2f}x | {r['params_after'] / 1e3:.0f} | "
                     f"{100 * r['top1_before']:.2f} | {100 * r['top1_after']:.2f} | {r['drop_points']:.2f} | "
                     f"{lat['1']['measured_speedup']:.2f}x | {lat['32']['measured_speedup']:.2f}x | "
                     f"{r['compress_wall_s']:.1f} |")
    return "\n".join(lines)


def plot_peers(rows: list[dict], out_dir: str | Path) -> list[Path]:
    """One PNG per model (``peers_MODEL.png``): top-1 after against measured speedup at batch 32 (left) and
    batch 1 (right), one line per tool's method over the targets."""
    from .plots import _pyplot, _save

    rows = [r for r in current_rows(rows, peers_cell_key) if not r.get("error")]
    paths = []
    for model in sorted({r["model"] for r in rows}):
        plt = _pyplot()
        figure, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
        mine = [r for r in rows if r["model"] == model]
        for label in sorted({r["label"] for r in mine}, key=_order):
            cells = sorted((r for r in mine if r["label"] == label), key=lambda r: r["target_speedup"])
            for axis, batch in zip(axes, ("32", "1")):
                axis.plot([r["latency"][batch]["measured_speedup"] for r in cells], [100 * r["top1_after"] for r in cells],
                          "o-", label=label)
        for axis, batch in zip(axes, ("32", "1")):
            axis.axhline(100 * mine[0]["top1_before"], color="gray", linestyle=":", label="original")
            axis.axvline(1.0, color="gray", linewidth=0.5)
            axis.set_xlabel(f"measured speedup at batch {batch} (folded original / compressed)")
            axis.grid(alpha=0.3)
        axes[0].set_ylabel("top-1 after, no fine-tuning (%)")
        axes[1].legend(fontsize=7, loc="best")
        targets = " / ".join(f"{t:g}x" for t in sorted({r["target_speedup"] for r in mine}))
        figure.suptitle(f"{model}: MAC targets {targets}")
        paths.append(_save(plt, figure, Path(out_dir) / f"peers_{model}.png"))
    return paths
