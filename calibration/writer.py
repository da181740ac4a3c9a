"""A writer thread: HDF5 appends of calibration samples overlap the forward pass.

The model's forward releases the GIL inside torch's kernels, so a thread that appends the previous batches
to the store while the next batch runs hides most of the write cost. The queue is bounded, so a slow disk
holds the forward pass back instead of piling samples up in memory.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Mapping
from types import TracebackType

import numpy as np

from .recorder import Samples
from .store import CalibrationWriter

__all__ = ["BackgroundWriter"]

logger = logging.getLogger(__name__)

_STOP = object()


#: A group of batches is handed to the writer thread once it holds this many images or bytes of samples.
FLUSH_IMAGES = 1024
FLUSH_BYTES = 8 << 20


class BackgroundWriter:
    """Context manager that appends batches to a :class:`CalibrationWriter` from a background thread.

    Parameters
    ----------
    writer : CalibrationWriter
        The open store. While the context is active, only this object's thread may touch it.
    max_pending : int, default 4
        Groups of batches queued at most; :meth:`append` blocks while the queue is full.
    flush_images : int, optional
        Images per group (default :data:`FLUSH_IMAGES`); a short run passes fewer, so that an interruption
        finds some images committed.
    snapshot : callable, optional
        Called in the caller's thread when a group is handed over (its batches have all run); it returns
        ``commit(writer, images_done)``, which the thread calls right after appending the group: running
        statistics (e.g. :class:`~calibration.input_stats.InputPatchStats`) are stored with the responses of
        exactly the same images.

    Notes
    -----
    Batches are gathered into groups of about :data:`FLUSH_IMAGES` images (or :data:`FLUSH_BYTES` bytes of
    samples, whichever comes first); the thread appends each group with one
    :meth:`CalibrationWriter.append`: few, large HDF5 writes. The store's commit protocol is unchanged: an
    interruption leaves the last group written as the committed state, and a resumed run redoes at most
    the groups that were not written. Memory holds at most ``max_pending + 1`` groups. On leaving the
    context the remaining batches are written (also when the block raised), then the thread ends; an error
    of the thread is raised from the next :meth:`append` or on leaving.
    """

    def __init__(self, writer: CalibrationWriter, *, max_pending: int = 4,
                 snapshot: Callable[[], Callable[[CalibrationWriter, int], None]] | None = None,
                 flush_images: int | None = None) -> None:
        if isinstance(max_pending, bool) or not isinstance(max_pending, int) or max_pending < 1:
            raise ValueError(f"max_pending must be a positive int, got {max_pending!r}")
        if flush_images is not None and (isinstance(flush_images, bool) or not isinstance(flush_images, int)
                                         or flush_images < 1):
            raise ValueError(f"flush_images must be a positive int or None, got {flush_images!r}")
        self._flush_images = flush_images
        self._writer = writer
        self._snapshot = snapshot
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._group: list[tuple[Mapping[str, Samples], int, np.ndarray | None]] = []
        self._group_bytes = 0
        self._flushed_images = writer.n_images_done

    def __enter__(self) -> "BackgroundWriter":
        if self._thread is not None:
            raise RuntimeError("this BackgroundWriter is already active; it cannot be entered twice")
        self._thread = threading.Thread(target=self._loop, name="calibration-writer", daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close(raise_error=exc_type is None)

    def append(self, samples: Mapping[str, Samples], images_done: int, digests: np.ndarray | None = None) -> None:
        """Add one batch (as for :meth:`CalibrationWriter.append`, ``digests`` included); a full group goes to
        the thread's queue, which blocks while ``max_pending`` groups wait."""
        if self._thread is None:
            raise RuntimeError("BackgroundWriter.append called outside its with-block")
        self._raise_error()
        self._group.append((samples, images_done, digests))
        self._group_bytes += sum(array.nbytes for rows in samples.values() for array in rows)
        limit = FLUSH_IMAGES if self._flush_images is None else min(self._flush_images, FLUSH_IMAGES)
        if images_done - self._flushed_images >= limit or self._group_bytes >= FLUSH_BYTES:
            self._flush()

    def _flush(self) -> None:
        if not self._group:
            return
        group, self._group, self._group_bytes = self._group, [], 0
        self._flushed_images = group[-1][1]
        commit = None if self._snapshot is None else self._snapshot()
        while True:
            try:
                self._queue.put((group, commit), timeout=0.5)
                return
            except queue.Full:
                self._raise_error()
                if not self._thread.is_alive():
                    raise RuntimeError("the calibration writer thread stopped") from None

    def close(self, raise_error: bool = True) -> None:
        """Write what is left, end the thread, and raise its error if it had one (and ``raise_error``)."""
        if self._thread is None:
            return
        if self._thread.is_alive():
            if self._error is None:
                self._flush()
            self._queue.put(_STOP)
            self._thread.join()
        self._thread = None
        if raise_error:
            self._raise_error()
        elif self._error is not None:
            logger.error("the calibration writer thread failed too: %s", self._error)

    def _raise_error(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise RuntimeError(f"writing the calibration store {self._writer.path!r} failed: {error}") from error

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            if self._error is not None:  # after a failure, drop the rest: the last commit stays
                continue
            group, commit = item
            try:
                digests = [d for _, _, d in group]
                self._writer.append(_concatenate([samples for samples, _, _ in group]), images_done=group[-1][1],
                                    digests=None if any(d is None for d in digests) else np.concatenate(digests))
                if commit is not None:
                    commit(self._writer, group[-1][1])
            except BaseException as error:  # handed to the caller's thread
                self._error = error


def _concatenate(parts: list[Mapping[str, Samples]]) -> dict[str, Samples]:
    """One batch of samples from consecutive batches (rows stay sorted by image ordinal)."""
    if len(parts) == 1:
        return dict(parts[0])
    names = list(dict.fromkeys(name for part in parts for name in part))
    merged = {}
    for name in names:
        pieces = [part[name] for part in parts if name in part]
        merged[name] = tuple(np.concatenate([piece[k] for piece in pieces]) for k in range(3))
    return merged
