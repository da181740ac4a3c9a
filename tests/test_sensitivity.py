"""Output-error curves for allocation "output", against explicit projections computed by hand."""

import numpy as np
import pytest
import torch
from torch import nn

from lowrank_fm.methods.base import ResponseStats
from lowrank_fm.sensitivity import (joint_output_divergence, output_error_curves, project_responses, rank_for_error,
                                   rank_grid)


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


def test_rank_for_error_is_the_smallest_rank_whose_projection_leaves_at_most_that_error():
    values, mean = np.array([8.0, 4.0, 2.0, 1.0]), np.array([1.0, 0.0, 0.0, 0.0])
    stats = ResponseStats(mean, values, np.eye(4), 100)
    total = values.sum() + 1.0  # E||y||^2 = sum of the eigenvalues + ||ybar||^2 = 16
    left = {r: np.sqrt(values[r:].sum() / total) for r in range(5)}  # sqrt(7/16), sqrt(3/16), sqrt(1/16), 0
    assert rank_for_error(stats, left[1]) == 1
    assert rank_for_error(stats, (left[1] + left[2]) / 2) == 2
    assert rank_for_error(stats, left[3] + 1e-12) == 3
    assert rank_for_error(stats, 0.0) == 4
    assert rank_for_error(stats, 1.0) == 1  # rank 0 (nothing kept) is never proposed


def _two_layer_model(seed: int):
    torch.manual_seed(seed)
    first, second, third = nn.Linear(6, 5).double(), nn.Linear(5, 4).double(), nn.Linear(4, 3).double()
    return first, second, nn.Sequential(first, nn.ReLU(), second, nn.ReLU(), third).eval()


def test_joint_divergence_projects_every_layer_at_once_and_compares_softmax_outputs_by_kl():
    first, second, model = _two_layer_model(2)
    batches = [torch.randn(30, 6, dtype=torch.float64) for _ in range(2)]
    x = torch.cat(batches)
    with torch.no_grad():
        y1 = first(x)
        y2 = second(torch.relu(y1))
        reference = model(x).numpy()
    stats = {"a": _stats(y1.numpy()), "b": _stats(y2.numpy())}
    ranks = {"a": 2, "b": 3}
    errors = {n: float(np.sqrt(s.eigenvalues[ranks[n]:].sum() / (s.eigenvalues.sum() + (s.mean ** 2).sum())))
              for n, s in stats.items()}  # the errors of those ranks' projections (rank_for_error finds them back)
    errors = {n: e * (1 + 1e-9) for n, e in errors.items()}
    got = joint_output_divergence(model, {"a": first, "b": second}, stats, errors, batches)

    def project(v, s, r):
        U = s.eigenvectors[:, :r]
        return (v - s.mean) @ U @ U.T + s.mean

    with torch.no_grad():  # the same network with both projections applied by hand, layer after layer
        h = project(first(x).numpy(), stats["a"], 2)
        h = second(torch.relu(torch.from_numpy(h))).numpy()
        h = project(h, stats["b"], 3)
        out = model[4](torch.relu(torch.from_numpy(h))).numpy()

    def log_softmax(z):
        z = z - z.max(1, keepdims=True)
        return z - np.log(np.exp(z).sum(1, keepdims=True))

    p, q = log_softmax(reference), log_softmax(out)
    expected = float(np.mean(np.sum(np.exp(p) * (p - q), axis=1)))
    assert expected > 1e-4 and got == pytest.approx(expected, rel=1e-9)
    # one layer alone moves the outputs less than both together here, and no error leaves them unchanged
    alone = joint_output_divergence(model, {"a": first}, {"a": stats["a"]}, {"a": errors["a"]}, batches)
    assert 0 < alone < got
    assert joint_output_divergence(model, {"a": first}, {"a": stats["a"]}, {"a": 0.0}, batches) == pytest.approx(0, abs=1e-12)
    assert len(first._forward_hooks) == 0 and len(second._forward_hooks) == 0  # hooks removed


def test_joint_divergence_of_non_class_outputs_is_the_relative_squared_error():
    torch.manual_seed(3)
    conv, head = nn.Conv2d(2, 4, 3, padding=1).double(), nn.Conv2d(4, 3, 1).double()
    model = nn.Sequential(conv, nn.ReLU(), head).eval()
    batches = [torch.randn(5, 2, 6, 6, dtype=torch.float64)]
    with torch.no_grad():
        y = conv(batches[0])
        reference = model(batches[0]).numpy()
    stats = _stats(y.permute(0, 2, 3, 1).reshape(-1, 4).numpy())
    error = float(np.sqrt(stats.eigenvalues[1:].sum() / (stats.eigenvalues.sum() + (stats.mean ** 2).sum())))
    got = joint_output_divergence(model, {"c": conv}, {"c": stats}, {"c": error}, batches)
    rows = y.permute(0, 2, 3, 1).reshape(-1, 4).numpy()
    U = stats.eigenvectors[:, :1]
    projected = torch.from_numpy(((rows - stats.mean) @ U @ U.T + stats.mean).reshape(5, 6, 6, 4)).permute(0, 3, 1, 2)
    with torch.no_grad():
        out = head(torch.relu(projected)).numpy()
    assert got == pytest.approx(((out - reference) ** 2).sum() / (reference ** 2).sum(), rel=1e-9)
