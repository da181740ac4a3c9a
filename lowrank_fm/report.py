"""The run's report: one record per candidate layer, totals, accuracy, latency, timings; JSON and a table.

Fields follow DESIGN.md ("Contracts"): totals are sums over the layer records, so a model's totals count
its Conv2d and Linear layers (every one of them is a record, approximated or kept with a reason).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .cost import module_params

__all__ = ["LayerRecord", "Report", "format_latency"]


@dataclass
class LayerRecord:
    """One candidate layer.

    ``rank`` is the kept rank (the original output width when kept), ``energy`` the share of the method's
    spectrum it keeps (None when not computed), ``rel_error`` = ||y - yhat||_F / ||y||_F over every output
    position of the held-out calibration images with the replacement applied to the original network's input
    to the layer, ``rel_error_network`` the same with yhat the replacement's output inside the approximated
    network (its input carries the error of the layers before; :func:`lowrank_fm.building.layer_errors`).
    Both are None when the layer is kept or not measured. For a layer whose last factor was refitted to the
    approximated network's inputs (the whole-model correction), ``rel_error`` can be far larger than
    ``rel_error_network``: the refit compensates for errors its original input does not have.
    """

    name: str
    kind: str
    shape: list[int]
    rank: int
    energy: float | None
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    rel_error: float | None
    status: str  # "approximated" | "kept"
    reason: str | None = None
    extra: dict = field(default_factory=dict)
    rel_error_network: float | None = None

    @classmethod
    def planned(cls, module, plan, timing=None) -> "LayerRecord":
        """The record of ``module`` as its :class:`~lowrank_fm.planner.LayerPlan` leaves it (a kept layer's rank
        is its output width unless a rank was considered), with the speed gate's ``timing`` (a
        :class:`~lowrank_fm.speedgate.LayerTiming`) where it timed the layer; the sizes of a factorized layer
        are filled in once it is built."""
        shape = list(module.weight.shape)
        params = module_params(module)
        return cls(name=plan.name, kind="conv" if module.weight.ndim == 4 else "linear", shape=shape,
                   rank=plan.chosen if plan.chosen is not None else shape[0], energy=plan.energy, params_before=params,
                   params_after=params, macs_before=plan.macs_before, macs_after=plan.macs_after, rel_error=None,
                   status="kept" if plan.rank is None else "approximated", reason=plan.reason,
                   extra={**({} if timing is None else timing.to_dict()), **plan.options,
                          **({"why": plan.note} if plan.note else {})})

    def to_dict(self) -> dict:
        data = asdict(self)
        extra = data.pop("extra")
        data.update(extra)
        return data


@dataclass
class Report:
    """Everything a run measured. ``accuracy``, ``latency`` and ``timing`` are filled by whoever measures."""

    model: str
    dataset: str | None
    method: str
    config: dict
    layers: list[LayerRecord]
    accuracy: dict | None = None
    latency: dict | None = None
    timing: dict = field(default_factory=dict)
    calibration: dict = field(default_factory=dict)
    folded_batchnorm: list[list[str]] = field(default_factory=list)
    selection: dict = field(default_factory=dict)
    output_matching: dict = field(default_factory=dict)
    finetune: dict | None = None  # mode, epochs, top1 after each epoch, the record of lowrank_fm.finetune
    spectra: dict = field(default_factory=dict, repr=False)  # layer -> method spectrum (for plots; not in JSON)

    @property
    def totals(self) -> dict:
        params_before = sum(l.params_before for l in self.layers)
        params_after = sum(l.params_after for l in self.layers)
        macs_before = sum(l.macs_before for l in self.layers)
        macs_after = sum(l.macs_after for l in self.layers)
        return {
            "params_before": params_before,
            "params_after": params_after,
            "macs_before": macs_before,
            "macs_after": macs_after,
            "theoretical_speedup": macs_before / macs_after if macs_after else None,
            "compression": params_before / params_after if params_after else None,
            "layers_approximated": sum(l.status == "approximated" for l in self.layers),
        }

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "dataset": self.dataset,
            "method": self.method,
            "config": self.config,
            "layers": [l.to_dict() for l in self.layers],
            "totals": self.totals,
            "accuracy": self.accuracy,
            "latency": self.latency,
            "timing": self.timing,
            "calibration": self.calibration,
            "folded_batchnorm": self.folded_batchnorm,
            "rank_selection": self.selection,
            "output_matching": self.output_matching,
            "finetune": self.finetune,
        }

    def save_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    def format_table(self) -> str:
        """A readable per-layer table with totals, accuracy and latency lines."""
        rows = [("layer", "kind", "shape", "rank", "energy", "MACs before", "MACs after", "rel.err",
                 "rel.err in network", "status")]
        for l in self.layers:
            rows.append(
                (
                    l.name,
                    l.kind,
                    "x".join(str(s) for s in l.shape),
                    str(l.rank),
                    "-" if l.energy is None else f"{l.energy:.3f}",
                    f"{l.macs_before:,}",
                    f"{l.macs_after:,}",
                    "-" if l.rel_error is None else f"{l.rel_error:.4f}",
                    "-" if l.rel_error_network is None else f"{l.rel_error_network:.4f}",
                    (f"{l.status} ({l.extra['method']})" if "method" in l.extra else l.status)
                    if l.reason is None else f"{l.status}: {l.reason}",
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r[:-1], widths)) + "  " + r[-1] for r in rows]
        t = self.totals
        speed = t["theoretical_speedup"]
        lines.append(
            f"totals: params {t['params_before']:,} -> {t['params_after']:,}, MACs {t['macs_before']:,} -> "
            f"{t['macs_after']:,} (theoretical speedup {speed:.2f}x)" if speed else "totals: no MACs counted"
        )
        if self.accuracy:
            a = self.accuracy
            approximated = (f"{a['top1_approximated']:.4f} approximated -> " if "top1_approximated" in a else "")
            lines.append(
                f"accuracy: top-1 {a['top1_before']:.4f} -> {approximated}{a['top1_after']:.4f} "
                f"({100 * (a['top1_after'] - a['top1_before']):+.2f} points) on {a['eval_images']} images"
            )
        if self.finetune:
            f, r = self.finetune, self.finetune["record"]
            top1 = ", top-1 after each epoch " + " ".join(f"{t:.4f}" for t in f["top1"]) if f["top1"] else ""
            lines.append(
                f"fine-tuning: {f['mode']} ({r['objective']}), {f['epochs']} epoch{'s' if f['epochs'] != 1 else ''} on "
                f"{r['images']} images, "
                f"loss " + " ".join(f"{x:.4f}" for x in r["loss"]) + f"{top1}, {r['seconds']:.1f} s"
            )
        if self.latency:
            lat = self.latency
            allocator = f", allocator {lat['allocator']['allocator']}" if "allocator" in lat else ""
            lines.append(format_latency(lat) + f", {lat['device']}{allocator}")
            for batch, other in sorted(lat.get("batches", {}).items(), key=lambda item: int(item[0])):
                if int(batch) != lat["batch_size"]:  # the other batch sizes timed (batch 1 always is)
                    lines.append("  " + format_latency({**other, "batch_size": int(batch), "threads": lat["threads"],
                                                        "baseline": lat.get("baseline", "original as given")}))
        if self.timing:
            lines.append("timing: " + ", ".join(f"{k} {v:.1f}" for k, v in self.timing.items()))
        return "\n".join(lines)


def format_latency(lat: dict) -> str:
    """The latency line a user reads: what was compared, both medians, the median ratio with its spread over
    the rounds, batch and threads; e.g. "latency (BatchNorm folded in both): 59.30 ms -> 26.00 ms, 2.28x
    (median of 7 rounds, 2.10x-2.40x), batch 32, 1 thread"."""
    baseline = lat.get("baseline", "original as given")
    spread = (f" (median of {lat['rounds']} rounds, {lat['speedup_min']:.2f}x-{lat['speedup_max']:.2f}x)"
              if "rounds" in lat else "")
    threads = f"{lat['threads']} thread" + ("" if lat["threads"] == 1 else "s")
    line = (f"latency ({baseline}): {lat['before_ms']:.2f} ms -> {lat['after_ms']:.2f} ms, "
            f"{lat['measured_speedup']:.2f}x{spread}, batch {lat['batch_size']}, {threads}")
    if "before_unfolded_ms" in lat:
        line += f"; original without folding {lat['before_unfolded_ms']:.2f} ms ({lat['speedup_vs_unfolded']:.2f}x)"
    return line
