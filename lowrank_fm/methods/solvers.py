"""Solvers of the output-feature-map approximation (Zhang, Zou, He, Sun, TPAMI 2016, arXiv 1505.06798).

Pure math: tensors in, tensors out, float64 throughout. Samples are ROWS.

Notation
--------
n samples, d output channels, p fan-in (c kh kw or in_features), r rank.

Y : (n, d)
    the ORIGINAL network's pre-activation responses y = W x + b (the targets).
Yhat : (n, d)
    the original layer's weights applied to the APPROXIMATED network's inputs, yhat = W xhat + b
    (symmetric case: Yhat = Y).
M = P Q^T, c
    the approximation y' = M yhat + c with P (d, r), Q (d, r), c (d,). As a layer: a first conv/linear with
    weight Q^T W (r, p) and bias Q^T b, then a 1x1 conv/linear with weight P (d, r) and bias c
    (see :func:`to_layer_factors`).
f
    the activation, ``"relu"`` (max(., 0)) or ``"identity"``.

Solvers
-------
:func:`reduced_rank_regression`
    the linear (and asymmetric) solution, closed form.
:func:`closed_form_nonlinear`
    the paper's alternating solver of min || f(y) - f(M yhat + c) ||^2 with an auxiliary z.
:func:`rmsprop_refine`
    stochastic RMSProp on the layer factors, minimising the same objective directly on input patches.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from .shards import RowShards, row_offset, shards_or_local, total

__all__ = [
    "ACTIVATIONS",
    "SolverResult",
    "reduced_rank_regression",
    "nonlinear_objective",
    "closed_form_nonlinear",
    "rmsprop_refine",
    "rmsprop_minimise",
    "to_layer_factors",
]

logger = logging.getLogger(__name__)

ACTIVATIONS = ("relu", "identity")

#: The paper's schedule for the closed-form solver: 25 iterations at lambda = 0.01, then 25 at lambda = 1.
DEFAULT_SCHEDULE: tuple[tuple[float, int], ...] = ((0.01, 25), (1.0, 25))


@dataclass(frozen=True)
class SolverResult:
    """What a solver returns. Tensors are float64; fields a solver does not produce are None.

    Attributes
    ----------
    solver : str
        ``"reduced-rank-regression"``, ``"closed-form-nonlinear"`` or ``"rmsprop"``.
    objective_before : float
        Objective of the initialisation (mean over samples of || f(y) - f(y') ||^2; for
        :func:`rmsprop_refine` measured on the validation samples).
    objective_after : float
        Objective of the returned factors (same data as ``objective_before``); never larger than it.
    iterations : int
        Iterations (closed form) or optimiser steps (RMSProp) run.
    history : tuple of float
        Closed form: the true nonlinear objective of the init followed by one value per iteration.
        RMSProp: the validation objective of the init followed by one value per evaluation.
    P : Tensor of shape (d, r) or None
        Second factor in response space (for RMSProp: the refined U).
    Q : Tensor of shape (d, r) or None
        M = P Q^T (None for RMSProp, whose first factor is no longer Q^T W).
    c : Tensor of shape (d,) or None
        Offset, y' = P Q^T yhat + c.
    first_weight : Tensor of shape (r, p) or None
        Weight of the first layer (V = Q^T W); None for solvers that work in response space only.
    first_bias : Tensor of shape (r,) or None
        Bias of the first layer (Q^T b).
    second_weight : Tensor of shape (d, r) or None
        Weight of the 1x1 layer (P or U).
    second_bias : Tensor of shape (d,) or None
        Bias of the 1x1 layer (c).
    relaxed_history : tuple of (float, float)
        Closed form only: (lambda, relaxed objective after the iteration), one pair per iteration.
    """

    solver: str
    objective_before: float
    objective_after: float
    iterations: int
    history: tuple[float, ...]
    P: torch.Tensor | None = None
    Q: torch.Tensor | None = None
    c: torch.Tensor | None = None
    first_weight: torch.Tensor | None = None
    first_bias: torch.Tensor | None = None
    second_weight: torch.Tensor | None = None
    second_bias: torch.Tensor | None = None
    relaxed_history: tuple[tuple[float, float], ...] = ()


# ----------------------------------------------------------------------------------------------- helpers


def _check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def _act(t: torch.Tensor, activation: str) -> torch.Tensor:
    return t.clamp_min(0.0) if activation == "relu" else t


def _matrix(name: str, t: torch.Tensor, keep_dtype: bool = False) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.ndim != 2:
        raise ValueError(f"{name} must be 2-D (samples as rows), got shape {tuple(t.shape)}")
    return t.detach() if keep_dtype and t.is_floating_point() else t.detach().double()


def _check_rank(rank: int, d: int) -> int:
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= d:
        raise ValueError(f"rank must be an integer in [1, {d}] (the number of regressor channels), got {rank!r}")
    return rank


def _check_pair(Y: torch.Tensor, Yhat: torch.Tensor, y_name: str = "Y", shards: RowShards | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    Y, Yhat = _matrix(y_name, Y), _matrix("Yhat", Yhat)
    if Y.shape[0] != Yhat.shape[0]:
        raise ValueError(f"{y_name} and Yhat must hold the same samples (rows), got {Y.shape[0]} and {Yhat.shape[0]}")
    if (Y.shape[0] if shards is None else total(shards, Y.shape[0])[0]) < 1:  # a shard alone may hold none
        raise ValueError(f"{y_name} holds no samples")
    return Y, Yhat


def _fix_signs(top: torch.Tensor) -> torch.Tensor:
    """Columns sign-fixed so that each column's largest-magnitude entry is positive (deterministic output)."""
    pivot = top.abs().argmax(dim=0)
    signs = torch.sign(top[pivot, torch.arange(top.shape[1])])
    signs[signs == 0] = 1.0
    return top * signs


def _top_eigenvectors(sym: torch.Tensor, rank: int) -> torch.Tensor:
    """Top-``rank`` eigenvectors (columns, eigenvalues descending) of a symmetric matrix, sign-fixed so that
    each column's largest-magnitude entry is positive (deterministic output)."""
    values, vectors = torch.linalg.eigh(0.5 * (sym + sym.T))
    order = torch.argsort(values, descending=True)[:rank]
    return _fix_signs(vectors[:, order])


#: The sample-space solution is used only when the r-th singular value of the fit is clearly nonzero: its
#: square (an eigenvalue of the n x n Gram) above this fraction of the largest.
_SAMPLE_SPACE_RELATIVE_FLOOR = 1e-10


def sample_space_regression(Zc: torch.Tensor, Yc: torch.Tensor, rank: int, reg: float
                            ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """P, Q of :func:`reduced_rank_regression` from centred rows, computed in sample space (n x n matrices).

    Parameters
    ----------
    Zc : Tensor of shape (n, e), centred targets; Yc : Tensor of shape (n, d), centred regressors (all rows)
    rank : r; reg : lambda > 0, the ridge

    Returns
    -------
    P (e, r), Q (d, r), or None when the fit has fewer than r clearly nonzero singular values (then the top-r
    eigenvectors are not determined by the fit, and the caller solves in regressor space).

    Notes
    -----
    With G = Yc Yc^T (n x n), the push-through identity (S + lambda I)^-1 Yc^T = Yc^T (G + lambda I)^-1 for
    S = Yc^T Yc (d x d) gives the same ridge solution with n x n systems instead of d x d ones:

        Mhat^T = (S + lambda I)^-1 Yc^T Zc = Yc^T A,        A = (G + lambda I)^-1 Zc          (n, e)
        F = Yc Mhat^T = G A                                  the centred least-squares fit    (n, e)
        F^T F = Mhat S Mhat^T:  its top-r eigenvectors are the top-r right singular vectors of F,
        P = F^T V_r diag(s_r)^-1/2  from  F F^T = V diag(s) V^T   (n x n eigendecomposition)
        Q = Mhat^T P = Yc^T (A P).

    Cost O(n^2 (d + e) + n^3) instead of O(d^3 + n d^2): the classifier Linear layers (d = 4096) with a few
    hundred calibration rows.
    """
    n = Yc.shape[0]
    G = Yc @ Yc.T
    A = torch.linalg.solve(G + reg * torch.eye(n, dtype=G.dtype), Zc)
    F = G @ A
    values, vectors = torch.linalg.eigh(0.5 * (F @ F.T + (F @ F.T).T))
    order = torch.argsort(values, descending=True)[:rank]
    values, vectors = values[order], vectors[:, order]
    if not float(values[-1]) > _SAMPLE_SPACE_RELATIVE_FLOOR * max(float(values[0]), 0.0):
        return None
    P = _fix_signs((F.T @ vectors) / values.sqrt())
    return P, Yc.T @ (A @ P)


# ----------------------------------------------------------------------------------------------- linear


def reduced_rank_regression(
    Y: torch.Tensor, Yhat: torch.Tensor, rank: int, *, ridge: float = 1e-8, shards: RowShards | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` affine map from ``Yhat`` to the target: min over rank(M) <= r, c of ||Z - Yhat M^T - c||_F.

    Parameters
    ----------
    Y : Tensor of shape (n, e)
        The target Z, samples as rows: the original responses Y for the linear/asymmetric case, the auxiliary
        Z in the nonlinear solver.
    Yhat : Tensor of shape (n, d)
        Regressors, samples as rows.
    rank : int
        r, 1 <= r <= d.
    ridge : float, default 1e-8
        Relative ridge on the regressor covariance: lambda = ridge * tr(Yc^T Yc) / d. Guards singular
        covariances; 0 gives the exact least-squares solution when Yc^T Yc is invertible.
    shards : RowShards or None
        When ``Y``, ``Yhat`` are one process's rows: the means, S and Zc^T Yc are sums of per-shard parts
        (``shards.sum``); with fewer rows than regressors (n < d) the rows are concatenated instead (few: n d).

    Returns
    -------
    P : Tensor of shape (e, r)
        U_r, orthonormal columns.
    Q : Tensor of shape (d, r)
        Mhat^T U_r, so that M = P Q^T = U_r U_r^T Mhat.
    c : Tensor of shape (e,)
        zbar - P Q^T yhatbar.

    Notes
    -----
    With Zc, Yc the centred samples (rows) and S = Yc^T Yc,

        Mhat = Zc^T Yc (S + lambda I)^-1            (unconstrained least squares, e x d)
        Mhat S Mhat^T = U diag(s) U^T,  U_r = the top-r eigenvectors
        M = U_r U_r^T Mhat,  c = zbar - M yhatbar.

    When Yhat = Z (symmetric case) Mhat = I (up to the ridge) and M = U_r U_r^T, the PCA projection.
    Mhat S Mhat^T = (Yc Mhat^T)^T (Yc Mhat^T) is formed from S (no pass over the rows). With n < d rows and a
    ridge, the same P, Q come from n x n matrices (:func:`sample_space_regression`).
    """
    Z, Yhat = _check_pair(Y, Yhat, "Y", shards)
    shards = shards_or_local(shards)
    d, e = Yhat.shape[1], Z.shape[1]
    rank = _check_rank(rank, min(d, e))
    if not ridge >= 0.0:
        raise ValueError(f"ridge must be >= 0, got {ridge!r}")
    sums = shards.sum(torch.cat([Z.sum(dim=0), Yhat.sum(dim=0),
                                 torch.tensor([float(Z.shape[0])], dtype=torch.float64)]))
    n = int(round(float(sums[-1])))
    zbar, ybar = sums[:e] / n, sums[e:e + d] / n
    Zc, Yc = Z - zbar, Yhat - ybar
    if ridge > 0.0 and n < d:  # dimension-bound: solve in sample space (the rows are few)
        Yc_all = shards.cat(Yc)
        reg = ridge * float(Yc_all.pow(2).sum()) / d  # tr(S) = tr(G) = ||Yc||_F^2
        if reg > 0.0:
            solved = sample_space_regression(shards.cat(Zc), Yc_all, rank, reg)
            if solved is not None:
                P, Q = solved
                return P, Q, zbar - P @ (Q.T @ ybar)
    S = shards.sum(Yc.T @ Yc)
    reg = ridge * float(torch.trace(S)) / d
    if reg > 0.0:
        S_reg = S + reg * torch.eye(d, dtype=S.dtype)
    else:
        S_reg = S
    cross = shards.sum(Zc.T @ Yc)  # (e, d)
    try:
        Mhat = torch.linalg.solve(S_reg, cross.T).T  # S_reg symmetric: (S_reg^-1 cross^T)^T = cross S_reg^-1
    except RuntimeError:
        logger.warning("regressor covariance is singular (ridge=%g); using the pseudo-inverse", ridge)
        Mhat = cross @ torch.linalg.pinv(S_reg, hermitian=True)
    P = _top_eigenvectors(Mhat @ S @ Mhat.T, rank)  # the Gram of the centred fit Yc Mhat^T
    Q = Mhat.T @ P
    c = zbar - P @ (Q.T @ ybar)
    return P, Q, c


def to_layer_factors(
    W: torch.Tensor, b: torch.Tensor | None, P: torch.Tensor, Q: torch.Tensor, c: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The two layers realising y' = P Q^T (W x + b) + c.

    Parameters
    ----------
    W : Tensor of shape (d, p)
        The original layer's weight unfolded along its output mode.
    b : Tensor of shape (d,) or None
    P, Q : Tensor of shape (d, r)
    c : Tensor of shape (d,)

    Returns
    -------
    first_weight : Tensor of shape (r, p)   Q^T W
    first_bias : Tensor of shape (r,)       Q^T b (zeros without bias)
    second_weight : Tensor of shape (d, r)  P
    second_bias : Tensor of shape (d,)      c
    """
    W, P, Q, c = W.detach().double(), P.detach().double(), Q.detach().double(), c.detach().double()
    b = torch.zeros(W.shape[0], dtype=torch.float64) if b is None else b.detach().double()
    return Q.T @ W, Q.T @ b, P.clone(), c.clone()


# ----------------------------------------------------------------------------------------------- nonlinear


def nonlinear_objective(
    Y: torch.Tensor,
    Yhat: torch.Tensor,
    P: torch.Tensor,
    Q: torch.Tensor,
    c: torch.Tensor,
    activation: str = "relu",
    shards: RowShards | None = None,
) -> float:
    """Mean over samples of || f(y) - f(P Q^T yhat + c) ||^2 (over every shard's rows with ``shards``).

    Parameters
    ----------
    Y, Yhat : Tensor of shape (n, d)
    P, Q : Tensor of shape (d, r)
    c : Tensor of shape (d,)
    activation : {"relu", "identity"}

    Returns
    -------
    float
        (1/n) sum_i sum_j (f(y_ij) - f(y'_ij))^2 with y' = Yhat Q P^T + c.
    """
    _check_activation(activation)
    Y, Yhat = _check_pair(Y, Yhat, shards=shards)
    approx = (Yhat @ Q.double()) @ P.double().T + c.double()
    squares = (_act(Y, activation) - _act(approx, activation)).pow(2).sum()
    if shards is None:
        return float(squares / Y.shape[0])
    summed, n = total(shards, float(squares), Y.shape[0])
    return summed / n


def _z_step(ry: torch.Tensor, approx: torch.Tensor, lam: float) -> torch.Tensor:
    """Element-wise exact minimiser of (r(y) - r(z))^2 + lam (z - y')^2 over z."""
    z0 = approx.clamp_max(0.0)
    z1 = ((lam * approx + ry) / (lam + 1.0)).clamp_min(0.0)
    cost0 = ry.pow(2) + lam * (z0 - approx).pow(2)
    cost1 = (ry - z1).pow(2) + lam * (z1 - approx).pow(2)
    return torch.where(cost1 < cost0, z1, z0)


def _relaxed_and_true(ry: torch.Tensor, z: torch.Tensor, approx: torch.Tensor, lam: float, shards: RowShards
                      ) -> tuple[float, float]:
    """(relaxed objective, true objective), means over every shard's rows."""
    relaxed = (ry - z.clamp_min(0.0)).pow(2).sum() + lam * (z - approx).pow(2).sum()
    true = (ry - approx.clamp_min(0.0)).pow(2).sum()
    relaxed, true, n = total(shards, float(relaxed), float(true), ry.shape[0])
    return relaxed / n, true / n


def closed_form_nonlinear(
    Y: torch.Tensor,
    Yhat: torch.Tensor,
    rank: int,
    *,
    init: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    schedule: tuple[tuple[float, int], ...] = DEFAULT_SCHEDULE,
    activation: str = "relu",
    ridge: float = 1e-8,
    shards: RowShards | None = None,
) -> SolverResult:
    """The paper's alternating solver of min over rank(M) <= r, c of sum_i || r(y_i) - r(M yhat_i + c) ||^2.

    Parameters
    ----------
    Y : Tensor of shape (n, d)
        Original pre-activation responses (targets).
    Yhat : Tensor of shape (n, d)
        The original layer applied to the approximated network's inputs (Yhat = Y in the symmetric case).
    rank : int
        r, 1 <= r <= d.
    init : (P (d, r), Q (d, r), c (d,)), optional
        Starting point; default the linear solution ``reduced_rank_regression(Y, Yhat, rank)``.
    schedule : sequence of (lambda, iterations), default ((0.01, 25), (1.0, 25))
        The penalty weights and how many iterations to run at each (the paper's schedule by default).
    activation : {"relu", "identity"}
        With "identity" the problem is linear and its exact solution, the reduced-rank regression, is
        returned (no iterations).
    ridge : float, default 1e-8
        Passed to :func:`reduced_rank_regression` in every M step.
    shards : RowShards or None
        When the rows are one process's share: the z step is row-wise (local), the M step and the objectives
        add per-shard sums (:func:`reduced_rank_regression`).

    Returns
    -------
    SolverResult
        ``P``, ``Q``, ``c`` of the iterate (the init included) with the lowest true nonlinear objective;
        ``second_weight`` = P and ``second_bias`` = c; ``first_weight``/``first_bias`` are None (no W here:
        use :func:`to_layer_factors`). ``history``: the true objective of the init, then one per iteration;
        ``relaxed_history``: (lambda, relaxed objective) after each iteration.

    Notes
    -----
    With an auxiliary z_i (d,) per sample and penalty lambda, the relaxed problem

        min_{M, c, z}  (1/n) sum_i [ || r(y_i) - r(z_i) ||^2 + lambda || z_i - (M yhat_i + c) ||^2 ]

    is solved by alternating two exact minimisers, so the relaxed objective never increases at fixed lambda:

    - z step (M, c fixed), element-wise with y' = (M yhat_i + c)_j: z0 = min(0, y'),
      z1 = max(0, (lambda y' + r(y)) / (lambda + 1)); keep the one with the smaller
      (r(y) - r(z))^2 + lambda (z - y')^2;
    - M, c step (z fixed): reduced-rank regression of Z on Yhat, c = zbar - M yhatbar.

    Each iteration is a z step then an M step, starting from ``init``.
    """
    _check_activation(activation)
    Y, Yhat = _check_pair(Y, Yhat, shards=shards)
    if Y.shape[1] != Yhat.shape[1]:
        raise ValueError(f"Y and Yhat must have the same channels, got {Y.shape[1]} and {Yhat.shape[1]}")
    rank = _check_rank(rank, Y.shape[1])
    for entry in schedule:
        lam, iters = entry
        if not (lam > 0.0 and math.isfinite(lam)) or not isinstance(iters, int) or iters < 0:
            raise ValueError(f"schedule entries must be (lambda > 0, iterations >= 0), got {entry!r}")
    if init is None:
        P, Q, c = reduced_rank_regression(Y, Yhat, rank, ridge=ridge, shards=shards)
    else:
        P, Q, c = (t.detach().double().clone() for t in init)
        if P.shape != (Y.shape[1], rank) or Q.shape != (Yhat.shape[1], rank) or c.shape != (Y.shape[1],):
            raise ValueError(
                f"init must be (P (d, r), Q (d, r), c (d,)) with d={Y.shape[1]}, r={rank}; "
                f"got {tuple(P.shape)}, {tuple(Q.shape)}, {tuple(c.shape)}"
            )
    before = nonlinear_objective(Y, Yhat, P, Q, c, activation, shards)

    if activation == "identity":
        P_lin, Q_lin, c_lin = reduced_rank_regression(Y, Yhat, rank, ridge=ridge, shards=shards)
        after = nonlinear_objective(Y, Yhat, P_lin, Q_lin, c_lin, activation, shards)
        if after <= before:
            P, Q, c = P_lin, Q_lin, c_lin
        else:
            after = before
        return SolverResult(
            solver="closed-form-nonlinear", objective_before=before, objective_after=after, iterations=0,
            history=(before,), P=P, Q=Q, c=c, second_weight=P, second_bias=c,
        )

    ry = Y.clamp_min(0.0)
    best = (before, P, Q, c)
    history = [before]
    relaxed: list[tuple[float, float]] = []
    iterations = 0
    for lam, iters in schedule:
        for _ in range(iters):
            approx = (Yhat @ Q) @ P.T + c
            Z = _z_step(ry, approx, lam)
            P, Q, c = reduced_rank_regression(Z, Yhat, rank, ridge=ridge, shards=shards)
            approx = (Yhat @ Q) @ P.T + c
            relaxed_value, true = _relaxed_and_true(ry, Z, approx, lam, shards_or_local(shards))
            relaxed.append((float(lam), relaxed_value))
            history.append(true)
            iterations += 1
            if true < best[0]:
                best = (true, P, Q, c)
        logger.debug("closed-form nonlinear: lambda=%g done, objective %.6g (best %.6g)", lam, history[-1], best[0])
    after, P, Q, c = best
    logger.info("closed-form nonlinear (rank %d): objective %.6g -> %.6g in %d iterations", rank, before, after,
                iterations)
    return SolverResult(
        solver="closed-form-nonlinear", objective_before=before, objective_after=after, iterations=iterations,
        history=tuple(history), P=P, Q=Q, c=c, second_weight=P, second_bias=c, relaxed_history=tuple(relaxed),
    )


# ----------------------------------------------------------------------------------------------- RMSProp


@torch.enable_grad()
def rmsprop_minimise(
    init: list[torch.Tensor],
    forward,
    X: torch.Tensor,
    Y: torch.Tensor,
    X_val: torch.Tensor,
    Y_val: torch.Tensor,
    *,
    activation: str = "relu",
    steps: int = 300,
    lr: float = 1e-3,
    alpha: float = 0.9,
    batch_size: int = 256,
    seed: int = 0,
    eval_every: int = 50,
    dtype: torch.dtype = torch.float32,
    shards: RowShards | None = None,
) -> tuple[float, float, list[torch.Tensor], tuple[float, ...]]:
    """Stochastic RMSProp on min (1/n) sum_i || f(y_i) - f(forward(params, x_i)) ||^2 over ``params``.

    Parameters
    ----------
    init : the starting parameters (copied; float64)
    forward : (params, X (m, p)) -> (m, d), the factorized layer applied to input patches
    X, Y : (n, p) patches and (n, d) original responses to fit; X_val, Y_val : held-out samples that choose
        the best iterate (evaluated every ``eval_every`` steps and after the last)
    steps, lr, alpha, batch_size, seed : RMSProp steps, learning rate, squared-gradient decay, samples per
        step (drawn without replacement from a fresh seeded permutation each pass), seed
    dtype : the precision of the iterations (float32 by default: a stochastic refinement's steps are far
        coarser than float32's rounding, and it halves the time); validation and the result are float64
    shards : RowShards or None
        When ``X``, ``Y`` (and ``X_val``, ``Y_val``) are one process's rows, rows ``[o, o + n_s)`` of all n rows
        in shard order: every shard draws the same mini-batch indices over all n rows, takes the loss of its
        own rows of the batch, and the gradients are summed over the shards before the (identical) step;
        validation objectives are sums over the shards. Equal to one process up to float32 summation order.

    Returns
    -------
    (validation objective of ``init``, of the best iterate, the best iterate's parameters, the history of
    validation objectives)

    Notes
    -----
    The mini-batch loss (1/|B|) sum_{i in B} ||f(y_i) - f(forward(params, x_i))||^2 is a sum over rows, so its
    gradient is sum_s (1/|B|) sum_{i in B, i on shard s} grad_i: each shard's part, added.
    """
    shards = shards_or_local(shards)
    first, n = row_offset(shards, X.shape[0])
    local_rows = X.shape[0]
    n_val = max(total(shards, X_val.shape[0])[0], 1.0)
    params = [t.detach().to(dtype).clone().requires_grad_(True) for t in init]
    X = X.to(dtype)
    fy = _act(Y.to(dtype), activation)
    X_val64, fy_val64 = X_val.double(), _act(Y_val.double(), activation)
    X_val, fy_val = X_val.to(dtype), fy_val64.to(dtype)

    def squares(x, fy_, ps) -> torch.Tensor:
        return (fy_ - _act(forward(ps, x), activation)).pow(2).sum()

    def validate(ps) -> float:  # iterates are ranked in the working precision
        with torch.no_grad():
            if shards.local:
                return float(squares(X_val, fy_val, ps) / X_val.shape[0])
            return total(shards, float(squares(X_val, fy_val, ps)))[0] / n_val

    def validate64(ps) -> float:  # the objectives returned (init and chosen iterate) in float64
        with torch.no_grad():
            return total(shards, float(squares(X_val64, fy_val64, [t.double() for t in ps])))[0] / n_val

    start = [t.detach().double() for t in init]
    before = validate64(start)
    best = (validate(params), [t.detach().clone() for t in params])
    history = [before]
    optimiser = torch.optim.RMSprop(params, lr=lr, alpha=alpha)
    generator = torch.Generator().manual_seed(seed)
    batch = min(batch_size, n)
    order = torch.randperm(n, generator=generator)
    cursor = 0
    for step in range(1, steps + 1):
        if cursor + batch > n:
            order, cursor = torch.randperm(n, generator=generator), 0
        idx = order[cursor:cursor + batch]
        cursor += batch
        optimiser.zero_grad(set_to_none=True)
        if shards.local:
            (squares(X[idx], fy[idx], params) / idx.shape[0]).backward()
        else:
            mine = idx[(idx >= first) & (idx < first + local_rows)] - first
            (squares(X[mine], fy[mine], params) / idx.shape[0]).backward()
            grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
            summed = shards.sum(torch.cat([g.reshape(-1) for g in grads]))
            for p, part in zip(params, summed.split([p.numel() for p in params])):
                p.grad = part.view_as(p).clone()
        optimiser.step()
        if step % eval_every == 0 or step == steps:
            value = validate(params)
            history.append(value)
            if value < best[0]:
                best = (value, [t.detach().clone() for t in params])
    after = validate64(best[1])
    if not after < before:  # nothing beat the start (in float64): return it unchanged
        return before, before, start, tuple(history)
    return before, after, [t.double() for t in best[1]], tuple(history)


@torch.enable_grad()
def rmsprop_refine(
    X: torch.Tensor,
    Y: torch.Tensor,
    W: torch.Tensor,
    b: torch.Tensor | None,
    P: torch.Tensor,
    Q: torch.Tensor,
    c: torch.Tensor,
    *,
    activation: str = "relu",
    steps: int = 300,
    lr: float = 1e-3,
    alpha: float = 0.9,
    batch_size: int = 256,
    seed: int = 0,
    eval_every: int = 50,
    X_val: torch.Tensor | None = None,
    Y_val: torch.Tensor | None = None,
    shards: RowShards | None = None,
) -> SolverResult:
    """Refine the factors of y' = U (V x + b1) + c by stochastic RMSProp on min || f(y) - f(y') ||^2.

    Parameters
    ----------
    X : Tensor of shape (n, p)
        Input patches of the layer in the APPROXIMATED network (so Yhat = X W^T + b).
    Y : Tensor of shape (n, d)
        The ORIGINAL network's pre-activation responses (targets).
    W : Tensor of shape (d, p)
        The original layer's weight unfolded along its output mode.
    b : Tensor of shape (d,) or None
    P, Q : Tensor of shape (d, r)
    c : Tensor of shape (d,)
        Initial approximation M = P Q^T, c (e.g. from :func:`reduced_rank_regression`); the factors start at
        U = P, V = Q^T W, b1 = Q^T b.
    activation : {"relu", "identity"}
    steps : int, default 300
        Optimiser steps (mini-batches). 300 steps of 256 samples take well under a second for a typical
        layer and cover a few passes over a calibration set of some 10^4 positions; at lr 1e-3 RMSProp moves
        each parameter by at most ~0.3, a refinement of the linear start rather than a new fit.
    lr : float, default 1e-3
    alpha : float, default 0.9
        RMSProp's decay of the squared-gradient average.
    batch_size : int, default 256
        Samples per step, drawn without replacement from a fresh seeded permutation each pass.
    seed : int, default 0
    eval_every : int, default 50
        Evaluate the validation objective every this many steps (and after the last step).
    X_val : Tensor of shape (m, p), optional
    Y_val : Tensor of shape (m, d), optional
        Held-out samples for the validation objective and the choice of the best iterate; both or neither.
        Default: the training samples.
    shards : RowShards or None
        When the rows are one process's share (see :func:`rmsprop_minimise`).

    Returns
    -------
    SolverResult
        ``first_weight`` V (r, p), ``first_bias`` b1 (r,), ``second_weight`` U (d, r), ``second_bias`` c (d,)
        of the iterate (the init included) with the lowest validation objective; ``P`` = U, ``c``; ``Q`` None.
        ``history``: the validation objective of the init and at each evaluation.

    Notes
    -----
    Loss per mini-batch B: (1/|B|) sum_{i in B} || f(y_i) - f(U (V x_i + b1) + c) ||^2, the objective of
    :func:`nonlinear_objective` evaluated on patches rather than responses, optimised with
    ``torch.optim.RMSprop(lr, alpha)`` in float32 (:func:`rmsprop_minimise`); factors returned in float64.
    """
    _check_activation(activation)
    X, Y = _matrix("X", X, keep_dtype=True), _matrix("Y", Y)  # RMSProp iterates in float32 anyway
    W = _matrix("W", W)
    n, p = X.shape
    d = W.shape[0]
    if W.shape[1] != p:
        raise ValueError(f"W must have shape (d, p) with p={p} (the columns of X), got {tuple(W.shape)}")
    if Y.shape != (n, d):
        raise ValueError(f"Y must have shape (n, d) = {(n, d)}, got {tuple(Y.shape)}")
    if (X_val is None) != (Y_val is None):
        raise ValueError("X_val and Y_val must be given together (or neither)")
    if X_val is None:
        X_val, Y_val = X, Y
    else:
        X_val, Y_val = _matrix("X_val", X_val, keep_dtype=True), _matrix("Y_val", Y_val)
        if X_val.shape[1] != p or Y_val.shape != (X_val.shape[0], d):
            raise ValueError(
                f"X_val must be (m, {p}) and Y_val (m, {d}), got {tuple(X_val.shape)} and {tuple(Y_val.shape)}"
            )
    for name, value, low in (("steps", steps, 0), ("batch_size", batch_size, 1), ("eval_every", eval_every, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if not lr > 0.0:
        raise ValueError(f"lr must be > 0, got {lr!r}")
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"alpha must be in [0, 1), got {alpha!r}")

    V0, b10, U0, c0 = to_layer_factors(W, b, P, Q, c)
    if U0.shape[0] != d or c0.shape != (d,):
        raise ValueError(f"P, Q must be (d, r) and c (d,) with d={d}, got {tuple(P.shape)}, {tuple(c.shape)}")

    def forward(params, x):
        V, b1, U, cc = params
        return (x @ V.T + b1) @ U.T + cc

    before, after, (V, b1, U, cc), history = rmsprop_minimise(
        [V0, b10, U0, c0], forward, X, Y, X_val, Y_val, activation=activation, steps=steps, lr=lr, alpha=alpha,
        batch_size=batch_size, seed=seed, eval_every=eval_every, shards=shards)
    logger.info("rmsprop refine: validation objective %.6g -> %.6g in %d steps", before, after, steps)
    return SolverResult(
        solver="rmsprop", objective_before=before, objective_after=after, iterations=steps,
        history=history, P=U, Q=None, c=cc, first_weight=V, first_bias=b1, second_weight=U,
        second_bias=cc,
    )
