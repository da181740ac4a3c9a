"""Solvers on rows split over shards (lowrank_fm.methods.shards): two shards give one process's result, and the
sample-space regression (n < d) gives the regressor-space ridge solution. Shards are emulated by threads that
meet at every collective (no torch.distributed here; tests/test_distributed.py runs real gloo processes)."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from lowrank_fm.correction import refit_output_factor
from lowrank_fm.methods.base import LayerData
from lowrank_fm.methods.fm_nonlinear import fit_two_factors
from lowrank_fm.methods.shards import LOCAL, RowShards, row_offset, total
from lowrank_fm.methods.solvers import reduced_rank_regression, rmsprop_minimise, sample_space_regression


class ThreadShards:
    """``count`` threads, one per shard, that meet at each collective: every thread adds (or concatenates) the
    same parts in shard order, so all get the same result."""

    def __init__(self, count: int) -> None:
        self.count, self.slots, self.barrier = count, [None] * count, threading.Barrier(count, timeout=60)

    def _meet(self, index: int, tensor: torch.Tensor) -> list[torch.Tensor]:
        self.slots[index] = tensor
        self.barrier.wait()
        parts = list(self.slots)
        self.barrier.wait()
        return parts

    def shards(self, index: int) -> RowShards:
        return RowShards(sum=lambda t: torch.stack(self._meet(index, t)).sum(0),
                         cat=lambda t: torch.cat(self._meet(index, t)), index=index, count=self.count)


def on_shards(solve, rows: list[torch.Tensor], cuts: list[int]) -> list:
    """``solve(shards, *its rows)`` on every shard (rows cut at ``cuts``), run together; the shards' results."""
    bounds = list(zip([0, *cuts], [*cuts, rows[0].shape[0]]))
    hub, results, errors = ThreadShards(len(bounds)), [None] * len(bounds), []

    def work(index: int) -> None:
        try:
            a, b = bounds[index]
            results[index] = solve(hub.shards(index), *[r[a:b] for r in rows])
        except Exception as error:  # surfaced below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(bounds))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results


def problem(n: int, p: int, d: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, p, generator=g, dtype=torch.float64)
    W = torch.randn(d, p, generator=g, dtype=torch.float64) / p ** 0.5
    Y = X @ W.T + 0.1 + 0.05 * torch.randn(n, d, generator=g, dtype=torch.float64)
    Xhat = X + 0.05 * torch.randn(n, p, generator=g, dtype=torch.float64)
    heldout = torch.arange(n) >= n - n // 8
    return X, Xhat, W, Y, heldout


def ridge_rrr_numpy(Z: np.ndarray, Yhat: np.ndarray, rank: int, ridge: float) -> tuple[np.ndarray, np.ndarray]:
    """Independent regressor-space solution: M = U_r U_r^T Mhat, Mhat = Zc^T Yc (S + lambda I)^-1, c."""
    Zc, Yc = Z - Z.mean(0), Yhat - Yhat.mean(0)
    S = Yc.T @ Yc
    lam = ridge * np.trace(S) / S.shape[0]
    Mhat = np.linalg.solve(S + lam * np.eye(S.shape[0]), Yc.T @ Zc).T
    values, vectors = np.linalg.eigh(Mhat @ S @ Mhat.T)
    U = vectors[:, np.argsort(values)[::-1][:rank]]
    M = U @ U.T @ Mhat
    return M, Z.mean(0) - M @ Yhat.mean(0)


