"""The README's tables are what `python scripts/benchmark.py --readme` makes from the committed results files,
and every committed results row carries its provenance."""

import json
from pathlib import Path

import pytest

from lowrank_fm.bench.provenance import read_rows
from lowrank_fm.bench.readme import generated_regions, render_readme, render_table

ROOT = Path(__file__).resolve().parents[1]
PROVENANCE = {"commit", "dirty", "date_utc", "command", "cpu", "cpu_count", "torch", "threads", "load_before",
              "load_after", "allocator"}


def test_readme_tables_are_what_the_script_prints_for_the_results_files():
    text = (ROOT / "README.md").read_text()
    regions = generated_regions(text)
    assert {spec.split()[0] for spec, _ in regions} >= {"accuracy", "speed"}
    for spec, body in regions:
        assert body == render_table(spec, ROOT / "results") + "\n", f"README table '{spec}' is stale: " \
            "run python scripts/benchmark.py --readme"
    assert render_readme(text, ROOT / "results") == text


def test_every_committed_results_row_has_its_provenance():
    files = sorted((ROOT / "results").glob("*.jsonl"))
    assert files
    for path in files:
        for row in read_rows(path):
            assert PROVENANCE <= set(row.get("provenance", {})), path.name


def _row(label, top1_after, date):
    return {"model": "m", "label": label, "target_speedup": 2.0, "theoretical_speedup": 2.0, "top1_before": 0.9,
            "top1_after": top1_after, "drop_points": 100 * (0.9 - top1_after), "approximate_wall_s": 1.0,
            "run_wall_s": 2.0, "eval_images": 10, "provenance": {"date_utc": date}}


def test_render_readme_rewrites_only_the_marked_region(tmp_path):
    rows = [_row("svd (weight-only)", 0.80, "2026-01-01T00:00:00Z"), _row("svd (weight-only)", 0.85, "2026-01-02T00:00:00Z"),
            {k: v for k, v in _row("fm, rmsprop", 0.5, "x").items() if k != "provenance"}]  # archived: not shown
    (tmp_path / "accuracy.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = "intro 1.23\n<!-- generated: accuracy m -->\nold table\n<!-- end generated -->\noutro\n"
    new = render_readme(text, tmp_path)
    assert new.startswith("intro 1.23\n<!-- generated: accuracy m -->\n| model |") and new.endswith(
        "<!-- end generated -->\noutro\n")
    body = generated_regions(new)[0][1].splitlines()
    assert len(body) == 3 and "| m | svd (weight-only) | 2x | 2.00x | 90.00 | 85.00 | 5.00 |" in body[2]
    assert render_readme(new, tmp_path) == new
    with pytest.raises(ValueError, match="unknown README table"):
        render_table("nonsense", tmp_path)


def test_training_table_names_the_gpu_and_keeps_the_latest_row_per_model(tmp_path):
    provenance = {"commit": "abcdef1234", "dirty": False, "date_utc": "2026-11-26T10:00:00Z", "threads": 3}

    def row(model, top1, device, date):
        return {"model": model, "input_size": 32, "test_top1": top1, "test_images": 10000, "epochs": 5,
                "settings": {"batch_size": 256, "lr": 0.1}, "train_seconds": 12.3, "device": device,
                "stored_dtype": "float16", "reproduce": f"python scripts/train_reference.py {model}",
                "provenance": {**provenance, "date_utc": date}}

    rows = [row("a-cifar10", 0.5, "cpu", "2026-11-25T00:00:00Z"), row("a-cifar10", 0.75, "NVIDIA H200", "2026-11-26T00:00:00Z")]
    (tmp_path / "reference_training.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    lines = render_table("training", tmp_path).splitlines()
    assert len(lines) == 3  # header, rule, one row: the later one
    assert "| a-cifar10 | 32 | 0.7500 (10,000 images) | 5 | 256, 0.1 | 12 | NVIDIA H200, 3 thread(s) | float16 |" in lines[2]
