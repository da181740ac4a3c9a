"""Deployment forms of an (approximated) model: TorchScript and ONNX, each checked against the eager model
(parity) and timed in the same process.

ONNX needs the optional extra ``pip install -e ".[export]"`` (onnx + onnxruntime); without it the ONNX
form is reported as skipped with the reason, and TorchScript still runs.
"""

from __future__ import annotations

import copy
import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .latency import BASELINE, MIN_ROUNDS, interleaved_rounds, machine_load, ratio_spread
from .surgery import folded_copy

__all__ = ["relative_difference", "export_torchscript", "export_onnx", "onnx_available", "export_and_check"]

log = logging.getLogger(__name__)


def relative_difference(reference: torch.Tensor | np.ndarray, other: torch.Tensor | np.ndarray) -> float:
    """max_i |a_i - b_i| / max_i |a_i|: the largest deviation relative to the output's scale.

    (An element-wise ratio would explode on outputs near zero; the scale of the output is what a
    classifier's decision depends on.)
    """
    a = torch.as_tensor(np.asarray(reference, dtype=np.float64))
    b = torch.as_tensor(np.asarray(other, dtype=np.float64))
    if a.shape != b.shape:
        raise ValueError(f"outputs differ in shape: {tuple(a.shape)} and {tuple(b.shape)}")
    scale = float(a.abs().max())
    diff = float((a - b).abs().max())
    return diff / scale if scale > 0 else diff


def export_torchscript(model: nn.Module, example: torch.Tensor, path: str | Path | None = None) -> torch.jit.ScriptModule:
    """Trace ``model`` on ``example`` (N, C, H, W) into TorchScript; saved to ``path`` when given."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model.eval(), example)
        traced = torch.jit.freeze(traced)
    if path is not None:
        traced.save(str(path))
    return traced


def onnx_available() -> str | None:
    """None when onnx and onnxruntime import, else why not (the extra to install)."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as error:
        return f"{error.name} is not installed: pip install -e \".[export]\""
    return None


def export_onnx(model: nn.Module, example: torch.Tensor, path: str | Path, *, opset: int = 17) -> Path:
    """Export ``model`` to ONNX at ``path`` (input ``images``, output ``outputs``, dynamic batch), checked
    with ``onnx.checker``."""
    reason = onnx_available()
    if reason:
        raise ImportError(reason)
    import onnx

    path = Path(path)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (example,), str(path), input_names=["images"], output_names=["outputs"],
                          opset_version=opset, dynamic_axes={"images": {0: "batch"}, "outputs": {0: "batch"}},
                          dynamo=False)
    onnx.checker.check_model(onnx.load(str(path)))
    return path


def _onnx_session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class _OnnxRunner:
    """Calls an onnxruntime session like a model (tensor in, array out), so it can be timed interleaved
    with the eager and TorchScript forms by :func:`compare_latency`."""

    def __init__(self, session) -> None:
        self.session = session

    def eval(self) -> "_OnnxRunner":
        return self

    def __call__(self, batch: torch.Tensor) -> np.ndarray:
        return self.session.run(None, {"images": batch.numpy().astype(np.float32)})[0]


def export_and_check(model: nn.Module, example: torch.Tensor, out_dir: str | Path, *, rounds: int = 7,
                     repeats: int = 1, warmup: int = 2, tolerance: float = 1e-4, original: nn.Module | None = None,
                     min_seconds: float = 2.0) -> dict:
    """Export ``model`` (on the CPU) to ``out_dir``/model.torchscript.pt and model.onnx, check each form's
    output against the eager model on ``example`` and time the three forms on it.

    Returns
    -------
    dict with one entry per form (``eager``, ``torchscript``, ``onnx``): ``path``, ``max_rel_diff``
    (:func:`relative_difference` against eager), ``parity`` (max_rel_diff < tolerance), ``ms`` (median
    latency); a form that could not be produced has ``skipped`` with the reason. Also ``batch_size``,
    ``threads``, ``load``, ``tolerance``, ``rounds``.

    All forms are timed in the same interleaved rounds (:func:`lowrank_fm.latency.interleaved_rounds`).
    With ``original`` (the model before approximation), a BatchNorm-folded copy of it is timed in those
    rounds too (``original_eager``, eager PyTorch, NCHW) and each form gets ``speedup_vs_original``:
    the median of the per-round ratios with ``speedup_min`` / ``speedup_max``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = model.eval().cpu()
    example = example.cpu()
    with torch.no_grad():
        reference = model(example)
    result: dict = {"batch_size": int(example.shape[0]), "threads": torch.get_num_threads(), "load": machine_load(),
                    "tolerance": tolerance}
    scripted = export_torchscript(model, example, out / "model.torchscript.pt")
    loaded = torch.jit.load(str(out / "model.torchscript.pt"))
    with torch.no_grad():
        script_diff = relative_difference(reference, loaded(example))
    forms: dict = {"eager": model, "torchscript": scripted}
    result["torchscript"] = {"path": str(out / "model.torchscript.pt"), "max_rel_diff": script_diff,
                             "parity": script_diff < tolerance}
    reason = onnx_available()
    if reason:
        result["onnx"] = {"skipped": reason}
    else:
        path = export_onnx(model, example, out / "model.onnx")
        forms["onnx"] = _OnnxRunner(_onnx_session(path))
        onnx_diff = relative_difference(reference, forms["onnx"](example))
        result["onnx"] = {"path": str(path), "max_rel_diff": onnx_diff, "parity": onnx_diff < tolerance}
    if original is not None:
        forms["original_eager"], folded = folded_copy(copy.deepcopy(original).cpu(), example[:1])  # caller's stays put
        result["original_eager"] = {"baseline": BASELINE, "folded_batchnorm": len(folded)}
    times = interleaved_rounds(forms, example, rounds=max(MIN_ROUNDS, rounds), repeats=repeats, warmup=warmup,
                               min_seconds=min_seconds)  # interleaved, same process
    result["rounds"] = max(MIN_ROUNDS, rounds)
    result["eager"] = {}
    for form, values in times.items():
        result[form]["ms"] = float(np.median(values))
        if original is not None and form != "original_eager":
            spread = ratio_spread(times["original_eager"], values)
            result[form].update(speedup_vs_original=spread["median"], speedup_min=spread["min"],
                                speedup_max=spread["max"])
    for form in ("torchscript", "onnx"):
        entry = result[form]
        if "parity" in entry:
            log.info("%s: max relative difference %.2e (%s), %.2f ms (eager %.2f ms)", form, entry["max_rel_diff"],
                     "ok" if entry["parity"] else "FAILED", entry["ms"], result["eager"]["ms"])
    return result