@pytest.mark.parametrize("ridge", [1e-8, 1e-2])
def test_sample_space_regression_is_the_regressor_space_ridge_solution(ridge: float) -> None:
    """n = 40 rows, d = 300 regressors, e = 250 targets, r = 12: P Q^T and c equal numpy's d x d ridge solution
    (largest relative difference measured 2e-7 at ridge 1e-8, where the d x d system S + lambda I has condition
    ~1e9 and numpy's solution carries that rounding; 3e-13 at ridge 1e-2; asserted 1e-6)."""
    g = torch.Generator().manual_seed(1)
    Yhat = torch.randn(40, 300, generator=g, dtype=torch.float64)
    Z = Yhat[:, :250] @ torch.randn(250, 250, generator=g, dtype=torch.float64) * 0.1 + torch.randn(40, 250, generator=g, dtype=torch.float64)
    P, Q, c = reduced_rank_regression(Z, Yhat, 12, ridge=ridge)  # n < d: the sample-space path
    M, c_np = ridge_rrr_numpy(Z.numpy(), Yhat.numpy(), 12, ridge)
    scale = np.abs(M).max()
    np.testing.assert_allclose((P @ Q.T).numpy(), M, atol=1e-6 * scale)
    np.testing.assert_allclose(c.numpy(), c_np, atol=1e-6 * np.abs(c_np).max())
    np.testing.assert_allclose((P.T @ P).numpy(), np.eye(12), atol=1e-10)  # orthonormal columns
    # the n x n path directly: the same P (sign-fixed) and Q
    Zc, Yc = Z - Z.mean(0), Yhat - Yhat.mean(0)
    P2, Q2 = sample_space_regression(Zc, Yc, 12, ridge * float(Yc.pow(2).sum()) / 300)
    torch.testing.assert_close(P2, P)
    torch.testing.assert_close(Q2, Q)


def test_sample_space_regression_declines_ranks_beyond_the_fit() -> None:
    """With 10 centred rows the fit has rank <= 9: rank 12 is not determined by it (None), and
    reduced_rank_regression then solves in regressor space (12 orthonormal columns)."""
    g = torch.Generator().manual_seed(2)
    Yhat, Z = torch.randn(10, 50, generator=g, dtype=torch.float64), torch.randn(10, 30, generator=g, dtype=torch.float64)
    Zc, Yc = Z - Z.mean(0), Yhat - Yhat.mean(0)
    assert sample_space_regression(Zc, Yc, 12, 1e-6) is None
    P, Q, c = reduced_rank_regression(Z, Yhat, 12)
    np.testing.assert_allclose((P.T @ P).numpy(), np.eye(12), atol=1e-10)
    M, c_np = ridge_rrr_numpy(Z.numpy(), Yhat.numpy(), 9, 1e-8)  # the determined part: the top 9 directions
    fit = (Yhat @ (P @ Q.T).T + c).numpy()
    np.testing.assert_allclose(fit, Yhat.numpy() @ M.T + c_np, atol=1e-6 * np.abs(fit).max())


