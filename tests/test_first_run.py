"""The first run a user makes: ``python scripts/approximate.py`` with no arguments approximates the shipped
vgg-fmnist on the embedded Fashion-MNIST sample (real model, real data, nothing to download)."""

from __future__ import annotations

import hashlib
import json
import re

import numpy as np
import pytest
import torch

from lowrank_fm.cli import DEFAULT_DATASET, DEFAULT_MODEL, calibration_indices, main
from lowrank_fm.zoo.data import EMBEDDED_DIR, FASHION_MNIST_SAMPLE, DataNotFoundError, load_dataset
from lowrank_fm.zoo.models import checkpoint_record


def test_embedded_sample_is_the_documented_file():
    readme = (EMBEDDED_DIR / "README.md").read_text()
    recorded = re.search(r"sha256 `([0-9a-f]{64})`", readme).group(1)
    assert hashlib.sha256(FASHION_MNIST_SAMPLE.read_bytes()).hexdigest() == recorded
    assert FASHION_MNIST_SAMPLE.stat().st_size < 6_000_000  # "a few MB" inside the package
    sample = load_dataset("fashion-mnist-sample")
    assert len(sample.train) == 600 and len(sample.test) == 10000
    np.testing.assert_array_equal(sample.calibration_sample, calibration_indices(60000, 0.01, None, 0))


def test_embedded_sample_equals_the_full_data_sets_images():
    """The sample holds exactly the full split's seed-0 calibration draw and its whole test split."""
    try:
        full = load_dataset("fashion-mnist")
    except DataNotFoundError as error:
        pytest.skip(f"full Fashion-MNIST not installed: {error}")
    sample = load_dataset("fashion-mnist-sample")
    ids = calibration_indices(len(full.train), 0.01, None, 0)
    torch.testing.assert_close(sample.train.tensors[0], full.train.tensors[0][torch.from_numpy(ids)], rtol=0, atol=0)
    torch.testing.assert_close(sample.train.tensors[1], full.train.tensors[1][torch.from_numpy(ids)])
    torch.testing.assert_close(sample.test.tensors[0], full.test.tensors[0], rtol=0, atol=0)
    torch.testing.assert_close(sample.test.tensors[1], full.test.tensors[1])


def test_more_calibration_images_than_embedded_is_one_clear_error(tmp_path, capsys):
    code = main(["--calib-images", "700", "--out", str(tmp_path / "out"), "--quiet"])
    assert code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --calib-images 700: the embedded fashion-mnist-sample holds 600")
    assert "--dataset fashion-mnist" in err


@pytest.mark.slow
def test_default_run_shows_the_method_on_real_data(tmp_path, capsys):
    """The README's first command, as a user runs it (the speed gate on): real model, 600 calibration images
    (1%), the full test split, a picture, and at most 1 point of top-1 lost."""
    h5py = pytest.importorskip("h5py")
    out = tmp_path / "first"
    assert main(["--out", str(out), "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert (report["model"], report["dataset"]) == (DEFAULT_MODEL, DEFAULT_DATASET)
    assert report["method"] == "fm" and report["config"]["method"] is None and report["config"]["energy"] == 0.95
    with h5py.File(out / "calibration.h5", "r") as store:
        np.testing.assert_array_equal(store["image_ids"][()], calibration_indices(60000, 0.01, None, 0))
    accuracy = report["accuracy"]
    assert accuracy["eval_images"] == 10000
    assert accuracy["top1_before"] == pytest.approx(checkpoint_record("vgg-fmnist")["test_top1"], abs=1e-4)
    assert accuracy["top1_before"] - accuracy["top1_after"] <= 0.010
    assert set(report["latency"]["batches"]) == {"1", "32"} and report["latency"]["threads"] == 1
    for layer in report["layers"]:
        assert layer["status"] == "approximated" or layer["reason"], layer
    picture = out / "spectra.png"
    if picture.exists():  # drawn whenever matplotlib is installed (the test extra installs it)
        assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert "spectra.png" in printed
    assert "accuracy: top-1" in printed and "totals:" in printed
    latency_lines = [line.strip() for line in printed.splitlines() if "latency (BatchNorm folded in both)" in line]
    assert len(latency_lines) == 2  # batch 32 (the report's headline) and batch 1
    assert ", batch 32, 1 thread" in latency_lines[0] and ", batch 1, 1 thread" in latency_lines[1]
    assert report["latency"]["baseline"] == "BatchNorm folded in both"
