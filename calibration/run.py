"""calibrate(): run a model over calibration batches and stream sampled layer responses to HDF5.

Each batch is run once through the model under ``torch.no_grad()`` in eval mode; the
:class:`~calibration.recorder.ResponseRecorder` samples the target layers' outputs and the batch is appended
to the store at once, so memory stays flat whatever the number of images. An interrupted run resumes from
the store's committed image count: batches already stored are drawn from the iterable but not run, and a
batch that straddles the boundary is run with only its new images kept.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from lowrank_fm.batches import batch_size_of, check_finite_images, to_device
from lowrank_fm.distributed import world

from .input_stats import InputPatchStats, check_input_sampling, input_positions
from .recorder import ResponseRecorder, Samples, layer_spec
from .sampling import check_positions_per_image
from .distributed import barrier, merge_shards, shard_meta, shard_path, shard_range
from .store import CalibrationMismatchError, CalibrationWriter, IncompleteCalibrationError, open_calibration
from .writer import BackgroundWriter

__all__ = ["calibrate", "resolve_layers", "weights_fingerprint", "image_digests"]

logger = logging.getLogger(__name__)

#: A short run commits at least this many groups of images, so that an interrupted one can resume.
MIN_COMMITS = 8


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    tensor = tensor.detach().cpu().contiguous()
    if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16: its bits as int16
        tensor = tensor.view(torch.int16)
    return tensor.numpy().tobytes()


def weights_fingerprint(model: nn.Module) -> str:
    """A digest (hex) of every parameter and buffer of ``model``: names, dtypes, shapes and values.

    It covers the sampled layers and everything upstream of them (and the rest of the model too, which is
    simpler and costs one pass over the weights): a store made with other weights is refused.
    """
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(model.state_dict().items()):
        if not isinstance(tensor, torch.Tensor):
            continue
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(_tensor_bytes(tensor))
    return digest.hexdigest()


def _digest(item: Any) -> int:
    digest = hashlib.blake2b(digest_size=8)
    if isinstance(item, torch.Tensor):
        digest.update(f"{item.dtype}|{tuple(item.shape)}|".encode())
        digest.update(_tensor_bytes(item))
    else:
        digest.update(repr(item).encode())
    return int(np.frombuffer(digest.digest(), dtype="<i8")[0]) or 1  # 0 means "not recorded"


def image_digests(batch: torch.Tensor | list) -> np.ndarray:
    """A checksum (int64, never 0) of each image of a batch: Tensor (B, ...) or a list of image tensors."""
    if isinstance(batch, torch.Tensor):
        flat = batch.detach().cpu().contiguous()
        return np.array([_digest(flat[i]) for i in range(flat.shape[0])], dtype=np.int64)
    return np.array([_digest(item) for item in batch], dtype=np.int64)


def resolve_layers(model: nn.Module, layer_names: Sequence[str]) -> dict[str, nn.Module]:
    """Target modules of ``model`` by qualified name (as in ``model.named_modules()``).

    Parameters
    ----------
    model : nn.Module
    layer_names : sequence of str
        Distinct names of nn.Conv2d or nn.Linear modules.

    Returns
    -------
    dict of str to nn.Module, in the order of ``layer_names``.

    Raises
    ------
    ValueError
        If the list is empty, has repeats, or names a module the model does not have.
    TypeError
        If a named module is not nn.Conv2d nor nn.Linear.
    """
    if isinstance(layer_names, str):
        raise ValueError(f"layer_names must be a list of names, got the string {layer_names!r}")
    names = list(layer_names)
    if not names:
        raise ValueError("layer_names must name at least one nn.Conv2d or nn.Linear layer, got none")
    if len(set(names)) != len(names):
        raise ValueError(f"layer_names has repeated names: {names}")
    available = dict(model.named_modules())
    missing = [name for name in names if name not in available]
    if missing:
        candidates = [n for n, m in available.items() if isinstance(m, (nn.Conv2d, nn.Linear))]
        raise ValueError(f"model has no module named {missing}; its Conv2d/Linear layers are {candidates}")
    modules = {name: available[name] for name in names}
    for name, module in modules.items():
        try:
            layer_spec(module)
        except TypeError as err:
            raise TypeError(f"layer {name!r}: {err}") from None
    return modules


def _batch_size(batch: Any) -> int:
    """Images in ``batch``; a tuple is refused: it is most likely a loader item such as (images, labels)."""
    if isinstance(batch, tuple):
        raise TypeError(
            "a batch must be a Tensor of shape (B, ...) or a list of image tensors, got tuple; pass to_input=... "
            "to turn a loader item into the model input (e.g. to_input=lambda item: item[0])"
        )
    return batch_size_of(batch)


def _check_model_device(model: nn.Module, device: torch.device) -> None:
    for tensor in list(model.parameters()) + list(model.buffers()):
        here = tensor.device
        if here.type != device.type or (device.index is not None and here.index != device.index):
            raise ValueError(
                f"the model is on {here} but device={str(device)!r}: move the model with model.to(device) "
                f"or pass device={str(here)!r}"
            )
        return


def calibrate(
    model: nn.Module,
    batches: Iterable[Any],
    layer_names: Sequence[str],
    path: str | os.PathLike,
    *,
    n_images: int,
    seed: int = 0,
    positions_per_image: int | None = 10,
    image_ids: np.ndarray | None = None,
    meta: Mapping[str, Any] | None = None,
    resume: bool = True,
    device: str | torch.device = "cpu",
    progress: bool = True,
    to_input: Callable[[Any], Any] | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    input_stats: bool | Collection[str] = False,
    input_rows: float | None = None,
) -> str:
    """Store sampled output responses of the target layers over ``n_images`` calibration images.

    Parameters
    ----------
    model : nn.Module
        The network, already on ``device``. It is run in eval mode under ``torch.no_grad()``; the training
        mode of each of its modules is restored afterwards, nothing else is changed.
    batches : iterable
        Model inputs: Tensors of shape (B, ...), or lists of image tensors (as torchvision detection models
        take), or any loader items that ``to_input`` turns into one of those. The model is called as
        ``model(batch)``. It must yield the same images in the same order on every call (for resuming).
    layer_names : sequence of str
        Qualified names of the nn.Conv2d / nn.Linear modules whose outputs are recorded.
    path : str or PathLike
        The HDF5 store (see :mod:`calibration.store`).
    n_images : int
        Number of calibration images; the images after it are not used.
    seed : int, default 0
        Seed of the position sampling.
    positions_per_image : int or None, default 10
        Spatial positions sampled per image and layer; None keeps all positions.
    image_ids : ndarray of shape (n_images,), optional
        The caller's identifier of each image (e.g. its index in the training set); default arange.
    meta : dict, optional
        JSON-serialisable metadata stored with the file (model name, dataset, ...). It is part of the
        store's identity: resuming needs the same meta.
    resume : bool, default True
        Continue an existing incomplete file made with the same settings (a complete one is returned as is).
    device : str or torch.device, default "cpu"
        Where tensors of each batch are moved.
    progress : bool, default True
        Show a tqdm progress bar over images.
    to_input : callable, optional
        ``to_input(item)`` turns a raw item of ``batches`` into the model input (default: identity).
    rank, world_size : int, optional
        This process's place in a multi-process run (default: those of the initialised
        ``torch.distributed`` process group, else 0 and 1). With ``world_size > 1``, ``batches`` must yield
        only this rank's images, ``shard_range(n_images, rank, world_size)`` of the whole ordered stream;
        they go to ``shard_path(path, rank, world_size)`` (see :mod:`calibration.distributed`). Under a
        process group the ranks then wait for each other and rank 0 merges the shards into ``path``;
        without one, the shard's path is returned and the caller merges with ``merge_shards``.
    input_stats : bool or collection of layer names, default False
        Also store each layer's input-patch mean and covariance (:mod:`calibration.input_stats`): every
        target layer's (True) or the named layers' only (a p x p covariance of a 25,088-wide Linear input is
        5 GB); the shards of a multi-process run each hold their own sums, which the merge adds up.
    input_rows : float, optional
        Keep those statistics over about ``input_rows`` x p patches per layer (p its input-patch width): the
        patches at ``max(1, ceil(input_rows p / n_images))`` seeded output positions of every image
        (:func:`calibration.input_stats.input_positions`); None (the default): every patch of every image. A
        store whose statistics were kept otherwise is refused, resumed or complete.

    Returns
    -------
    str
        The path of the complete store (of the shard, for a rank outside a process group).

    Raises
    ------
    ValueError
        If ``batches`` runs out before ``n_images`` images (the file stays incomplete and resumable), or on
        bad arguments.
    CalibrationMismatchError
        If ``path`` holds a store made with other settings.
    FileExistsError
        If ``path`` exists and ``resume`` is False.
    """
    if isinstance(n_images, bool) or not isinstance(n_images, (int, np.integer)) or n_images <= 0:
        raise ValueError(f"n_images must be a positive int, got {n_images!r}")
    n_images = int(n_images)
    positions_per_image = check_positions_per_image(positions_per_image)
    modules = resolve_layers(model, layer_names)
    ids = np.arange(n_images, dtype=np.int64) if image_ids is None else np.asarray(image_ids)
    if ids.shape != (n_images,):
        raise ValueError(f"image_ids must have shape (n_images,) = ({n_images},), got {ids.shape}")
    device = torch.device(device)
    _check_model_device(model, device)
    path = os.fspath(path)
    layers = {name: layer_spec(module) for name, module in modules.items()}

    settings = dict(layers=layers, seed=seed, positions_per_image=positions_per_image,
                    weights_fingerprint=weights_fingerprint(model))
    kept = list(modules) if input_stats is True else [n for n in modules if input_stats and n in set(input_stats)]
    sampling = {name: (index, input_positions(modules[name], n_images, input_rows))
                for index, name in enumerate(modules) if name in kept}
    options = dict(resume=resume, device=device, progress=progress, to_input=to_input, input_stats=sampling)
    if rank is None and world_size is None:
        rank, world_size = world()
    elif rank is None or world_size is None:
        raise ValueError(f"pass both rank and world_size, or neither; got rank={rank!r}, world_size={world_size!r}")
    if world_size == 1 and rank == 0:
        return _calibrate_store(model, batches, modules, path, image_ids=ids, meta=meta, **settings, **options)

    start, stop = shard_range(n_images, rank, world_size)
    if _complete(path):  # a merged store already complete is reused as is (every rank sees the same)
        with CalibrationWriter.open(path, image_ids=ids, meta=meta, resume=resume, **settings) as writer:  # same run?
            check_input_sampling(writer, {name: k for name, (_, k) in sampling.items()})
        return path
    shard = shard_path(path, rank, world_size)
    logger.info("rank %d of %d calibrates images [%d, %d) into %s", rank, world_size, start, stop, shard)
    _calibrate_store(model, batches, modules, shard, image_ids=ids[start:stop], first_ordinal=start,
                     meta=shard_meta(meta, rank, world_size, n_images), **settings, **options)
    if world() != (rank, world_size):
        return shard  # no process group to wait on: the caller merges the shards (merge_shards)
    barrier()
    if rank == 0:
        merge_shards(path, world_size=world_size, image_ids=ids, meta=meta, **settings)
    barrier()
    return path


def _complete(path: str) -> bool:
    """Whether ``path`` is a complete store (read-only: other ranks may be reading it too)."""
    if not os.path.exists(path):
        return False
    try:
        open_calibration(path).close()
    except IncompleteCalibrationError:
        return False
    return True


def _calibrate_store(
    model: nn.Module,
    batches: Iterable[Any],
    modules: dict[str, nn.Module],
    path: str,
    *,
    layers: dict[str, tuple[int, str]],
    seed: int,
    positions_per_image: int | None,
    weights_fingerprint: str,
    image_ids: np.ndarray,
    meta: Mapping[str, Any] | None,
    resume: bool,
    device: torch.device,
    progress: bool,
    to_input: Callable[[Any], Any] | None,
    first_ordinal: int = 0,
    input_stats: Mapping[str, tuple[int, int]] | None = None,
) -> str:
    """Write (or resume) one store of ``len(image_ids)`` images, the first with global ordinal
    ``first_ordinal``; returns ``path``. ``input_stats``: the layers whose input statistics are kept, name ->
    (layer index, positions per image or -1)."""
    n_images = int(image_ids.shape[0])
    with CalibrationWriter.open(
        path, layers=layers, seed=seed, positions_per_image=positions_per_image, image_ids=image_ids,
        meta=meta, resume=resume, weights_fingerprint=weights_fingerprint,
    ) as writer:
        check_input_sampling(writer, {name: k for name, (_, k) in (input_stats or {}).items()})
        if writer.complete:
            logger.info("calibration file %s is already complete (%d images)", path, n_images)
            return path
        n_done = writer.n_images_done
        if n_done:
            logger.info("resuming calibration file %s at image %d of %d", path, n_done, n_images)
        if n_done < n_images:
            _run_batches(model, batches, modules, writer, n_images=n_images, n_done=n_done, seed=seed,
                         positions_per_image=positions_per_image, device=device, progress=progress,
                         to_input=to_input, first_ordinal=first_ordinal, input_stats=input_stats)
        writer.mark_complete()
        logger.info("calibration file %s complete: %d images, layers %s", path, n_images, list(modules))
    return path


def _lookahead(items: Iterable[Any]) -> Iterator[tuple[Any, Any | None]]:
    """Pairs (item, next item or None): the next batch is known while the current one runs. An error
    raised while fetching the next item is raised after the current item has been handled."""
    iterator = iter(items)
    try:
        current = next(iterator)
    except StopIteration:
        return
    while True:
        try:
            following = next(iterator)
        except StopIteration:
            yield current, None
            return
        except BaseException:
            yield current, None
            raise
        yield current, following
        current = following


def _run_batches(
    model: nn.Module,
    batches: Iterable[Any],
    modules: dict[str, nn.Module],
    writer: CalibrationWriter,
    *,
    n_images: int,
    n_done: int,
    seed: int,
    positions_per_image: int | None,
    device: torch.device,
    progress: bool,
    to_input: Callable[[Any], Any] | None,
    first_ordinal: int = 0,
    max_pending: int = 4,
    input_stats: Mapping[str, tuple[int, int]] | None = None,
) -> None:
    """Run the batches from image ``n_done`` to ``n_images``, appending each batch to ``writer``.

    The forward pass overlaps the rest: the positions of the next batch are drawn in the recorder's
    background thread, and the samples of finished batches are written by a :class:`BackgroundWriter`
    (groups of batches, at most ``max_pending`` queued). ``first_ordinal`` is the global ordinal of the first
    image (a shard of a multi-process run): positions are drawn with global ordinals, the store keeps
    ordinals relative to the shard.
    """
    modes = {module: module.training for module in model.modules()}
    model.eval()
    ordinal = 0  # ordinal (relative to the stream) of the first image of the next batch
    kept = {name: modules[name] for name in input_stats or {}}
    stats = InputPatchStats(kept, keep_from=n_done, keep_until=n_images, positions=input_stats, seed=seed,
                            first_ordinal=first_ordinal).resume(writer) if kept else None
    try:
        with ResponseRecorder(modules, seed=seed, positions_per_image=positions_per_image,
                              start_ordinal=first_ordinal, skip_before=first_ordinal + n_done) as recorder, \
                stats or contextlib.nullcontext(), \
                BackgroundWriter(writer, max_pending=max_pending, flush_images=-(-n_images // MIN_COMMITS),
                                 snapshot=None if stats is None else stats.snapshot) as background, \
                tqdm(total=n_images, initial=n_done, unit="img", desc="calibration",
                     disable=not progress) as bar, torch.no_grad():
            prepared = _prepared(batches, to_input, first_ordinal)
            for (batch, size), upcoming in _lookahead(prepared):
                digests = image_digests(batch)
                if ordinal < n_done:  # already stored: check that these are the stored images
                    _check_continues(writer, digests[: n_done - ordinal], ordinal, first_ordinal)
                if ordinal + size <= n_done:  # already stored: do not run the model
                    recorder.skip(size)
                    if stats is not None:
                        stats.advance(size)
                    ordinal += size
                    continue
                if upcoming is not None and ordinal + size < n_images:
                    recorder.plan(first_ordinal + ordinal + size, upcoming[1])
                model(to_device(batch, device))
                recorder.next_batch(size)
                done = min(ordinal + size, n_images)
                background.append(_relative(recorder.pop(), first_ordinal, n_images), images_done=done,
                                  digests=digests[max(n_done - ordinal, 0): done - ordinal])
                if stats is not None:
                    stats.advance(size)
                bar.update(done - max(ordinal, n_done))
                ordinal += size
                if ordinal >= n_images:
                    break
    finally:
        for module, training in modes.items():
            module.training = training
    if ordinal < n_images:
        raise ValueError(
            f"the calibration batches ran out after {ordinal} images but n_images={n_images} were requested; "
            f"{writer.n_images_done} images are stored in {writer.path!r}, which stays incomplete: pass more "
            f"batches (same images, same order) with the same settings to resume, or a smaller n_images with "
            f"another file"
        )


def _prepared(batches: Iterable[Any], to_input: Callable[[Any], Any] | None,
              first_ordinal: int = 0) -> Iterator[tuple[Any, int]]:
    """(model input, its number of images) per item; an image with NaN or inf values is refused."""
    seen = 0
    for item in batches:
        batch = item if to_input is None else to_input(item)
        size = _batch_size(batch)
        check_finite_images(batch, first_ordinal + seen)
        seen += size
        yield batch, size


def _check_continues(writer: CalibrationWriter, digests: np.ndarray, ordinal: int, first_ordinal: int) -> None:
    """Refuse a resume whose images (checksums ``digests`` from ``ordinal`` on) differ from the stored ones."""
    stored = writer.stored_digests(ordinal, ordinal + len(digests))
    recorded = stored != 0
    differs = recorded & (stored != digests[: len(stored)])
    if differs.any():
        bad = first_ordinal + ordinal + int(np.flatnonzero(differs)[0])
        raise CalibrationMismatchError(
            f"calibration file {writer.path!r}: image {bad} given now is not the image stored at that place "
            f"(checksums differ): a resume needs the same images in the same order (a one-shot generator "
            f"consumed earlier cannot resume); the file is left as it was: pass the same data from its first "
            f"image, or another calibration file"
        )


def _relative(samples: Mapping[str, Samples], first_ordinal: int, limit: int) -> dict[str, Samples]:
    """Ordinals relative to the stream's first image, rows of images >= ``limit`` dropped."""
    kept = {}
    for name, (responses, ordinal, position) in samples.items():
        local = ordinal - first_ordinal if first_ordinal else ordinal
        stop = int(np.searchsorted(local, limit, side="left"))
        kept[name] = (responses[:stop], local[:stop], position[:stop])
    return kept