@pytest.mark.parametrize("n", [600, 30])  # rows > regressors (sums of moments), rows < regressors (rows gathered)
def test_two_shards_of_the_regression_equal_one_process(n: int) -> None:
    _, Xhat, W, Y, _ = problem(n, 60, 48)
    Yhat = Xhat @ W.T
    P, Q, c = reduced_rank_regression(Y, Yhat, 6)
    for cuts in ([n // 3], [0], [n // 4, n // 2]):  # uneven shards, an empty shard, three shards
        for P2, Q2, c2 in on_shards(lambda s, y, yh: reduced_rank_regression(y, yh, 6, shards=s), [Y, Yhat], cuts):
            assert float((P2 @ Q2.T - P @ Q.T).abs().max()) < 1e-10 * float((P @ Q.T).abs().max())
            assert float((c2 - c).abs().max()) < 1e-10


def test_row_offset_and_total() -> None:
    assert row_offset(LOCAL, 7) == (0, 7) and total(LOCAL, 1, 2.5) == [1.0, 2.5]
    rows = torch.zeros(10, 1)
    got = on_shards(lambda s, r: (row_offset(s, r.shape[0]), total(s, r.shape[0])), [rows], [3, 3, 8])
    assert got == [((0, 10), [10.0]), ((3, 10), [10.0]), ((3, 10), [10.0]), ((8, 10), [10.0])]


def test_two_shards_of_fm_without_refinement_equal_one_process() -> None:
    """fit_two_factors with solver "none" (regression, held-out objective, scale): the factors of one process
    within 1e-10, the same held-out objective within 1e-12 relative."""
    X, Xhat, W, Y, heldout = problem(500, 40, 24)
    b = torch.full((24,), 0.1, dtype=torch.float64)
    one, info = fit_two_factors(W, b, LayerData(Xhat, Y, heldout, "relu"), 5, solver="none")
    for two, info2 in on_shards(lambda s, x, y, h: fit_two_factors(W, b, LayerData(x, y, h, "relu", s), 5, solver="none"),
                                [Xhat, Y, heldout], [230]):
        assert max(float((a - c).abs().max()) for a, c in zip(one, two)) < 1e-10
        assert info2["error_before"] == pytest.approx(info["error_before"], rel=1e-12)


def test_two_shards_of_rmsprop_in_float64_equal_one_process() -> None:
    """rmsprop_minimise with float64 iterations: every shard draws the same mini-batches over all rows and the
    gradients are added, so 300 steps give one process's iterate within 1e-12 (float64 summation order)."""
    X, _, W, Y, _ = problem(700, 20, 8)
    init = [0.5 * W, torch.zeros(8, dtype=torch.float64)]

    def forward(params, x):
        return x @ params[0].T + params[1]

    before, after, params, _ = rmsprop_minimise(init, forward, X, Y, X[:100], Y[:100], dtype=torch.float64, seed=3)
    assert after < before
    # shard 0 holds rows 0-299 and every validation row, shard 1 rows 300-699 and none
    results = on_shards(lambda s, x, y: rmsprop_minimise(init, forward, x, y, X[:100] if s.index == 0 else X[:0],
                                                         Y[:100] if s.index == 0 else Y[:0], shards=s,
                                                         dtype=torch.float64, seed=3),
                        [X, Y], [300])
    for before2, after2, params2, _ in results:
        assert before2 == pytest.approx(before, rel=1e-12) and after2 == pytest.approx(after, rel=1e-12)
        assert max(float((a - c).abs().max()) for a, c in zip(params, params2)) < 1e-12


def test_two_shards_of_rmsprop_differ_as_little_as_float32_rounding_of_one_process() -> None:
    """fm's default float32 RMSProp on ReLU targets is sensitive to rounding: a 1e-7 relative perturbation of one
    process's inputs moves the factors by some delta. Two shards (float32 gradient sums in another order) move
    them by no more than 5 delta, and the held-out objective by no more than 1e-2 relative."""
    X, Xhat, W, Y, heldout = problem(1200, 36, 20, seed=4)
    b = torch.full((20,), 0.1, dtype=torch.float64)
    data = LayerData(Xhat, Y, heldout, "relu")
    one, info = fit_two_factors(W, b, data, 5, seed=1)
    noise = 1e-7 * torch.randn(Xhat.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    nudged, _ = fit_two_factors(W, b, LayerData(Xhat * (1 + noise), Y, heldout, "relu"), 5, seed=1)
    delta = max(float((a - c).abs().max()) for a, c in zip(one, nudged))
    (two, info2), _ = on_shards(lambda s, x, y, h: fit_two_factors(W, b, LayerData(x, y, h, "relu", s), 5, seed=1),
                                [Xhat, Y, heldout], [500])
    moved = max(float((a - c).abs().max()) for a, c in zip(one, two))
    print(f"float32 RMSProp: 2 shards move the factors by {moved:.3g}; a 1e-7 input perturbation by {delta:.3g}")
    assert info2["iterations"] == info["iterations"] == 300
    assert moved <= 5 * delta + 1e-6
    assert info2["error_after"] == pytest.approx(info["error_after"], rel=1e-2)


def test_two_shards_of_the_correction_equal_one_process() -> None:
    """refit_output_factor (least squares, then RMSProp in float32) on two shards: the same candidate kept, the
    same fit-row count, the least-squares objective within 1e-10 relative; without RMSProp the factor too."""
    X, Xhat, W, Y, heldout = problem(800, 30, 16, seed=5)
    B0 = W[:, :12] * 0.5
    Z = Xhat[:, :12]
    for solver in ("none", "rmsprop"):
        B, c, info = refit_output_factor(Z, Y, heldout, B0, None, activation="relu", solver=solver, seed=2)
        for B2, c2, info2 in on_shards(lambda s, z, y, h: refit_output_factor(z, y, h, B0, None, activation="relu",
                                                                                solver=solver, seed=2, shards=s),
                                       [Z, Y, heldout], [333]):
            assert info2["kept"] == info["kept"] and info2["samples"] == info["samples"] == 700
            assert info2["error_linear"] == pytest.approx(info["error_linear"], rel=1e-10)
            assert info2["error_original"] == pytest.approx(info["error_original"], rel=1e-10)
            if solver == "none":
                assert float((B2 - B).abs().max()) < 1e-10 and float((c2 - c).abs().max()) < 1e-10
