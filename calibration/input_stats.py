"""Streaming second moments of each target layer's input patches, kept in the calibration store.

The Sigma-norm methods (ALGORITHMS.md section 6) need, per layer, the mean mu (p,) and the covariance
Sigma (p, p) of the x in y = W x + b: for a conv, every column that ``torch.nn.functional.unfold`` takes
with the layer's own kernel size, padding, stride and dilation (p = C kh kw, ordered like
``weight.reshape(d, -1)``), for a Linear layer every input row (p = in). :class:`InputPatchStats` hooks the
layers and accumulates, in float64, the sums

    n = number of patches,  s = sum_i x_i (p,),  M = sum_i x_i x_i^T (p, p)

over the calibration images, which is exact and independent of the batching. They are written beside the
responses in the same HDF5 file, under ``/input_stats/<escaped layer name>`` (datasets ``sum`` and
``outer_sum``, attr ``count``), with the group attr ``images_done`` written last: a resumed run continues
from them when they cover exactly the committed images, and :func:`read_input_stats` reads them back only
from a complete store whose statistics cover every image.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import TracebackType

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .store import CalibrationMismatchError, CalibrationReader, CalibrationWriter, _escape

__all__ = ["InputPatchStats", "read_input_stats", "input_patches", "merge_input_stats"]

_GROUP = "input_stats"
_ADVICE = "delete the calibration file or pass another one (--calib-file)"


def input_patches(module: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """Every input patch of ``module`` in ``inputs``, one row per (image, output position).

    Parameters
    ----------
    module : nn.Conv2d (groups = 1, numeric padding, zero padding mode) or nn.Linear
    inputs : (B, C, H, W) for a conv; (B, ..., in) for a Linear

    Returns
    -------
    (B, L, p) : L = H' W' output positions (or the middle dims of a Linear input), p = C kh kw or in.
    """
    if isinstance(module, nn.Conv2d):
        if module.groups != 1 or isinstance(module.padding, str) or module.padding_mode != "zeros":
            raise ValueError(
                f"input statistics need a conv with groups=1 and numeric zero padding, got groups={module.groups}, "
                f"padding={module.padding!r}, padding_mode={module.padding_mode!r}; exclude that layer")
        columns = F.unfold(inputs, module.kernel_size, dilation=module.dilation, padding=module.padding,
                           stride=module.stride)  # (B, p, L)
        return columns.transpose(1, 2)
    if isinstance(module, nn.Linear):
        return inputs.reshape(inputs.shape[0], -1, inputs.shape[-1])
    raise TypeError(f"input statistics are kept for nn.Conv2d and nn.Linear layers, got {type(module).__name__}")


class InputPatchStats:
    """Forward hooks that sum x, x x^T and the patch count of each layer's inputs, in float64.

    Parameters
    ----------
    modules : dict of str to nn.Module, the target layers by name
    keep_from, keep_until : images with ordinal in [keep_from, keep_until) are counted (the rest of a batch
        straddling a resume point or the end of the run is not); the caller advances the ordinal with
        :meth:`advance` after each batch, run or skipped.

    Attributes
    ----------
    count_ : dict name -> int; sum_ : dict name -> Tensor (p,); outer_sum_ : dict name -> Tensor (p, p)
    """

    def __init__(self, modules: Mapping[str, nn.Module], *, keep_from: int = 0, keep_until: int | None = None) -> None:
        self._modules = dict(modules)
        self.keep_from, self.keep_until = int(keep_from), keep_until
        self._ordinal = 0
        self._handles: list = []
        self.count_: dict[str, int] = {name: 0 for name in self._modules}
        self.sum_: dict[str, torch.Tensor | None] = {name: None for name in self._modules}
        self.outer_sum_: dict[str, torch.Tensor | None] = {name: None for name in self._modules}

    def __enter__(self) -> "InputPatchStats":
        for name, module in self._modules.items():
            self._handles.append(module.register_forward_hook(
                lambda _module, args, _output, name=name: self._add(name, args[0])))
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def advance(self, n_images: int) -> None:
        """The next batch starts ``n_images`` images later."""
        self._ordinal += int(n_images)

    @torch.no_grad()
    def _add(self, name: str, inputs: torch.Tensor) -> None:
        lo = max(self.keep_from - self._ordinal, 0)
        hi = inputs.shape[0] if self.keep_until is None else min(self.keep_until - self._ordinal, inputs.shape[0])
        if hi <= lo:
            return
        x = input_patches(self._modules[name], inputs[lo:hi]).double()
        x = x.reshape(-1, x.shape[-1])
        if self.sum_[name] is None:
            p = x.shape[1]
            self.sum_[name] = torch.zeros(p, dtype=torch.float64, device=x.device)
            self.outer_sum_[name] = torch.zeros(p, p, dtype=torch.float64, device=x.device)
        self.sum_[name] += x.sum(0)
        self.outer_sum_[name] += x.T @ x
        self.count_[name] += x.shape[0]

    def resume(self, writer: CalibrationWriter) -> "InputPatchStats":
        """Start from the sums stored in ``writer``'s file, which must cover its committed images."""
        f = writer._file
        n_done = writer.n_images_done
        if n_done == 0:
            return self
        stored = int(f[_GROUP].attrs["images_done"]) if _GROUP in f else 0
        if stored != n_done:
            raise CalibrationMismatchError(
                f"calibration file {writer.path!r} holds responses of {n_done} images but input statistics of "
                f"{stored}; they cannot be resumed together: {_ADVICE}")
        for name in self._modules:
            g = f[_GROUP][_escape(name)]
            self.count_[name] = int(g.attrs["count"])
            self.sum_[name] = torch.from_numpy(g["sum"][()])
            self.outer_sum_[name] = torch.from_numpy(g["outer_sum"][()])
        return self

    def snapshot(self):
        """A copy of the current sums, as ``commit(writer, images_done)`` that writes them into ``writer``'s
        file (``images_done`` committed last); for a writer thread that stores them after the responses."""
        arrays = {name: (self.count_[name], self.sum_[name].cpu().numpy().copy(),
                         self.outer_sum_[name].cpu().numpy().copy())
                  for name in self._modules if self.sum_[name] is not None}

        def commit(writer: CalibrationWriter, images_done: int) -> None:
            _write_sums(writer._file, arrays, images_done)

        return commit

    def save(self, writer: CalibrationWriter, images_done: int) -> None:
        """Write the sums into ``writer``'s file; ``images_done`` is committed last."""
        self.snapshot()(writer, images_done)


