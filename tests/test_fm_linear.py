"""The linear output-feature-map method against independent dense computations."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowrank_fm.layers import ConvChain, LinearChain, chain_from_spec
from lowrank_fm.methods import LayerContext, ResponseStats, get_method
from lowrank_fm.stats import principal_components

def _stats_from_outputs(y: torch.Tensor) -> ResponseStats:
    """Statistics of every position of a conv output (N, d, H, W), computed directly."""
    flat = y.permute(0, 2, 3, 1).reshape(-1, y.shape[1]).double().numpy() if y.ndim == 4 else y.double().numpy()
    values, vectors = principal_components(np.cov(flat.T, bias=True))
    return ResponseStats(flat.mean(axis=0), values, vectors, flat.shape[0])


@pytest.mark.parametrize("kernel,stride,padding,dilation", [(3, 1, 1, 1), ((3, 1), 2, (1, 2), 2), (5, 2, 0, 1)])
def test_reduced_rank_equals_dense_conv_of_reconstructed_kernel(kernel, stride, padding, dilation):
    torch.manual_seed(1)
    conv = nn.Conv2d(5, 9, kernel, stride=stride, padding=padding, dilation=dilation).double().eval()
    x = torch.randn(3, 5, 12, 12, dtype=torch.float64)
    y = conv(x).detach()
    stats = _stats_from_outputs(y)
    rank = 4
    ctx = LayerContext("conv", conv, y.shape[2] * y.shape[3], stats)
    chain = get_method("fm-linear").build(ctx, rank)
    assert isinstance(chain, ConvChain) and chain.rank == rank
    U = torch.from_numpy(stats.eigenvectors[:, :rank])
    P = U @ U.T
    ybar = torch.from_numpy(stats.mean)
    dense_w = torch.einsum("ij,jckl->ickl", P, conv.weight.detach())
    dense_b = P @ conv.bias.detach() + ybar - P @ ybar
    expected = F.conv2d(x, dense_w, dense_b, stride=stride, padding=padding, dilation=dilation)
    with torch.no_grad():
        torch.testing.assert_close(chain(x), expected, rtol=1e-9, atol=1e-9)
    # and the projection is the best rank-4 one for these responses: its error is the discarded energy
    flat = y.permute(0, 2, 3, 1).reshape(-1, 9)
    approx = chain(x).detach().permute(0, 2, 3, 1).reshape(-1, 9)
    mse = float(((flat - approx) ** 2).sum(dim=1).mean())
    assert mse == pytest.approx(stats.eigenvalues[rank:].sum(), rel=1e-8)


def test_linear_layer_full_and_reduced_rank():
    torch.manual_seed(2)
    linear = nn.Linear(20, 12).double()
    x = torch.randn(200, 20, dtype=torch.float64)
    y = linear(x).detach()
    ctx = LayerContext("fc", linear, 1, _stats_from_outputs(y))
    method = get_method("fm-linear")
    full = method.build(ctx, 12)
    assert isinstance(full, LinearChain)
    torch.testing.assert_close(full(x), y, rtol=1e-9, atol=1e-9)
    assert method.macs_per_position(ctx, 3) == 3 * 20 + 12 * 3


def test_chain_spec_round_trip_rebuilds_the_same_shapes():
    conv = nn.Conv2d(4, 6, (3, 1), stride=(2, 1), padding=(1, 0), dilation=(2, 1))
    y = conv(torch.randn(2, 4, 9, 9)).detach()
    chain = get_method("fm-linear").build(LayerContext("c", conv, 1, _stats_from_outputs(y)), 3)
    rebuilt = chain_from_spec(chain.spec())
    rebuilt.load_state_dict(chain.state_dict())
    x = torch.randn(1, 4, 9, 9)
    torch.testing.assert_close(rebuilt(x), chain(x))
