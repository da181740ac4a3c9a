"""Output-error curves for allocation "output", against explicit projections computed by hand."""

import numpy as np
import pytest
import torch
from torch import nn

from lowrank_fm.methods.base import ResponseStats
from lowrank_fm.sensitivity import output_error_curves, project_responses, rank_grid


def _stats(y: np.ndarray) -> ResponseStats:
    mean = y.mean(0)
    values, vectors = np.linalg.eigh(np.cov(y.T, bias=True))
    order = np.argsort(values)[::-1]
    return ResponseStats(mean, values[order], vectors[:, order], len(y))


def test_projection_of_conv_maps_equals_the_per_position_matrix_projection():
    torch.manual_seed(0)
    y = torch.randn(2, 5, 3, 4, dtype=torch.float64)
    stats = _stats(y.permute(0, 2, 3, 1).reshape(-1, 5).numpy())
    basis = torch.from_numpy(stats.eigenvectors[:, :2].copy())
    mean = torch.from_numpy(stats.mean)
    got = project_responses(y, mean, basis)
    rows = y.permute(0, 2, 3, 1).reshape(-1, 5)
    expected = (rows - mean) @ basis @ basis.T + mean
    torch.testing.assert_close(got.permute(0, 2, 3, 1).reshape(-1, 5), expected)
    full = torch.from_numpy(stats.eigenvectors.copy())
    torch.testing.assert_close(project_responses(y, mean, full), y)


def test_curves_match_a_hand_computed_output_error_and_never_rise():
    torch.manual_seed(1)
    first, second = nn.Linear(6, 5).double(), nn.Linear(5, 3).double()
    model = nn.Sequential(first, nn.ReLU(), second).eval()
    batches = [torch.randn(40, 6, dtype=torch.float64) for _ in range(2)]
    x = torch.cat(batches)
    with torch.no_grad():
        y = first(x)
        reference = model(x)
    stats = _stats(y.numpy())
    curves = output_error_curves(model, {"0": first}, {"0": stats}, {"0": 5}, batches, points=5)
    curve = curves["0"]
    assert curve.shape == (6,) and curve[5] == pytest.approx(0.0, abs=1e-12)
    assert np.all(np.diff(curve[1:]) <= 1e-15)
    for rank in (1, 2):  # measured ranks on the grid
        U = stats.eigenvectors[:, :rank]
        projected = (y.numpy() - stats.mean) @ U @ U.T + stats.mean
        out = second(torch.relu(torch.from_numpy(projected))).detach().numpy()
        expected = np.sqrt(((out - reference.numpy()) ** 2).sum() / (reference.numpy() ** 2).sum())
        assert curve[rank] == pytest.approx(expected, rel=1e-9)


def test_rank_grid_spans_the_range():
    assert rank_grid(1) == [1]
    grid = rank_grid(100, points=8)
    assert grid[0] == 1 and grid[-1] == 100 and len(grid) <= 9 and grid == sorted(set(grid))


def test_non_tensor_outputs_give_no_curves():
    class DictModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(3, 2)

        def forward(self, x):
            return {"out": self.layer(x)}

    model = DictModel()
    stats = _stats(np.random.default_rng(0).normal(size=(20, 2)))
    assert output_error_curves(model, {"layer": model.layer}, {"layer": stats}, {"layer": 2}, [torch.randn(4, 3)]) is None
