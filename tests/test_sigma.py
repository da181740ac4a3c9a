"""Sigma-norm methods: reduce to their Frobenius counterparts at Sigma = I, never raise the objective, and the
objective is the measured mean squared output error of the built layer (explicit unfold, dense conv)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import layer_context
from lowrank_fm.methods import InputStats, get_method
from lowrank_fm.methods.cp import cp_als, cp_reconstruct
from lowrank_fm.methods.sigma_math import cp_sigma, regularised_sigma, sigma_sqrt, svd_sigma, tucker2_sigma
from lowrank_fm.methods.tucker import tucker2


def correlated_images(n=24, c=6, size=8, seed=0) -> torch.Tensor:
    """Images whose channels are strongly correlated (a random mixing of a few sources), plus a mean."""
    g = torch.Generator().manual_seed(seed)
    sources = torch.randn(n, 2, size, size, generator=g)
    mix = torch.randn(c, 2, generator=g)
    return torch.einsum("ca,nahw->nchw", mix, sources) + 0.05 * torch.randn(n, c, size, size, generator=g) + 0.7


def conv_with_stats(seed=0, **geometry):
    torch.manual_seed(seed)
    conv = nn.Conv2d(6, 8, 3, **geometry).double()
    x = correlated_images().double()
    cols = F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=conv.padding, stride=conv.stride)
    rows = cols.permute(0, 2, 1).reshape(-1, cols.shape[1]).numpy()
    stats = InputStats(rows.mean(0), np.cov(rows.T, bias=True), rows.shape[0])
    base = layer_context(conv, x)
    ctx = type(base)(base.name, conv, base.positions, None, base.in_shape, base.out_shape, stats)
    return conv, x, ctx


def measured_mse(conv, replacement, x) -> float:
    """Mean over output positions of ||y - y~||^2 (summed over channels), from the modules themselves."""
    with torch.no_grad():
        y, approx = conv(x), replacement.double()(x)
    return float((y - approx).pow(2).sum(1).mean())


def test_sigma_sqrt_adds_jitter_only_when_singular() -> None:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((5, 5))
    root, eps = sigma_sqrt(a @ a.T)
    assert eps == 0.0
    np.testing.assert_allclose(root @ root.T, a @ a.T, atol=1e-12)
    low = a[:, :2] @ a[:, :2].T  # rank 2
    root, eps = sigma_sqrt(low)
    assert eps > 0
    np.testing.assert_allclose(root @ root.T, low + eps * np.trace(low) / 5 * np.eye(5), atol=1e-12)
    with pytest.raises(ValueError, match="square"):
        sigma_sqrt(np.ones((2, 3)))


def test_svd_sigma_identity_is_truncated_svd_and_optimal_otherwise() -> None:
    rng = np.random.default_rng(1)
    w = rng.standard_normal((7, 12))
    first, second = svd_sigma(w, np.eye(12), 3)
    u, s, vh = np.linalg.svd(w)
    np.testing.assert_allclose(second @ first, (u[:, :3] * s[:3]) @ vh[:3], atol=1e-10)
    b = rng.standard_normal((12, 12))
    sigma = b @ b.T
    root = np.linalg.cholesky(sigma)
    first, second = svd_sigma(w, sigma, 3)
    singular = np.linalg.svd(w @ root, compute_uv=False)
    error = np.linalg.norm((w - second @ first) @ root) ** 2
    np.testing.assert_allclose(error, np.sum(singular[3:] ** 2), rtol=1e-10)  # Eckart-Young on W L


def test_tucker2_sigma_at_identity_keeps_the_frobenius_solution() -> None:
    torch.manual_seed(2)
    w = torch.randn(8, 6, 3, 3, dtype=torch.float64)
    core, u_out, u_in = tucker2(w, 4, 3, iterations=2000, tol=1e-14)
    core2, u_out2, u_in2, history = tucker2_sigma(w.numpy(), np.eye(54), core.numpy(), u_out.numpy(), u_in.numpy())
    plain = torch.einsum("abhw,ta,sb->tshw", core, u_out, u_in).numpy()
    np.testing.assert_allclose(np.einsum("abhw,ta,sb->tshw", core2, u_out2, u_in2), plain, atol=1e-6)
    np.testing.assert_allclose(u_out2 @ u_out2.T, (u_out @ u_out.T).numpy(), atol=1e-6)  # same subspaces
    np.testing.assert_allclose(u_in2 @ u_in2.T, (u_in @ u_in.T).numpy(), atol=1e-6)


def test_kronecker_products_without_the_kronecker_matrix() -> None:
    """The Tucker-2 ALS's M (U (x) I_k2) and (U (x) I_k2)^T Sigma (U (x) I_k2), against np.kron formed densely."""
    from lowrank_fm.methods.sigma_math import _kron_identity_sandwich, _times_kron_identity

    rng = np.random.default_rng(5)
    u = rng.standard_normal((6, 4))
    b = np.kron(u, np.eye(9))
    root = rng.standard_normal((54, 54))
    sigma = root @ root.T
    m = rng.standard_normal((5, 54))
    np.testing.assert_allclose(_times_kron_identity(m, u, 9), m @ b, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(_kron_identity_sandwich(sigma, u, 9), b.T @ sigma @ b, rtol=1e-12, atol=1e-10)
    g = rng.standard_normal((3, 36))  # A = G B^T, as the ALS forms it (the factor transposed)
    np.testing.assert_allclose(_times_kron_identity(g, u.T, 9), g @ b.T, rtol=1e-12, atol=1e-12)


def test_cp_sigma_at_identity_keeps_the_frobenius_solution() -> None:
    rng = np.random.default_rng(3)
    exact = cp_reconstruct(*(rng.standard_normal((n, 3)) for n in (8, 6, 3, 3)))
    w = exact + 1e-3 * rng.standard_normal(exact.shape)
    *start, fit = cp_als(w, 3, restarts=1, iterations=3000, tol=1e-15)
    factors, history = cp_sigma(w, np.eye(54), start)
    np.testing.assert_allclose(cp_reconstruct(*factors), cp_reconstruct(*start), atol=1e-6)
    assert history[-1] <= history[0]


@pytest.mark.parametrize("method", ["tucker2-sigma", "cp-sigma", "svd-sigma", "alds-sigma"])
def test_objective_is_the_measured_output_error(method) -> None:
    conv, x, ctx = conv_with_stats(padding=1, stride=(1, 2))
    m = get_method(method)
    info = {}
    replacement = m.build(ctx, 3, None, info)
    w = conv.weight.detach().reshape(8, -1).numpy()
    # the objective tr(D Sigma D^T) of the built layer, D from the dense kernel the chain reproduces: its
    # response at output (2, 1) (window rows 1..3, cols 1..3 with padding 1, stride (1, 2)) to unit patches
    probes = torch.zeros(55, 6, 5, 5, dtype=torch.float64)
    probes[:54, :, 1:4, 1:4] = torch.eye(54, dtype=torch.float64).reshape(54, 6, 3, 3)
    with torch.no_grad():
        out = replacement.double()(probes)[:, :, 2, 1]
    kernel = (out[:54] - out[54]).T.numpy()
    objective = float(np.sum(((w - kernel) @ regularised_sigma(ctx.input_stats.covariance)) * (w - kernel)))
    assert objective == pytest.approx(measured_mse(conv, replacement, x), rel=1e-6)
    if "sigma_error" in info:
        assert info["sigma_error"] == pytest.approx(objective, rel=1e-6)
    # the mean response is kept exactly
    with torch.no_grad():
        assert torch.allclose(conv(x).mean((0, 2, 3)), replacement(x).mean((0, 2, 3)), atol=1e-9)


@pytest.mark.parametrize("solver", ["tucker2", "cp"])
def test_als_never_raises_the_objective_and_beats_its_start(solver) -> None:
    conv, x, ctx = conv_with_stats(seed=4, padding=1)
    sigma = regularised_sigma(ctx.input_stats.covariance)
    w = conv.weight.detach()
    if solver == "tucker2":
        history = tucker2_sigma(w.numpy(), sigma, *(f.numpy() for f in tucker2(w, 4, 3)), iterations=15, tol=0)[3]
    else:
        history = cp_sigma(w.numpy(), sigma, cp_als(w.numpy(), 4, restarts=1)[:4], iterations=15, tol=0)[1]
    assert np.all(np.diff(history) <= 1e-12 * history[0])
    assert history[-1] < 0.9 * history[0]  # correlated inputs: the data-aware error is much lower


def test_sigma_method_without_input_stats_says_what_is_missing() -> None:
    conv, x, ctx = conv_with_stats()
    bare = type(ctx)(ctx.name, conv, ctx.positions, None, ctx.in_shape, ctx.out_shape)
    with pytest.raises(ValueError, match="needs the input-patch covariance"):
        get_method("tucker2-sigma").build(bare, 3)


def test_the_regularised_covariance_is_computed_once_per_layer_and_read_only() -> None:
    """InputStats.regularised_covariance is regularised_sigma(covariance), bit for bit, the same array on every
    access (auto builds a candidate at several ranks from it), and cannot be changed in place."""
    from lowrank_fm.methods.base import InputStats
    from lowrank_fm.methods.sigma_math import regularised_sigma

    rows = np.random.default_rng(0).standard_normal((5, 8))  # 5 rows of 8: a singular covariance, jittered
    covariance = np.cov(rows.T, bias=True)
    stats = InputStats(rows.mean(0), covariance, 5)
    first = stats.regularised_covariance
    np.testing.assert_array_equal(first, regularised_sigma(covariance))
    assert np.linalg.matrix_rank(first) == 8 > np.linalg.matrix_rank(covariance)
    assert stats.regularised_covariance is first
    with pytest.raises(ValueError, match="read-only"):
        first[0, 0] = 1.0
