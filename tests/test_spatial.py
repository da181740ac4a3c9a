"""Spatially separable filters against dense convs built from the reconstructed kernel."""

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import layer_context
from lowrank_fm.cost import measure_costs
from lowrank_fm.methods import get_method


@pytest.mark.parametrize("kernel,stride,padding,dilation",
                         list(itertools.product([3, (3, 5)], [1, 2, (2, 1)], [0, 1, (1, 2)], [1, 2])))
def test_full_rank_reproduces_the_conv_and_macs_are_the_counted_ones(kernel, stride, padding, dilation):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, kernel, stride=stride, padding=padding, dilation=dilation).double()
    x = torch.randn(2, 4, 13, 12, dtype=torch.float64)
    method, ctx = get_method("spatial"), layer_context(conv, x)
    chain = method.build(ctx, method.full_rank(ctx))
    torch.testing.assert_close(chain(x), conv(x), rtol=1e-9, atol=1e-9)
    counted = sum(c.macs for c in measure_costs(chain, x).values())
    assert method.macs(ctx, method.full_rank(ctx)) == counted


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
