"""How the process's C allocator treats the memory of freed tensors, which decides a share of CPU speed.

PyTorch allocates every CPU activation with ``malloc``. glibc serves blocks above its mmap threshold
(128 KiB, raised dynamically up to 32 MiB) with fresh ``mmap`` pages and gives them back to the OS on
``free``, so every large output of every layer is page-faulted and zeroed again on each forward. A factorized
layer writes as many full-resolution outputs as the original (one per factor) but does a fraction of the
arithmetic, so this fixed cost eats its speedup: on this project's 2-core machine, a 1x1 conv 16 -> 64 on
8 x 224 x 224 maps took 75 ms with fresh pages and 20 ms with reused memory (the original 3x3 conv it
partly replaces: 390 ms either way).

``"reuse"`` keeps freed memory in the process for the next allocation (glibc: ``mallopt(M_MMAP_MAX, 0)``,
every block from the heap, and ``mallopt(M_TRIM_THRESHOLD, 2**31 - 1)``, the heap is not trimmed), the
glibc analogue of running under jemalloc or tcmalloc with memory retention, as CPU inference deployments
commonly do. Cost: the process keeps its peak heap size. ``"system"`` is glibc's behaviour.

Only the process-wide setting lives here; the command line and the benchmark choose it and every latency
measurement records :func:`allocator_state` beside its numbers.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
import sys

__all__ = ["ALLOCATORS", "use_allocator", "allocator_state"]

log = logging.getLogger(__name__)

ALLOCATORS = ("reuse", "system")

# glibc mallopt parameters (malloc.h) and the defaults "system" restores
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4
_DEFAULT_TRIM_THRESHOLD, _DEFAULT_MMAP_THRESHOLD, _DEFAULT_MMAP_MAX = 128 * 1024, 128 * 1024, 65536
_REUSE_TRIM_THRESHOLD = 2**31 - 1

_state = {"allocator": "system", "changed": False}


@functools.cache
def _glibc():
    """The C library when it is glibc (it has ``mallopt`` and ``gnu_get_libc_version``), else None (looked up
    once: every latency measurement asks)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()
        libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
        return libc
    except (OSError, AttributeError):
        return None


def _preloaded() -> str | None:
    """The allocator library named in LD_PRELOAD (jemalloc, tcmalloc, mimalloc), if any."""
    for name in os.environ.get("LD_PRELOAD", "").replace(":", " ").split():
        if any(lib in os.path.basename(name) for lib in ("jemalloc", "tcmalloc", "mimalloc")):
            return name
    return None


def allocator_state() -> dict:
    """What is in effect: ``allocator`` ("reuse" or "system"), ``library`` (glibc VERSION, or the preloaded
    allocator, or "unknown") and ``note`` when the setting could not be applied or was reset."""
    libc = _glibc()
    library = _preloaded() or (f"glibc {libc.gnu_get_libc_version().decode()}" if libc else "unknown")
    state = {"allocator": _state["allocator"], "library": library}
    if "note" in _state:
        state["note"] = _state["note"]
    return state


def use_allocator(name: str) -> dict:
    """Make freed memory be reused by the process (``"reuse"``) or returned as glibc does (``"system"``).

    Process-wide and immediate. Where glibc's ``mallopt`` is not the allocator (another C library, or an
    allocator preloaded with LD_PRELOAD), nothing is changed and the returned state's ``note`` says why.
    "system" after "reuse" sets glibc's documented defaults (128 KiB thresholds, without the dynamic
    mmap threshold of a fresh process) and returns the retained free memory to the OS (``malloc_trim``).
    Returns :func:`allocator_state`.
    """
    if name not in ALLOCATORS:
        raise ValueError(f"unknown allocator {name!r}: use one of {list(ALLOCATORS)}")
    libc, preloaded = _glibc(), _preloaded()
    _state.pop("note", None)
    if preloaded:
        _state.update(allocator="system", note=f"{preloaded} is preloaded: it manages freed memory itself, "
                                               "mallopt does not apply")
    elif libc is None:
        _state.update(allocator="system", note="not glibc: freed-memory reuse is not set here (preload jemalloc "
                                               "or tcmalloc for the same effect)")
    elif name == "reuse":
        ok = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, _REUSE_TRIM_THRESHOLD) == 1
        _state.update(allocator="reuse" if ok else "system", changed=True)
        if not ok:
            _state["note"] = "mallopt refused the settings"
    elif _state["changed"]:
        libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
        libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD)
        libc.mallopt(_M_MMAP_THRESHOLD, _DEFAULT_MMAP_THRESHOLD)
        libc.malloc_trim(0)  # hand the retained free memory back, so that it is not reused as under "reuse"
        _state.update(allocator="system", note="glibc defaults restored (fixed 128 KiB thresholds, retained "
                                               "memory trimmed)")
    if _state.get("note"):
        log.info("allocator %s requested: %s", name, _state["note"])
    return allocator_state()
