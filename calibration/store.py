"""The HDF5 store of calibration responses (format version 4).

Layout
------
File attrs
    ``format_version`` (4; version 3 kept input-patch statistics as raw sums x and x x^T, which lose digits to
    a large mean, version 2 had no weights fingerprint nor image checksums, version 1 drew positions with
    another sampler), ``position_sampler`` (the name of the draw, :data:`calibration.sampling.SAMPLER`),
    ``complete`` (bool), ``n_images_done`` (committed images), ``n_images_planned``, ``seed``,
    ``positions_per_image`` (-1 = all positions), ``meta_json`` (JSON of caller-given metadata),
    ``layers_json`` (JSON list of layer names, in order), ``weights_fingerprint`` (a digest of the model's
    weights, :func:`calibration.run.weights_fingerprint`; "" when none was given).
``/image_ids`` int64 (n_images_planned,)
    The caller's identifier of each calibration image, indexed by image ordinal.
``/image_digest`` int64 (n_images_planned,)
    A checksum of each committed image (0: not recorded), so that a resumed run can check that the images
    it is given continue the stored ones.
``/layers/<escaped name>`` one group per layer
    attrs ``name``, ``channels`` (d), ``kind`` ("conv" | "linear"), ``committed_rows``; datasets
    ``responses`` float32 (N, d), ``image_ordinal`` int64 (N,), ``position`` int32 (N, 2), chunked and
    resizable along rows. Rows are sorted by image ordinal. Only the first ``committed_rows`` rows are data:
    rows past it belong to a batch whose write was interrupted.
``/<section>/<escaped name>`` per-layer statistics, optional (e.g. ``/input_stats``, :mod:`calibration.input_stats`)
    attrs ``name`` and counts (ints), datasets of arrays; the section's attr ``images_done`` (the images they
    cover) is written last (:meth:`CalibrationWriter.write_stats`, read back with ``stats_images_done``,
    ``stats_layers`` and ``read_stats`` of the writer or the reader).

Commit protocol
---------------
:meth:`CalibrationWriter.append` writes every layer's rows first, then each layer's ``committed_rows``, then
the file's ``n_images_done``, then flushes. On resume every layer is cut back to its committed rows *and* to
the rows of images < ``n_images_done``, so an interruption anywhere in that sequence resumes cleanly. (HDF5
has no journal: a crash inside the library itself can still leave a file that does not open; it is then
refused and must be deleted.)

This is the only module of the project that imports h5py.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any
from urllib.parse import quote

import h5py
import numpy as np

from .sampling import SAMPLER

__all__ = [
    "FORMAT_VERSION",
    "CalibrationLockedError",
    "CalibrationMismatchError",
    "IncompleteCalibrationError",
    "CalibrationWriter",
    "CalibrationReader",
    "open_calibration",
]

FORMAT_VERSION = 4
_KINDS = ("conv", "linear")
_CHUNK_BYTES = 1 << 20  # target size of a responses chunk
_MAX_CHUNK_ROWS = 4096
_INDEX_CHUNK_ROWS = 4096  # chunk rows of image_ordinal / position
_CACHE_BYTES = 4 << 20  # HDF5 chunk cache per open dataset
_ADVICE = "pass another calibration file (--calib-file) or delete this one"
_LOCKED = "another run is using it (HDF5 file lock): wait for that run to finish, or pass another calibration file"


class CalibrationMismatchError(ValueError):
    """An existing file is not a calibration store made with the requested settings."""


class IncompleteCalibrationError(ValueError):
    """A calibration store is read before its run completed."""


class CalibrationLockedError(RuntimeError):
    """A calibration store is open for writing by another run (HDF5 file locking)."""


def _escape(name: str) -> str:
    """HDF5 group name of a layer: percent-encodes '/' and '%', and a leading '.'; '' becomes '%'."""
    escaped = quote(name, safe="")
    if escaped.startswith("."):
        escaped = "%2E" + escaped[1:]
    return escaped or "%"


_RESERVED = ("layers", "image_ids", "image_digest")


def _check_section(section: str) -> str:
    """A statistics section's name, checked: lower-case letters, digits and '_', not one of the store's own."""
    if not isinstance(section, str) or not section or section in _RESERVED or \
            not all(c.islower() or c.isdigit() or c == "_" for c in section) or not section.isascii():
        raise ValueError(
            f"a statistics section must be a name of lower-case letters, digits and '_' other than {_RESERVED}, "
            f"got {section!r}"
        )
    return section


def _chunk_rows(channels: int) -> int:
    return int(max(1, min(_MAX_CHUNK_ROWS, _CHUNK_BYTES // (4 * channels))))


@dataclass(frozen=True)
class _Config:
    """Normalised settings of a calibration run, the identity of a store."""

    layers: tuple[tuple[str, int, str], ...]
    seed: int
    positions_per_image: int  # -1: all positions
    image_ids: np.ndarray
    meta: dict[str, Any]
    weights_fingerprint: str = ""

    @classmethod
    def build(
        cls,
        layers: Mapping[str, tuple[int, str]],
        seed: int,
        positions_per_image: int | None,
        image_ids: np.ndarray,
        meta: Mapping[str, Any] | None,
        weights_fingerprint: str | None = None,
    ) -> "_Config":
        if not layers:
            raise ValueError("layers must name at least one layer, got an empty dict")
        normalised = []
        for name, spec in layers.items():
            if not isinstance(name, str):
                raise ValueError(f"layer names must be str, got {name!r}")
            try:
                channels, kind = spec
            except (TypeError, ValueError):
                raise ValueError(f"layers[{name!r}] must be (channels, kind), got {spec!r}") from None
            if isinstance(channels, bool) or not isinstance(channels, (int, np.integer)) or channels <= 0:
                raise ValueError(f"layers[{name!r}]: channels must be a positive int, got {channels!r}")
            if kind not in _KINDS:
                raise ValueError(f"layers[{name!r}]: kind must be one of {_KINDS}, got {kind!r}")
            normalised.append((name, int(channels), str(kind)))
        escaped = [_escape(name) for name, _, _ in normalised]
        if len(set(escaped)) != len(escaped):
            raise ValueError(f"layer names must be distinct, got {[n for n, _, _ in normalised]}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        if positions_per_image is None:
            ppi = -1
        elif isinstance(positions_per_image, (int, np.integer)) and not isinstance(positions_per_image, bool) \
                and positions_per_image > 0:
            ppi = int(positions_per_image)
        else:
            raise ValueError(
                f"positions_per_image must be a positive int or None (all positions), got {positions_per_image!r}"
            )
        ids = np.asarray(image_ids)
        if ids.ndim != 1 or ids.shape[0] == 0 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(
                f"image_ids must be a non-empty 1-D integer array, got dtype {ids.dtype} and shape {ids.shape}"
            )
        try:
            meta_norm = json.loads(json.dumps(dict(meta or {}), sort_keys=True))
        except (TypeError, ValueError) as err:
            raise ValueError(f"meta must be a JSON-serialisable dict: {err}") from None
        if weights_fingerprint is not None and not isinstance(weights_fingerprint, str):
            raise ValueError(f"weights_fingerprint must be a str or None, got {weights_fingerprint!r}")
        return cls(tuple(normalised), int(seed), ppi, ids.astype(np.int64), meta_norm, weights_fingerprint or "")

    @property
    def names(self) -> list[str]:
        return [name for name, _, _ in self.layers]


def _meta_diffs(stored: Any, wanted: Any, prefix: str = "meta") -> list[str]:
    if isinstance(stored, dict) and isinstance(wanted, dict):
        diffs = []
        for key in sorted(set(stored) | set(wanted)):
            label = f"{prefix}.{key}"
            if key not in stored:
                diffs.append(f"{label}: missing in the file, requested {wanted[key]!r}")
            elif key not in wanted:
                diffs.append(f"{label}: file has {stored[key]!r}, not requested")
            else:
                diffs.extend(_meta_diffs(stored[key], wanted[key], label))
        return diffs
    if stored != wanted:
        return [f"{prefix}: {stored!r} != {wanted!r} (file != requested)"]
    return []


def _config_of(f: h5py.File, path: str) -> _Config:
    """Read the settings stored in an open calibration file (checks the format)."""
    if "format_version" not in f.attrs:
        raise CalibrationMismatchError(
            f"{path!r} is an HDF5 file but not a calibration store (no format_version); {_ADVICE}"
        )
    version = int(f.attrs["format_version"])
    if version != FORMAT_VERSION:
        raise CalibrationMismatchError(
            f"calibration file {path!r} has format version {version}; this code reads version {FORMAT_VERSION}; "
            f"{_ADVICE}"
        )
    try:
        names = json.loads(f.attrs["layers_json"])
        layers = []
        for name in names:
            g = f["layers"][_escape(name)]
            layers.append((name, int(g.attrs["channels"]), str(g.attrs["kind"])))
        return _Config(
            tuple(layers),
            int(f.attrs["seed"]),
            int(f.attrs["positions_per_image"]),
            np.asarray(f["image_ids"][()], dtype=np.int64),
            json.loads(f.attrs["meta_json"]),
            str(f.attrs["weights_fingerprint"]),
        )
    except (KeyError, ValueError, TypeError) as err:
        raise CalibrationMismatchError(f"calibration file {path!r} is damaged ({err}); {_ADVICE}") from None


def _config_diffs(stored: _Config, wanted: _Config, *, subset_ok: bool = False) -> list[str]:
    """What differs between a file's settings and the requested ones. With ``subset_ok`` (a complete file
    being reused), the requested layers may be any subset of the stored ones."""
    diffs = []
    stored_layers = {name: (c, k) for name, c, k in stored.layers}
    if subset_ok and set(wanted.names) <= set(stored.names):
        pairs = [(name, stored_layers[name], (c, k)) for name, c, k in wanted.layers]
    elif stored.names != wanted.names:
        diffs.append(f"layers differ: file has {stored.names}, requested {wanted.names}")
        pairs = []
    else:
        pairs = [(name, stored_layers[name], (c, k)) for name, c, k in wanted.layers]
    for name, (c0, k0), (c1, k1) in pairs:
        if (c0, k0) != (c1, k1):
            diffs.append(f"layer {name!r}: file has {c0} channels ({k0}), requested {c1} ({k1})")
    if stored.seed != wanted.seed:
        diffs.append(f"seed: {stored.seed} != {wanted.seed} (file != requested)")
    if stored.positions_per_image != wanted.positions_per_image:
        def show(v: int) -> str:
            return "all" if v < 0 else str(v)

        diffs.append(
            f"positions_per_image: {show(stored.positions_per_image)} != {show(wanted.positions_per_image)} "
            f"(file != requested)"
        )
    if stored.image_ids.shape != wanted.image_ids.shape:
        diffs.append(
            f"image count: file plans {stored.image_ids.shape[0]} images, requested {wanted.image_ids.shape[0]}"
        )
    elif not np.array_equal(stored.image_ids, wanted.image_ids):
        first = int(np.flatnonzero(stored.image_ids != wanted.image_ids)[0])
        diffs.append(
            f"image_ids differ (first at ordinal {first}: {stored.image_ids[first]} != {wanted.image_ids[first]})"
        )
    diffs.extend(_meta_diffs(stored.meta, wanted.meta))
    if stored.weights_fingerprint != wanted.weights_fingerprint:
        diffs.insert(0, (
            f"the model's weights differ from those the file was made with (weights fingerprint "
            f"{stored.weights_fingerprint or 'none'} in the file, {wanted.weights_fingerprint or 'none'} now): its "
            f"responses belong to another model"
        ))
    return diffs


def _open_h5(path: str, mode: str) -> h5py.File:
    if not h5py.is_hdf5(path):
        raise CalibrationMismatchError(f"{path!r} is not an HDF5 calibration file; {_ADVICE}")
    try:
        return h5py.File(path, mode, rdcc_nbytes=_CACHE_BYTES)
    except OSError as err:
        if "lock" in str(err).lower():
            raise CalibrationLockedError(f"calibration file {path!r} cannot be opened: {_LOCKED}") from None
        raise CalibrationMismatchError(f"cannot open calibration file {path!r} ({err}); {_ADVICE}") from None


def _first_row_at_or_after(ordinals: h5py.Dataset, n_rows: int, ordinal: int) -> int:
    """Binary search, in the first ``n_rows`` sorted rows, of the first row whose ordinal >= ``ordinal``."""
    lo, hi = 0, n_rows
    while lo < hi:
        mid = (lo + hi) // 2
        if int(ordinals[mid]) < ordinal:
            lo = mid + 1
        else:
            hi = mid
    return lo


class _OpenFile:
    """An open HDF5 file in ``self._f``, closed by :meth:`close` or on leaving a ``with`` block."""

    _f: h5py.File | None

    def close(self) -> None:
        """Close the file (idempotent)."""
        if self._f is not None:
            self._f.close()
            self._f = None

    def __enter__(self):
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    _role: str  # "writer" or "reader", for the message of a closed store

    @property
    def _file(self) -> h5py.File:
        if self._f is None:
            raise ValueError(f"calibration {self._role} for {self.path!r} is closed")
        return self._f

    def stats_images_done(self, section: str) -> int | None:
        """Images that the per-layer statistics ``section`` cover (None when the store holds no such section).

        A statistics section (``/<section>``, e.g. ``input_stats``) holds arrays and counts per layer written by
        :meth:`CalibrationWriter.write_stats`; it is complete for the store only when this equals the number
        of committed images.
        """
        root = self._file.get(_check_section(section))
        return None if root is None else int(root.attrs.get("images_done", -1))

    def stats_layers(self, section: str) -> list[str]:
        """Names of the layers that statistics ``section`` holds (empty when there is no such section)."""
        root = self._file.get(_check_section(section))
        return [] if root is None else [str(g.attrs["name"]) for g in root.values()]

    def read_stats(self, section: str, layer: str) -> dict[str, np.ndarray | int] | None:
        """Statistics ``section`` of layer ``layer``: its arrays (ndarray) and counts (int) by key, as written by
        :meth:`CalibrationWriter.write_stats`; None when the store holds none for that layer."""
        root = self._file.get(_check_section(section))
        if root is None or _escape(layer) not in root:
            return None
        g = root[_escape(layer)]
        values: dict[str, np.ndarray | int] = {key: g[key][()] for key in g}
        values.update({key: int(value) for key, value in g.attrs.items() if key != "name"})
        return values

    def stats_counts(self, section: str, layer: str) -> dict[str, int] | None:
        """The counts (ints) only of :meth:`read_stats`, without reading its arrays."""
        root = self._file.get(_check_section(section))
        if root is None or _escape(layer) not in root:
            return None
        return {key: int(value) for key, value in root[_escape(layer)].attrs.items() if key != "name"}


class CalibrationWriter(_OpenFile):
    """Writes (or resumes) a calibration store. Build it with :meth:`open`.

    Attributes
    ----------
    path : str
    complete : bool
        True when the file was already complete with the same settings: there is nothing to write.
    n_images_done : int
        Images committed so far; a resumed run continues from this ordinal.
    n_images_planned : int
    layers : list of str
    """

    _role = "writer"

    def __init__(self, f: h5py.File, path: str, config: _Config) -> None:
        self._f: h5py.File | None = f
        self.path = path
        self._config = config
        self.layers = config.names
        self.n_images_planned = int(config.image_ids.shape[0])
        self._groups: dict[str, h5py.Group] = {}  # open handles, looked up once (appends are frequent)

    def close(self) -> None:
        """Close the file (idempotent)."""
        self._groups = {}
        super().close()

    def _layer_group(self, name: str) -> h5py.Group:
        f = self._file
        if name not in self._groups:
            self._groups[name] = f["layers"][_escape(name)]
        return self._groups[name]

    @property
    def complete(self) -> bool:
        return bool(self._file.attrs["complete"])

    @property
    def n_images_done(self) -> int:
        return int(self._file.attrs["n_images_done"])

    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        *,
        layers: Mapping[str, tuple[int, str]],
        seed: int,
        positions_per_image: int | None,
        image_ids: np.ndarray,
        meta: Mapping[str, Any] | None,
        resume: bool = True,
        weights_fingerprint: str | None = None,
    ) -> "CalibrationWriter":
        """Create a store, or reopen one made with the same settings.

        Parameters
        ----------
        path : str or PathLike
            The HDF5 file; its parent directories are created.
        layers : dict of str to (int, str)
            Layer name -> (channels d, kind "conv" | "linear"), in the order of the run.
        seed : int
            Non-negative seed of the position sampling.
        positions_per_image : int or None
            Positions per image and layer; None means all (stored as -1).
        image_ids : ndarray of shape (n_images,), integer
            The caller's identifier of each calibration image.
        meta : dict
            JSON-serialisable metadata (model name, dataset, ...); part of the store's identity.
        resume : bool, default True
            Whether an existing file with the same settings may be continued.
        weights_fingerprint : str, optional
            A digest of the model's weights (:func:`calibration.run.weights_fingerprint`); part of the
            store's identity, so that a store made with other weights is refused.

        Returns
        -------
        CalibrationWriter
            ``complete`` is True if the file already holds the whole run.

        Raises
        ------
        FileExistsError
            If the file exists and ``resume`` is False.
        CalibrationMismatchError
            If the file exists but is not a calibration store, or was made with other settings; the message
            names what differs.
        """
        config = _Config.build(layers, seed, positions_per_image, image_ids, meta, weights_fingerprint)
        path = os.fspath(path)
        if os.path.exists(path):
            if not resume:
                raise FileExistsError(
                    f"calibration file {path!r} already exists and resume=False: delete it, pass another "
                    f"calibration file (--calib-file), or allow resuming"
                )
            return cls._reopen(path, config)
        parent = os.path.dirname(path)
        if parent:
            os.makedirs(parent, exist_ok=True)
        f = h5py.File(path, "w-", rdcc_nbytes=_CACHE_BYTES)
        try:
            cls._create(f, config)
        except BaseException:
            f.close()
            os.remove(path)
            raise
        return cls(f, path, config)

    @staticmethod
    def _create(f: h5py.File, config: _Config) -> None:
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["position_sampler"] = SAMPLER
        f.attrs["complete"] = False
        f.attrs["n_images_done"] = 0
        f.attrs["n_images_planned"] = int(config.image_ids.shape[0])
        f.attrs["seed"] = config.seed
        f.attrs["positions_per_image"] = config.positions_per_image
        f.attrs["meta_json"] = json.dumps(config.meta, sort_keys=True)
        f.attrs["layers_json"] = json.dumps(config.names)
        f.attrs["weights_fingerprint"] = config.weights_fingerprint
        f.create_dataset("image_ids", data=config.image_ids)
        f.create_dataset("image_digest", data=np.zeros(config.image_ids.shape[0], dtype=np.int64))
        root = f.create_group("layers")
        for name, channels, kind in config.layers:
            g = root.create_group(_escape(name))
            g.attrs["name"] = name
            g.attrs["channels"] = channels
            g.attrs["kind"] = kind
            g.attrs["committed_rows"] = 0
            g.create_dataset(
                "responses", shape=(0, channels), maxshape=(None, channels), dtype=np.float32,
                chunks=(_chunk_rows(channels), channels),
            )
            g.create_dataset(
                "image_ordinal", shape=(0,), maxshape=(None,), dtype=np.int64, chunks=(_INDEX_CHUNK_ROWS,)
            )
            g.create_dataset(
                "position", shape=(0, 2), maxshape=(None, 2), dtype=np.int32, chunks=(_INDEX_CHUNK_ROWS, 2)
            )
        f.flush()

    @classmethod
    def _reopen(cls, path: str, config: _Config) -> "CalibrationWriter":
        with _open_h5(path, "r") as f:
            stored = _config_of(f, path)
            complete = bool(f.attrs["complete"])
            diffs = _config_diffs(stored, config, subset_ok=complete)
            if diffs:
                raise CalibrationMismatchError(
                    f"calibration file {path!r} was made with other settings: {'; '.join(diffs)}; {_ADVICE}"
                )
        if complete:
            return cls(_open_h5(path, "r"), path, config)
        f = _open_h5(path, "r+")
        try:
            cls._truncate(f, path)
        except BaseException:
            f.close()
            raise
        return cls(f, path, config)

    @staticmethod
    def _truncate(f: h5py.File, path: str) -> None:
        """Cut every layer back to its committed rows of images < n_images_done."""
        n_done = int(f.attrs["n_images_done"])
        for g in f["layers"].values():
            committed = int(g.attrs["committed_rows"])
            lengths = {key: g[key].shape[0] for key in ("responses", "image_ordinal", "position")}
            if min(lengths.values()) < committed:
                raise CalibrationMismatchError(
                    f"calibration file {path!r} is damaged: layer {g.attrs['name']!r} commits {committed} rows "
                    f"but holds {lengths}; {_ADVICE}"
                )
            keep = _first_row_at_or_after(g["image_ordinal"], committed, n_done)
            for key in ("responses", "image_ordinal", "position"):
                g[key].resize(keep, axis=0)
            g.attrs["committed_rows"] = keep
        f.flush()

    def stored_digests(self, start: int, stop: int) -> np.ndarray:
        """Checksums of the committed images with ordinals in [start, stop) (0 where none was recorded)."""
        stop = min(int(stop), self.n_images_done)
        if stop <= start:
            return np.zeros(0, dtype=np.int64)
        return np.asarray(self._file["image_digest"][int(start):stop], dtype=np.int64)

    def append(self, samples: Mapping[str, tuple[np.ndarray, np.ndarray, np.ndarray]], images_done: int,
               digests: np.ndarray | None = None) -> None:
        """Append one batch of samples and commit ``images_done`` images.

        Parameters
        ----------
        samples : dict of str to (responses, image_ordinal, position)
            Per layer: responses (n, d) float, image_ordinal (n,) int sorted, with values in
            [n_images_done, images_done), position (n, 2) int. A layer left out has no rows in this batch.
        images_done : int
            Total number of images committed after this batch.
        digests : ndarray of shape (images_done - n_images_done,), int64, optional
            A checksum of each image committed by this call (see :func:`calibration.run.image_digests`).

        Notes
        -----
        All rows are written before any ``committed_rows`` changes, and ``n_images_done`` changes last, then
        the file is flushed: an interruption leaves the previous consistent state.
        """
        f = self._file
        if self.complete:
            raise ValueError(f"calibration file {self.path!r} is complete; nothing may be appended")
        n_done = self.n_images_done
        images_done = int(images_done)
        if not n_done <= images_done <= self.n_images_planned:
            raise ValueError(
                f"images_done must be in [{n_done}, {self.n_images_planned}] (committed so far, planned), "
                f"got {images_done}"
            )
        if digests is not None:
            digests = np.asarray(digests, dtype=np.int64)
            if digests.shape != (images_done - n_done,):
                raise ValueError(
                    f"digests must have one entry per image committed, shape ({images_done - n_done},), got "
                    f"{digests.shape}"
                )
        unknown = sorted(set(samples) - set(self.layers))
        if unknown:
            raise ValueError(f"samples name unknown layers {unknown}; the store holds {self.layers}")
        prepared = {}
        for name, channels, _ in self._config.layers:
            if name not in samples:
                continue
            responses, ordinal, position = samples[name]
            responses = np.asarray(responses, dtype=np.float32)
            ordinal = np.asarray(ordinal, dtype=np.int64)
            position = np.asarray(position, dtype=np.int32)
            n = responses.shape[0] if responses.ndim == 2 else -1
            if responses.shape != (n, channels) or ordinal.shape != (n,) or position.shape != (n, 2):
                raise ValueError(
                    f"samples[{name!r}]: expected responses (n, {channels}), image_ordinal (n,), position (n, 2); "
                    f"got {responses.shape}, {ordinal.shape}, {position.shape}"
                )
            if n and (ordinal[0] < n_done or ordinal[-1] >= images_done or np.any(np.diff(ordinal) < 0)):
                raise ValueError(
                    f"samples[{name!r}]: image ordinals must be sorted and in [{n_done}, {images_done}), got "
                    f"values from {ordinal.min()} to {ordinal.max()}"
                )
            prepared[name] = (responses, ordinal, position)
        starts = {}
        for name, (responses, ordinal, position) in prepared.items():
            g = self._layer_group(name)
            start = int(g.attrs["committed_rows"])
            stop = start + responses.shape[0]
            for key, data in (("responses", responses), ("image_ordinal", ordinal), ("position", position)):
                g[key].resize(stop, axis=0)
                g[key][start:stop] = data
            starts[name] = stop
        if digests is not None and digests.size:
            f["image_digest"][n_done:images_done] = digests
        for name, stop in starts.items():
            self._layer_group(name).attrs["committed_rows"] = stop
        f.attrs["n_images_done"] = images_done
        f.flush()

    def write_stats(self, section: str, stats: Mapping[str, Mapping[str, np.ndarray | int]], images_done: int) -> None:
        """Store per-layer statistics under ``/<section>``, then record that they cover ``images_done`` images.

        Parameters
        ----------
        section : str
            Name of the statistics (lower-case letters, digits, "_"; not one of the store's own entries).
        stats : dict of str to dict of str to (ndarray or int)
            Per layer name, its arrays (stored as datasets) and counts (ints, stored as attributes); a layer or
            key written before is overwritten, others are left as they are.
        images_done : int
            The images the statistics cover, written last (then the file is flushed): a reader compares it
            with the committed images (:meth:`stats_images_done`).
        """
        root = self._file.require_group(_check_section(section))
        for name, values in stats.items():
            g = root.require_group(_escape(name))
            g.attrs["name"] = name
            for key, value in values.items():
                if key == "name":
                    raise ValueError(f"write_stats: 'name' is reserved for the layer name, got it among {sorted(values)}")
                if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
                    g.attrs[key] = int(value)
                    continue
                value = np.asarray(value)
                if key in g and g[key].shape == value.shape and g[key].dtype == value.dtype:
                    g[key][...] = value
                else:
                    if key in g:
                        del g[key]
                    g.create_dataset(key, data=value)
        root.attrs["images_done"] = int(images_done)
        self._file.flush()

    def mark_complete(self) -> None:
        """Mark the store complete (all planned images committed)."""
        f = self._file
        if self.complete:
            return
        if self.n_images_done != self.n_images_planned:
            raise ValueError(
                f"calibration file {self.path!r} holds {self.n_images_done} of {self.n_images_planned} planned "
                f"images; it cannot be marked complete"
            )
        f.attrs["complete"] = True
        f.flush()



class CalibrationReader(_OpenFile):
    """Read access to a complete calibration store. Build it with :func:`open_calibration`.

    Attributes
    ----------
    path : str
    layers : list of str
        Layer names, in the order of the run.
    meta : dict
    seed : int
    positions_per_image : int or None
        None when every position was kept.
    image_ids : ndarray of shape (n_images,), int64
    n_images : int
    """

    _role = "reader"

    def __init__(self, f: h5py.File, path: str) -> None:
        self._f: h5py.File | None = f
        self.path = path
        config = _config_of(f, path)
        self.layers = config.names
        self.meta = config.meta
        self.seed = config.seed
        self.positions_per_image = None if config.positions_per_image < 0 else config.positions_per_image
        self.image_ids = config.image_ids
        self.n_images = int(f.attrs["n_images_done"])
        self._specs = {name: (channels, kind) for name, channels, kind in config.layers}
        self._rows = {}
        for name in self.layers:
            g = f["layers"][_escape(name)]
            rows = int(g.attrs["committed_rows"])
            if any(g[key].shape[0] < rows for key in ("responses", "image_ordinal", "position")):
                raise CalibrationMismatchError(f"calibration file {path!r} is damaged (layer {name!r}); {_ADVICE}")
            self._rows[name] = rows

    @property
    def weights_fingerprint(self) -> str:
        """The digest of the model's weights the store was made with ("" when none was given)."""
        return str(self._file.attrs["weights_fingerprint"])

    def image_digests(self) -> np.ndarray:
        """The checksum of each stored image: ndarray (n_images,) int64 (0 where none was recorded)."""
        return np.asarray(self._file["image_digest"][: self.n_images], dtype=np.int64)

    def _group(self, name: str) -> h5py.Group:
        if name not in self._specs:
            raise KeyError(f"layer {name!r} is not in calibration file {self.path!r}; it holds {self.layers}")
        return self._file["layers"][_escape(name)]

    def channels(self, name: str) -> int:
        """Number d of output channels of layer ``name``."""
        self._group(name)
        return self._specs[name][0]

    def kind(self, name: str) -> str:
        """Kind of layer ``name``: "conv" or "linear"."""
        self._group(name)
        return self._specs[name][1]

    def n_samples(self, name: str) -> int:
        """Number N of stored samples (rows) of layer ``name``."""
        self._group(name)
        return self._rows[name]

    def _read(self, name: str, key: str, rows: slice | np.ndarray | None) -> np.ndarray:
        ds = self._group(name)[key]
        n = self._rows[name]
        if rows is None:
            return ds[:n]
        if isinstance(rows, slice):
            start, stop, step = rows.indices(n)
            if step == 1:
                return ds[start:stop] if stop > start else ds[0:0]
            rows = np.arange(start, stop, step)
        idx = np.asarray(rows)
        if idx.dtype == bool:
            if idx.shape != (n,):
                raise IndexError(f"a boolean row mask for layer {name!r} must have shape ({n},), got {idx.shape}")
            idx = np.flatnonzero(idx)
        if idx.ndim != 1 or (idx.size and not np.issubdtype(idx.dtype, np.integer)):
            raise IndexError(
                f"rows must be a slice, a 1-D integer array or a boolean mask, got {idx.dtype} {idx.shape}"
            )
        idx = idx.astype(np.int64)
        if idx.size and (idx.min() < -n or idx.max() >= n):
            raise IndexError(f"row index out of range for layer {name!r} with {n} rows")
        idx = np.where(idx < 0, idx + n, idx)
        return self._take(ds, idx)

    @staticmethod
    def _take(ds: h5py.Dataset, idx: np.ndarray) -> np.ndarray:
        """Rows ``idx`` (any order, repeats allowed) read block by block."""
        out = np.empty((idx.shape[0],) + ds.shape[1:], dtype=ds.dtype)
        if idx.size == 0:
            return out
        block = ds.chunks[0] * 16
        order = np.argsort(idx, kind="stable")
        sorted_idx = idx[order]
        blocks = sorted_idx // block
        bounds = np.flatnonzero(np.diff(blocks)) + 1
        for part in np.split(np.arange(sorted_idx.shape[0]), bounds):
            lo = int(sorted_idx[part[0]])
            hi = int(sorted_idx[part[-1]]) + 1
            data = ds[lo:hi]
            out[order[part]] = data[sorted_idx[part] - lo]
        return out

    def responses(self, name: str, rows: slice | np.ndarray | None = None) -> np.ndarray:
        """Responses of layer ``name``.

        Parameters
        ----------
        name : str
        rows : slice, ndarray of int, boolean ndarray of shape (N,), or None
            Rows to read (None: all N committed rows).

        Returns
        -------
        ndarray of shape (n, d), float32
        """
        return self._read(name, "responses", rows)

    def image_ordinal(self, name: str, rows: slice | np.ndarray | None = None) -> np.ndarray:
        """Image ordinal of each sample of layer ``name``: ndarray (n,) int64, sorted."""
        return self._read(name, "image_ordinal", rows)

    def position(self, name: str, rows: slice | np.ndarray | None = None) -> np.ndarray:
        """(row, col) of each sample of layer ``name``: ndarray (n, 2) int32 ((p, 0) for a Linear layer)."""
        return self._read(name, "position", rows)

    def iter_responses(
        self,
        name: str,
        batch_rows: int = 65536,
        mask_fn: Callable[[np.ndarray], np.ndarray] | None = None,
    ) -> Iterator[np.ndarray]:
        """Stream the responses of layer ``name`` in blocks, chunk by chunk (memory stays flat).

        Parameters
        ----------
        name : str
        batch_rows : int, default 65536
            Rows read per block; when it exceeds one HDF5 chunk it is rounded down to whole chunks.
        mask_fn : callable, optional
            ``mask_fn(image_ordinal)`` gets the int64 ordinals (m,) of a block and returns a boolean mask
            (m,) of the rows to keep (e.g. a held-out split by image). Blocks left empty are not yielded.

        Yields
        ------
        ndarray of shape (m, d), float32
            Consecutive blocks; concatenated (without mask_fn) they equal ``responses(name)``.
        """
        if isinstance(batch_rows, bool) or not isinstance(batch_rows, (int, np.integer)) or batch_rows <= 0:
            raise ValueError(f"batch_rows must be a positive int, got {batch_rows!r}")
        g = self._group(name)
        ds = g["responses"]
        n = self._rows[name]
        chunk = ds.chunks[0]
        step = int(batch_rows) if batch_rows < chunk else (int(batch_rows) // chunk) * chunk
        for start in range(0, n, step):
            stop = min(start + step, n)
            block = ds[start:stop]
            if mask_fn is not None:
                mask = np.asarray(mask_fn(g["image_ordinal"][start:stop]), dtype=bool)
                if mask.shape != (stop - start,):
                    raise ValueError(f"mask_fn must return a boolean mask of shape ({stop - start},), got {mask.shape}")
                block = block[mask]
                if block.shape[0] == 0:
                    continue
            yield block



def stored_weights_fingerprint(path: str | os.PathLike) -> str | None:
    """The weights fingerprint recorded in the store at ``path`` (None when there is no readable store)."""
    path = os.fspath(path)
    if not os.path.exists(path) or not h5py.is_hdf5(path):
        return None
    with _open_h5(path, "r") as f:
        value = f.attrs.get("weights_fingerprint")
    return None if value is None else str(value)


def open_calibration(path: str | os.PathLike) -> CalibrationReader:
    """Open a complete calibration store for reading.

    Parameters
    ----------
    path : str or PathLike

    Returns
    -------
    CalibrationReader

    Raises
    ------
    FileNotFoundError
        If the file does not exist.
    CalibrationMismatchError
        If it is not a calibration store of a known format version.
    IncompleteCalibrationError
        If its run has not completed.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"calibration file {path!r} does not exist; run the calibration first")
    f = _open_h5(path, "r")
    try:
        _config_of(f, path)
        if not bool(f.attrs["complete"]):
            raise IncompleteCalibrationError(
                f"calibration file {path!r} is incomplete ({int(f.attrs['n_images_done'])} of "
                f"{int(f.attrs['n_images_planned'])} images): resume it with the same settings or delete it"
            )
        return CalibrationReader(f, path)
    except BaseException:
        f.close()
        raise
