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
    from lowrank_fm.layer_stats import response_stats
    from lowrank_fm.distributed import world

    model = tiny_model()
    # the default method (asymmetric, RMSProp refinement); one thread in every process, since the refinement
    # amplifies the summation order that the thread count changes
    new_model, report = approximate(model, loader(), calib_file=calib_file, energy=0.9, progress=False, seed=1)
    rank, size = world()
    n_fit = report.calibration["fit_images"]
    shard = shard_range(N_IMAGES, rank, size) if size > 1 else None
    with open_calibration(calib_file) as reader, torch.no_grad():
        stats = {name: response_stats(reader, name, n_fit, "streaming", shard) for name in reader.layers}
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


# --- the layer-wise pass sharded across ranks (issue 20) -------------------------------------------------------

SETTINGS = {"maps": {"fit_positions": 5}, "store": {"fit_positions": None}}  # drawn from whole maps / the store


def test_a_shard_draws_the_positions_of_one_process_for_its_images() -> None:
    """layer_data_from_maps over a shard (first_ordinal) gives exactly the rows one process gives for those
    images, whatever the batch sizes: the position stream is skipped by the earlier images' ordinals."""
    from lowrank_fm.samples import layer_data_from_maps

    torch.manual_seed(5)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    maps = torch.randn(12, 3, 6, 5)
    hats = maps + 0.1 * torch.randn_like(maps)
    options = dict(n_fit=9, per_image=4, seed=7, activation="relu")
    whole = layer_data_from_maps("layer", conv, list(hats.split(5)), list(maps.split(5)), **options)
    parts = [layer_data_from_maps("layer", conv, list(hats[a:b].split(3)), list(maps[a:b].split(3)), **options,
                                  first_ordinal=a) for a, b in ((0, 7), (7, 12))]
    for field in ("inputs", "targets", "heldout"):
        assert torch.equal(torch.cat([getattr(p, field) for p in parts]), getattr(whole, field))
    assert whole.heldout.sum() == 3 * 4


def test_split_range_and_collectives_without_a_process_group() -> None:
    from lowrank_fm.distributed import all_reduce_sums, broadcast_object, gather_rows, split_range

    assert [split_range(81, 90, r, 2) for r in range(2)] == [(81, 86), (86, 90)]
    assert [split_range(5, 6, r, 3) for r in range(3)] == [(5, 6), (6, 6), (6, 6)]  # empty parts allowed
    rows = torch.arange(6.0).reshape(3, 2)
    assert gather_rows(rows) is rows and broadcast_object("x") == "x" and all_reduce_sums([1.5, 2.0]) == [1.5, 2.0]


def run_sharded_pass(settings: dict) -> dict:
    """approximate() on the tiny model, recording what this rank's layer-wise pass and held-out pass saw and
    the rows each solver was given (rank 0 under torchrun: the rows gathered from every rank)."""
    import lowrank_fm.api as api
    from lowrank_fm import approximate
    from lowrank_fm.batches import batch_size_of
    from lowrank_fm.layerwise import LayerwisePass
    from lowrank_fm.methods.fm_nonlinear import FeatureMap

    seen = {"pass_images": [], "heldout_images": 0, "rows": {}}
    run, build, heldout = LayerwisePass.run, FeatureMap.build, api.heldout_errors

    def counting_run(self, targets, on_layer):
        seen["pass_images"].append(sum(batch_size_of(b) for b in self.batches))
        return run(self, targets, on_layer)

    def recording_build(self, ctx, rank, data=None, info=None):
        if data is not None:  # (the speed gate builds without data)
            seen["rows"][ctx.name] = (data.inputs, data.targets, data.heldout)
        return build(self, ctx, rank, data, info)

    def counting_heldout(reference, replacements, inputs, reduce=False):
        def counted():
            for batch in inputs:
                seen["heldout_images"] += batch_size_of(batch)
                yield batch
        return heldout(reference, replacements, counted(), reduce)

    LayerwisePass.run, FeatureMap.build, api.heldout_errors = counting_run, recording_build, counting_heldout
    try:
        model, report = approximate(tiny_model(), loader(), calib_file=settings["calib_file"], energy=0.9,
                                    progress=False, seed=1, fit_positions=settings["fit_positions"],
                                    speed_gate=False)  # (timings would decide which layers are replaced)
    finally:
        LayerwisePass.run, FeatureMap.build, api.heldout_errors = run, build, heldout
    seen.update(state=model.state_dict(), ranks=[r.rank for r in report.layers],
                errors=[r.rel_error for r in report.layers], extra=[r.extra for r in report.layers])
    return seen


