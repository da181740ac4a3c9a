"""The measured-speed benchmark end to end on the embedded vgg-digits model (seconds)."""

import json

import pytest

from lowrank_fm.plots import matplotlib_available
from lowrank_fm.speed_benchmark import SpeedRun, make_plots, run_speed_benchmark, speed_table


def test_speed_benchmark_writes_rows_table_and_plots(tmp_path, vgg_digits):
    out = tmp_path / "latency.jsonl"
    runs = [SpeedRun("vgg-digits", "svd", 1.5, {"method": "svd"}, batch_sizes=(1, 4), export=True),
            SpeedRun("vgg-digits", "svd", 2.0, {"method": "svd", "speed_gate": False}, batch_sizes=(1, 4))]
    rows = run_speed_benchmark(runs, out, eval_images=100, repeats=2)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 2 and lines[0]["label"] == "svd"
    for row in lines:
        assert set(row["measured_speedup"]) == {"1", "4"}
        assert row["threads"] >= 1 and row["speed"]["device"] == "cpu"
        assert 0.0 <= row["top1_after"] <= 1.0 and row["theoretical_speedup"] >= 1.0
        assert row["mode"].startswith("accuracy")
    assert lines[1]["theoretical_speedup"] > 1.0  # ungated (gated, this tiny model's layers may all be kept)
    assert "speed_gate" in lines[0]["selection"] and "speed_gate" not in lines[1]["selection"]
    assert lines[0]["export"]["torchscript"]["parity"]
    table = speed_table(rows)
    assert table.count("| vgg-digits | svd |") == 2
    if matplotlib_available() is None:
        written = make_plots(rows, tmp_path)
        assert {p.name for p in written} == {"accuracy_vs_speedup_vgg-digits.png", "spectra_vgg-digits_svd_1.5x.png"}
