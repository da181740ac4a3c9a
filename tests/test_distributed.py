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
    from types import SimpleNamespace

    from lowrank_fm import approximate
    from lowrank_fm.distributed import world
    from lowrank_fm.layer_stats import read_layer_stats

    model = tiny_model()
    # the default method (asymmetric, RMSProp refinement); one thread in every process, since the refinement
    # amplifies the summation order that the thread count changes
    new_model, report = approximate(model, loader(), calib_file=calib_file, energy=0.9, progress=False, seed=1)
    rank, size = world()
    n_fit = report.calibration["fit_images"]
    shard = shard_range(N_IMAGES, rank, size) if size > 1 else None
    with open_calibration(calib_file) as reader:
        names = list(reader.layers)
    # two processes: the covariances merged on every rank, each rank decomposing every second layer
    stats, _ = read_layer_stats(calib_file, names, SimpleNamespace(needs_responses=True), n_fit, "streaming", shard)
    with torch.no_grad():
        return new_model(probe()), stats, [r.rank for r in report.layers]


def _worker(rank: int, init_file: str, calib_file: str, out_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        from lowrank_fm.distributed import computed_round_robin

        outputs, stats, ranks = run_pipeline(Path(calib_file))
        computed_by = computed_round_robin(["a", "b", "c"], lambda key: (key, rank))

        def fails_on_rank_one(key):
            if rank == 1:
                raise ArithmeticError(f"rank 1 failed on {key}")
            return key

        try:
            computed_round_robin(["a", "b"], fails_on_rank_one)
            failure = None
        except ArithmeticError as error:
            failure = str(error)
        torch.save({"outputs": outputs, "ranks": ranks, "computed_by": computed_by, "failure": failure,
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
        assert result["computed_by"] == {"a": ("a", 0), "b": ("b", 1), "c": ("c", 0)}  # the same dict on both ranks
        assert result["failure"] == "rank 1 failed on b"  # raised on rank 0 too: nobody waits
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
# fm fits the rows itself; tucker2 builds from the weights alone and the whole-model correction refits its last
# factor to the rows (lowrank_fm.correction). By default rank 0 gathers every rank's rows and solves alone; with
# sharded_solvers both add their row sums over the ranks (fm-3d is not written for shards: it always gathers)
RUNS = {("fm", "maps", "none", True), ("fm", "store", "rmsprop", True), ("tucker2", "maps", "rmsprop", True),
        ("fm-3d", "maps", "rmsprop", True), ("fm", "maps", "rmsprop", False)}


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
    from lowrank_fm.distributed import (all_gather_rows, all_reduce_sums, all_reduce_tensor, broadcast_object,
                                        distributed_shards, gather_rows, split_range)

    assert [split_range(81, 90, r, 2) for r in range(2)] == [(81, 86), (86, 90)]
    assert [split_range(5, 6, r, 3) for r in range(3)] == [(5, 6), (6, 6), (6, 6)]  # empty parts allowed
    rows = torch.arange(6.0).reshape(3, 2)
    assert gather_rows(rows) is rows and broadcast_object("x") == "x" and all_reduce_sums([1.5, 2.0]) == [1.5, 2.0]
    assert all_reduce_tensor(rows) is rows and all_gather_rows(rows) is rows and distributed_shards().local


def run_sharded_pass(settings: dict, method: str = "fm", solver: str = "rmsprop", sharded: bool = False) -> dict:
    """approximate() on the tiny model, recording what this rank's layer-wise pass and held-out pass saw and
    the rows each solver was given (each rank's own rows: the solvers add their sums over the ranks)."""
    import lowrank_fm.api as api
    import lowrank_fm.building as building
    from lowrank_fm import approximate
    from lowrank_fm.batches import batch_size_of
    from lowrank_fm.layerwise import LayerwisePass

    seen = {"pass_images": [], "heldout_images": 0, "rows": {}}
    run, correct, heldout = LayerwisePass.run, building.correct_last_factor, api.layer_errors
    from lowrank_fm.methods.fm_nonlinear import FeatureMap
    build = FeatureMap.build

    def counting_run(self, targets, on_layer):
        seen["pass_images"].append(sum(batch_size_of(b) for b in self.batches))
        return run(self, targets, on_layer)

    def recording_build(self, ctx, rank, data=None, info=None):
        if data is not None:  # (the speed gate builds without data)
            seen["rows"][ctx.name] = (data.inputs, data.targets, data.heldout)
        return build(self, ctx, rank, data, info)

    def recording_correct(layer, replacement, data, seed=0):
        name = next(n for n, m in tiny_model().named_modules() if type(m) is type(layer)
                    and m.weight.shape == layer.weight.shape)
        seen["rows"][name] = (data.inputs, data.targets, data.heldout)
        return correct(layer, replacement, data, seed)

    def counting_heldout(reference, approximated, replacements, inputs, reduce=False):
        def counted():
            for batch in inputs:
                seen["heldout_images"] += batch_size_of(batch)
                yield batch
        return heldout(reference, approximated, replacements, counted(), reduce)

    LayerwisePass.run, api.layer_errors = counting_run, counting_heldout
    FeatureMap.build, building.correct_last_factor = recording_build, recording_correct
    try:
        model, report = approximate(tiny_model(), loader(), calib_file=settings["calib_file"], energy=0.9,
                                    progress=False, seed=1, fit_positions=settings["fit_positions"],
                                    method=method, speed_gate=False, sharded_solvers=sharded,  # (no timings)
                                    **({"solver": solver} if method.startswith("fm") else {}))
    finally:
        LayerwisePass.run, api.layer_errors = run, heldout
        FeatureMap.build, building.correct_last_factor = build, correct
    seen.update(state=model.state_dict(), ranks=[r.rank for r in report.layers],
                errors=[e for r in report.layers for e in (r.rel_error, r.rel_error_network)], extra=[r.extra for r in report.layers])
    return seen


def _sharded_worker(rank: int, init_file: str, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        for method, key, solver, sharded in sorted(RUNS):
            result = run_sharded_pass({**SETTINGS[key], "calib_file": Path(folder) / f"two-{method}-{key}-{sharded}.h5"},
                                      method, solver, sharded)
            torch.save(result, Path(folder) / f"{method}-{key}-{solver}-{sharded}.{rank}")
    finally:
        dist.destroy_process_group()


def _without_floats(extra: dict) -> dict:
    """A layer's record without its float measurements (held-out objectives): the decisions it holds."""
    if isinstance(extra, dict):
        return {k: _without_floats(v) for k, v in extra.items() if not isinstance(v, float)}
    return extra


def test_two_gloo_processes_share_the_layerwise_pass_and_give_the_single_process_layers(tmp_path: Path) -> None:
    """Each rank runs the layer-wise pass over its shard of whole batches only (48 and 42 of 90 images) and its
    part of the held-out images (5 and 4 of 9), and keeps its rows of every layer (rank 0's rows followed by rank
    1's are the single-process rows, bit for bit, wherever the layers before are equal). Rank 0's layer is
    broadcast, so both ranks hold the same model exactly.

    - by default (fm with RMSProp) rank 0 gathers the rows and solves alone: the single-process factors exactly
      (largest difference measured 0.0).

    With ``sharded_solvers`` the solvers add their row sums over the ranks:

    - fm without refinement (float64 regression only): the single-process factors, largest difference measured
      0.0 (asserted < 1e-9), the same decisions, held-out errors (alone and in the network) within 1e-6 relative (float32 forwards of
      9 held-out images in chunks of 8 + 1 against 5 and 4: measured up to 1.1e-7).
    - fm and tucker2 (whole-model correction) with RMSProp: 300 float32 steps amplify the float32 summation
      order of the gradient sums (a 1e-7 perturbation of one process's inputs moves the factors as much:
      test_two_shards_of_rmsprop_differ_as_little_as_float32_rounding_of_one_process). Measured largest factor
      differences 0.04 (fm) and 6e-8 (tucker2, asserted < 1e-5) on factors up to 0.75; asserted: the same
      ranks and held-out errors within 5% relative.
    - fm-3d (not written for shards): rank 0 gathers every rank's rows, the single-process rows in the same order,
      and solves alone: the single-process factors exactly (largest difference measured 0.0)."""
    mp.spawn(_sharded_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    for method, key, solver, sharded in sorted(RUNS):
        one = run_sharded_pass({**SETTINGS[key], "calib_file": tmp_path / f"one-{method}-{key}-{solver}.h5"}, method,
                               solver)
        two = [torch.load(tmp_path / f"{method}-{key}-{solver}-{sharded}.{r}", weights_only=False) for r in (0, 1)]
        exact, gathered = solver == "none", method == "fm-3d" or not sharded
        assert one["pass_images"] == [N_IMAGES] and one["heldout_images"] == 9
        assert [t["pass_images"] for t in two] == [[48], [42]]  # 3 whole batches of 16 each, the last one of 10
        assert [t["heldout_images"] for t in two] == [5, 4]
        if gathered:
            assert set(one["rows"]) == set(two[0]["rows"]) and two[1]["rows"] == {}  # only rank 0 solves
        else:
            assert set(one["rows"]) == set(two[0]["rows"]) == set(two[1]["rows"]) >= {"2"}
        for name in (sorted(one["rows"]) if exact else [] if gathered else ["2"]):  # each rank its own rows: together all of them
            for field, want in enumerate(one["rows"][name]):
                got = torch.cat([two[0]["rows"][name][field], two[1]["rows"][name][field]])
                assert torch.equal(got, want), (method, key, name, field)
            assert 0 < len(two[1]["rows"][name][0]) < len(one["rows"][name][0])
        for result in two:
            assert result["ranks"] == one["ranks"]
            assert result["state"].keys() == one["state"].keys()
            difference = max(float((result["state"][n] - v).abs().max()) for n, v in one["state"].items())
            print(f"{method} {key} {solver}: largest factor difference, 2 processes vs 1: {difference:.3g}")
            assert [e is None for e in result["errors"]] == [e is None for e in one["errors"]]
            errors = ([e for e in result["errors"] if e is not None], [e for e in one["errors"] if e is not None])
            if gathered:
                assert difference == 0.0
                assert result["extra"] == one["extra"]
            elif exact:
                assert difference < 1e-9
                assert [_without_floats(e) for e in result["extra"]] == [_without_floats(e) for e in one["extra"]]
                np.testing.assert_allclose(*errors, rtol=1e-6)
            else:
                np.testing.assert_allclose(*errors, rtol=0.05)
                assert method != "tucker2" or difference < 1e-5
        assert all(torch.equal(two[0]["state"][n], two[1]["state"][n]) for n in one["state"])  # rank 0's, broadcast
        assert two[0]["errors"] == two[1]["errors"]  # the reduced sums: the same on every rank
        assert two[0]["extra"] == two[1]["extra"]
        if method == "tucker2":
            corrected = [e["correction"] for e in two[0]["extra"] if "correction" in e]
            assert corrected and all(c["samples"] == 81 * 5 for c in corrected)  # fit rows, counted over the ranks


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


def _borrowing_worker(rank: int, init_file: str, folder: str) -> None:
    """A 2-process run on one machine as torchrun starts it (LOCAL_WORLD_SIZE=2), recording the threads each
    layer's solve ran with."""
    import threadpoolctl

    from lowrank_fm import approximate
    from lowrank_fm.methods.fm_nonlinear import FeatureMap

    os.environ["LOCAL_WORLD_SIZE"] = "2"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    build, seen = FeatureMap.build, []

    def recording_build(self, ctx, rank_, data=None, info=None):
        if data is not None:
            blas = [p["num_threads"] for p in threadpoolctl.threadpool_info() if p["user_api"] == "blas"]
            seen.append((torch.get_num_threads(), blas))
        return build(self, ctx, rank_, data, info)

    FeatureMap.build = recording_build
    try:
        model, report = approximate(tiny_model(), loader(), calib_file=Path(folder) / "two.h5", energy=0.9,
                                    progress=False, seed=1, speed_gate=False)
        with torch.no_grad():
            outputs = model(probe())
        torch.save({"seen": seen, "after": torch.get_num_threads(), "outputs": outputs,
                    "ranks": [r.rank for r in report.layers]}, Path(folder) / f"borrow.{rank}")
    finally:
        FeatureMap.build = build
        dist.destroy_process_group()


def test_rank_0_solves_with_the_threads_of_the_processes_waiting_for_it(tmp_path: Path) -> None:
    """Under torchrun on one machine (LOCAL_WORLD_SIZE=2, one thread each) rank 0 solves every layer with two
    threads (torch's and the BLAS's; as many as the cores allow) while rank 1 waits, then returns to one;
    the model equals the one-process model up to the summation order of the threaded solver."""
    from lowrank_fm import approximate
    from lowrank_fm.distributed import solver_threads

    mp.spawn(_borrowing_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    two = [torch.load(tmp_path / f"borrow.{r}", weights_only=False) for r in (0, 1)]
    cores = len(os.sched_getaffinity(0))
    expected = min(2, cores)
    assert two[0]["seen"] and all(threads == expected and set(blas) <= {expected} for threads, blas in two[0]["seen"])
    assert two[1]["seen"] == []  # rank 1 never solves
    assert two[0]["after"] == two[1]["after"] == 1
    assert torch.equal(two[0]["outputs"], two[1]["outputs"])  # rank 0's layers, broadcast
    model, report = approximate(tiny_model(), loader(), calib_file=tmp_path / "one.h5", energy=0.9,
                                progress=False, seed=1, speed_gate=False)
    with torch.no_grad():
        one = model(probe())
    assert two[0]["ranks"] == [r.rank for r in report.layers]
    difference = float((two[0]["outputs"] - one).abs().max() / one.abs().max())
    print(f"2 processes (rank 0 solving with {expected} threads) vs 1: largest output difference {difference:.3g}")
    assert difference < 0.05
    # the count itself: asked for, or the local processes' threads within the cores
    assert solver_threads(3) == 3
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LOCAL_WORLD_SIZE", "64")
        assert solver_threads(None) == min(64 * torch.get_num_threads(), cores)
        patch.delenv("LOCAL_WORLD_SIZE")
        assert solver_threads(None) == torch.get_num_threads()
