"""The measured-speed benchmark end to end on the embedded vgg-digits model (seconds)."""

import json


from lowrank_fm.allocator import _glibc, _preloaded
from lowrank_fm.bench.plots import matplotlib_available
from lowrank_fm.bench.speed_benchmark import SpeedRun, make_plots, run_speed_benchmark, speed_table


def test_speed_benchmark_writes_rows_table_and_plots(tmp_path, vgg_digits):
    out = tmp_path / "latency.jsonl"
    runs = [SpeedRun("vgg-digits", "svd", 1.5, {"method": "svd"}, batch_sizes=(1, 4), export=True),
            SpeedRun("vgg-digits", "svd", 2.0, {"method": "svd", "speed_gate": False}, batch_sizes=(1, 4))]
    rows = run_speed_benchmark(runs, out, eval_images=100, rounds=5)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 2 and lines[0]["label"] == "svd"
    for row in lines:
        assert set(row["measured_speedup"]) == {"1", "4"}
        assert row["provenance"]["threads"] == row["threads"] and row["provenance"]["load_before"] is not None
        assert row["speed"]["baseline"] == "BatchNorm folded in both"
        assert row["speed"]["folded_batchnorm"]["original"] == 4  # vgg-digits: 4 conv + BatchNorm pairs
        for batch, (low, high) in row["speedup_spread"].items():
            assert low <= row["measured_speedup"][batch] <= high
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
    batch1 = rows[0]["speed"]["batches"]["1"]
    assert (f"1: {batch1['measured_speedup']:.2f}x ({batch1['speedup_min']:.2f}-{batch1['speedup_max']:.2f})"
            in table.splitlines()[2])
    older = {k: v for k, v in rows[0].items() if k != "provenance"}  # a row without provenance: not shown
    rerun = {**rows[1], "theoretical_speedup": 9.0}  # the same cell re-run: replaces its row
    rerun["provenance"] = {**rows[1]["provenance"], "date_utc": "2999-01-01T00:00:00Z"}
    lines_shown = speed_table([older, rows[1], rerun]).splitlines()[2:]
    assert len(lines_shown) == 1 and "| 9.00x |" in lines_shown[0]
    if matplotlib_available() is None:
        written = make_plots(rows, tmp_path)
        assert {p.name for p in written} == {"accuracy_vs_speedup_vgg-digits.png", "spectra_vgg-digits_svd_1.5x.png"}


def test_every_cell_of_the_speed_grids_makes_a_valid_configuration_and_method():
    """Each cell's settings are fields of the run or settings of its method, and the method constructs with
    them; the default a user gets under --speedup (auto, allocation output) is timed on both fmnist models."""
    from lowrank_fm.bench.speed_benchmark import SPEED_GRID, SPEED_GRID_CUDA
    from lowrank_fm.config import ApproxConfig
    from lowrank_fm.methods import get_method

    for grid in (SPEED_GRID, SPEED_GRID_CUDA):
        for model, runs in grid.items():
            for run in runs:
                config = ApproxConfig(speedup=run.speedup, seed=0).replace(**run.settings)
                assert get_method(config.method, config.method_settings).name == run.settings["method"], (model, run)
                if "(weight-only)" in run.label:  # the weights as the method computes them: no correction
                    assert config.correction is False, (model, run.label)
    default = ApproxConfig(speedup=3.0)
    for model in ("vgg-fmnist", "resnet-fmnist"):
        autos = [r for r in SPEED_GRID[model] if r.label == "auto, allocation output" and r.speedup == 3.0]
        assert len(autos) == 1, model
        config = ApproxConfig(speedup=3.0).replace(**autos[0].settings)
        assert (config.method, config.allocation, config.speed_gate) == ("auto", "output", default.speed_gate), model
