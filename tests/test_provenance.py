"""Provenance on every results row: fields written by code, the commit checked against git itself."""

import json
import os
import subprocess
from pathlib import Path

import torch

from lowrank_fm.bench.provenance import append_row, current_rows, provenance, read_rows

ROOT = Path(__file__).resolve().parents[1]
FIELDS = {"commit", "dirty", "date_utc", "command", "cpu", "cpu_count", "torch", "threads", "load_before",
          "load_after", "allocator"}


def test_provenance_fields_match_an_independent_look():
    p = provenance([0.5, 0.4, 0.3], argv=["scripts/x.py", "--flag"])
    assert set(p) == FIELDS
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:
        assert p["commit"] == head.stdout.strip() and isinstance(p["dirty"], bool)
    assert p["command"].endswith("scripts/x.py --flag")
    assert p["cpu_count"] == os.cpu_count() and p["torch"] == torch.__version__
    assert p["threads"] == torch.get_num_threads() and p["load_before"] == [0.5, 0.4, 0.3]
    assert p["date_utc"].endswith("Z") and p["date_utc"][:2] == "20"
    assert p["allocator"]["allocator"] in ("reuse", "system")


def test_append_row_writes_provenance_and_keeps_a_workers(tmp_path):
    out = tmp_path / "sub" / "rows.jsonl"
    written = append_row(out, {"model": "m", "x": 1}, load_before=[1.0, 1.0, 1.0])
    append_row(out, {"model": "m", "x": 2, "provenance": {"date_utc": "worker"}})
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert lines[0] == written and lines[0]["provenance"]["load_before"] == [1.0, 1.0, 1.0]
    assert lines[1]["provenance"] == {"date_utc": "worker"}
    assert read_rows(out) == lines and read_rows(tmp_path / "missing.jsonl") == []


def test_current_rows_drop_unprovenanced_and_keep_the_latest_per_cell():
    rows = [{"k": 1, "v": "old"}, {"k": 1, "v": "a", "provenance": {"date_utc": "2026-01-02T00:00:00Z"}},
            {"k": 2, "v": "b", "provenance": {"date_utc": "2026-01-01T00:00:00Z"}},
            {"k": 1, "v": "c", "provenance": {"date_utc": "2026-01-01T00:00:00Z"}},
            {"k": 2, "v": "d", "provenance": {"date_utc": "2026-01-01T00:00:00Z"}}]  # same date: file order
    assert [r["v"] for r in current_rows(rows, lambda r: r["k"])] == ["a", "d"]


def test_code_state_takes_the_commit_named_in_the_environment(monkeypatch):
    from lowrank_fm.bench import provenance as prov

    monkeypatch.setattr(prov, "_git", lambda *args: None)  # a tree copied without .git
    monkeypatch.delenv("LOWRANK_FM_COMMIT", raising=False)
    assert prov.code_state.__wrapped__() == {"commit": None, "dirty": None}
    monkeypatch.setenv("LOWRANK_FM_COMMIT", "abc1234")
    assert prov.code_state.__wrapped__() == {"commit": "abc1234", "dirty": None}
    monkeypatch.setattr(prov, "_git", lambda *args: "537bab8")  # a stale .git beside the copy: the name wins
    assert prov.code_state.__wrapped__() == {"commit": "abc1234", "dirty": None}
