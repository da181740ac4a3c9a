"""The table over calibration draws (lowrank_fm.bench.draws): means, standard errors and paired differences
checked against numbers worked out by hand."""

import math

import pytest

from lowrank_fm.bench.draws import draw_summary, draws_table


def _row(label, seed, drop, date="2026-11-27T10:00:00Z", commit="a" * 40, model="m", target=4.0):
    return {"model": model, "label": label, "target_speedup": target, "eval_images": 10000,
            "calibration_seed": seed, "drop_points": drop, "theoretical_speedup": 4.0, "approximate_wall_s": 10.0,
            "provenance": {"commit": commit, "date_utc": date}}


AUTO, CP = "auto, allocation output", "cp + correction"


def test_means_standard_errors_and_paired_differences_by_hand():
    rows = [_row(AUTO, 0, 0.30), _row(AUTO, 1, 0.50), _row(AUTO, 2, 0.40),
            _row(CP, 0, 0.20), _row(CP, 1, 0.60), _row(CP, 2, 0.10)]
    summary = {s["label"]: s for s in draw_summary(rows)}
    auto, cp = summary[AUTO], summary[CP]
    assert auto["seeds"] == [0, 1, 2] and auto["drops"] == [0.30, 0.50, 0.40]
    # auto: mean 0.4, sample std 0.1, SE 0.1 / sqrt(3)
    assert auto["mean"] == pytest.approx(0.4) and auto["se"] == pytest.approx(0.1 / math.sqrt(3))
    assert auto["paired"] is None  # the reference itself
    # cp: mean 0.3, sample std sqrt(0.07), SE 0.153; deltas -0.1, +0.1, -0.3 -> mean -0.1, sample std 0.2, SE 0.2 / sqrt(3)
    assert cp["mean"] == pytest.approx(0.3)
    mean, se, draws = cp["paired"]
    assert (mean, draws) == (pytest.approx(-0.1), 3) and se == pytest.approx(0.2 / math.sqrt(3))
    table = draws_table(rows)
    assert "| m | 4x | cp + correction | 3 (0, 1, 2) | 0.20 / 0.60 / 0.10 | 0.30 ± 0.15 | -0.10 ± 0.12 |" in table


def test_a_rerun_of_a_draw_replaces_it_and_single_draws_are_left_out():
    rows = [_row(AUTO, 0, 0.30), _row(AUTO, 1, 0.50), _row(AUTO, 1, 0.70, date="2026-11-28T00:00:00Z",
                                                            commit="b" * 40),
            _row(CP, 0, 0.20)]  # cp on one draw only: no spread to report
    summary = draw_summary(rows)
    assert [s["label"] for s in summary] == [AUTO]
    assert summary[0]["drops"] == [0.30, 0.70] and summary[0]["commits"] == ["aaaaaaaa", "bbbbbbbb"]
    assert "cp + correction" not in draws_table(rows)


def test_paired_difference_uses_only_the_draws_both_methods_have():
    rows = [_row(AUTO, 0, 0.30), _row(AUTO, 1, 0.50), _row(AUTO, 2, 0.90),
            _row(CP, 0, 0.40), _row(CP, 1, 0.40), _row(CP, 3, 0.00)]
    cp = next(s for s in draw_summary(rows) if s["label"] == CP)
    mean, se, draws = cp["paired"]  # draws 0 and 1: +0.1 and -0.1
    assert draws == 2 and mean == pytest.approx(0.0) and se == pytest.approx(math.sqrt(0.02) / math.sqrt(2))
