"""Whole-model correction of a factorized layer's output-side factor (ALGORITHMS.md, "Whole-model correction
for any factorization"; the asymmetric step of Zhang, Zou, He, Sun, TPAMI 2016, applied to any method).

Pure math: tensors in, factors out; samples are ROWS. Which factor is refitted and how its inputs are computed
from the layer's input patches is the business of :mod:`lowrank_fm.layers` (:func:`~lowrank_fm.layers.last_factor_inputs`);
the layer-wise pass (:mod:`lowrank_fm.building`) calls both.

Notation
--------
A factorized layer is y' = B z + c, where z = A(xhat) is the output of all its earlier factors (any structure,
fixed here) on the layer's input xhat in the network approximated so far, seen at one output position as the
input patch of the last factor (q values), B (d, q) the last factor's weight unfolded along its output mode and
c (d,) its bias. y = W x + b is the ORIGINAL layer's response on the ORIGINAL network's input x at the same
position, f the activation that follows the layer (``"relu"``, or ``"identity"`` before a residual sum).
"""

from __future__ import annotations

import torch

from .methods.shards import RowShards, shards_or_local, total
from .methods.solvers import ACTIVATIONS, nonlinear_objective, reduced_rank_regression, rmsprop_minimise

__all__ = ["CORRECTION_SOLVERS", "refit_output_factor", "affine_least_squares"]

CORRECTION_SOLVERS = ("rmsprop", "none")


