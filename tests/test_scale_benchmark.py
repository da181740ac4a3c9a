"""The scale benchmark end to end in one process on a tiny ImageFolder (seconds): one row with the report's
per-stage timing, plain inference over the same images, and the peak memory."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def test_scale_benchmark_writes_a_row_with_stage_timings(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import scale_benchmark
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for label in ("a", "b"):
            folder = tmp_path / "data" / split / label
            folder.mkdir(parents=True)
            for k in range(3):
                Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(folder / f"{k}.png")
    out = tmp_path / "scale.jsonl"
    threads = torch.get_num_threads()  # the script sets one thread for its process
    common = ["--model", "resnet18", "--data-dir", str(tmp_path / "data"), "--images", "6", "--image-size", "32",
              "--batch-size", "4", "--calib-dir", str(tmp_path), "--out", str(out)]
    try:
        done = scale_benchmark.main(common)
        replayed = scale_benchmark.main([*common, "--positions-per-image", "4", "--fit-positions", "store"])
    finally:
        torch.set_num_threads(threads)
    assert done == 0 and replayed == 0
    row, store_row = [json.loads(line) for line in out.read_text().splitlines()]
    assert (row["fit_positions"], row["positions_per_image"]) == (64, 10)
    assert (store_row["fit_positions"], store_row["positions_per_image"]) == (None, 4)
    assert len(row["provenance"]["load_before"]) == 3

    from lowrank_fm.bench.readme import render_table

    table = render_table("scale", tmp_path).splitlines()
    assert len(table) == 4 and "64 drawn positions, original alongside" in table[2] and "the store's 4 positions" in table[3]
    assert row["kind"] == "scale" and row["processes"] == 1 and row["images"] == 6
    assert {"fold_s", "calibrate_s", "statistics_s", "plan_s", "build_s"} <= set(row["timing"])
    assert row["inference_images_per_s"] > 0 and row["pass_over_inference"] > 0
    assert len(row["peak_rss_mb_per_rank"]) == 1 and row["provenance"]["threads"] == 1
    # images per second of each stage and the linear projection to ImageNet's 1% (12,811 images)
    # (from the stage times before the row rounds them to milliseconds)
    approx = lambda value: pytest.approx(value, rel=0.05, abs=0.2)  # noqa: E731
    assert row["images_per_s"]["calibrate"] == approx(6 / row["timing"]["calibrate_s"])
    assert row["projected_imagenet_1pct_s"]["layerwise_pass"] == approx(row["timing"]["build_s"] * 12_811 / 6)
    assert row["projected_imagenet_1pct_s"]["inference"] == approx(row["inference_s"] * 12_811 / 6)
