"""Empirical VBMF against matrices of known rank and an independent evaluation of its objective."""

import numpy as np
import pytest

from lowrank_fm.vbmf import evbmf, vbmf_rank

SHAPES = [(64, 256), (256, 64), (100, 100), (30, 500)]


def _low_rank_plus_noise(shape, rank, noise, seed):
    rng = np.random.default_rng(seed)
    rows, cols = shape
    signal = rng.standard_normal((rows, rank)) @ rng.standard_normal((rank, cols))
    return signal + noise * rng.standard_normal(shape)


def _omega(sigma2, s, length, width):
    """ALGORITHMS.md section 3, written out term by term (all singular values kept: no residual)."""
    alpha = length / width
    tau_bar = 2.5129 * np.sqrt(alpha)
    x_bar = (1 + tau_bar) * (1 + alpha / tau_bar)
    total = 0.0
    for gamma in s:
        x = gamma ** 2 / (width * sigma2)
        if x <= x_bar:
            total += x - np.log(x)
        else:
            tau = ((x - 1 - alpha) + np.sqrt((x - 1 - alpha) ** 2 - 4 * alpha)) / 2
            total += x - tau + np.log(tau + 1) - np.log(x) + alpha * np.log(tau / alpha + 1)
    return total


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rank", [2, 5, 10])
def test_known_rank_plus_noise_is_recovered_with_its_noise_variance(shape, rank):
    noise = 0.5
    y = _low_rank_plus_noise(shape, rank, noise, seed=rank)
    found, sigma2 = evbmf(y)
    assert found == rank
    assert sigma2 == pytest.approx(noise ** 2, rel=0.1)
    assert vbmf_rank(y) == rank


@pytest.mark.parametrize("shape", SHAPES + [(500, 30)])
@pytest.mark.parametrize("scale", [1e-4, 1.0, 1e3])
def test_pure_noise_has_rank_zero_or_one_at_any_scale(shape, scale):
    y = scale * np.random.default_rng(7).standard_normal(shape)
    found, sigma2 = evbmf(y)
    assert found in (0, 1)
    assert sigma2 == pytest.approx(scale ** 2, rel=0.1)


@pytest.mark.parametrize("shape", SHAPES)
def test_transposing_changes_nothing_and_scaling_scales_the_variance(shape):
    y = _low_rank_plus_noise(shape, 5, 0.5, seed=3)
    rank, sigma2 = evbmf(y)
    rank_t, sigma2_t = evbmf(y.T)
    assert rank_t == rank
    assert sigma2_t == pytest.approx(sigma2, rel=1e-6)
    # conv weights are ~1e-2: the search must not stop at scipy's absolute tolerance of 1e-5 on sigma^2
    rank_small, sigma2_small = evbmf(1e-3 * y)
    assert rank_small == rank
    assert sigma2_small == pytest.approx(1e-6 * sigma2, rel=1e-4)


@pytest.mark.parametrize("shape,rank", [((64, 256), 5), ((30, 500), 10), ((40, 40), 3)])
def test_the_variance_minimises_the_objective_and_the_rank_is_the_thresholded_count(shape, rank):
    y = _low_rank_plus_noise(shape, rank, 2.0, seed=11)  # low SNR: the objective matters
    found, sigma2 = evbmf(y)
    length, width = min(shape), max(shape)
    s = np.linalg.svd(y, compute_uv=False)
    alpha = length / width
    tau_bar = 2.5129 * np.sqrt(alpha)
    x_bar = (1 + tau_bar) * (1 + alpha / tau_bar)
    # the bounds of Nakajima et al. 2013, 0-based h* = ceil(L / (1 + alpha)) - 1
    h_star = int(np.ceil(length / (1 + alpha))) - 1
    lower = max(s[h_star] ** 2 / (width * x_bar), np.mean(s[h_star:] ** 2) / width)
    upper = np.sum(s ** 2) / (length * width)
    assert lower <= sigma2 <= upper
    grid = np.exp(np.linspace(np.log(lower), np.log(upper), 2000))
    best_on_grid = min(_omega(v, s, length, width) for v in grid)
    assert _omega(sigma2, s, length, width) <= best_on_grid + 1e-9 * abs(best_on_grid)
    assert found == np.count_nonzero(s > np.sqrt(width * sigma2 * x_bar))


def test_zero_and_rank_one_row_matrices():
    assert evbmf(np.zeros((5, 8))) == (0, 0.0)
    assert evbmf(np.arange(1.0, 9.0)[None])[0] == 0  # a single row is never more than noise to EVBMF


@pytest.mark.parametrize("bad,message", [(np.ones(5), "2-D"), (np.ones((0, 3)), "non-empty"),
                                         (np.array([[1.0, np.nan], [0.0, 1.0]]), "non-finite")])
def test_bad_matrices_raise(bad, message):
    with pytest.raises(ValueError, match=message):
        evbmf(bad)
