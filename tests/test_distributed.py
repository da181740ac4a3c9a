"""Multi-process calibration: two gloo processes on the CPU give the single-process store, statistics and
approximated model; shards resume and foreign shards are refused."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from calibration import (
    CalibrationMismatchError,
    IncompleteCalibrationError,
    calibrate,
    merge_shards,
    open_calibration,
    shard_path,
    shard_range,
)

N_IMAGES = 90
LAYERS = {"2": (12, "conv"), "4": (12, "conv"), "8": (7, "linear")}


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 12, 3, padding=1), nn.ReLU(),
        nn.Conv2d(12, 12, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Dropout(0.0), nn.Linear(12 * 16, 7),
        nn.ReLU(), nn.Linear(7, 3),
    ).eval()


def loader() -> DataLoader:
    images = torch.randn(N_IMAGES, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    labels = torch.arange(N_IMAGES) % 3
    return DataLoader(TensorDataset(images, labels), batch_size=16, shuffle=False)


def probe() -> torch.Tensor:
    return torch.randn(20, 1, 8, 8, generator=torch.Generator().manual_seed(4))


def run_pipeline(calib_file: Path):
    """approximate() and the statistics of its calibration store, as each rank computes them."""
    from lowrank_fm import approximate
    from lowrank_fm.layer_stats import response_stats as _response_stats
    from lowrank_fm.distributed import world

    model = tiny_model()
    # the default method (asymmetric, RMSProp refinement); one thread in every process, since the refinement
    # amplifies the summation order that the thread count changes
    new_model, report = approximate(model, loader(), calib_file=calib_file, energy=0.9, progress=False, seed=1)
    rank, size = world()
    n_fit = report.calibration["fit_images"]
    shard = shard_range(N_IMAGES, rank, size) if size > 1 else None
    with open_calibration(calib_file) as reader, torch.no_grad():
        stats = {name: _response_stats(reader, name, n_fit, "streaming", shard) for name in reader.layers}
        return new_model(probe()), stats, [r.rank for r in report.layers]


def _worker(rank: int, init_file: str, calib_file: str, out_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        outputs, stats, ranks = run_pipeline(Path(calib_file))
        torch.save({"outputs": outputs, "ranks": ranks,
                    "stats": {k: (torch.from_numpy(v.mean), torch.from_numpy(v.eigenvalues), v.n_samples)
                              for k, v in stats.items()}}, f"{out_file}.{rank}")
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_match_one_process(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path / "two.h5"), str(tmp_path / "result")), nprocs=2)
    outputs, stats, ranks = run_pipeline(tmp_path / "one.h5")

    # the merged store is the single-process store, row for row; the shards are gone
    assert not (tmp_path / "two.h5.shards").exists()
    with open_calibration(tmp_path / "one.h5") as one, open_calibration(tmp_path / "two.h5") as two:
        assert one.layers == two.layers and one.n_images == two.n_images == N_IMAGES
        for name in one.layers:
            np.testing.assert_array_equal(one.image_ordinal(name), two.image_ordinal(name))
            np.testing.assert_array_equal(one.position(name), two.position(name))
            np.testing.assert_allclose(one.responses(name), two.responses(name), rtol=1e-5, atol=1e-6)
            fit = one.responses(name)[one.image_ordinal(name) < 81].astype(np.float64)
            reference = (fit.mean(axis=0), np.linalg.eigvalsh(np.cov(fit, rowvar=False, bias=True))[::-1])
            for result in (torch.load(f"{tmp_path / 'result'}.{r}", weights_only=True) for r in (0, 1)):
                mean, values, count = result["stats"][name]
                assert count == fit.shape[0] == stats[name].n_samples
                # each rank fitted its own images; the reduced statistics are those of all fit images
                np.testing.assert_allclose(mean.numpy(), reference[0], rtol=1e-9, atol=1e-9)
                np.testing.assert_allclose(values.numpy(), reference[1], rtol=1e-7, atol=1e-9)
                np.testing.assert_allclose(mean.numpy(), stats[name].mean, rtol=1e-12, atol=1e-12)
    for r in (0, 1):
        result = torch.load(f"{tmp_path / 'result'}.{r}", weights_only=True)
        assert result["ranks"] == ranks
        torch.testing.assert_close(result["outputs"], outputs, rtol=1e-4, atol=1e-5)


def shard_run(model: nn.Module, path: Path, rank: int, crash_after: int | None = None, **kwargs) -> str:
    """Calibrate the shard of ``rank`` (of 2) without a process group, feeding only its images."""
    start, stop = shard_range(N_IMAGES, rank, 2)
    images = next(iter(DataLoader(loader().dataset, batch_size=N_IMAGES)))[0][start:stop]

    def batches():
        for k, batch in enumerate(images.split(7)):
            if crash_after is not None and k == crash_after:
                raise RuntimeError("simulated crash")
            yield batch

    options = dict(n_images=N_IMAGES, seed=2, positions_per_image=5, meta={"run": "a"}, progress=False)
    options.update(kwargs)
    return calibrate(model, batches(), list(LAYERS), path, rank=rank, world_size=2, **options)


def test_shards_resume_merge_and_refuse_foreign_shards(tmp_path: Path) -> None:
    model = tiny_model()
    images = next(iter(DataLoader(loader().dataset, batch_size=N_IMAGES)))[0]
    single = calibrate(model, images.split(16), list(LAYERS), tmp_path / "one.h5", n_images=N_IMAGES, seed=2,
                       positions_per_image=5, meta={"run": "a"}, progress=False)
    path = tmp_path / "two.h5"
    assert shard_run(model, path, 0) == shard_path(path, 0, 2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        shard_run(model, path, 1, crash_after=3)
    merge_options = dict(world_size=2, layers=LAYERS, seed=2, positions_per_image=5, image_ids=np.arange(N_IMAGES),
                         meta={"run": "a"})
    with pytest.raises(IncompleteCalibrationError, match=r"incomplete \(21 of 45 images\)"):
        merge_shards(path, **merge_options)
    shard_run(model, path, 1)  # resumes rank 1's shard at its image 21
    # a shard of another run is refused, before anything is merged from it
    foreign = tmp_path / "foreign.h5"
    shard_run(model, foreign, 0, seed=3)
    with pytest.raises(CalibrationMismatchError, match=r"seed: 3 != 2"):
        shard_run(model, foreign, 0)
    with pytest.raises(CalibrationMismatchError, match=r"seed: 3 != 2"):
        merge_shards(foreign, **merge_options)
    assert merge_shards(path, **merge_options, block_images=10) == str(path)
    with open_calibration(single) as one, open_calibration(path) as two:
        # the merge carries each image's checksum and the weights fingerprint (a later resume checks them)
        np.testing.assert_array_equal(one.image_digests(), two.image_digests())
        assert np.all(two.image_digests() != 0)
        assert one.weights_fingerprint == two.weights_fingerprint != ""
        for name in LAYERS:
            np.testing.assert_array_equal(one.image_ordinal(name), two.image_ordinal(name))
            np.testing.assert_array_equal(one.position(name), two.position(name))
            np.testing.assert_allclose(one.responses(name), two.responses(name), rtol=1e-5, atol=1e-6)
    assert not os.path.exists(shard_path(path, 0, 2))


def test_shard_range_and_bad_arguments() -> None:
    assert [shard_range(10, r, 3) for r in range(3)] == [(0, 4), (4, 7), (7, 10)]
    with pytest.raises(ValueError, match=r"rank must be an int in \[0, world_size=2\)"):
        shard_range(10, 2, 2)
    with pytest.raises(ValueError, match="3 calibration images cannot be shared among 4 processes"):
        shard_range(3, 0, 4)
    with pytest.raises(ValueError, match="pass both rank and world_size"):
        calibrate(tiny_model(), [], list(LAYERS), "x.h5", n_images=4, rank=0)
