"""Input-patch statistics in the calibration store: equal to explicit unfolded patches, resumable, gated."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from calibration import CalibrationMismatchError, calibrate, open_calibration, read_input_stats

N_IMAGES = 13
LAYERS = ["0", "2", "5"]


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    # conv 2->4 (padding 1), conv 4->3 (stride 2, dilation 2, anisotropic padding), linear 75 -> 5
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 3, (3, 2), stride=2, padding=(2, 1), dilation=2),
        nn.ReLU(), nn.Flatten(), nn.Linear(3 * 5 * 5, 5),
    ).double().eval()  # float64, so that batch sizes do not change the layers' inputs by rounding


def images() -> torch.Tensor:
    return torch.randn(N_IMAGES + 3, 2, 9, 9, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def layer_inputs(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The input of every layer in LAYERS for the batch x, captured by forward hooks."""
    inputs = {}
    hooks = [model[int(n)].register_forward_hook(lambda m, a, o, n=n: inputs.__setitem__(n, a[0])) for n in LAYERS]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return inputs


def explicit(model: nn.Module, x: torch.Tensor) -> dict[str, tuple[np.ndarray, np.ndarray, int]]:
    """Mean and covariance of every layer's input patches from torch unfold on the whole input at once."""
    inputs = layer_inputs(model, x)
    out = {}
    for name in LAYERS:
        module, inp = model[int(name)], inputs[name].double()
        if isinstance(module, nn.Conv2d):
            cols = F.unfold(inp, module.kernel_size, dilation=module.dilation, padding=module.padding, stride=module.stride)
            rows = cols.permute(0, 2, 1).reshape(-1, cols.shape[1]).numpy()
        else:
            rows = inp.numpy()
        out[name] = (rows.mean(0), np.cov(rows.T, bias=True), rows.shape[0])
    return out


def run(path: Path, size: int, crash_after: int | None = None, **kwargs) -> str:
    def batches():
        for k, batch in enumerate(images().split(size)):
            if crash_after is not None and k == crash_after:
                raise RuntimeError("simulated crash")
            yield batch

    return calibrate(tiny_model(), batches(), LAYERS, path, n_images=N_IMAGES, seed=0, positions_per_image=3,
                     progress=False, input_stats=True, **kwargs)


def test_only_the_named_layers_keep_input_statistics(tmp_path: Path) -> None:
    """input_stats as a list of names: those layers' statistics are the explicit ones, the others have none
    and asking for them says so (a method that needs them on every layer refuses the file)."""
    path = tmp_path / "c.h5"
    calibrate(tiny_model(), images().split(5), LAYERS, path, n_images=N_IMAGES, seed=0, positions_per_image=3,
              progress=False, input_stats=LAYERS[:1])
    reference = explicit(tiny_model(), images()[:N_IMAGES])
    with open_calibration(path) as reader:
        mean, cov, count = read_input_stats(reader, LAYERS[0])
        np.testing.assert_allclose(cov, reference[LAYERS[0]][1], rtol=1e-10, atol=1e-12)
        for name in LAYERS[1:]:
            with pytest.raises(ValueError, match=f"no input covariance for layer {name!r}"):
                read_input_stats(reader, name)


def read_all(path) -> dict:
    with open_calibration(path) as reader:
        return {name: read_input_stats(reader, name) for name in LAYERS}


