"""Spatially separable filters against dense convs built from the reconstructed kernel."""

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from conftest import layer_context
from lowrank_fm.methods import get_method


def test_reduced_rank_is_the_best_separable_kernel():
    torch.manual_seed(1)
    conv = nn.Conv2d(5, 7, 3, padding=1).double()
    x = torch.randn(2, 5, 9, 9, dtype=torch.float64)
    method, ctx = get_method("spatial"), layer_context(conv, x)
    rank = 4
    w = conv.weight.detach().numpy()
    m = w.transpose(1, 2, 0, 3).reshape(5 * 3, 7 * 3)  # rows (c, i), columns (n, j)
    u, s, vt = np.linalg.svd(m, full_matrices=False)
    best = ((u[:, :rank] * s[:rank]) @ vt[:rank]).reshape(5, 3, 7, 3).transpose(2, 0, 1, 3)
    expected = F.conv2d(x, torch.from_numpy(best.copy()), conv.bias, padding=1)
    torch.testing.assert_close(method.build(ctx, rank)(x), expected, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(method.spectrum(ctx), s ** 2, rtol=1e-10)


def test_pointwise_convs_and_linear_layers_are_refused_with_a_reason():
    method = get_method("spatial")
    assert "nothing to separate" in method.supports(nn.Conv2d(3, 4, 1))
    assert "convs only" in method.supports(nn.Linear(3, 4))
    assert method.supports(nn.Conv2d(3, 4, 3)) is None
