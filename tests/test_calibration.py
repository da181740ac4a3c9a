"""Tests of the calibration stage: sampling, hooks, the HDF5 store, calibrate() and resuming."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch import nn

from calibration import (
    FORMAT_VERSION,
    CalibrationMismatchError,
    CalibrationWriter,
    IncompleteCalibrationError,
    ResponseRecorder,
    calibrate,
    open_calibration,
    sample_positions,
)

LAYERS = ["0", "2", "5"]
N_IMAGES = 20
META = {"model": "tiny", "dataset": "random"}


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    # conv 1->4 on 8x8 (64 positions), conv 4->6 stride 2 -> 3x3 (9 positions), linear 54 -> 5.
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, stride=2), nn.ReLU(), nn.Flatten(),
        nn.Linear(54, 5),
    ).eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(N_IMAGES + 5, 1, 8, 8, generator=torch.Generator().manual_seed(1))


def batches_of(x: torch.Tensor, size: int, crash_after: int | None = None) -> Iterator[torch.Tensor]:
    for k, batch in enumerate(x.split(size)):
        if crash_after is not None and k == crash_after:
            raise RuntimeError("simulated crash")
        yield batch


def run(model: nn.Module, x: torch.Tensor, path: Path, size: int, crash_after: int | None = None,
        **kwargs) -> str:
    """calibrate() on ``x`` in batches of ``size`` with the tests' default settings."""
    options = dict(n_images=N_IMAGES, seed=3, positions_per_image=5, meta=META, progress=False)
    options.update(kwargs)
    return calibrate(model, batches_of(x, size, crash_after), LAYERS, path, **options)


def read_all(path: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    with open_calibration(path) as reader:
        return {name: (reader.responses(name), reader.image_ordinal(name), reader.position(name))
                for name in reader.layers}


def assert_same_store(a: dict, b: dict, exact: bool) -> None:
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name][1], b[name][1])
        np.testing.assert_array_equal(a[name][2], b[name][2])
        if exact:
            np.testing.assert_array_equal(a[name][0], b[name][0])
        else:
            np.testing.assert_allclose(a[name][0], b[name][0], rtol=1e-5, atol=1e-6)


# --- sampling -----------------------------------------------------------------------------------------------

def test_sample_positions_deterministic_distinct_in_bounds() -> None:
    p = sample_positions(7, 2, 11, 13, 17, 25)
    assert p.shape == (25, 2) and p.dtype == np.int32
    np.testing.assert_array_equal(p, sample_positions(7, 2, 11, 13, 17, 25))
    assert p[:, 0].min() >= 0 and p[:, 0].max() < 13 and p[:, 1].min() >= 0 and p[:, 1].max() < 17
    flat = p[:, 0] * 17 + p[:, 1]
    assert np.unique(flat).size == 25
    # another image, layer or seed draws another set
    assert not np.array_equal(p, sample_positions(7, 2, 12, 13, 17, 25))
    assert not np.array_equal(p, sample_positions(7, 3, 11, 13, 17, 25))
    assert not np.array_equal(p, sample_positions(8, 2, 11, 13, 17, 25))


def test_sample_positions_all_when_count_covers_map() -> None:
    expected = np.array([[r, c] for r in range(3) for c in range(4)], dtype=np.int32)
    for count in (None, 0, -1, 12, 50):
        np.testing.assert_array_equal(sample_positions(0, 0, 0, 3, 4, count), expected)


def test_sample_positions_uniform() -> None:
    counts = np.zeros(16)
    for ordinal in range(4000):
        p = sample_positions(0, 0, ordinal, 4, 4, 4)
        counts[p[:, 0] * 4 + p[:, 1]] += 1
    # each position is drawn with probability 1/4: 1000 expected, std ~ 27
    assert np.all(np.abs(counts - 1000) < 150)


def _splitmix64(z: int) -> int:
    """SplitMix64's output function on Python ints (the reference the vectorised sampler must match)."""
    mask = (1 << 64) - 1
    z = (z + 0x9E3779B97F4A7C15) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return z ^ (z >> 31)


