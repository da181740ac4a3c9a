"""The issue-19 table command (``scripts/benchmark.py --torchvision``, lowrank_fm/bench/torchvision_table.py):
its rows, written with provenance, on vgg-digits (seconds), and the line it prints for a missing checkpoint."""

import json

from lowrank_fm.bench.torchvision_table import (TABLE_CELLS, TableCell, missing_checkpoint_line, run_table_cells,
                                                run_torchvision_table, select_cells, torchvision_table)
from lowrank_fm.bench.provenance import append_row, read_rows


def test_rows_on_vgg_digits(tmp_path, digits, vgg_digits):
    out = tmp_path / "torchvision.jsonl"
    cells = (TableCell("tucker2, vbmf ranks", None, {"method": "tucker2", "ranks": "vbmf", "speed_gate": False}),
             TableCell("default (auto), no speed gate", 2.0, {"speed_gate": False, "fit_positions": 8}))
    rows = run_table_cells("vgg-digits", vgg_digits, digits, cells, calib_images=64, eval_images=120,
                           finetune_images=256, latency_batches=(1, 8), latency_rounds=5, latency_min_seconds=0.05,
                           on_row=lambda row: append_row(out, row))
    written = read_rows(out)
    assert [r["label"] for r in written] == [c.label for c in cells]
    for row in written:
        assert "commit" in row["provenance"] and "dirty" in row["provenance"]
        assert {"date_utc", "cpu", "torch", "load_before"} <= set(row["provenance"])
        assert row["params_after"] <= row["params_before"] and row["macs_ratio"] >= 1.0
        assert row["params_ratio"] == row["params_before"] / row["params_after"]
        for key in ("top1_before", "top1_after", "top1_finetuned_labels", "top1_finetuned_distill"):
            assert 0.0 <= row[key] <= 1.0, key
        assert row["eval_images"] == 120 and row["calib_images"] == 64
        assert row["finetune"]["labels"]["images_per_epoch"] == 256
        assert set(row["measured_speedup"]) == {"1", "8"} and all(v > 0 for v in row["measured_speedup"].values())
        assert row["top1_before"] > 0.8  # the trained reference model
    fm = written[1]
    assert abs(fm["macs_ratio"] - 2.0) < 0.1 and fm["layers_approximated"] >= 1
    assert rows[0]["ranks"] == written[0]["ranks"]

    table = torchvision_table(written).splitlines()
    assert len(table) == 4
    assert "| vgg-digits | default (auto), no speed gate | 2x |" in "\n".join(table)
    assert "| vgg-digits | tucker2, vbmf ranks | vbmf |" in "\n".join(table)
    assert all(line.endswith("| cpu | 120 |") for line in table[2:])


def test_cells_selected_by_label_and_target_keep_their_order():
    assert [c.speedup for c in select_cells(TABLE_CELLS, ["default (auto), no speed gate"])] == [2.0, 3.0]
    assert [c.label for c in select_cells(TABLE_CELLS, speedups=[2.0])] == ["default (auto), no speed gate",
                                                                            "default (auto), speed gate"]
    assert select_cells(TABLE_CELLS, ["tucker2, vbmf ranks"], [2.0]) == []
    assert select_cells(TABLE_CELLS) == list(TABLE_CELLS)


def test_a_gpu_row_names_its_gpu_in_the_table():
    row = {"model": "vgg16_bn-cifar10", "label": "default (auto), speed gate", "target_speedup": 2.0,
           "params_ratio": 2.5, "macs_ratio": 2.0, "top1_before": 0.88, "top1_after": 0.87, "eval_images": 10000,
           "measured_speedup": {"1": 1.1}, "device": "cuda", "gpu": "NVIDIA H200",
           "provenance": {"date_utc": "2026-11-26T00:00:00Z"}}
    assert "| 1.10x (1) | NVIDIA H200 | 10000 |" in torchvision_table([row])


def test_the_table_names_each_fine_tunes_rate_and_whether_it_is_relative():
    row = {"model": "alexnet-cifar10", "label": "default (auto), speed gate", "target_speedup": 2.0,
           "params_ratio": 5.7, "macs_ratio": 2.0, "top1_before": 0.8053, "top1_after": 0.8053, "eval_images": 10000,
           "top1_finetuned_labels": 0.8073, "top1_finetuned_distill": 0.8040, "measured_speedup": {"1": 2.9},
           "finetune": {"epochs": 1, "labels": {"lr": 3e-3, "lr_per_tensor": "lr * max(RMS, 1e-3)"},
                        "distill": {"lr": 3e-5}}, "device": "cpu", "provenance": {"date_utc": "2026-11-26T00:00:00Z"}}
    assert "| 80.73 | 80.40 | 3e-03 x RMS / 3e-05 | 2.90x (1) |" in torchvision_table([row])
    row["finetune"]["labels"]["kept_start"] = True
    row["top1_finetuned_labels"] = 0.8053
    assert "| 80.53 | 80.53 (start kept) | 80.40 |" in torchvision_table([row])


def test_missing_checkpoint_gives_one_line_and_no_row(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWRANK_FM_CACHE", str(tmp_path / "cache"))
    records = tmp_path / "training.jsonl"
    records.write_text(json.dumps({"model": "alexnet-cifar10", "reproduce":
                                   "python scripts/train_reference.py alexnet-cifar10 --epochs 54"}) + "\n")
    line = missing_checkpoint_line("alexnet-cifar10", records=(records,))
    assert "alexnet-cifar10" in line and "--epochs 54 --results results/reference_training.jsonl" in line
    said = []
    out = tmp_path / "rows.jsonl"
    assert run_torchvision_table(out, ("alexnet-cifar10", "densenet161-cifar10"), say=said.append) == []
    assert not out.exists()
    assert len(said) == 2 and all("scripts/train_reference.py" in s for s in said)
    assert "densenet161-cifar10" in said[1]


def test_a_diverging_finetune_is_recorded_and_the_cells_go_on(digits, vgg_digits, monkeypatch):
    import sys

    import lowrank_fm.finetune  # noqa: F401  (the package's ``finetune`` attribute is the function)

    def diverging(*args, **kwargs):
        raise FloatingPointError("finetune: the loss became inf at epoch 1, step 1")

    monkeypatch.setattr(sys.modules["lowrank_fm.finetune"], "finetune", diverging)
    cells = (TableCell("svd", 1.5, {"method": "svd", "speed_gate": False}),
             TableCell("svd", 2.0, {"method": "svd", "speed_gate": False}))
    rows = run_table_cells("vgg-digits", vgg_digits, digits, cells, calib_images=32, eval_images=60,
                           latency_batches=(1,), latency_rounds=5, latency_min_seconds=0.01)
    assert len(rows) == 2
    for row in rows:
        assert row["top1_finetuned_labels"] is None and row["top1_finetuned_distill"] is None
        assert "inf" in row["finetune"]["labels"]["error"]
    for row in rows:
        row["provenance"] = {"date_utc": "2026-11-26T00:00:00Z"}
    assert "| - | - |" in torchvision_table(rows)