def _sharded_worker(rank: int, init_file: str, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        for key, settings in SETTINGS.items():
            result = run_sharded_pass({**settings, "calib_file": Path(folder) / f"two-{key}.h5"})
            torch.save(result, Path(folder) / f"{key}.{rank}")
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_share_the_layerwise_pass_and_give_the_single_process_layers(tmp_path: Path) -> None:
    """Each rank runs the layer-wise pass over its shard of whole batches only (48 and 42 of 90 images) and its
    part of the held-out images (5 and 4 of 9); rank 0 solves on the rows gathered from both ranks, which are
    the single-process rows in the same order, bit for bit (each batch is computed as one process computes it,
    with one thread); so the factors are the single-process factors exactly (largest difference measured: 0.0),
    on every rank. Only the held-out errors are sums over ranks, of batches cut differently (81-89 in one
batch against 81-85 and 86-89): float32 rounding and summation order, 2.6e-8 relative measured."""
    mp.spawn(_sharded_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    for key, settings in SETTINGS.items():
        one = run_sharded_pass({**settings, "calib_file": tmp_path / f"one-{key}.h5"})
        two = [torch.load(tmp_path / f"{key}.{r}", weights_only=False) for r in (0, 1)]
        assert one["pass_images"] == [N_IMAGES] and one["heldout_images"] == 9
        assert [t["pass_images"] for t in two] == [[48], [42]]  # 3 whole batches of 16 each, the last one of 10
        assert [t["heldout_images"] for t in two] == [5, 4]
        assert set(one["rows"]) == set(two[0]["rows"]) == {"2", "4", "8"}
        assert two[1]["rows"] == {}  # only rank 0 solves
        for name, rows in one["rows"].items():  # the same rows (images, positions, values), in image order
            assert all(torch.equal(got, want) for got, want in zip(two[0]["rows"][name], rows)), name
        for result in two:
            assert result["ranks"] == one["ranks"] and result["extra"] == one["extra"]
            assert result["extra"][1]["solver"] == "rmsprop"
            assert result["state"].keys() == one["state"].keys()
            difference = max(float((result["state"][n] - v).abs().max()) for n, v in one["state"].items())
            print(f"{key}: largest factor difference, 2 processes vs 1: {difference:.3g}")
            assert difference == 0.0
            assert [e is None for e in result["errors"]] == [e is None for e in one["errors"]]
            np.testing.assert_allclose([e for e in result["errors"] if e is not None],
                                       [e for e in one["errors"] if e is not None], rtol=1e-6)
        assert two[0]["errors"] == two[1]["errors"]  # the reduced sums: the same on every rank


def _failing_worker(rank: int, init_file: str, folder: str) -> None:
    import lowrank_fm.api as api
    from lowrank_fm import approximate
    from lowrank_fm.methods.fm_nonlinear import FeatureMap

    def failing_plan(*args, **kwargs):
        raise ValueError("no plan on rank 0")

    def failing_build(self, ctx, rank, data=None, info=None):
        if data is not None:
            raise ArithmeticError(f"no factors for layer {ctx.name}")
        return build(self, ctx, rank, data, info)

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    plan, build = api._plan, FeatureMap.build
    messages = []
    try:
        for patch in ("plan", "build"):
            if patch == "plan":
                api._plan = failing_plan
            else:
                api._plan, FeatureMap.build = plan, failing_build
            try:
                approximate(tiny_model(), loader(), calib_file=Path(folder) / f"{patch}.h5", energy=0.9,
                            progress=False, seed=1, speed_gate=False)
            except (ValueError, ArithmeticError) as error:
                messages.append(f"{type(error).__name__}: {error}")
        torch.save(messages, Path(folder) / f"messages.{rank}")
    finally:
        api._plan, FeatureMap.build = plan, build
        dist.destroy_process_group()


def test_a_failure_in_rank_0s_plan_or_solver_is_raised_on_every_rank(tmp_path: Path) -> None:
    """Rank 0 alone plans and solves; when it fails, the other ranks raise the same error instead of waiting."""
    mp.spawn(_failing_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    expected = ["ValueError: no plan on rank 0", "ArithmeticError: no factors for layer 2"]
    assert [torch.load(tmp_path / f"messages.{r}") for r in (0, 1)] == [expected, expected]
