"""Where a results row came from, written by code on every row: the commit, the machine, the load.

Every benchmark writes its rows through :func:`append_row`, which adds ``provenance``: the git commit of
the code that ran and whether its tracked code differed from it (``dirty``), the UTC
date, the command line, the CPU model and core count, torch version, torch threads, the load average when
the row's work started and when it was written, and the allocator setting. No field of it is typed by hand.

Tables and plots read rows with :func:`current_rows`: only rows that carry ``provenance`` (rows of older
code paths live in ``results/archive/``), and of the rows of one cell (``cell_key``) the latest, so a
re-run replaces its row instead of doubling it.
"""

from __future__ import annotations

import datetime
import functools
import json
import logging
import os
import platform
import subprocess
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from ..allocator import allocator_state
from ..latency import machine_load  # the core's (latency reports carry it too); re-exported here

__all__ = ["provenance", "append_row", "read_rows", "current_rows", "machine_load", "code_state", "cpu_model",
           "device_label"]

log = logging.getLogger(__name__)

_ROOT = Path(__file__).resolve().parents[2]  # the checkout: lowrank_fm/bench/provenance.py
_CODE = ("lowrank_fm", "calibration", "scripts", "pyproject.toml")


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(_ROOT), *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


@functools.cache
def code_state() -> dict:
    """``commit`` (HEAD of the checkout this package was imported from, None outside git) and ``dirty``
    (tracked code differs from it: the packages, the scripts, pyproject.toml; edits to the README, the tests
    or results/ do not change what a run computes; None when unknown). ``$LOWRANK_FM_COMMIT``, where set,
    is taken as the commit, with ``dirty`` unknown: a tree sent to another machine (a lent GPU) may carry no
    .git or a stale one (one such copy reported the session's first commit, its code changed). Looked up once per process: the code
    a process runs is the code it imported at start, whatever the tree holds later."""
    named = os.environ.get("LOWRANK_FM_COMMIT")
    if named:  # a copy of the tree sent elsewhere (a lent GPU machine), whose .git, if any, may be stale
        return {"commit": named, "dirty": None}
    commit = _git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "dirty": None}
    changes = _git("status", "--porcelain", "--untracked-files=no", "--", *_CODE)
    return {"commit": commit, "dirty": None if changes is None else bool(changes)}


@functools.cache
def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux, else :func:`platform.processor`)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def provenance(load_before: list[float] | None = None, *, argv: list[str] | None = None) -> dict:
    """The provenance of a row written now. ``load_before``: :func:`machine_load` when its work started
    (None: not known, e.g. a row computed from other files)."""
    return {
        **code_state(),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": " ".join([os.path.basename(sys.executable), *(sys.argv if argv is None else argv)]),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_before": load_before,
        "load_after": machine_load(),
        "allocator": allocator_state(),
    }


def append_row(path: str | Path, row: dict, *, load_before: list[float] | None = None) -> dict:
    """Append ``row`` with its ``provenance`` as one JSON line to ``path`` (created with its folder);
    returns the row as written. A row that already carries ``provenance`` (made where its work ran, e.g.
    in a worker process) keeps it."""
    if "provenance" not in row:
        row = {**row, "provenance": provenance(load_before)}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        handle.write(json.dumps(row) + "\n")
    return row


def read_rows(path: str | Path) -> list[dict]:
    """Every JSON line of ``path`` (none when it does not exist)."""
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def current_rows(rows: Iterable[dict], cell_key: Callable[[dict], object]) -> list[dict]:
    """The rows a table shows: those with ``provenance``, and of each cell (``cell_key(row)``) only the one
    written last (by ``provenance.date_utc``, file order breaking ties), in order of first appearance."""
    latest: dict = {}
    for index, row in enumerate(rows):
        if "provenance" not in row:
            continue
        key = cell_key(row)
        stamp = (row["provenance"].get("date_utc") or "", index)
        if key not in latest or stamp >= latest[key][0]:
            latest[key] = (stamp, row)
    return [row for _, row in latest.values()]


def device_label(row: dict) -> str:
    """Where a results row ran: ``cpu``, or the GPU's name (``gpu``) for a CUDA row."""
    device = str(row.get("device", "cpu"))
    return row.get("gpu", device) if device.startswith("cuda") else device
