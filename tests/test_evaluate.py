"""Top-1 hits per image and the paired standard error of a top-1 drop."""

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from lowrank_fm.zoo.evaluate import accuracy, drop_standard_error


def test_per_image_hits_are_the_argmax_matches_and_average_to_top1():
    torch.manual_seed(0)
    images, labels = torch.randn(300, 8), torch.randint(0, 4, (300,))
    model = nn.Linear(8, 4)
    result = accuracy(model, TensorDataset(images, labels), batch_size=64, progress=False, per_image=True)
    with torch.no_grad():
        expected = (model(images).argmax(1) == labels).numpy()
    assert result["top1_hits"].dtype == bool and result["top1_hits"].shape == (300,)
    assert np.array_equal(result["top1_hits"], expected)
    assert result["top1"] == pytest.approx(expected.mean())
    assert "top1_hits" not in accuracy(model, TensorDataset(images, labels), progress=False)


def test_drop_standard_error_by_hand_and_from_the_discordant_pairs():
    # d = [0, 1, -1, 1]: mean 0.25, sample variance ((-.25)^2 + .75^2 + (-1.25)^2 + .75^2) / 3 = 2.75 / 3
    assert drop_standard_error([1, 1, 0, 1], [1, 0, 1, 0]) == pytest.approx(np.sqrt(2.75 / 3 / 4))
    rng = np.random.default_rng(1)
    before = rng.random(1000) < 0.9
    after = before.copy()
    lost = rng.choice(np.flatnonzero(before), 40, replace=False)
    gained = rng.choice(np.flatnonzero(~before), 15, replace=False)
    after[lost], after[gained] = False, True
    n, b, c = 1000, 40, 15
    mcnemar = np.sqrt((b + c - (b - c) ** 2 / n) / (n - 1) / n)
    assert drop_standard_error(before, after) == pytest.approx(mcnemar, rel=1e-12)
    assert drop_standard_error(before, before) == 0.0
    with pytest.raises(ValueError, match="same images"):
        drop_standard_error([1, 0, 1], [1, 0])
