"""The calibration writer pipeline: a killed run resumes to the uninterrupted store, memory stays flat with
the number of images, and a failure of the writer thread reaches the caller."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
import tracemalloc
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from calibration import CalibrationWriter, calibrate, open_calibration
from calibration.writer import BackgroundWriter

from test_calibration import LAYERS, tiny_model  # tests/ is on sys.path under pytest

ROOT = Path(__file__).resolve().parents[1]


def stream(n_images: int, batch: int = 10):
    """Seeded images made batch by batch (only one batch is ever held)."""
    generator = torch.Generator().manual_seed(5)
    for start in range(0, n_images, batch):
        yield torch.randn(min(batch, n_images - start), 1, 8, 8, generator=generator)


def read_all(path) -> dict:
    with open_calibration(path) as reader:
        return {n: (reader.responses(n), reader.image_ordinal(n), reader.position(n)) for n in reader.layers}


KILLED_RUN = textwrap.dedent("""
    import os, signal, sys, time
    sys.path.insert(0, {root!r})
    sys.path.insert(0, {tests!r})
    import torch
    torch.set_num_threads(1)
    from test_writer import LAYERS, stream, tiny_model
    import calibration.writer
    from calibration import calibrate
    calibration.writer.FLUSH_IMAGES = 30  # commit every few batches, so the kill finds some committed

    def batches():
        for k, batch in enumerate(stream(200)):
            if k == 9:
                time.sleep(0.5)  # let the writer thread commit what it holds, then die without cleanup
                os.kill(os.getpid(), signal.SIGKILL)
            yield batch

    calibrate(tiny_model(), batches(), LAYERS, {path!r}, n_images=200, seed=1, positions_per_image=4,
              progress=False)
""")


def test_killed_calibration_resumes_to_the_uninterrupted_store(tmp_path: Path) -> None:
    reference = read_all(calibrate(tiny_model(), stream(200), LAYERS, tmp_path / "ref.h5", n_images=200, seed=1,
                                   positions_per_image=4, progress=False))
    path = tmp_path / "killed.h5"
    script = KILLED_RUN.format(root=str(ROOT), tests=str(ROOT / "tests"), path=str(path))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == -9, done.stderr
    with h5py.File(path, "r") as f:
        committed = int(f.attrs["n_images_done"])
        assert not f.attrs["complete"] and 0 < committed < 200
    calibrate(tiny_model(), stream(200), LAYERS, path, n_images=200, seed=1, positions_per_image=4, progress=False)
    resumed = read_all(path)
    for name in LAYERS:
        for a, b in zip(reference[name], resumed[name]):
            np.testing.assert_array_equal(a, b)


def peak_bytes(tmp_path: Path, n_images: int) -> int:
    model = tiny_model()
    tracemalloc.start()
    try:
        calibrate(model, stream(n_images), LAYERS, tmp_path / f"m{n_images}.h5", n_images=n_images, seed=0,
                  positions_per_image=None, progress=False)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_peak_memory_does_not_grow_with_the_number_of_images(tmp_path: Path, monkeypatch) -> None:
    # memory holds at most max_pending + 1 write groups. Groups of 20 images, and a writer slowed to 5 ms a
    # group, make both sizes fill the queue whatever the machine's load (a fast writer in the small run and a
    # slow one in the large would otherwise compare an empty queue with a full one)
    monkeypatch.setattr("calibration.writer.FLUSH_IMAGES", 20)
    append = CalibrationWriter.append

    def slow_append(self, *args, **kwargs):
        time.sleep(0.005)
        return append(self, *args, **kwargs)

    monkeypatch.setattr(CalibrationWriter, "append", slow_append)
    small, large = peak_bytes(tmp_path, 300), peak_bytes(tmp_path, 1500)
    # all positions are kept: the store grows by ~1200 * (64 * 4 + 9 * 6 + 5) * 4 bytes = 1.5 MB between the sizes
    with open_calibration(tmp_path / "m1500.h5") as reader:
        stored = sum(reader.responses(name).nbytes for name in LAYERS)
    assert stored > 1_800_000
    assert large < small * 1.25 + 100_000, (small, large)


def test_writer_thread_failure_reaches_the_caller(tmp_path: Path) -> None:
    with CalibrationWriter.open(tmp_path / "c.h5", layers={"a": (2, "conv")}, seed=0, positions_per_image=1,
                                image_ids=np.arange(4), meta={}) as writer:
        bad = {"a": (np.zeros((1, 3), np.float32), np.zeros(1, np.int64), np.zeros((1, 2), np.int32))}
        with pytest.raises(RuntimeError, match=r"writing the calibration store .* failed: samples\['a'\]: expected"):
            with BackgroundWriter(writer, max_pending=1) as background:
                background.append(bad, images_done=1)
        assert writer.n_images_done == 0
    with pytest.raises(ValueError, match="max_pending must be a positive int, got 0"):
        BackgroundWriter(writer, max_pending=0)