def affine_least_squares(Z: torch.Tensor, Y: torch.Tensor, *, ridge: float = 1e-8, shards: RowShards | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """The affine map that best predicts ``Y`` from ``Z`` in least squares: min over B, c of ||Y - Z B^T - c||_F.

    Parameters
    ----------
    Z : Tensor of shape (n, q), the regressors (the last factor's input patches), samples as rows
    Y : Tensor of shape (n, d), the targets (the original responses)
    ridge : relative ridge lambda = ridge * tr(Zc^T Zc) / q on the regressor covariance (0: plain least
        squares where Zc^T Zc is invertible)
    shards : RowShards or None, when ``Z``, ``Y`` are one process's rows (the moments are summed over them)

    Returns
    -------
    B : Tensor of shape (d, q), float64
    c : Tensor of shape (d,), float64

    Notes
    -----
    With Zc = Z - zbar, Yc = Y - ybar (centred rows)

        B = Yc^T Zc (Zc^T Zc + lambda I)^-1,    c = ybar - B zbar.

    This is :func:`~lowrank_fm.methods.solvers.reduced_rank_regression` at full rank min(d, q) (the rank
    constraint is then void: B = P Q^T with P Q^T = Mhat), reused rather than written again.
    """
    Z, Y = Z.double(), Y.double()
    P, Q, c = reduced_rank_regression(Y, Z, min(Y.shape[1], Z.shape[1]), ridge=ridge, shards=shards)
    return P @ Q.T, c


def _objective(Y: torch.Tensor, Z: torch.Tensor, B: torch.Tensor, c: torch.Tensor, activation: str,
               shards: RowShards | None) -> float:
    """Mean over rows (of every shard) of || f(y) - f(B z + c) ||^2 (float64)."""
    eye = torch.eye(B.shape[1], dtype=torch.float64)
    return nonlinear_objective(Y.double(), Z.double(), B.double(), eye, c.double(), activation=activation,
                               shards=shards)


def _with_offset(Z: torch.Tensor, Y: torch.Tensor, offset: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[Z, o] and y + o: with B' = [B, I], B' [z; o] + c = (B z + c) + o, so the objectives compare the sums."""
    return torch.cat([Z.double(), offset.double()], dim=1), Y + offset.double()


def _extended(B: torch.Tensor) -> torch.Tensor:
    return torch.cat([B.double(), torch.eye(B.shape[0], dtype=torch.float64)], dim=1)


def refit_output_factor(Z: torch.Tensor, Y: torch.Tensor, heldout: torch.Tensor, weight: torch.Tensor,
                        bias: torch.Tensor | None, *, activation: str = "identity", solver: str = "rmsprop",
                        steps: int | None = None, seed: int = 0, shards: RowShards | None = None,
                        offset: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Refit a factorized layer's last factor to the original responses from the approximated inputs.

    Parameters
    ----------
    Z : Tensor of shape (n, q), the last factor's input patches z = A(xhat) (float32 or float64)
    Y : Tensor of shape (n, d), the original network's responses y = W x + b at the same positions
    heldout : bool Tensor of shape (n,), rows of held-out calibration images: they choose between the
        candidates and are never fitted (without any, the fitted rows choose)
    weight : Tensor of shape (d, q), the last factor as the method built it, B0; bias : (d,) or None, c0
    activation : "relu" or "identity", f
    solver : "rmsprop" (least squares, then RMSProp on the nonlinear objective) or "none" (least squares only)
    steps : RMSProp steps (None: the solver's default); seed : seeds RMSProp's mini-batches
    shards : RowShards or None: ``Z``, ``Y``, ``heldout`` are one process's rows; the least squares' moments,
        the objectives and RMSProp's gradients are sums over the processes (each works on its own rows only)
    offset : None, or (n, d) o added to both sides before the activation (a layer before a residual sum, fitted
        with the shortcut compensation: Y = y + v - vhat, o = vhat, f the activation after the sum): the
        objectives become ||f(y_i + o_i) - f(B z_i + c + o_i)||^2; the least squares is unchanged

    Returns
    -------
    B : Tensor of shape (d, q), c : Tensor of shape (d,), float64: whichever of (the method's B0, c0; the least
        squares; the refined) has the lowest held-out objective
    info : ``kept`` ("original", "linear" or "refined"), ``error_original``, ``error_linear``,
        ``error_refined`` (held-out objective relative to E||f(y)||^2), ``iterations``, ``samples`` (fit rows)

    Notes
    -----
    1. Linear refit (:func:`affine_least_squares`): B, c = argmin sum_i ||y_i - B z_i - c||^2 on the fit rows.
    2. Nonlinear refit: from that start, RMSProp on (1/n) sum_i ||f(y_i) - f(B z_i + c)||^2 (mini-batches of the
       fit rows, the best iterate on the held-out rows; :func:`~lowrank_fm.methods.solvers.rmsprop_minimise`).
    3. Held-out rule: a candidate replaces the one before only when its held-out objective is strictly lower, so
       the result is never worse on the held-out rows than what the method built.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if solver not in CORRECTION_SOLVERS:
        raise ValueError(f"solver must be one of {CORRECTION_SOLVERS}, got {solver!r}")
    if Z.ndim != 2 or Y.ndim != 2 or Z.shape[0] != Y.shape[0] or heldout.shape != (Z.shape[0],):
        raise ValueError(f"Z (n, q), Y (n, d) and heldout (n,) must agree in n, got {tuple(Z.shape)}, "
                         f"{tuple(Y.shape)} and {tuple(heldout.shape)}")
    d, q = Y.shape[1], Z.shape[1]
    if tuple(weight.shape) != (d, q):
        raise ValueError(f"weight must have shape (d, q) = {(d, q)}, got {tuple(weight.shape)}")
    heldout = heldout.bool()
    every = shards_or_local(shards)
    n_fit, n_held = total(every, float((~heldout).sum()), float(heldout.sum()))
    fit, val = ~heldout, (heldout if n_held > 0 else ~heldout)
    if not n_fit > 0:
        raise ValueError("refit_output_factor needs fit rows: every row is held out")
    Y = Y.double()
    B0 = weight.detach().double()
    c0 = torch.zeros(d, dtype=torch.float64) if bias is None else bias.detach().double()
    if offset is not None and tuple(offset.shape) != tuple(Y.shape):
        raise ValueError(f"offset must have the shape of Y {tuple(Y.shape)}, got {tuple(offset.shape)}")
    # what the objectives compare: (Zs, Ys) = (Z, Y), or ([Z, o], y + o) with B extended to [B, I]
    Zs, Ys = (Z, Y) if offset is None else _with_offset(Z, Y, offset)
    extend = (lambda B: B) if offset is None else _extended
    fy = torch.relu(Ys[val]) if activation == "relu" else Ys[val]
    squares, count = total(every, float(fy.pow(2).sum()), fy.shape[0])
    scale = max(squares / max(count, 1.0), 1e-30)

    best = (_objective(Ys[val], Zs[val], extend(B0), c0, activation, shards), B0, c0, "original")
    info: dict = {"error_original": best[0] / scale, "iterations": 0, "samples": int(n_fit)}
    B1, c1 = affine_least_squares(Z[fit], Y[fit], shards=shards)
    linear = _objective(Ys[val], Zs[val], extend(B1), c1, activation, shards)
    info["error_linear"] = linear / scale
    if linear < best[0]:
        best = (linear, B1, c1, "linear")
    if solver == "rmsprop":
        kwargs = {} if steps is None else {"steps": int(steps)}

        def forward(params, z):  # B z + c, plus the offset columns when there are any
            return z[:, :q] @ params[0].T + params[1] + (z[:, q:] if z.shape[1] > q else 0.0)

        before, after, (B2, c2), _ = rmsprop_minimise([B1, c1], forward, Zs[fit], Ys[fit], Zs[val], Ys[val],
                                                      activation=activation, seed=seed, shards=shards, **kwargs)
        info["iterations"] = int(kwargs.get("steps", 300))
        info["error_refined"] = after / scale
        if after < before and after < best[0]:  # rmsprop_minimise returns its start when nothing beat it
            best = (after, B2, c2, "refined")
    info["kept"] = best[3]
    return best[1], best[2], info
