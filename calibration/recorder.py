"""Forward hooks that sample a layer's output responses at chosen spatial positions.

A :class:`ResponseRecorder` hooks the target modules of a model. On each forward call it takes the module's
output y (the pre-activation response), picks the positions of every image with
:func:`~calibration.sampling.sample_positions`, and keeps the sampled C-vectors with their image ordinal and
position. The caller drives the image counter: after each complete model forward it calls
``next_batch(batch_size)``, which checks that every target layer ran exactly once on that many images and
advances the counter. Batches that are skipped without running the model advance it with ``skip(n)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from types import TracebackType

import numpy as np
import torch
from torch import nn

from .sampling import check_positions_per_image, sample_positions_batch

__all__ = ["ResponseRecorder", "layer_spec", "Samples"]

#: One layer's samples: responses float32 (n, d), image ordinal int64 (n,), position int32 (n, 2).
Samples = tuple[np.ndarray, np.ndarray, np.ndarray]


def layer_spec(module: nn.Module) -> tuple[int, str]:
    """Number of output channels and kind of a target layer.

    Parameters
    ----------
    module : nn.Conv2d or nn.Linear

    Returns
    -------
    (channels, kind) : (int, str)
        ``(out_channels, "conv")`` for a Conv2d, ``(out_features, "linear")`` for a Linear.

    Raises
    ------
    TypeError
        For any other module type.
    """
    if isinstance(module, nn.Conv2d):
        return int(module.out_channels), "conv"
    if isinstance(module, nn.Linear):
        return int(module.out_features), "linear"
    raise TypeError(
        f"target layers must be nn.Conv2d or nn.Linear, got {type(module).__name__}; "
        f"pick the convolution or linear module itself, not its container"
    )


def _empty_samples(channels: int) -> Samples:
    return (
        np.empty((0, channels), dtype=np.float32),
        np.empty((0,), dtype=np.int64),
        np.empty((0, 2), dtype=np.int32),
    )


class ResponseRecorder:
    """Context manager that records sampled output responses of the given modules.

    Parameters
    ----------
    modules : dict of str to nn.Module
        Target layers by name (nn.Conv2d or nn.Linear). A layer's index in this dict's order is the
        ``layer_index`` given to :func:`~calibration.sampling.sample_positions`.
    seed : int
        Non-negative seed of the position draw.
    positions_per_image : int or None
        Positions sampled per image and layer; None means all positions.
    start_ordinal : int, default 0
        Ordinal of the first image of the first batch.
    skip_before : int, default 0
        Samples of images with ordinal < skip_before are not kept (used on resume, when a batch straddles
        the boundary of what is already stored).

    Notes
    -----
    Output shapes: a Conv2d output (B, C, H, W) gives the C-vector at (b, :, h, w) for each sampled
    (h, w). A Linear output (B, F) has one position per image, (0, 0); an output (B, ..., F) has its middle
    dimensions flattened into P positions, position (p, 0).

    Inside a ``with`` block, :meth:`plan` draws the positions of a coming batch in a background thread,
    so that the hooks only gather rows during the forward pass.

    The image counter advances only through :meth:`next_batch` (after a model forward) and :meth:`skip`
    (for a batch not run). Each target layer must run exactly once per model forward: a second call before
    ``next_batch`` raises RuntimeError, since its images could not be told apart from the first call's.

    Examples
    --------
    >>> with ResponseRecorder({"conv1": model.conv1}, seed=0, positions_per_image=10) as rec:
    ...     model(x)
    ...     rec.next_batch(x.shape[0])
    ...     samples = rec.pop()  # {"conv1": (responses, image_ordinal, position)}
    """

    def __init__(
        self,
        modules: Mapping[str, nn.Module],
        *,
        seed: int,
        positions_per_image: int | None,
        start_ordinal: int = 0,
        skip_before: int = 0,
    ) -> None:
        if not modules:
            raise ValueError("ResponseRecorder needs at least one module to record, got an empty dict")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        for label, value in (("start_ordinal", start_ordinal), ("skip_before", skip_before)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
                raise ValueError(f"{label} must be a non-negative int, got {value!r}")
        self._modules = dict(modules)
        self._specs = {name: layer_spec(module) for name, module in self._modules.items()}
        self.seed = int(seed)
        self.positions_per_image = check_positions_per_image(positions_per_image)
        self.skip_before = int(skip_before)
        self._ordinal = int(start_ordinal)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._called: dict[str, int] = {}
        self._gathered: dict[str, list[Samples]] = {name: [] for name in self._modules}
        self._shapes: dict[int, tuple[int, int]] = {}  # layer index -> (height, width) of its last output
        self._plans: dict[tuple[int, int, int, int, int], Future] = {}
        self._planner: ThreadPoolExecutor | None = None

    @property
    def ordinal(self) -> int:
        """Ordinal of the first image of the next batch."""
        return self._ordinal

    def __enter__(self) -> "ResponseRecorder":
        if self._handles:
            raise RuntimeError("this ResponseRecorder is already active; it cannot be entered twice")
        for index, (name, module) in enumerate(self._modules.items()):
            self._handles.append(module.register_forward_hook(self._make_hook(name, index)))
        self._planner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="calibration-positions")
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Remove the hooks (the gathered samples stay until :meth:`pop`)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self._planner is not None:
            self._planner.shutdown(wait=True, cancel_futures=True)
            self._planner = None
        self._plans = {}

    def plan(self, first_ordinal: int, batch_size: int) -> None:
        """Start drawing, in a background thread, the positions of a batch that will run later.

        Optional: it only moves the position draw off the forward pass. It uses each layer's map size seen
        in the last forward; a layer whose map size then differs draws its positions during the forward.
        """
        if self._planner is None:
            return
        for key in [k for k in self._plans if k[1] < self._ordinal]:  # plans of batches that did not run
            self._plans.pop(key).cancel()
        for index, (height, width) in self._shapes.items():
            key = (index, int(first_ordinal), int(batch_size), height, width)
            if key not in self._plans:
                self._plans[key] = self._planner.submit(self._indices, *key)

    def next_batch(self, batch_size: int) -> None:
        """Close the current model forward and advance the image counter by ``batch_size``.

        Raises
        ------
        RuntimeError
            If a target layer did not run during the forward, or ran on a batch of another size.
        """
        batch_size = int(batch_size)
        missing = [name for name in self._modules if name not in self._called]
        if missing:
            raise RuntimeError(
                f"target layer(s) {missing} did not run during the model forward: they are not part of the "
                f"computation for this input; remove them from the target layers"
            )
        wrong = {name: b for name, b in self._called.items() if b != batch_size}
        if wrong:
            raise RuntimeError(
                f"target layer(s) saw a batch dimension other than the batch size {batch_size}: {wrong}; "
                f"the recorder needs layers whose output's first dimension indexes the input images"
            )
        self._called = {}
        self._ordinal += batch_size

    def skip(self, n_images: int) -> None:
        """Advance the image counter by ``n_images`` for a batch that was not run through the model."""
        if self._called:
            raise RuntimeError("skip() called after a model forward; call next_batch(batch_size) instead")
        self._ordinal += int(n_images)

    def pop(self) -> dict[str, Samples]:
        """Return and clear the samples gathered since the last call.

        Returns
        -------
        dict of str to (responses, image_ordinal, position)
            For every target layer, in order: responses float32 (n, d), image_ordinal int64 (n,),
            position int32 (n, 2), rows sorted by image ordinal (empty arrays if nothing was gathered).
        """
        result: dict[str, Samples] = {}
        for name, parts in self._gathered.items():
            if not parts:
                result[name] = _empty_samples(self._specs[name][0])
            elif len(parts) == 1:
                result[name] = parts[0]
            else:
                responses, ordinals, positions = zip(*parts)
                result[name] = (np.concatenate(responses), np.concatenate(ordinals), np.concatenate(positions))
            self._gathered[name] = []
        return result

    def _make_hook(self, name: str, index: int):
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            self._record(name, index, output)

        return hook

    def _record(self, name: str, index: int, output: torch.Tensor) -> None:
        if name in self._called:
            raise RuntimeError(
                f"target layer {name!r} ran more than once in one model forward (a shared or reused module), "
                f"or next_batch(batch_size) was not called after the previous forward; calibrate modules "
                f"that run once per forward"
            )
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"target layer {name!r} returned {type(output).__name__}, expected a Tensor")
        channels, kind = self._specs[name]
        if kind == "conv":
            if output.dim() != 4:
                raise ValueError(
                    f"conv layer {name!r} gave an output of shape {tuple(output.shape)}; expected a batched "
                    f"(B, C, H, W) output: feed batched inputs"
                )
            grid = output.detach().permute(0, 2, 3, 1)  # (B, H, W, C)
        else:
            if output.dim() < 2:
                raise ValueError(
                    f"linear layer {name!r} gave an output of shape {tuple(output.shape)}; expected (B, F) "
                    f"or (B, ..., F): feed batched inputs"
                )
            out = output.detach()
            grid = out.reshape(out.shape[0], -1, 1, out.shape[-1])  # (B, P, 1, F)
        batch, height, width = int(grid.shape[0]), int(grid.shape[1]), int(grid.shape[2])
        self._called[name] = batch
        self._shapes[index] = (height, width)
        pending = self._plans.pop((index, self._ordinal, batch, height, width), None)
        b_idx, rows_h, rows_w, ordinals, positions = (
            self._indices(index, self._ordinal, batch, height, width) if pending is None else pending.result()
        )
        if ordinals.shape[0] == 0:
            return
        device = grid.device
        rows = grid[b_idx.to(device), rows_h.to(device), rows_w.to(device)]  # (n, C)
        responses = rows.to(device="cpu", dtype=torch.float32).numpy()
        self._gathered[name].append((responses, ordinals, positions))

    def _indices(
        self, index: int, first_ordinal: int, batch: int, height: int, width: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, np.ndarray, np.ndarray]:
        """Where to gather one layer's samples in a batch: (image in batch, row, col) as int64 tensors (n,),
        with the image ordinals int64 (n,) and positions int32 (n, 2) that the store keeps."""
        lo = min(max(self.skip_before - first_ordinal, 0), batch)
        positions = sample_positions_batch(self.seed, index, first_ordinal + lo, batch - lo, height, width,
                                           self.positions_per_image)  # (m, n, 2)
        per_image = positions.shape[1]
        b_idx = np.repeat(np.arange(lo, batch, dtype=np.int64), per_image)
        flat = np.ascontiguousarray(positions.reshape(-1, 2))
        return (
            torch.from_numpy(b_idx),
            torch.from_numpy(flat[:, 0].astype(np.int64)),
            torch.from_numpy(flat[:, 1].astype(np.int64)),
            b_idx + first_ordinal,
            flat,
        )
