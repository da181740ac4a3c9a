"""Streaming second moments of each target layer's input patches, kept in the calibration store.

The Sigma-norm methods (ALGORITHMS.md section 6) need, per layer, the mean mu (p,) and the covariance
Sigma (p, p) of the x in y = W x + b: for a conv, every column that ``torch.nn.functional.unfold`` takes
with the layer's own kernel size, padding, stride and dilation (p = C kh kw, ordered like
``weight.reshape(d, -1)``), for a Linear layer every input row (p = in). :class:`InputPatchStats` hooks the
layers and keeps, in float64, the centred moments

    n = number of patches,  mu = (1/n) sum_i x_i (p,),  S = sum_i (x_i - mu)(x_i - mu)^T (p, p)

over the calibration images: each batch's own (n_b, mu_b, S_b) is folded in with the pairwise update of
Chan et al. (:func:`lowrank_fm.stats.merge_moments`), which keeps its digits when the mean is large
(forming sum x x^T / n - mu mu^T does not: with mean 1e4 and unit variance it cancels about 8 of the 16
digits) and does not depend on the batching beyond rounding. They are written beside the responses in the
same HDF5 file as the store's statistics section ``input_stats`` (per layer: arrays ``mean`` and
``scatter``, count ``count``; :meth:`calibration.store.CalibrationWriter.write_stats`), whose
``images_done`` is written last: a resumed run continues from them when they cover exactly the committed
images, and :func:`read_input_stats` reads them back only from a complete store whose statistics cover
every image. The shards of a multi-process run are merged with the same update, in rank order.

Subsampled moments (``rows_per_dim``)
-------------------------------------
Every patch of every image costs n L p^2 multiply-adds per layer (ResNet-56 at 32 px: L = 1024 positions of
500 images per layer), the bulk of a calibration for the Sigma-norm estimates. With ``rows_per_dim = c`` the
moments are kept instead over the patches at ``k = max(1, ceil(c p / n_images))`` output positions of every
image (all of them when the map has no more than k), drawn like the response samples
(:func:`calibration.sampling.sample_positions_batch`, seeded by (seed, layer index, global image ordinal),
uniform without replacement, so a resumed or sharded run draws the same ones): about ``c p`` rows per layer,
``n_images k`` exactly. Every image gives the same number of rows and every position of an image is equally
likely, so the row mean is an unbiased estimate of the mean over all patches, and S / n (n the rows kept) the
plug-in estimate of their covariance. The store keeps k per layer (``positions``, -1: every position);
:func:`check_input_sampling` refuses a store whose statistics were kept with another k, whether resumed or
reused complete, so moments of different samplings are never mixed nor read back under another setting.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import TracebackType

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lowrank_fm.stats import StreamingCovariance

from .sampling import sample_positions_batch
from .store import CalibrationMismatchError, CalibrationReader, CalibrationWriter

__all__ = ["InputPatchStats", "read_input_stats", "input_patches", "merge_input_stats", "input_positions",
           "check_input_sampling", "sampled_input_patches"]

_SECTION = "input_stats"
_ADVICE = "delete the calibration file or pass another one (--calib-file)"
_CENTRED_BYTES = 64 << 20  # the patches are centred in row blocks of this size (memory beyond the patches)


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
    _check_module(module)
    if isinstance(module, nn.Conv2d):
        columns = F.unfold(inputs, module.kernel_size, dilation=module.dilation, padding=module.padding,
                           stride=module.stride)  # (B, p, L)
        return columns.transpose(1, 2)
    return inputs.reshape(inputs.shape[0], -1, inputs.shape[-1])


def _check_module(module: nn.Module) -> None:
    """Refuse a layer whose input patches are not unfold's columns (or a Linear layer's rows)."""
    if isinstance(module, nn.Conv2d):
        if module.groups != 1 or isinstance(module.padding, str) or module.padding_mode != "zeros":
            raise ValueError(
                f"input statistics need a conv with groups=1 and numeric zero padding, got groups={module.groups}, "
                f"padding={module.padding!r}, padding_mode={module.padding_mode!r}; exclude that layer")
    elif not isinstance(module, nn.Linear):
        raise TypeError(f"input statistics are kept for nn.Conv2d and nn.Linear layers, got {type(module).__name__}")


def input_positions(module: nn.Module, n_images: int, rows_per_dim: float | None) -> int:
    """Output positions per image whose input patches the moments keep: ``max(1, ceil(rows_per_dim p / n_images))``
    (p = c kh kw or in_features), or -1 (every position) when ``rows_per_dim`` is None."""
    if rows_per_dim is None:
        return -1
    if isinstance(rows_per_dim, bool) or not isinstance(rows_per_dim, (int, float)) or not rows_per_dim > 0:
        raise ValueError(f"rows_per_dim must be a positive number or None (every patch), got {rows_per_dim!r}")
    p = int(np.prod(module.weight.shape[1:]))
    return max(1, math.ceil(rows_per_dim * p / int(n_images)))


def _output_size(module: nn.Conv2d, height: int, width: int) -> tuple[int, int]:
    size = []
    for n, k, s, d, pad in zip((height, width), module.kernel_size, module.stride, module.dilation, module.padding):
        size.append((n + 2 * pad - d * (k - 1) - 1) // s + 1)
    return size[0], size[1]


def sampled_input_patches(module: nn.Module, inputs: torch.Tensor, positions: np.ndarray) -> torch.Tensor:
    """The input patches of ``module`` at the given output positions of each image, gathered directly.

    Parameters
    ----------
    module : as :func:`input_patches`
    inputs : (B, C, H, W) for a conv; (B, ..., in) for a Linear
    positions : int array (B, k, 2), (row, col) of each image's output positions ((q, 0) for a Linear input's
        q-th middle row)

    Returns
    -------
    (B, k, p) : row (b, j) equals ``input_patches(module, inputs)[b, row * W' + col]``.
    """
    _check_module(module)
    pos = torch.as_tensor(np.asarray(positions, dtype=np.int64), device=inputs.device)
    b = torch.arange(inputs.shape[0], device=inputs.device)
    if isinstance(module, nn.Linear):
        rows = inputs.reshape(inputs.shape[0], -1, inputs.shape[-1])
        return rows[b[:, None], pos[..., 0]]
    (kh, kw), (sh, sw), (dh, dw), (ph, pw) = module.kernel_size, module.stride, module.dilation, module.padding
    padded = F.pad(inputs, (pw, pw, ph, ph)).permute(0, 2, 3, 1)  # (B, H + 2ph, W + 2pw, C)
    h = pos[..., 0, None] * sh + torch.arange(kh, device=inputs.device) * dh  # (B, k, kh)
    w = pos[..., 1, None] * sw + torch.arange(kw, device=inputs.device) * dw  # (B, k, kw)
    patches = padded[b[:, None, None, None], h[..., :, None], w[..., None, :]]  # (B, k, kh, kw, C)
    return patches.permute(0, 1, 4, 2, 3).reshape(inputs.shape[0], pos.shape[1], -1)


class InputPatchStats:
    """Forward hooks that keep the patch count, mean and scatter of each layer's inputs, in float64.

    Parameters
    ----------
    modules : dict of str to nn.Module, the target layers by name
    keep_from, keep_until : images with ordinal in [keep_from, keep_until) are counted (the rest of a batch
        straddling a resume point or the end of the run is not); the caller advances the ordinal with
        :meth:`advance` after each batch, run or skipped.
    positions : dict name -> (layer index, k): keep the patches at k output positions per image only, drawn by
        :func:`~calibration.sampling.sample_positions_batch` with ``seed``, the layer index and the image's
        global ordinal (``first_ordinal`` + its ordinal here); k = -1, or a layer left out: every patch.
    seed, first_ordinal : of that draw.

    Attributes
    ----------
    count_ : dict name -> int; mean_ : dict name -> Tensor (p,);
    scatter_ : dict name -> Tensor (p, p), sum (x - mean)(x - mean)^T (on the device of the layer's inputs)
    """

    def __init__(self, modules: Mapping[str, nn.Module], *, keep_from: int = 0, keep_until: int | None = None,
                 positions: Mapping[str, tuple[int, int]] | None = None, seed: int = 0, first_ordinal: int = 0) -> None:
        self._modules = dict(modules)
        self.keep_from, self.keep_until = int(keep_from), keep_until
        self.positions = {name: (int(i), int(k)) for name, (i, k) in (positions or {}).items() if k > 0}
        self.seed, self.first_ordinal = int(seed), int(first_ordinal)
        self._ordinal = 0
        self._handles: list = []
        self.count_: dict[str, int] = {name: 0 for name in self._modules}
        self.mean_: dict[str, torch.Tensor | None] = {name: None for name in self._modules}
        self.scatter_: dict[str, torch.Tensor | None] = {name: None for name in self._modules}

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
        module = self._modules[name]
        if name in self.positions:
            index, count = self.positions[name]
            if isinstance(module, nn.Conv2d):
                height, width = _output_size(module, inputs.shape[-2], inputs.shape[-1])
            else:
                height, width = int(np.prod(inputs.shape[1:-1])), 1
            where = sample_positions_batch(self.seed, index, self.first_ordinal + self._ordinal + lo, hi - lo,
                                           height, width, count)
            x = sampled_input_patches(module, inputs[lo:hi], where).double()
        else:
            x = input_patches(module, inputs[lo:hi]).double()
        x = x.reshape(-1, x.shape[-1])
        if x.shape[0] == 0:
            return
        mean, count = x.mean(0), x.shape[0]
        if self.mean_[name] is None:
            self.count_[name], self.mean_[name] = 0, mean
            self.scatter_[name] = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
        # merge_moments in place (a p x p matrix is not allocated and added per batch: 2 s of vgg-fmnist's
        # calibration for auto): S += sum (x - m_b)(x - m_b)^T + (n_a n_b / n) delta delta^T, m += (n_b / n) delta
        scatter = self.scatter_[name] = self.scatter_[name].to(x.device)
        for part in x.split(max(1, _CENTRED_BYTES // (8 * x.shape[1]))):  # centred copies of bounded size
            centred = part - mean
            scatter.addmm_(centred.T, centred)
        before, delta = self.count_[name], mean - self.mean_[name].to(x.device)
        total = before + count
        scatter.addr_(delta, delta, alpha=before * count / total)
        self.count_[name], self.mean_[name] = total, self.mean_[name].to(x.device) + (count / total) * delta

    def resume(self, writer: CalibrationWriter) -> "InputPatchStats":
        """Start from the statistics stored in ``writer``'s file, which must cover its committed images."""
        n_done = writer.n_images_done
        if n_done == 0:
            return self
        stored = writer.stats_images_done(_SECTION) or 0
        if stored != n_done:
            raise CalibrationMismatchError(
                f"calibration file {writer.path!r} holds responses of {n_done} images but input statistics of "
                f"{stored}; they cannot be resumed together: {_ADVICE}")
        for name in self._modules:
            values = writer.read_stats(_SECTION, name)
            if values is None:  # no patch of this layer in the images so far
                continue
            self.count_[name] = values["count"]
            self.mean_[name] = torch.from_numpy(values["mean"])
            self.scatter_[name] = torch.from_numpy(values["scatter"])
        return self

    def snapshot(self):
        """A copy of the current statistics, as ``commit(writer, images_done)`` that writes them into
        ``writer``'s file (``images_done`` committed last); for a writer thread that stores them after the
        responses."""
        arrays = {name: {"count": self.count_[name], "mean": self.mean_[name].cpu().numpy().copy(),
                         "scatter": self.scatter_[name].cpu().numpy().copy(),
                         "positions": self.positions.get(name, (0, -1))[1]}
                  for name in self._modules if self.mean_[name] is not None}

        def commit(writer: CalibrationWriter, images_done: int) -> None:
            writer.write_stats(_SECTION, arrays, images_done)

        return commit

    def save(self, writer: CalibrationWriter, images_done: int) -> None:
        """Write the statistics into ``writer``'s file; ``images_done`` is committed last."""
        self.snapshot()(writer, images_done)


def _stored(store: CalibrationReader | CalibrationWriter, name: str) -> StreamingCovariance:
    """Layer ``name``'s stored input statistics as an estimator (empty when none are stored)."""
    values = store.read_stats(_SECTION, name)
    if values is None:
        return StreamingCovariance()
    return StreamingCovariance.from_moments(values["count"], values["mean"], values["scatter"])


def _stored_positions(store: CalibrationReader | CalibrationWriter, name: str) -> int | None:
    """The k that layer ``name``'s stored statistics were kept with (-1: every position; a store written before
    subsampling existed kept every one); None when none are stored."""
    counts = store.stats_counts(_SECTION, name)
    return None if counts is None else int(counts.get("positions", -1))


def check_input_sampling(store: CalibrationReader | CalibrationWriter, wanted: Mapping[str, int]) -> None:
    """Refuse a store whose input statistics were kept with other positions per image than ``wanted`` (name ->
    k, -1: every position), for a resume or a reuse: moments of two samplings are never mixed nor taken for
    each other."""
    if store.stats_images_done(_SECTION) is None:
        return
    show = {-1: "every position"}
    for name, k in wanted.items():
        stored = _stored_positions(store, name)
        if stored is not None and stored != k:
            raise CalibrationMismatchError(
                f"calibration file {store.path!r} holds the input statistics of layer {name!r} kept over "
                f"{show.get(stored, f'{stored} positions per image')}, but this run keeps them over "
                f"{show.get(k, f'{k} positions per image')} (another input_rows setting); {_ADVICE}")


def merge_input_stats(shards: Sequence[CalibrationReader], writer: CalibrationWriter) -> bool:
    """Merge the input statistics of a multi-process run's complete shards, in rank order, into the merged store.

    Returns False (and writes nothing) when the shards hold none; raises when only some do or when a shard's
    statistics do not cover all of its images.
    """
    covered = [reader.stats_images_done(_SECTION) for reader in shards]
    if all(n is None for n in covered):
        return False
    if any(n is None for n in covered):
        raise CalibrationMismatchError(f"only some calibration shards hold input statistics; {_ADVICE}")
    merged: dict[str, StreamingCovariance] = {}
    positions: dict[str, int] = {}
    for reader, n in zip(shards, covered):
        if n != reader.n_images:
            raise CalibrationMismatchError(
                f"calibration shard {reader.path!r}: input statistics cover {n} of {reader.n_images} images; {_ADVICE}")
        for name in reader.stats_layers(_SECTION):
            k = _stored_positions(reader, name)
            if positions.setdefault(name, k) != k:
                raise CalibrationMismatchError(
                    f"calibration shards kept layer {name!r}'s input statistics over {positions[name]} and {k} "
                    f"positions per image; {_ADVICE}")
            merged.setdefault(name, StreamingCovariance()).merge(_stored(reader, name))
    writer.write_stats(_SECTION, {name: {"count": est.n_samples_seen_, "mean": est.mean_, "scatter": est.scatter_,
                                         "positions": positions[name]}
                                  for name, est in merged.items() if est.n_samples_seen_},
                       writer.n_images_done)
    return True


def read_input_stats(reader: CalibrationReader, name: str) -> tuple[np.ndarray, np.ndarray, int]:
    """Mean (p,), covariance (p, p) and patch count of layer ``name``'s inputs, float64.

    Covariance = S / n, the population covariance (S the stored scatter, symmetrised), from a complete store
    whose input statistics cover every calibration image.
    """
    covered = reader.stats_images_done(_SECTION)
    if covered is None or reader.read_stats(_SECTION, name) is None:
        raise ValueError(
            f"calibration file {reader.path!r} has no input covariance for layer {name!r} (it was made for a method "
            f"that does not need one); {_ADVICE}")
    if covered != reader.n_images:
        raise CalibrationMismatchError(
            f"calibration file {reader.path!r}: input statistics cover {covered} of {reader.n_images} images; {_ADVICE}")
    estimator = _stored(reader, name)
    covariance = estimator.covariance_
    return estimator.mean_, 0.5 * (covariance + covariance.T), estimator.n_samples_seen_
