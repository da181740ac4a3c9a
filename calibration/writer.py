"""A writer thread: HDF5 appends of calibration samples overlap the forward pass.

The model's forward releases the GIL inside torch's kernels, so a thread that appends the previous batches
to the store while the next batch runs hides most of the write cost. The queue is bounded, so a slow disk
holds the forward pass back instead of piling samples up in memory.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Mapping
from types import TracebackType

import numpy as np

from .recorder import Samples
from .store import CalibrationWriter

__all__ = ["BackgroundWriter"]

logger = logging.getLogger(__name__)

_STOP = object()


class BackgroundWriter:
    """Context manager that appends batches to a :class:`CalibrationWriter` from a background thread.

    Parameters
    ----------
    writer : CalibrationWriter
        The open store. While the context is active, only this object's thread may touch it.
    max_pending : int, default 4
        Batches queued at most; :meth:`append` blocks while the queue is full.

    Notes
    -----
    Batches are written in the order given with :meth:`CalibrationWriter.append`, so the store's commit
    protocol is unchanged: an interruption leaves the last batch written as the committed state. Batches
    that wait in the queue when the thread comes to them are appended together (fewer, larger HDF5 writes). On leaving
    the context the queued batches are written (also when the block raised), then the thread ends; an error
    of the thread is raised from the next :meth:`append` or on leaving.
    """

    def __init__(self, writer: CalibrationWriter, *, max_pending: int = 4) -> None:
        if isinstance(max_pending, bool) or not isinstance(max_pending, int) or max_pending < 1:
            raise ValueError(f"max_pending must be a positive int, got {max_pending!r}")
        self._writer = writer
        self._coalesce = max_pending
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

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

    def append(self, samples: Mapping[str, Samples], images_done: int) -> None:
        """Queue one batch for :meth:`CalibrationWriter.append` (blocks while ``max_pending`` are queued)."""
        if self._thread is None:
            raise RuntimeError("BackgroundWriter.append called outside its with-block")
        self._raise_error()
        while True:
            try:
                self._queue.put((samples, images_done), timeout=0.5)
                return
            except queue.Full:
                self._raise_error()
                if not self._thread.is_alive():
                    raise RuntimeError("the calibration writer thread stopped") from None

    def close(self, raise_error: bool = True) -> None:
        """Write what is queued, end the thread, and raise its error if it had one (and ``raise_error``)."""
        if self._thread is None:
            return
        if self._thread.is_alive():
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
        stop = False
        while not stop:
            items = [self._queue.get()]
            while items[-1] is not _STOP and len(items) < self._coalesce:  # batches already waiting
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            if items[-1] is _STOP:
                stop = True
                items.pop()
            if self._error is not None or not items:  # after a failure, drop the rest: the last commit stays
                continue
            try:
                self._writer.append(_concatenate([samples for samples, _ in items]), images_done=items[-1][1])
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