def _write_sums(f, arrays: Mapping[str, tuple[int, np.ndarray, np.ndarray]], images_done: int) -> None:
    """Store (count, sum, outer_sum) per layer under /input_stats, then the group's ``images_done``."""
    root = f.require_group(_GROUP)
    for name, (count, total, outer) in arrays.items():
        g = root.require_group(_escape(name))
        g.attrs["name"] = name
        for key, value in (("sum", total), ("outer_sum", outer)):
            if key not in g:
                g.create_dataset(key, data=value)
            else:
                g[key][...] = value
        g.attrs["count"] = int(count)
    root.attrs["images_done"] = int(images_done)
    f.flush()


def merge_input_stats(shards: Sequence[CalibrationReader], writer: CalibrationWriter) -> bool:
    """Add up the input statistics of a multi-process run's complete shards into the merged store.

    Returns False (and writes nothing) when the shards hold none; raises when only some do or when a shard's
    statistics do not cover all of its images.
    """
    held = [_GROUP in reader._file for reader in shards]
    if not any(held):
        return False
    if not all(held):
        raise CalibrationMismatchError(f"only some calibration shards hold input statistics; {_ADVICE}")
    totals: dict[str, list] = {}
    for reader in shards:
        root = reader._file[_GROUP]
        if int(root.attrs.get("images_done", -1)) != reader.n_images:
            raise CalibrationMismatchError(
                f"calibration shard {reader.path!r}: input statistics cover {int(root.attrs.get('images_done', -1))} "
                f"of {reader.n_images} images; {_ADVICE}")
        for key in root:
            g = root[key]
            entry = totals.setdefault(g.attrs["name"], [0, 0.0, 0.0])
            entry[0] += int(g.attrs["count"])
            entry[1] = entry[1] + g["sum"][()]
            entry[2] = entry[2] + g["outer_sum"][()]
    _write_sums(writer._file, {name: tuple(v) for name, v in totals.items()}, writer.n_images_done)
    return True


def read_input_stats(reader: CalibrationReader, name: str) -> tuple[np.ndarray, np.ndarray, int]:
    """Mean (p,), covariance (p, p) and patch count of layer ``name``'s inputs, float64.

    Covariance = M / n - mu mu^T (the population covariance), from a complete store whose input statistics
    cover every calibration image.
    """
    f = reader._file
    root = f.get(_GROUP)
    if root is None or _escape(name) not in root:
        raise ValueError(
            f"calibration file {reader.path!r} has no input covariance for layer {name!r} (it was made for a method "
            f"that does not need one); {_ADVICE}")
    if int(root.attrs.get("images_done", -1)) != reader.n_images:
        raise CalibrationMismatchError(
            f"calibration file {reader.path!r}: input statistics cover {int(root.attrs.get('images_done', -1))} "
            f"of {reader.n_images} images; {_ADVICE}")
    g = root[_escape(name)]
    count = int(g.attrs["count"])
    mean = g["sum"][()] / count
    covariance = g["outer_sum"][()] / count - np.outer(mean, mean)
    return mean, 0.5 * (covariance + covariance.T), count
