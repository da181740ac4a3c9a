"""fm-3d: spatial split then the channel method, against dense convs and an explicit vertical conv."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import layer_context
from lowrank_fm.methods import get_method
from lowrank_fm.methods.base import LayerContext, LayerData, ResponseStats
from lowrank_fm.methods.fm3d import refit_horizontal, spatial_rank_for, vertical_responses
from lowrank_fm.methods.spatial import spatial_factors
from lowrank_fm.patches import patches_at
from lowrank_fm.stats import StreamingCovariance, principal_components

GEOMETRIES = list(itertools.product([3, (3, 5)], [1, 2, (2, 1)], [0, 1, (1, 2)], [1, 2]))


def _all_positions(conv, x):
    out = conv(x)
    n, _, h, w = out.shape
    image = torch.arange(n).repeat_interleave(h * w)
    rows = torch.arange(h).repeat_interleave(w).repeat(n)
    cols = torch.arange(w).repeat(h * n)
    return image, torch.stack([rows, cols], 1), out


@pytest.mark.parametrize("kernel,stride,padding,dilation", GEOMETRIES)
def test_vertical_responses_are_the_vertical_conv_seen_through_the_horizontal_window(kernel, stride, padding, dilation):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, kernel, stride=stride, padding=padding, dilation=dilation).double()
    x = torch.randn(2, 3, 13, 12, dtype=torch.float64)
    vertical, _ = spatial_factors(conv.weight.detach(), 4)
    (sh, sw), (ph, pw), (dh, dw) = conv.stride, conv.padding, conv.dilation
    z_map = F.conv2d(x, vertical, None, (sh, 1), (ph, 0), (dh, 1))  # the real vertical conv
    horizontal_geometry = nn.Conv2d(4, 1, (1, conv.kernel_size[1]), stride=(1, sw), padding=(0, pw), dilation=(1, dw))
    image, position, _ = _all_positions(conv, x)
    expected = patches_at(horizontal_geometry, z_map, image, position)
    got = vertical_responses(patches_at(conv, x, image, position), vertical, tuple(conv.kernel_size))
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def _context_with_stats(conv, x):
    ctx = layer_context(conv, x)
    y = conv(x).detach().double().permute(0, 2, 3, 1).reshape(-1, conv.out_channels)
    cov = StreamingCovariance().partial_fit(y.numpy())
    values, vectors = principal_components(cov.covariance_)
    stats = ResponseStats(cov.mean_, values, vectors, cov.n_samples_seen_)
    return LayerContext(ctx.name, conv, ctx.positions, stats, ctx.in_shape, ctx.out_shape), y


def test_reduced_ranks_keep_the_even_split_and_the_channel_stage_is_a_projection():
    # d' = 4 of d = 8 over c = 8, 3x3: K = ceil(4 * 8 * 9 / (24 + 24)) = 6; each stage gains d / d' = 2
    assert spatial_rank_for(4, 8, 8, (3, 3)) == 6
    assert spatial_rank_for(8, 8, 8, (3, 3)) == 24 and spatial_rank_for(1, 8, 8, (3, 3)) == 2
    torch.manual_seed(3)
    conv = nn.Conv2d(8, 8, 3, padding=1).double()
    x = torch.randn(4, 8, 10, 10, dtype=torch.float64)
    ctx, _ = _context_with_stats(conv, x)
    chain = get_method("fm-3d").build(ctx, 4)  # no data: symmetric projection of the separated layer
    convs = [m for m in chain.modules() if isinstance(m, nn.Conv2d)]
    assert [tuple(c.weight.shape) for c in convs] == [(6, 8, 3, 1), (4, 6, 1, 3), (8, 4, 1, 1)]
    # independent: the separated layer (spatial rank 6), projected on the top-4 response directions
    vertical, horizontal = spatial_factors(conv.weight.detach(), 6)
    separated = F.conv2d(F.conv2d(x, vertical, None, 1, (1, 0)), horizontal, conv.bias, 1, (0, 1))
    U = torch.from_numpy(ctx.stats.eigenvectors[:, :4].copy())
    mean = torch.from_numpy(ctx.stats.mean).view(1, -1, 1, 1)
    projected = torch.einsum("de,ef,nfhw->ndhw", U, U.T, separated - mean) + mean
    torch.testing.assert_close(chain(x), projected, rtol=1e-9, atol=1e-9)


def test_horizontal_refit_recovers_a_linear_map_exactly():
    torch.manual_seed(4)
    Z = torch.randn(500, 12, dtype=torch.float64)
    H, b = torch.randn(5, 12, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    got_H, got_b = refit_horizontal(Z, Z @ H.T + b, ridge=0.0)
    torch.testing.assert_close(got_H, H)
    torch.testing.assert_close(got_b, b)


def test_pointwise_layers_take_the_channel_method():
    torch.manual_seed(5)
    conv = nn.Conv2d(6, 8, 1).double()
    x = torch.randn(2, 6, 7, 7, dtype=torch.float64)
    ctx, _ = _context_with_stats(conv, x)
    assert get_method("fm-3d").macs(ctx, 3) == get_method("fm").macs(ctx, 3)
    torch.testing.assert_close(get_method("fm-3d").build(ctx, 3)(x), get_method("fm").build(ctx, 3)(x))


def test_joint_refinement_objective_is_the_built_chains_heldout_error_and_never_worse():
    torch.manual_seed(6)
    conv = nn.Conv2d(4, 6, 3, padding=1).double()
    x = torch.randn(3, 4, 8, 8, dtype=torch.float64)
    ctx, _ = _context_with_stats(conv, x)
    image, position, out = _all_positions(conv, x)
    targets = out.detach()[image, :, position[:, 0], position[:, 1]]
    noisy = x + 0.05 * torch.randn_like(x)  # the "approximated network's" inputs
    data = LayerData(patches_at(conv, noisy, image, position), targets, image == 2, "relu")
    method = get_method("fm-3d", {"solver_steps": 60})
    info = {}
    chain = method.build(ctx, 3, data, info)
    joint = info["joint"]
    assert joint["objective_after"] <= joint["objective_before"]
    with torch.no_grad():  # independent: the real conv chain on the held-out image
        got = torch.relu(chain(noisy[2:3]))[0].permute(1, 2, 0).reshape(-1, 6)
    want = torch.relu(out.detach()[2]).permute(1, 2, 0).reshape(-1, 6)
    assert float((want - got).pow(2).sum(1).mean()) == pytest.approx(joint["objective_after"], rel=1e-6)
