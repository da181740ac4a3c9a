"""Solvers of the output-feature-map approximation against independent (numpy) computations."""

import numpy as np
import pytest
import torch

from lowrank_fm.methods.solvers import (
    SolverResult,
    closed_form_nonlinear,
    nonlinear_objective,
    reduced_rank_regression,
    rmsprop_refine,
    to_layer_factors,
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape, g):
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def _anisotropic(n, d, g):
    """Samples (n, d) with a spread spectrum (std from 3 down to 0.3) and a non-zero mean."""
    basis, _ = torch.linalg.qr(_randn(d, d, g=g))
    scales = torch.linspace(3.0, 0.3, d, dtype=torch.float64)
    return (_randn(n, d, g=g) * scales) @ basis.T + _randn(d, g=g)


def _np_objective(Y, Yhat, M, c, relu=True):
    """(1/n) sum_i || f(y_i) - f(M yhat_i + c) ||^2 in numpy."""
    Y, Yhat, M, c = (np.asarray(t, dtype=np.float64) for t in (Y, Yhat, M, c))
    approx = Yhat @ M.T + c
    f = (lambda t: np.maximum(t, 0.0)) if relu else (lambda t: t)
    return float(((f(Y) - f(approx)) ** 2).sum() / Y.shape[0])


def _pca_projection(samples: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """(U_r U_r^T, mean) from numpy's eigh of the covariance."""
    values, vectors = np.linalg.eigh(np.cov(samples.T, bias=True))
    top = vectors[:, np.argsort(values)[::-1][:rank]]
    return top @ top.T, samples.mean(axis=0)


@pytest.fixture(scope="module")
def recovery_problem():
    """A layer whose ReLU responses are exactly those of a rank-3 affine map of Yhat while Y is not rank 3.

    X (n, p) patches, W (d, p), b; Yhat = X W^T + b; T = Yhat M_true^T + c_true with rank(M_true) = 3;
    Y = T plus a negative-only perturbation where T < 0, so r(Y) = r(T) exactly.
    """
    g = _gen(0)
    n, d, p, r = 2000, 16, 32, 3
    X = _randn(n, p, g=g)
    W = _randn(d, p, g=g) / p**0.5
    b = 0.1 * _randn(d, g=g)
    Yhat = X @ W.T + b
    M_true = _randn(d, r, g=g) @ _randn(d, r, g=g).T / d**0.5
    c_true = 0.1 * _randn(d, g=g)
    T = Yhat @ M_true.T + c_true
    push = torch.empty(n, d, dtype=torch.float64).exponential_(1.0, generator=g) * float(T.std())
    Y = torch.where(T < 0, T - push, T)
    assert torch.equal(Y.clamp_min(0), T.clamp_min(0))
    assert torch.linalg.matrix_rank(Y - Y.mean(0)) == d  # Y itself is full rank
    P, Q, c = reduced_rank_regression(Y, Yhat, r)
    linear = nonlinear_objective(Y, Yhat, P, Q, c)
    return dict(X=X, W=W, b=b, Yhat=Yhat, Y=Y, rank=r, init=(P, Q, c), linear=linear)


# --------------------------------------------------------------------------- reduced-rank regression


def test_symmetric_rrr_is_the_pca_projection():
    Y = _anisotropic(600, 12, _gen(1))
    for ridge, tol in ((0.0, 1e-10), (1e-8, 1e-7)):
        P, Q, c = reduced_rank_regression(Y, Y, 4, ridge=ridge)
        proj, mean = _pca_projection(Y.numpy(), 4)
        M = (P @ Q.T).numpy()
        assert np.abs(M - proj).max() < tol
        assert np.abs(c.numpy() - (mean - proj @ mean)).max() < tol
        assert np.abs(P.numpy() - Q.numpy()).max() < tol  # P = Q = U_r
        np.testing.assert_allclose((P.T @ P).numpy(), np.eye(4), atol=1e-12)


def test_rrr_recovers_an_exact_rank_r_map():
    g = _gen(2)
    Yhat = _anisotropic(500, 10, g)
    A = _randn(10, 3, g=g) @ _randn(3, 10, g=g)
    c0 = _randn(10, g=g)
    Z = Yhat @ A.T + c0
    P, Q, c = reduced_rank_regression(Z, Yhat, 3, ridge=0.0)
    assert float((P @ Q.T - A).abs().max()) < 1e-10
    assert float((c - c0).abs().max()) < 1e-10
    P, Q, c = reduced_rank_regression(Z, Yhat, 3)  # default ridge: bias of order 1e-8 relative
    assert float((P @ Q.T - A).norm() / A.norm()) < 1e-6


def test_rrr_equals_truncated_svd_of_the_least_squares_fit():
    """Independent route: the rank-r fit is the rank-r SVD truncation of the centred least-squares fit."""
    g = _gen(3)
    Yhat = _anisotropic(400, 9, g)
    Z = Yhat @ _randn(7, 9, g=g).T + 0.5 * _randn(400, 7, g=g)  # e = 7 target channels, d = 9 regressors
    P, Q, c = reduced_rank_regression(Z, Yhat, 3, ridge=0.0)
    Zn, Yn = Z.numpy(), Yhat.numpy()
    Zc, Yc = Zn - Zn.mean(0), Yn - Yn.mean(0)
    fit = Yc @ np.linalg.lstsq(Yc, Zc, rcond=None)[0]
    u, s, vt = np.linalg.svd(fit, full_matrices=False)
    fit_r = (u[:, :3] * s[:3]) @ vt[:3]
    ours = Yn @ (P @ Q.T).numpy().T + c.numpy()
    np.testing.assert_allclose(ours, fit_r + Zn.mean(0), atol=1e-9)
    assert P.shape == (7, 3) and Q.shape == (9, 3) and c.shape == (7,)


def test_asymmetric_beats_symmetric_projections():
    g = _gen(4)
    Y = _anisotropic(800, 12, g)
    Yhat = Y + 1.5 * _randn(800, 12, g=g)
    P, Q, c = reduced_rank_regression(Y, Yhat, 4)
    asym = _np_objective(Y, Yhat, P @ Q.T, c, relu=False)
    for source in (Yhat, Y):  # PCA of the approximated responses (symmetric use of xhat), or of the originals
        proj, mean = _pca_projection(source.numpy(), 4)
        sym = _np_objective(Y, Yhat, proj, mean - proj @ mean, relu=False)
        assert asym < 0.9 * sym
    assert asym == pytest.approx(nonlinear_objective(Y, Yhat, P, Q, c, activation="identity"), rel=1e-12)


# --------------------------------------------------------------------------- objective and layer form


def test_nonlinear_objective_matches_numpy():
    g = _gen(5)
    Y, Yhat = _randn(100, 6, g=g), _randn(100, 6, g=g)
    P, Q, c = _randn(6, 2, g=g), _randn(6, 2, g=g), _randn(6, g=g)
    M = (P @ Q.T).numpy()
    assert nonlinear_objective(Y, Yhat, P, Q, c) == pytest.approx(_np_objective(Y, Yhat, M, c), rel=1e-12)
    assert nonlinear_objective(Y, Yhat, P, Q, c, "identity") == pytest.approx(
        _np_objective(Y, Yhat, M, c, relu=False), rel=1e-12
    )


def test_layer_factors_reproduce_the_response_space_map():
    g = _gen(6)
    X, W, b = _randn(50, 20, g=g), _randn(8, 20, g=g), _randn(8, g=g)
    P, Q, c = _randn(8, 3, g=g), _randn(8, 3, g=g), _randn(8, g=g)
    V, b1, U, c2 = to_layer_factors(W, b, P, Q, c)
    assert V.shape == (3, 20) and b1.shape == (3,) and U.shape == (8, 3) and c2.shape == (8,)
    layer = (X @ V.T + b1) @ U.T + c2
    direct = (X @ W.T + b).numpy() @ (P @ Q.T).numpy().T + c.numpy()
    np.testing.assert_allclose(layer.numpy(), direct, atol=1e-10)
    V0, b10, _, _ = to_layer_factors(W, None, P, Q, c)
    np.testing.assert_allclose(V0.numpy(), V.numpy())
    assert float(b10.abs().max()) == 0.0


# --------------------------------------------------------------------------- closed-form nonlinear


def test_closed_form_relaxed_objective_never_increases(recovery_problem):
    rp = recovery_problem
    schedule = ((0.01, 25), (1.0, 25))
    res = closed_form_nonlinear(rp["Y"], rp["Yhat"], rp["rank"], schedule=schedule)
    assert isinstance(res, SolverResult) and res.iterations == 50
    assert [lam for lam, _ in res.relaxed_history] == [0.01] * 25 + [1.0] * 25
    for lam, _ in schedule:
        values = np.array([v for l, v in res.relaxed_history if l == lam])
        steps = np.diff(values)
        assert (steps <= 1e-10 * values[:-1]).all(), steps.max()
    assert len(res.history) == 51
    assert res.objective_before == pytest.approx(rp["linear"], rel=1e-12)
    assert res.objective_after <= res.objective_before
    assert res.objective_after == pytest.approx(min(res.history), rel=1e-12)
    M = (res.P @ res.Q.T).numpy()
    assert res.objective_after == pytest.approx(_np_objective(rp["Y"], rp["Yhat"], M, res.c), rel=1e-10)


def test_closed_form_monotone_on_a_generic_asymmetric_layer():
    """No planted structure: Yhat = Y + noise; the relaxed objective still only falls and the result is
    never worse than the init."""
    g = _gen(7)
    Y = _anisotropic(1000, 10, g) - 1.0
    Yhat = Y + 0.5 * _randn(1000, 10, g=g)
    res = closed_form_nonlinear(Y, Yhat, 3, schedule=((0.01, 10), (1.0, 10)))
    for lam in (0.01, 1.0):
        values = np.array([v for l, v in res.relaxed_history if l == lam])
        assert (np.diff(values) <= 1e-10 * values[:-1]).all()
    P, Q, c = reduced_rank_regression(Y, Yhat, 3)
    assert res.objective_before == pytest.approx(_np_objective(Y, Yhat, (P @ Q.T).numpy(), c), rel=1e-12)
    assert res.objective_after <= res.objective_before


def test_closed_form_recovers_a_rank_3_relu_layer(recovery_problem):
    rp = recovery_problem
    res = closed_form_nonlinear(rp["Y"], rp["Yhat"], rp["rank"])
    assert res.objective_after < 0.1 * rp["linear"], (rp["linear"], res.objective_after)
    # the init argument is honoured: starting from the result, it cannot get worse
    again = closed_form_nonlinear(rp["Y"], rp["Yhat"], rp["rank"], init=(res.P, res.Q, res.c),
                                  schedule=((1.0, 3),))
    assert again.objective_before == pytest.approx(res.objective_after, rel=1e-12)
    assert again.objective_after <= again.objective_before


def test_closed_form_identity_returns_the_linear_solution():
    g = _gen(8)
    Y = _anisotropic(500, 8, g)
    Yhat = Y + 0.3 * _randn(500, 8, g=g)
    res = closed_form_nonlinear(Y, Yhat, 3, activation="identity")
    P, Q, c = reduced_rank_regression(Y, Yhat, 3)
    assert res.iterations == 0
    np.testing.assert_allclose((res.P @ res.Q.T).numpy(), (P @ Q.T).numpy(), atol=1e-12)
    np.testing.assert_allclose(res.c.numpy(), c.numpy(), atol=1e-12)
    assert res.objective_after == pytest.approx(_np_objective(Y, Yhat, (P @ Q.T).numpy(), c, relu=False))


# --------------------------------------------------------------------------- RMSProp


def test_rmsprop_recovers_a_rank_3_relu_layer(recovery_problem):
    rp = recovery_problem
    res = rmsprop_refine(rp["X"], rp["Y"], rp["W"], rp["b"], *rp["init"], steps=1000, lr=1e-2)
    assert res.objective_before == pytest.approx(rp["linear"], rel=1e-10)
    assert res.objective_after < 0.1 * rp["linear"], (rp["linear"], res.objective_after)
    assert res.first_weight.shape == (3, 32) and res.first_bias.shape == (3,)
    assert res.second_weight.shape == (16, 3) and res.second_bias.shape == (16,)


def test_rmsprop_never_returns_worse_than_its_init_on_validation(recovery_problem):
    rp = recovery_problem
    X, Y, W, b = rp["X"], rp["Y"], rp["W"], rp["b"]
    tr, va = slice(0, 1500), slice(1500, None)
    P, Q, c = reduced_rank_regression(Y[tr], rp["Yhat"][tr], 3)
    # a deliberately large learning rate, so that some iterates are worse than the init
    res = rmsprop_refine(X[tr], Y[tr], W, b, P, Q, c, X_val=X[va], Y_val=Y[va], steps=200, lr=0.3, seed=1)
    init_val = _np_objective(Y[va], rp["Yhat"][va], (P @ Q.T).numpy(), c)
    assert res.objective_before == pytest.approx(init_val, rel=1e-10)
    assert res.objective_after <= res.objective_before
    assert res.history[0] == res.objective_before and len(res.history) == 5
    assert res.objective_after == pytest.approx(min(res.history))
    # the returned factors achieve the reported validation objective
    layer = (X[va] @ res.first_weight.T + res.first_bias) @ res.second_weight.T + res.second_bias
    direct = float(((Y[va].clamp_min(0) - layer.clamp_min(0)) ** 2).sum() / layer.shape[0])
    assert direct == pytest.approx(res.objective_after, rel=1e-10)


def test_rmsprop_identity_from_the_optimal_linear_init_does_not_degrade():
    """With p = d and W invertible, rank-r affine maps of x are exactly rank-r affine maps of yhat, so the
    reduced-rank regression is the global optimum of the identity objective and RMSProp cannot improve it.
    (With p > d it can, slightly: V = Q^T W is then only one of the (r, p) matrices RMSProp may reach.)"""
    g = _gen(10)
    n, d = 1500, 10
    X = _anisotropic(n, d, g)
    W = _randn(d, d, g=g) + 3.0 * torch.eye(d, dtype=torch.float64)
    b = _randn(d, g=g)
    Yhat = X @ W.T + b
    Y = Yhat @ _randn(d, d, g=g).T / d**0.5 + _randn(n, d, g=g)
    P, Q, c = reduced_rank_regression(Y, Yhat, 3, ridge=0.0)
    res = rmsprop_refine(X, Y, W, b, P, Q, c, activation="identity", steps=300)
    optimum = _np_objective(Y, Yhat, (P @ Q.T).numpy(), c, relu=False)
    assert res.objective_before == pytest.approx(optimum, rel=1e-10)
    assert res.objective_after <= res.objective_before
    assert res.objective_after >= optimum * (1 - 1e-9)  # nothing beats the global linear optimum


# --------------------------------------------------------------------------- bad input


def test_bad_inputs_raise():
    g = _gen(9)
    Y, Yhat = _randn(20, 5, g=g), _randn(20, 5, g=g)
    with pytest.raises(ValueError, match=r"rank must be an integer in \[1, 5\].*got 6"):
        reduced_rank_regression(Y, Yhat, 6)
    with pytest.raises(ValueError, match="rank must be"):
        closed_form_nonlinear(Y, Yhat, 0)
    with pytest.raises(ValueError, match="same samples"):
        reduced_rank_regression(Y, Yhat[:10], 2)
    with pytest.raises(ValueError, match="2-D"):
        reduced_rank_regression(Y[0], Yhat, 2)
    with pytest.raises(ValueError, match=r"activation must be one of \('relu', 'identity'\), got 'tanh'"):
        closed_form_nonlinear(Y, Yhat, 2, activation="tanh")
    with pytest.raises(ValueError, match="schedule entries"):
        closed_form_nonlinear(Y, Yhat, 2, schedule=((0.0, 5),))
    with pytest.raises(ValueError, match="init must be"):
        closed_form_nonlinear(Y, Yhat, 2, init=(_randn(5, 3, g=g), _randn(5, 3, g=g), _randn(5, g=g)))
    X, W = _randn(20, 7, g=g), _randn(5, 7, g=g)
    P, Q, c = reduced_rank_regression(Y, X @ W.T, 2)
    with pytest.raises(ValueError, match="X_val and Y_val"):
        rmsprop_refine(X, Y, W, None, P, Q, c, X_val=X)
    with pytest.raises(ValueError, match=r"W must have shape \(d, p\)"):
        rmsprop_refine(X, Y, W[:, :6], None, P, Q, c)
    with pytest.raises(ValueError, match="steps must be"):
        rmsprop_refine(X, Y, W, None, P, Q, c, steps=-1)