@pytest.mark.parametrize("size", [1, 4, 13])
def test_streamed_covariance_equals_explicit_unfold(tmp_path: Path, size: int) -> None:
    stored = read_all(run(tmp_path / "c.h5", size))
    reference = explicit(tiny_model(), images()[:N_IMAGES])
    for name in LAYERS:
        mean, cov, count = stored[name]
        assert count == reference[name][2]
        np.testing.assert_allclose(mean, reference[name][0], rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(cov, reference[name][1], rtol=1e-10, atol=1e-12)


def test_resume_after_crash_gives_the_same_statistics(tmp_path: Path) -> None:
    path = tmp_path / "c.h5"
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(path, 3, crash_after=2)
    run(path, 5)  # other batch size: the resumed batch straddles the 6 committed images
    reference = explicit(tiny_model(), images()[:N_IMAGES])
    for name, (mean, cov, count) in read_all(path).items():
        assert count == reference[name][2]
        np.testing.assert_allclose(cov, reference[name][1], rtol=1e-10, atol=1e-12)


def test_statistics_lagging_the_responses_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.h5"
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(path, 3, crash_after=2)
    with h5py.File(path, "r+") as f:  # as if the run died between the responses and the statistics
        f["input_stats"].attrs["images_done"] = 3
    with pytest.raises(CalibrationMismatchError, match="input statistics of 3"):
        run(path, 3)


def test_complete_store_with_incomplete_statistics_is_not_read(tmp_path: Path) -> None:
    path = run(tmp_path / "c.h5", 4)
    with h5py.File(path, "r+") as f:
        f["input_stats"].attrs["images_done"] = 8
    with open_calibration(path) as reader, pytest.raises(CalibrationMismatchError, match="cover 8 of 13"):
        read_input_stats(reader, "0")


def test_statistics_are_gathered_only_on_request(tmp_path: Path) -> None:
    path = calibrate(tiny_model(), images().split(4), LAYERS, tmp_path / "c.h5", n_images=N_IMAGES, progress=False)
    with h5py.File(path, "r") as f:
        assert "input_stats" not in f
    with open_calibration(path) as reader, pytest.raises(ValueError, match="no input covariance"):
        read_input_stats(reader, "0")


def test_shards_of_a_two_process_run_sum_to_the_single_process_statistics(tmp_path: Path) -> None:
    from calibration import merge_shards, shard_range
    from calibration.recorder import layer_spec

    model, x = tiny_model(), images()[:N_IMAGES]
    path = tmp_path / "two.h5"
    for rank in (0, 1):  # each rank sees only its own images, no process group: shards only
        start, stop = shard_range(N_IMAGES, rank, 2)
        calibrate(model, x[start:stop].split(3), LAYERS, path, n_images=N_IMAGES, seed=0, positions_per_image=3,
                  progress=False, input_stats=True, rank=rank, world_size=2)
    layers = {name: layer_spec(model[int(name)]) for name in LAYERS}
    merge_shards(path, world_size=2, layers=layers, seed=0, positions_per_image=3, image_ids=np.arange(N_IMAGES),
                 meta=None)
    merged, reference = read_all(path), explicit(model, x)
    for name in LAYERS:
        mean, cov, count = merged[name]
        assert count == reference[name][2]
        np.testing.assert_allclose(mean, reference[name][0], rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(cov, reference[name][1], rtol=1e-10, atol=1e-12)



def test_covariance_of_inputs_with_a_large_mean_keeps_its_digits(tmp_path: Path) -> None:
    """Inputs of mean 1e4 and unit spread: forming sum x x^T / n - mu mu^T (the format-3 store) cancels about
    7 of float64's 16 digits (an error of 3e-7 here); the centred, pairwise-merged moments match np.cov of the
    same patches to 1e-11 (3e-13 measured), whatever the batching, and also when two shards are merged."""
    from calibration import merge_shards, shard_range
    from calibration.recorder import layer_spec

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 5)).double()
    n_images = 24
    x = 1e4 + torch.randn(n_images, 3, 6, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    patches = F.unfold(x, 3).permute(0, 2, 1).reshape(-1, 27).numpy()  # computed independently of the hooks
    reference = np.cov(patches.T, bias=True)

    def error(cov: np.ndarray) -> float:
        return float(np.abs(cov - reference).max() / np.abs(reference).max())

    old = patches.T @ patches / patches.shape[0] - np.outer(patches.mean(0), patches.mean(0))
    assert error(old) > 1e-8  # what the old formula loses here (about 3e-7): the test can fail
    options = dict(n_images=n_images, seed=0, positions_per_image=2, progress=False, input_stats=True)
    paths = [calibrate(model, x.split(size), ["0", "3"], tmp_path / f"c{size}.h5", **options) for size in (5, 24)]
    merged = tmp_path / "two.h5"
    for rank in (0, 1):
        start, stop = shard_range(n_images, rank, 2)
        calibrate(model, x[start:stop].split(7), ["0", "3"], merged, rank=rank, world_size=2, **options)
    merge_shards(merged, world_size=2, layers={name: layer_spec(model[int(name)]) for name in ("0", "3")}, seed=0,
                 positions_per_image=2, image_ids=np.arange(n_images), meta=None)
    for path in paths + [merged]:
        with open_calibration(path) as reader:
            mean, cov, count = read_input_stats(reader, "0")
        assert count == patches.shape[0]
        np.testing.assert_allclose(mean, patches.mean(0), rtol=1e-14)
        assert error(cov) < 1e-11, (path, error(cov), error(old))


# --- subsampled moments (input_rows) -------------------------------------------------------------------------

#: with input_rows = 2 and 13 images: layer "0" (p = 18, 81 positions) keeps ceil(36 / 13) = 3 positions per image,
#: layer "2" (p = 24, 25 positions) ceil(48 / 13) = 4, the Linear layer "5" (p = 75, 1 row) ceil(150 / 13) = 12,
#: more than it has: its one row
SUBSAMPLED = {"0": (3, (9, 9)), "2": (4, (5, 5)), "5": (1, (1, 1))}


def drawn_rows(model: nn.Module, x: torch.Tensor, positions_per_layer: dict) -> dict[str, np.ndarray]:
    """Each layer's input patches at exactly the positions the sampler draws for it (explicit unfold, then rows)."""
    from calibration.sampling import sample_positions_batch

    inputs = layer_inputs(model, x)
    rows = {}
    for index, name in enumerate(LAYERS):
        module, inp = model[int(name)], inputs[name].double()
        if isinstance(module, nn.Conv2d):
            all_rows = F.unfold(inp, module.kernel_size, dilation=module.dilation, padding=module.padding,
                                stride=module.stride).permute(0, 2, 1).numpy()  # (B, L, p)
        else:
            all_rows = inp.numpy()[:, None, :]
        k, (height, width) = positions_per_layer[name]
        where = sample_positions_batch(0, index, 0, x.shape[0], height, width, k)
        flat = where[..., 0] * width + where[..., 1]
        rows[name] = np.concatenate([all_rows[b, flat[b]] for b in range(x.shape[0])])
    return rows


def test_sampled_patches_are_the_unfolded_columns_at_those_positions() -> None:
    from calibration import sampled_input_patches

    model, x = tiny_model(), images()[:4]
    generator = np.random.default_rng(0)
    conv = model[2]  # stride 2, dilation 2, anisotropic padding and kernel
    with torch.no_grad():
        inp = torch.relu(model[0](x))
    columns = F.unfold(inp, conv.kernel_size, dilation=conv.dilation, padding=conv.padding, stride=conv.stride)
    positions = np.stack([generator.integers(0, 5, (4, 6)), generator.integers(0, 5, (4, 6))], axis=-1)
    got = sampled_input_patches(conv, inp, positions)
    assert got.shape == (4, 6, 24)
    for b in range(4):
        for j, (r, c) in enumerate(positions[b]):
            np.testing.assert_array_equal(got[b, j].numpy(), columns[b, :, r * 5 + c].numpy())
    linear, rows = nn.Linear(7, 2), torch.randn(3, 5, 7, dtype=torch.float64)
    picked = np.stack([np.array([[4, 0], [1, 0]])] * 3)
    np.testing.assert_array_equal(sampled_input_patches(linear, rows, picked).numpy(), rows[:, [4, 1]].numpy())


def test_positions_per_image_follow_the_rows_per_input_dimension() -> None:
    from calibration import input_positions

    model = tiny_model()
    assert [input_positions(model[int(n)], N_IMAGES, 2.0) for n in LAYERS] == [3, 4, 12]
    assert input_positions(model[0], 1000, 2.0) == 1  # at least one position per image
    assert input_positions(model[0], N_IMAGES, None) == -1  # every position
    with pytest.raises(ValueError, match="rows_per_dim must be a positive number or None.*got 0"):
        input_positions(model[0], N_IMAGES, 0)


@pytest.mark.parametrize("size", [1, 5, 13])
def test_subsampled_moments_are_numpys_mean_and_covariance_of_exactly_the_drawn_rows(tmp_path: Path, size: int) -> None:
    """The moments kept over k seeded positions per image equal np.mean / np.cov of those rows, whatever the
    batching; the count is n k (n L where the map has fewer than k positions); the store records k."""
    stored = read_all(run(tmp_path / "c.h5", size, input_rows=2))
    reference = drawn_rows(tiny_model(), images()[:N_IMAGES], SUBSAMPLED)
    for name in LAYERS:
        mean, cov, count = stored[name]
        rows = reference[name]
        assert count == rows.shape[0] == N_IMAGES * SUBSAMPLED[name][0]
        np.testing.assert_allclose(mean, rows.mean(0), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(cov, np.cov(rows.T, bias=True), rtol=1e-10, atol=1e-12)
    full = explicit(tiny_model(), images()[:N_IMAGES])["0"]
    assert np.abs(stored["0"][1] - full[1]).max() > 1e-3  # a subsample indeed: it differs from every patch's
    with h5py.File(tmp_path / "c.h5", "r") as f:
        assert [int(f["input_stats"][n].attrs["positions"]) for n in LAYERS] == [3, 4, 12]


def test_subsampled_moments_resume_and_shard_to_the_single_run(tmp_path: Path) -> None:
    from calibration import merge_shards, shard_range
    from calibration.recorder import layer_spec

    path = tmp_path / "c.h5"
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(path, 3, crash_after=2, input_rows=2)
    run(path, 5, input_rows=2)
    model, x = tiny_model(), images()[:N_IMAGES]
    two = tmp_path / "two.h5"
    for rank in (0, 1):  # the shards draw with global ordinals: the same rows as one process
        start, stop = shard_range(N_IMAGES, rank, 2)
        calibrate(model, x[start:stop].split(3), LAYERS, two, n_images=N_IMAGES, seed=0, positions_per_image=3,
                  progress=False, input_stats=True, input_rows=2, rank=rank, world_size=2)
    merge_shards(two, world_size=2, layers={name: layer_spec(model[int(name)]) for name in LAYERS}, seed=0,
                 positions_per_image=3, image_ids=np.arange(N_IMAGES), meta=None)
    reference = drawn_rows(model, x, SUBSAMPLED)
    for stored in (read_all(path), read_all(two)):
        for name in LAYERS:
            mean, cov, count = stored[name]
            assert count == reference[name].shape[0]
            np.testing.assert_allclose(cov, np.cov(reference[name].T, bias=True), rtol=1e-10, atol=1e-12)
    with h5py.File(two, "r") as f:
        assert int(f["input_stats"]["0"].attrs["positions"]) == 3


@pytest.mark.parametrize("first,then", [(2, None), (None, 2), (2, 4)])
def test_a_store_kept_with_one_input_rows_is_refused_under_another(tmp_path: Path, first, then) -> None:
    """Complete or resumed: statistics kept over other positions are neither reused nor extended."""
    done = run(tmp_path / "done.h5", 5, input_rows=first)
    run(done, 5, input_rows=first)  # the same setting: reused
    with pytest.raises(CalibrationMismatchError, match="layer '0' kept over .* but this run keeps them over"):
        run(done, 5, input_rows=then)
    partial = tmp_path / "partial.h5"
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(partial, 3, crash_after=2, input_rows=first)
    with pytest.raises(CalibrationMismatchError, match="another input_rows setting"):
        run(partial, 3, input_rows=then)