@pytest.mark.parametrize("seed, layer, ordinal, height, width, count", [(0, 0, 0, 4, 4, 3), (7, 5, 123456, 13, 9, 10)])
def test_sample_positions_are_the_smallest_hash_keys(seed, layer, ordinal, height, width, count) -> None:
    image = _splitmix64(_splitmix64(_splitmix64(seed) ^ layer) ^ ordinal)
    keys = [_splitmix64(image ^ p) for p in range(height * width)]
    chosen = sorted(sorted(range(height * width), key=lambda p: keys[p])[:count])
    expected = np.array([[p // width, p % width] for p in chosen], dtype=np.int32)
    np.testing.assert_array_equal(sample_positions(seed, layer, ordinal, height, width, count), expected)


def test_sample_positions_batch_equals_one_by_one() -> None:
    from calibration.sampling import sample_positions_batch

    batch = sample_positions_batch(2, 1, 40, 6, 5, 7, 4)
    assert batch.shape == (6, 4, 2)
    for i in range(6):
        np.testing.assert_array_equal(batch[i], sample_positions(2, 1, 40 + i, 5, 7, 4))


def test_recorder_positions_do_not_depend_on_batch_size(images: torch.Tensor) -> None:
    model = tiny_model()
    results = []
    for size in (1, 4, 10):
        with ResponseRecorder({"0": model[0]}, seed=5, positions_per_image=6) as rec, torch.no_grad():
            parts = []
            for batch in images[:10].split(size):
                model(batch)
                rec.next_batch(batch.shape[0])
                parts.append(rec.pop()["0"])
        results.append([np.concatenate(a) for a in zip(*parts)])
    for other in results[1:]:
        np.testing.assert_array_equal(results[0][1], other[1])
        np.testing.assert_array_equal(results[0][2], other[2])
        np.testing.assert_allclose(results[0][0], other[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(results[0][1], np.repeat(np.arange(10), 6))
    for ordinal in range(10):
        np.testing.assert_array_equal(results[0][2][ordinal * 6:(ordinal + 1) * 6],
                                      sample_positions(5, 0, ordinal, 8, 8, 6))


def test_recorder_rejects_layer_called_twice() -> None:
    conv = nn.Conv2d(1, 1, 1)
    model = nn.Sequential(conv, conv)
    with ResponseRecorder({"0": conv}, seed=0, positions_per_image=2) as rec, torch.no_grad():
        with pytest.raises(RuntimeError, match="ran more than once in one model forward"):
            model(torch.zeros(2, 1, 3, 3))
    assert not conv._forward_hooks  # hooks removed on exit


def test_recorder_skip_before_keeps_only_later_images(images: torch.Tensor) -> None:
    model = tiny_model()
    with ResponseRecorder({"2": model[2]}, seed=0, positions_per_image=4, start_ordinal=10,
                          skip_before=13) as rec, torch.no_grad():
        model(images[:5])
        rec.next_batch(5)
        responses, ordinal, position = rec.pop()["2"]
    np.testing.assert_array_equal(ordinal, np.repeat([13, 14], 4))
    assert responses.shape == (8, 6) and responses.dtype == np.float32
    assert position.shape == (8, 2)
    assert rec.ordinal == 15


# --- calibrate() and the store ---------------------------------------------------------------------------------

def test_stored_responses_equal_module_outputs(tmp_path: Path, images: torch.Tensor) -> None:
    model = tiny_model()
    path = run(model, images, tmp_path / "c.h5", size=3)
    outputs = {}
    with torch.no_grad():
        x = images[:N_IMAGES]
        outputs["0"] = model[0](x)
        outputs["2"] = model[2](model[1](outputs["0"]))
        outputs["5"] = model(x)
    with open_calibration(path) as reader:
        assert reader.layers == LAYERS and reader.meta == META and reader.seed == 3
        assert reader.positions_per_image == 5 and reader.n_images == N_IMAGES
        np.testing.assert_array_equal(reader.image_ids, np.arange(N_IMAGES))
        assert [reader.channels(n) for n in LAYERS] == [4, 6, 5]
        assert [reader.kind(n) for n in LAYERS] == ["conv", "conv", "linear"]
        # 5 of 64 positions, 5 of 9, and the single position of the Linear
        assert [reader.n_samples(n) for n in LAYERS] == [100, 100, 20]
        for name in ("0", "2"):
            ordinal, position = reader.image_ordinal(name), reader.position(name)
            expected = outputs[name][torch.from_numpy(ordinal), :, torch.from_numpy(position[:, 0]).long(),
                                     torch.from_numpy(position[:, 1]).long()].numpy()
            np.testing.assert_allclose(reader.responses(name), expected, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(reader.position("5"), np.zeros((20, 2), dtype=np.int32))
        np.testing.assert_allclose(reader.responses("5"), outputs["5"].numpy(), rtol=1e-5, atol=1e-6)
        # row selection by slice, indices (any order) and mask
        full = reader.responses("0")
        np.testing.assert_array_equal(reader.responses("0", slice(7, 31, 3)), full[7:31:3])
        idx = np.array([50, 3, 3, 99, 0])
        np.testing.assert_array_equal(reader.responses("0", idx), full[idx])
        mask = reader.image_ordinal("0") % 2 == 0
        np.testing.assert_array_equal(reader.responses("0", mask), full[mask])


def test_batch_size_does_not_change_the_store(tmp_path: Path, images: torch.Tensor) -> None:
    model = tiny_model()
    a = read_all(run(model, images, tmp_path / "a.h5", size=3))
    b = read_all(run(model, images, tmp_path / "b.h5", size=7))
    assert_same_store(a, b, exact=False)


def test_file_layout_and_metadata(tmp_path: Path, images: torch.Tensor) -> None:
    path = run(tiny_model(), images, tmp_path / "c.h5", size=7, image_ids=np.arange(100, 100 + N_IMAGES))
    with h5py.File(path, "r") as f:
        assert f.attrs["format_version"] == FORMAT_VERSION == 4 and bool(f.attrs["complete"])
        assert f.attrs["position_sampler"] == "splitmix64-smallest-keys"
        assert f.attrs["n_images_done"] == N_IMAGES and f.attrs["n_images_planned"] == N_IMAGES
        assert f.attrs["seed"] == 3 and f.attrs["positions_per_image"] == 5
        assert json.loads(f.attrs["meta_json"]) == META and json.loads(f.attrs["layers_json"]) == LAYERS
        np.testing.assert_array_equal(f["image_ids"][()], np.arange(100, 120))
        g = f["layers/2"]
        attrs = (g.attrs["name"], g.attrs["channels"], g.attrs["kind"], g.attrs["committed_rows"])
        assert attrs == ("2", 6, "conv", 100)
        assert g["responses"].dtype == np.float32 and g["responses"].maxshape == (None, 6)
        assert g["responses"].chunks is not None and g["image_ordinal"].dtype == np.int64
        assert g["position"].dtype == np.int32 and g["position"].shape == (100, 2)


def test_all_positions_and_iter_responses(tmp_path: Path, images: torch.Tensor) -> None:
    path = run(tiny_model(), images, tmp_path / "c.h5", size=4, positions_per_image=None)
    with open_calibration(path) as reader:
        assert reader.positions_per_image is None
        assert reader.n_samples("0") == N_IMAGES * 64 and reader.n_samples("2") == N_IMAGES * 9
        full = reader.responses("0")
        blocks = list(reader.iter_responses("0", batch_rows=300))
        assert len(blocks) > 1
        np.testing.assert_array_equal(np.concatenate(blocks), full)
        held = np.concatenate(list(reader.iter_responses("0", batch_rows=300, mask_fn=lambda o: o % 5 == 0)))
        np.testing.assert_array_equal(held, full[reader.image_ordinal("0") % 5 == 0])
        assert held.shape == (4 * 64, 4)


def test_complete_file_is_reused_without_running(tmp_path: Path, images: torch.Tensor) -> None:
    model = tiny_model()
    path = run(model, images, tmp_path / "c.h5", size=5)
    before = read_all(path)

    def never() -> Iterator[torch.Tensor]:
        raise AssertionError("a complete file must not draw batches")
        yield

    assert calibrate(model, never(), LAYERS, path, n_images=N_IMAGES, seed=3, positions_per_image=5,
                     meta=META, progress=False) == path
    assert_same_store(before, read_all(path), exact=True)
    with pytest.raises(FileExistsError, match="resume=False"):
        run(model, images, path, size=5, resume=False)


def test_model_mode_restored_and_too_few_batches(tmp_path: Path, images: torch.Tensor) -> None:
    model = tiny_model().train()
    model[0].eval()
    with pytest.raises(ValueError, match=r"ran out after 10 images but n_images=20"):
        calibrate(model, batches_of(images[:10], 4), LAYERS, tmp_path / "c.h5", n_images=N_IMAGES,
                  progress=False)
    assert model.training and not model[0].training and model[2].training
    with pytest.raises(IncompleteCalibrationError, match=r"incomplete \(10 of 20 images\)"):
        open_calibration(tmp_path / "c.h5")


# --- resuming ----------------------------------------------------------------------------------------------------

def test_resume_after_crash_equals_uninterrupted_run(tmp_path: Path, images: torch.Tensor) -> None:
    model = tiny_model()
    reference = read_all(run(model, images, tmp_path / "ref.h5", size=3))
    path = tmp_path / "c.h5"
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(model, images, path, size=3, crash_after=4)
    with pytest.raises(IncompleteCalibrationError, match=r"incomplete \(12 of 20 images\).*resume"):
        open_calibration(path)
    run(model, images, path, size=3)
    assert_same_store(reference, read_all(path), exact=True)


def test_resume_with_straddling_batch(tmp_path: Path, images: torch.Tensor) -> None:
    model = tiny_model()
    reference = read_all(run(model, images, tmp_path / "ref.h5", size=3))
    path = tmp_path / "c.h5"
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(model, images, path, size=3, crash_after=2)  # 6 images stored
    run(model, images, path, size=4)  # batch 4..7 straddles: only 6, 7 kept
    assert_same_store(reference, read_all(path), exact=False)


def test_resume_truncates_half_written_batch(tmp_path: Path, images: torch.Tensor) -> None:
    model = tiny_model()
    reference = read_all(run(model, images, tmp_path / "ref.h5", size=3))
    path = tmp_path / "c.h5"
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(model, images, path, size=3, crash_after=3)  # 9 images stored
    with h5py.File(path, "r+") as f:
        # rows of a batch written without updating committed_rows
        g = f["layers/0"]
        n = g["responses"].shape[0]
        for key, row in (("responses", np.full(4, 99.0)), ("image_ordinal", 9), ("position", [1, 1])):
            g[key].resize(n + 7, axis=0)
            g[key][n:] = row
        # a layer whose committed_rows moved on before the file's n_images_done did
        g = f["layers/5"]
        n = g["responses"].shape[0]
        for key, row in (("responses", np.full(5, 99.0)), ("image_ordinal", 9), ("position", [0, 0])):
            g[key].resize(n + 1, axis=0)
            g[key][n:] = row
        g.attrs["committed_rows"] = n + 1
    run(model, images, path, size=3)
    assert_same_store(reference, read_all(path), exact=True)


# --- refusals ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(layer_names=["0", "2"]), "layers differ"),
        (dict(seed=4), r"seed: 3 != 4"),
        (dict(meta={"model": "resnet18", "dataset": "random"}), r"meta\.model: 'tiny' != 'resnet18'"),
        (dict(positions_per_image=None), r"positions_per_image: 5 != all"),
        (dict(image_ids=np.arange(1, N_IMAGES + 1)), "image_ids differ"),
        (dict(n_images=N_IMAGES - 1), "image count"),
    ],
)
def test_foreign_file_is_refused(tmp_path: Path, images: torch.Tensor, change: dict, message: str) -> None:
    model = tiny_model()
    path = tmp_path / "c.h5"
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(model, images, path, size=3, crash_after=1)
    settings = dict(n_images=N_IMAGES, seed=3, positions_per_image=5, meta=META, progress=False)
    layer_names = change.pop("layer_names", LAYERS)
    settings.update(change)
    with pytest.raises(CalibrationMismatchError, match=message) as info:
        calibrate(model, batches_of(images, 3), layer_names, path, **settings)
    assert "--calib-file" in str(info.value) and "delete" in str(info.value)


def test_layer_channels_mismatch_and_non_calibration_files(tmp_path: Path) -> None:
    options = dict(seed=0, positions_per_image=2, image_ids=np.arange(3), meta={})
    CalibrationWriter.open(tmp_path / "c.h5", layers={"a": (4, "conv")}, **options).close()
    with pytest.raises(CalibrationMismatchError, match=r"layer 'a': file has 4 channels \(conv\), requested 5"):
        CalibrationWriter.open(tmp_path / "c.h5", layers={"a": (5, "conv")}, **options)
    (tmp_path / "text.h5").write_text("not hdf5")
    with pytest.raises(CalibrationMismatchError, match="not an HDF5"):
        CalibrationWriter.open(tmp_path / "text.h5", layers={"a": (4, "conv")}, **options)
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f.attrs["something"] = 1
    with pytest.raises(CalibrationMismatchError, match="no format_version"):
        open_calibration(tmp_path / "other.h5")
    with h5py.File(tmp_path / "c.h5", "r+") as f:
        f.attrs["format_version"] = 1  # version 1 drew positions with another sampler
    with pytest.raises(CalibrationMismatchError, match="format version 1; this code reads version 4"):
        open_calibration(tmp_path / "c.h5")
    with h5py.File(tmp_path / "c.h5", "r+") as f:
        f.attrs["format_version"] = 3  # version 3 kept input statistics as raw sums
    with pytest.raises(CalibrationMismatchError, match="format version 3; this code reads version 4; pass another"):
        open_calibration(tmp_path / "c.h5")
    with pytest.raises(CalibrationMismatchError, match="format version 3; this code reads version 4"):
        CalibrationWriter.open(tmp_path / "c.h5", layers={"a": (4, "conv")}, **options)


def test_writer_append_checks_and_escaped_names(tmp_path: Path) -> None:
    layers = {"features/0.conv": (3, "conv"), "fc": (2, "linear")}
    with CalibrationWriter.open(tmp_path / "c.h5", layers=layers, seed=0, positions_per_image=None,
                                image_ids=np.arange(2), meta={"model": "m"}) as writer:
        with pytest.raises(ValueError, match=r"ordinals must be sorted and in \[0, 1\)"):
            writer.append({"fc": (np.zeros((1, 2)), np.array([1]), np.zeros((1, 2)))}, images_done=1)
        with pytest.raises(ValueError, match="expected responses \\(n, 2\\)"):
            writer.append({"fc": (np.zeros((1, 3)), np.array([0]), np.zeros((1, 2)))}, images_done=1)
        with pytest.raises(ValueError, match="unknown layers"):
            writer.append({"nope": (np.zeros((1, 2)), np.array([0]), np.zeros((1, 2)))}, images_done=1)
        writer.append({"features/0.conv": (np.ones((2, 3)), np.array([0, 1]), np.zeros((2, 2))),
                       "fc": (np.ones((2, 2)), np.array([0, 1]), np.zeros((2, 2)))}, images_done=2)
        writer.mark_complete()
    with open_calibration(tmp_path / "c.h5") as reader:
        assert reader.layers == ["features/0.conv", "fc"]
        np.testing.assert_array_equal(reader.responses("features/0.conv"), np.ones((2, 3), np.float32))
        with pytest.raises(KeyError, match="not in calibration file"):
            reader.responses("conv")


# --- Linear layers --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(6, 5), (6, 7, 5), (6, 2, 3, 5)])
def test_linear_responses(tmp_path: Path, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4))
    x = torch.randn(*shape)
    path = calibrate(model, list(x.split(4)), ["0"], tmp_path / "c.h5", n_images=6, positions_per_image=3,
                     progress=False)
    with torch.no_grad():
        out = model(x).reshape(shape[0], -1, 4)  # (B, P, F)
    n_positions = out.shape[1]
    with open_calibration(path) as reader:
        assert reader.kind("0") == "linear" and reader.channels("0") == 4
        ordinal, position = reader.image_ordinal("0"), reader.position("0")
        assert reader.n_samples("0") == 6 * min(3, n_positions)
        assert np.all(position[:, 1] == 0) and position[:, 0].max() < n_positions
        expected = out[torch.from_numpy(ordinal), torch.from_numpy(position[:, 0]).long()].numpy()
        np.testing.assert_allclose(reader.responses("0"), expected, rtol=1e-5, atol=1e-6)


def test_list_batches_to_input_and_bad_arguments(tmp_path: Path, images: torch.Tensor) -> None:
    class ListModel(nn.Module):  # takes a list of images, as torchvision detection models do
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3)

        def forward(self, xs: list[torch.Tensor]) -> torch.Tensor:
            return self.conv(torch.stack(xs))

    model = ListModel()
    items = [(list(batch), torch.zeros(len(batch))) for batch in images[:6].split(4)]
    path = calibrate(model, items, ["conv"], tmp_path / "c.h5", n_images=5, positions_per_image=2,
                     progress=False, to_input=lambda item: item[0])
    with open_calibration(path) as reader:
        np.testing.assert_array_equal(reader.image_ordinal("conv"), np.repeat(np.arange(5), 2))
    with pytest.raises(TypeError, match="to_input"):
        calibrate(model, items, ["conv"], tmp_path / "d.h5", n_images=5, progress=False)
    with pytest.raises(ValueError, match=r"no module named \['conv2'\]"):
        calibrate(model, items, ["conv2"], tmp_path / "e.h5", n_images=5, progress=False)
    with pytest.raises(ValueError, match="positions_per_image must be a positive int or None"):
        calibrate(model, items, ["conv"], tmp_path / "e.h5", n_images=5, positions_per_image=0, progress=False)


def test_package_imports_first_and_shares_the_library_helpers() -> None:
    """calibration takes its torch-only helpers from lowrank_fm (one owner each); lowrank_fm does not import
    calibration at import time (tests/test_import.py), so importing calibration first works: no cycle."""
    code = ("import calibration, calibration.run as run, lowrank_fm.batches as b, lowrank_fm.distributed as d; "
            "print(run.to_device is b.to_device, calibration.check_finite_images is b.check_finite_images, "
            "calibration.process_group is d.world)")
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "True", "True"]


def test_complete_file_serves_a_subset_of_its_layers_but_not_a_superset(tmp_path: Path, images: torch.Tensor) -> None:
    model = tiny_model()
    path = tmp_path / "c.h5"
    run(model, images, path, size=4)
    stored = read_all(path)
    options = dict(n_images=N_IMAGES, seed=3, positions_per_image=5, meta=META, progress=False)
    # reused as it is: the batches are never drawn
    calibrate(model, batches_of(images, 4, crash_after=0), ["0", "5"], path, **options)
    assert_same_store(stored, read_all(path), exact=True)
    partial = tmp_path / "partial.h5"
    calibrate(model, batches_of(images, 4), ["0", "5"], partial, **options)
    with pytest.raises(CalibrationMismatchError, match="layers differ"):
        calibrate(model, batches_of(images, 4), LAYERS, partial, **options)


def test_statistics_sections_round_trip_through_the_public_store_api(tmp_path: Path) -> None:
    options = dict(layers={"a/b": (2, "conv"), "fc": (3, "linear")}, seed=0, positions_per_image=None,
                   image_ids=np.arange(2), meta=None)
    with CalibrationWriter.open(tmp_path / "c.h5", **options) as writer:
        assert writer.stats_images_done("extra") is None and writer.stats_layers("extra") == []
        assert writer.read_stats("extra", "a/b") is None
        writer.append({}, images_done=2)
        writer.write_stats("extra", {"a/b": {"count": 7, "mean": np.arange(3.0)}}, images_done=1)
        writer.write_stats("extra", {"a/b": {"mean": np.ones(4)}, "fc": {"count": 2}}, images_done=2)
        for name in ("layers", "Extra", "a/b", ""):
            with pytest.raises(ValueError, match="a statistics section must be a name of lower-case letters"):
                writer.write_stats(name, {}, images_done=2)
        writer.mark_complete()
    with open_calibration(tmp_path / "c.h5") as reader:
        assert reader.stats_images_done("extra") == 2 and sorted(reader.stats_layers("extra")) == ["a/b", "fc"]
        stored = reader.read_stats("extra", "a/b")
        assert stored["count"] == 7 and np.array_equal(stored["mean"], np.ones(4))
        assert reader.read_stats("extra", "fc") == {"count": 2}
    with pytest.raises(ValueError, match="calibration reader for .* is closed"):
        reader.stats_layers("extra")
