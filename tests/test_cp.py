"""CP decomposition (Lebedev et al. 2015) against dense convs built from the CP-reconstructed kernel."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import layer_context
from lowrank_fm.cost import measure_costs
from lowrank_fm.methods import get_method
from lowrank_fm.methods.cp import cp_als

FAST = {"restarts": 2, "iterations": 15, "ridge": 1e-6}


def _exact_rank_kernel(shape, rank, seed):
    rng = np.random.default_rng(seed)
    factors = [rng.standard_normal((n, rank)) for n in shape]
    return np.einsum("tr,sr,ir,jr->tsij", *factors), factors


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_kernel_of_exact_cp_rank_is_recovered(seed):
    kernel, _ = _exact_rank_kernel((6, 5, 3, 3), 3, seed)
    a_t, a_s, a_h, a_w, fit = cp_als(kernel, 3)
    assert [a.shape for a in (a_t, a_s, a_h, a_w)] == [(6, 3), (5, 3), (3, 3), (3, 3)]
    # independent reconstruction: sum of rank-one outer products
    rebuilt = sum(np.multiply.outer(np.multiply.outer(np.multiply.outer(a_t[:, r], a_s[:, r]), a_h[:, r]), a_w[:, r])
                  for r in range(3))
    error = np.linalg.norm(rebuilt - kernel) / np.linalg.norm(kernel)
    assert error < 1e-6
    assert fit == pytest.approx(1.0 - error, abs=1e-12)


def test_an_exact_rank_conv_is_reproduced_by_the_built_chain():
    kernel, _ = _exact_rank_kernel((6, 5, 3, 3), 3, 3)
    conv = nn.Conv2d(5, 6, 3, padding=1).double()
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(kernel))
    x = torch.randn(2, 5, 8, 9, dtype=torch.float64)
    method = get_method("cp")
    info = {}
    chain = method.build(layer_context(conv, x), 3, None, info)
    torch.testing.assert_close(chain(x), conv(x), rtol=1e-6, atol=1e-6)
    assert info["cp_fit"] > 1 - 1e-6


# the geometry grid is tests/test_method_contract.py's (exactness on an exact-rank kernel, MACs counted)
@pytest.mark.parametrize("kernel,stride,padding,dilation", [(3, 1, 1, 1), ((3, 5), (2, 1), (1, 2), 2)])
def test_chain_is_the_dense_conv_of_the_cp_kernel_and_macs_are_the_counted_ones(kernel, stride, padding, dilation):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, kernel, stride=stride, padding=padding, dilation=dilation).double()
    x = torch.randn(2, 4, 13, 12, dtype=torch.float64)
    method, ctx, rank = get_method("cp", FAST), layer_context(conv, x), 3
    info = {}
    chain = method.build(ctx, rank, None, info)
    a_t, a_s, a_h, a_w, fit = cp_als(conv.weight.detach().numpy(), rank, restarts=2, iterations=15, ridge=1e-6, seed=0)
    cp_kernel = np.einsum("tr,sr,ir,jr->tsij", a_t, a_s, a_h, a_w)
    expected = F.conv2d(x, torch.from_numpy(cp_kernel), conv.bias, stride=conv.stride, padding=conv.padding,
                        dilation=conv.dilation)
    torch.testing.assert_close(chain(x), expected, rtol=1e-9, atol=1e-9)
    assert info == {"cp_fit": pytest.approx(fit, abs=1e-12)}
    assert [c.groups for c in chain] == [1, rank, rank, 1] and chain.rank == rank
    counted = sum(c.macs for c in measure_costs(chain, x).values())
    assert method.macs(ctx, rank) == counted


def test_more_restarts_never_give_a_worse_fit():
    rng = np.random.default_rng(5)
    for trial in range(3):
        kernel = rng.standard_normal((6, 5, 3, 3))
        fits = [cp_als(kernel, 4, restarts=r, iterations=40, seed=trial)[-1] for r in (1, 2, 3, 5)]
        assert all(later >= earlier for earlier, later in zip(fits, fits[1:]))
        assert 0.0 < fits[-1] < 1.0


def test_spectrum_proxy_and_full_rank():
    torch.manual_seed(2)
    conv = nn.Conv2d(5, 7, (3, 2)).double()
    x = torch.randn(1, 5, 6, 6, dtype=torch.float64)
    method, ctx = get_method("cp"), layer_context(conv, x)
    s = np.linalg.svd(conv.weight.detach().numpy().reshape(7, -1), compute_uv=False)
    np.testing.assert_allclose(method.spectrum(ctx), s ** 2, rtol=1e-10)
    assert method.full_rank(ctx) == 7 * 5 * 3 * 2 // 7


def test_zero_kernel_and_bad_arguments():
    *factors, fit = cp_als(np.zeros((3, 2, 3, 3)), 2)
    assert fit == 1.0 and all(np.all(f == 0) for f in factors)
    with pytest.raises(ValueError):
        cp_als(np.zeros((3, 2, 3)), 2)
    with pytest.raises(ValueError):
        cp_als(np.ones((3, 2, 3, 3)), 0)


def test_linear_layers_pointwise_and_grouped_convs_are_refused_with_a_reason():
    method = get_method("cp")
    assert "convs only" in method.supports(nn.Linear(3, 4))
    assert "1x1" in method.supports(nn.Conv2d(3, 4, 1))
    assert "grouped" in method.supports(nn.Conv2d(4, 4, 3, groups=2))  # the base class's reason
    assert method.supports(nn.Conv2d(3, 4, 3)) is None
    assert method.supports(nn.Conv2d(3, 4, (1, 3))) is None
    assert method.needs_responses is False


def test_the_mttkrp_of_every_mode_is_the_unfolding_times_the_khatri_rao_product():
    """Against the definition written out: M_n[i, r] = sum over the other indices of K times the other three
    factors' entries (np.einsum), for a non-cubic kernel (T, S, kh, kw) = (5, 4, 3, 2)."""
    from lowrank_fm.methods.cp import _mttkrp

    rng = np.random.default_rng(4)
    kernel = rng.standard_normal((5, 4, 3, 2))
    factors = [rng.standard_normal((n, 6)) for n in kernel.shape]
    unfolded = kernel.reshape(5, -1)
    projected = np.einsum("tsij,tr->sijr", kernel, factors[0])
    expected = [np.einsum("tsij,sr,ir,jr->tr", kernel, *factors[1:]),
                np.einsum("tsij,tr,ir,jr->sr", kernel, factors[0], factors[2], factors[3]),
                np.einsum("tsij,tr,sr,jr->ir", kernel, factors[0], factors[1], factors[3]),
                np.einsum("tsij,tr,sr,ir->jr", kernel, *factors[:3])]
    for mode in range(4):
        np.testing.assert_allclose(_mttkrp(unfolded, projected, factors, mode), expected[mode], rtol=1e-12, atol=1e-12)
