"""The measured-speed benchmark end to end on the embedded vgg-digits model (seconds)."""

import json

import pytest

from lowrank_fm.allocator import _glibc, _preloaded
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
        if _glibc() is not None and _preloaded() is None:  # both allocator settings timed, the first is the row's
            assert set(row["measured_speedup_by_allocator"]) == {"reuse", "system"}
            assert row["speed"]["allocator"]["allocator"] == "reuse"
            assert row["measured_speedup_by_allocator"]["reuse"] == row["measured_speedup"]
    assert lines[1]["theoretical_speedup"] > 1.0  # ungated (gated, this tiny model's layers may all be kept)
    assert "speed_gate" in lines[0]["selection"] and "speed_gate" not in lines[1]["selection"]
    assert lines[0]["export"]["torchscript"]["parity"]
    table = speed_table(rows)
    assert table.count("| vgg-digits | svd |") == 2
    assert "measured, system allocator" in table.splitlines()[0]
    older = {**rows[0], "measured_speedup": {"1": 0.5}}  # a row from before allocators were recorded
    older.pop("measured_speedup_by_allocator")
    assert "| - | 1: 0.50x |" in speed_table([older])
    if matplotlib_available() is None:
        written = make_plots(rows, tmp_path)
        assert {p.name for p in written} == {"accuracy_vs_speedup_vgg-digits.png", "spectra_vgg-digits_svd_1.5x.png"}
