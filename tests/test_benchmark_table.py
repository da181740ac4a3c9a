"""The benchmark's Markdown table: grid order within a model and target, a re-run replaces the earlier row."""

from lowrank_fm.bench.benchmark import markdown_table


def _row(label, target, top1_after, model="vgg-fmnist", date="2026-11-25T00:00:00Z"):
    return {"model": model, "label": label, "target_speedup": target, "theoretical_speedup": target,
            "top1_before": 0.9, "top1_after": top1_after, "drop_points": 100 * (0.9 - top1_after),
            "approximate_wall_s": 1.0, "run_wall_s": 2.0, "provenance": {"date_utc": date}}


def test_rerun_replaces_the_earlier_row_and_rows_follow_the_grid_order():
    rows = [_row("fm-3d, rmsprop", 3.0, 0.80), _row("svd (weight-only)", 3.0, 0.50), _row("fm-3d, rmsprop", 3.0, 0.85),
            _row("svd (weight-only)", 2.0, 0.70)]
    lines = markdown_table(rows).splitlines()[2:]
    assert len(lines) == 3
    assert lines[0].startswith("| vgg-fmnist | svd (weight-only) | 2x |")
    assert lines[1].startswith("| vgg-fmnist | svd (weight-only) | 3x |")
    assert "| fm-3d, rmsprop | 3x |" in lines[2] and "| 85.00 | 5.00 |" in lines[2]


def test_the_drop_shows_its_standard_error_where_the_row_has_one():
    plain, with_se = _row("svd (weight-only)", 2.0, 0.85), {**_row("svd (weight-only)", 3.0, 0.85), "drop_se_points": 0.123}
    lines = markdown_table([plain, with_se]).splitlines()[2:]
    assert "| 85.00 | 5.00 | 1.0 |" in lines[0]
    assert "| 85.00 | 5.00 ± 0.12 | 1.0 |" in lines[1]


def test_rows_without_provenance_are_not_shown_and_the_latest_date_wins():
    old = {k: v for k, v in _row("svd (weight-only)", 2.0, 0.10).items() if k != "provenance"}
    later = _row("svd (weight-only)", 3.0, 0.60, date="2026-11-25T02:00:00Z")
    earlier = _row("svd (weight-only)", 3.0, 0.40, date="2026-11-25T01:00:00Z")  # written after, dated before
    lines = markdown_table([old, later, earlier]).splitlines()[2:]
    assert lines == [next(l for l in markdown_table([later]).splitlines()[2:])]
    assert "| 60.00 | 30.00 |" in lines[0]


def test_parallel_jobs_give_the_rows_of_a_serial_run(tmp_path, vgg_digits):
    import json

    from lowrank_fm.bench.benchmark import BenchmarkRun, run_benchmark

    grid = {"vgg-digits": [BenchmarkRun("fm-linear (symmetric)", 1.5, {"method": "fm-linear", "speed_gate": False}),
                           BenchmarkRun("svd (weight-only)", 1.5, {"method": "svd", "speed_gate": False})]}
    serial = run_benchmark(grid, tmp_path / "serial.jsonl")
    parallel = run_benchmark(grid, tmp_path / "parallel.jsonl", jobs=2)
    written = [json.loads(line) for line in (tmp_path / "parallel.jsonl").read_text().splitlines()]
    assert len(written) == len(parallel) == 2
    by_label = {r["label"]: r for r in parallel}
    for row in serial:
        other = by_label[row["label"]]
        assert other["ranks"] == row["ranks"]
        assert other["top1_after"] == row["top1_after"]
        assert other["drop_se_points"] == row["drop_se_points"] and 0.0 <= row["drop_se_points"] < 100.0
        assert other["threads"] == 1
    for row in written:  # every row written carries its provenance, made in the process that ran it
        assert row["provenance"]["threads"] == 1 and row["provenance"]["torch"]


def test_every_run_of_the_grid_makes_a_valid_configuration_and_method():
    """Each cell's settings are fields of the run or settings of its method (a setting that moved from one to
    the other, like fm's ``solver``, must still reach its method) and the method constructs with them."""
    from lowrank_fm.bench.benchmark import DEFAULT_GRID, run_config
    from lowrank_fm.methods import get_method

    for model, runs in DEFAULT_GRID.items():
        for run in runs:
            config = run_config(run, seed=0)
            method = get_method(config.method, config.method_settings)
            assert config.speedup == run.speedup and method.name == run.settings["method"], (model, run.label)
            for name, value in run.settings.items():
                assert getattr(config, name, config.method_settings.get(name)) == value, (model, run.label, name)


def test_the_rerun_commands_cover_every_current_cell_once_and_only_those():
    """--all re-runs what the table shows: the latest row of each cell, grouped by model and target, labels in
    grid order; a superseded row adds nothing, a row without provenance (archived style) nothing, and a label
    the grid no longer has is named instead of run."""
    from lowrank_fm.bench.benchmark import rerun_commands

    def row(model, label, target, date):
        return {"model": model, "label": label, "target_speedup": target, "eval_images": 10000,
                "provenance": {"date_utc": date}}

    rows = [row("vgg-fmnist", "fm, rmsprop", 4.0, "2026-01-01"), row("vgg-fmnist", "auto", 4.0, "2026-01-02"),
            row("vgg-fmnist", "spatial (weight-only)", 4.0, "2026-01-03"),
            row("vgg-fmnist", "fm, rmsprop", 4.0, "2026-01-04"),  # re-run of the first cell
            row("vgg-fmnist", "fm, rmsprop", 3.0, "2026-01-05"), row("resnet-fmnist", "fm, rmsprop", 3.0, "2026-01-01"),
            row("vgg-fmnist", "a label from an old grid", 3.0, "2026-01-01"),
            {"model": "vgg-fmnist", "label": "svd (weight-only)", "target_speedup": 4.0, "eval_images": 10000}]
    commands, orphans = rerun_commands(rows)
    assert commands == [
        ["benchmark.py", "--models", "resnet-fmnist", "--speedups", "3", "--labels", "fm, rmsprop"],
        ["benchmark.py", "--models", "vgg-fmnist", "--speedups", "3", "--labels", "fm, rmsprop"],
        ["benchmark.py", "--models", "vgg-fmnist", "--speedups", "4", "--labels", "spatial (weight-only)", "fm, rmsprop",
         "auto"]]
    assert orphans == [("vgg-fmnist", "a label from an old grid", 3.0, 10000)]


def test_a_row_names_the_layers_the_speed_gate_kept(tmp_path, vgg_digits, monkeypatch):
    from lowrank_fm.bench.benchmark import BenchmarkRun, run_benchmark
    from lowrank_fm.speedgate import SpeedGate

    monkeypatch.setattr(SpeedGate, "check", lambda self, name, original, factorized, in_shape: name != "features.3")
    grid = {"vgg-digits": [BenchmarkRun("svd (weight-only)", 1.5, {"method": "svd"}),
                           BenchmarkRun("svd (weight-only), no speed gate", 1.5, {"method": "svd", "speed_gate": False})]}
    gated, ungated = run_benchmark(grid, tmp_path / "rows.jsonl")
    assert gated["speed_gate"]["slower"] == ["features.3"] and gated["speed_gate"]["replans"] == 2
    assert "speed_gate" not in ungated
