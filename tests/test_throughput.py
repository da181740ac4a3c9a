"""The calibration-throughput benchmark times inference and calibration on the same batches."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lowrank_fm.bench.throughput import calibration_throughput


def test_throughput_reports_both_rates_and_their_ratio(tmp_path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 64, 3))
    batches = list(torch.randn(48, 1, 8, 8, generator=torch.Generator().manual_seed(0)).split(16))
    result = calibration_throughput(model, batches, repeats=2, work_dir=tmp_path)
    assert result["images"] == 48 and result["layers"] == ["0", "3"]
    assert len(result["inference_s"]) == len(result["calibration_s"]) == 2
    # the median of two repeats is their mean
    assert result["inference_images_per_s"] == pytest.approx(48 / (sum(result["inference_s"]) / 2))
    assert result["calibration_images_per_s"] == pytest.approx(48 / (sum(result["calibration_s"]) / 2))
    assert result["ratio"] == pytest.approx(result["calibration_images_per_s"] / result["inference_images_per_s"])
    assert result["store_mb"] > 0 and not list(tmp_path.glob("*.h5"))  # the stores are removed
    with pytest.raises(ValueError, match="repeats must be a positive int, got 0"):
        calibration_throughput(model, batches, repeats=0)
