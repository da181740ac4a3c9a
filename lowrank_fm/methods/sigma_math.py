"""Sigma-norm (data-driven) low-rank approximation of a layer: pure float64 numpy, no modules.

With x the layer's input patches (mean mu, covariance Sigma, ALGORITHMS.md section 6; Kalle et al., NeurIPS
2025, arXiv 2511.04494), the mean squared output error of replacing W (d, p) by W~ and the bias b by
b' = b + (W - W~) mu is

    E || (W - W~)(x - mu) ||^2 = || (W - W~) Sigma^1/2 ||_F^2 = tr(D Sigma D^T),  D = W - W~,

which every function here minimises over a structured W~. ``Sigma^1/2`` is a Cholesky factor L (Sigma = L
L^T); a singular Sigma gets an increasing diagonal jitter (:func:`sigma_sqrt`) and the jittered Sigma is the
one used throughout. With Sigma = I each function reduces to its Frobenius counterpart.
"""

from __future__ import annotations

import logging

import numpy as np

log = logging.getLogger(__name__)

__all__ = ["sigma_sqrt", "regularised_sigma", "svd_sigma", "tucker2_sigma", "cp_sigma",
           "corrected_bias"]

JITTERS = (0.0, 1e-9, 1e-8, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3)


def sigma_sqrt(covariance: np.ndarray) -> tuple[np.ndarray, float]:
    """Lower Cholesky factor L of Sigma + eps * (tr Sigma / p) I for the first eps of :data:`JITTERS` that works.

    Parameters
    ----------
    covariance : (p, p) symmetric positive semi-definite

    Returns
    -------
    L : (p, p) lower triangular, L L^T = Sigma + eps (tr Sigma / p) I
    eps : the relative jitter that was added (0.0 when Sigma is positive definite)
    """
    sigma = np.asarray(covariance, dtype=np.float64)
    if sigma.ndim != 2 or sigma.shape[0] != sigma.shape[1]:
        raise ValueError(f"covariance must be a square (p, p) matrix, got shape {sigma.shape}")
    if not np.all(np.isfinite(sigma)):
        raise ValueError("covariance has non-finite entries; check the calibration data")
    sigma = 0.5 * (sigma + sigma.T)
    scale = max(float(np.trace(sigma)) / sigma.shape[0], np.finfo(np.float64).tiny)
    for eps in JITTERS:
        try:
            return np.linalg.cholesky(sigma + eps * scale * np.eye(sigma.shape[0])), eps
        except np.linalg.LinAlgError:
            continue
    raise np.linalg.LinAlgError(f"covariance is not positive semi-definite even with a jitter of {JITTERS[-1]} "
                                "of its mean diagonal; check the calibration data")


def regularised_sigma(covariance: np.ndarray) -> np.ndarray:
    """L L^T of :func:`sigma_sqrt`: Sigma itself when it is positive definite, else Sigma with the jitter."""
    root, eps = sigma_sqrt(covariance)
    if eps > 0:
        log.info("input covariance is singular: added a diagonal jitter of %g of its mean diagonal", eps)
    return root @ root.T


def corrected_bias(bias: np.ndarray | None, weight: np.ndarray, approximation: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """b' = b + (W - W~) mu (d,): keeps the mean response exact, E[W~ x + b'] = E[W x + b].

    bias : (d,) or None (zero); weight, approximation : (d, p); mean : (p,)
    """
    correction = (np.asarray(weight, np.float64) - np.asarray(approximation, np.float64)) @ np.asarray(mean, np.float64)
    return correction if bias is None else np.asarray(bias, np.float64) + correction


def svd_sigma(weight: np.ndarray, sigma: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """The rank-r W~ minimising ||(W - W~) Sigma^1/2||_F, in closed form.

    Parameters
    ----------
    weight : (d, p); sigma : (p, p) positive definite; rank : 1 <= r <= d

    Returns
    -------
    first : (r, p) = U_r^T W;  second : (d, r) = U_r, with U_r the top-r eigenvectors of W Sigma W^T, so that
    W~ = U_r U_r^T W.

    Notes
    -----
    ||(W - W~) L|| is minimised over rank-r W~ L by the truncated SVD of W L (Eckart-Young); its left
    singular vectors are the eigenvectors of W L L^T W^T = W Sigma W^T, and L is invertible.
    """
    weight = np.asarray(weight, dtype=np.float64)
    if not 1 <= int(rank) <= weight.shape[0]:
        raise ValueError(f"rank must be in [1, {weight.shape[0]}] (the output channels), got {rank!r}")
    gram = weight @ sigma @ weight.T
    vectors = np.linalg.eigh(0.5 * (gram + gram.T))[1][:, ::-1][:, : int(rank)]
    return vectors.T @ weight, vectors


def _spd_solve(matrix: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """matrix^-1 rhs for a symmetric PSD matrix (least-squares solution when it is singular)."""
    try:
        return np.linalg.solve(matrix, rhs)
    except np.linalg.LinAlgError:
        return np.linalg.lstsq(matrix, rhs, rcond=None)[0]


#: the ALS stops when a sweep lowers the Sigma error by less than this fraction. On vgg-fmnist's layers at 6x
#: (auto, 2026-11-26) sweeps 10 to 30 lowered it by 0.08% in all (each layer ran the cap of 30 at 1e-6), and the
#: whole-model correction refits the last factor afterwards anyway
SWEEP_TOLERANCE = 1e-4
#: relative residual ||b - A x|| / ||b|| at which a CG solve of the ALS sweeps stops. The solves sit inside an
#: outer ALS loop that re-solves from the current factor, so an exact inner solve buys nothing: on a 128x128x3x3
#: kernel (Tucker-2 ranks 60/60, 6 sweeps) 1e-3 took 55 operator applications against 249 at 1e-10 (every solve
#: ran its 50-step cap; 2.7x less time) for a Sigma error higher by 6e-6 relatively; on CP-Sigma (rank 24, 10
#: sweeps) 369 against 848 applications, +2e-4. At 1e-2 the error rose by 1.4e-3 (issue 17, 2026-11-26).
CG_TOLERANCE = 1e-3


def _conjugate_gradient(apply, rhs: np.ndarray, start: np.ndarray, iterations: int, tol: float = CG_TOLERANCE
                        ) -> np.ndarray:
    """Approximate solution of apply(x) = rhs for a symmetric PSD linear map, by CG from ``start``: at most
    ``iterations`` steps, stopping once the residual ||rhs - apply(x)|| falls to ``tol`` ||rhs||.

    Each iterate minimises the quadratic 1/2 x^T A x - b^T x over ``start`` plus a Krylov space, so the
    quadratic never rises above its value at ``start``.
    """
    x = start.copy()
    r = rhs - apply(x)
    p = r.copy()
    rr = float(np.sum(r * r))
    stop = tol**2 * max(float(np.sum(rhs * rhs)), np.finfo(np.float64).tiny)
    for _ in range(iterations):
        if rr <= stop:
            break
        ap = apply(p)
        curvature = float(np.sum(p * ap))
        if curvature <= 0:
            break
        alpha = rr / curvature
        x += alpha * p
        r -= alpha * ap
        rr_new = float(np.sum(r * r))
        p = r + (rr_new / rr) * p
        rr = rr_new
    return x


def _check_inputs(weight: np.ndarray, sigma: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    weight = np.asarray(weight, dtype=np.float64)
    sigma = np.asarray(sigma, dtype=np.float64)
    if weight.ndim != 4:
        raise ValueError(f"weight must have shape (T, S, kh, kw), got {weight.shape}")
    p = int(np.prod(weight.shape[1:]))
    if sigma.shape != (p, p):
        raise ValueError(f"sigma must have shape ({p}, {p}) = (S kh kw, S kh kw) for weight {weight.shape}, got {sigma.shape}")
    return weight, sigma


class _Monotone:
    """Tracks tr(D Sigma D^T) of the current iterate; refuses any update that raises it.

    ``factored(state) -> (L (T, R), M (R, p))`` with W~ = L M; with D = W - L M the error is evaluated as
    tr(W Sigma W^T) - 2 <L^T (W Sigma), M> + <L^T L, M Sigma M^T> (the first term computed once): R p^2
    multiply-adds instead of T p^2 for forming D Sigma.
    """

    def __init__(self, weight2d: np.ndarray, w_sigma: np.ndarray, sigma: np.ndarray, factored, state: dict) -> None:
        self.w_sigma, self.sigma, self.factored = w_sigma, sigma, factored  # w_sigma = W Sigma
        self.constant = float(np.sum(w_sigma * weight2d))
        self.state = state
        self.value = self.error(state)
        self.history = [self.value]

    def error(self, state: dict) -> float:
        left, right = self.factored(state)
        cross = float(np.sum((left.T @ self.w_sigma) * right))
        quadratic = float(np.sum((left.T @ left) * (right @ self.sigma @ right.T)))
        return max(self.constant - 2.0 * cross + quadratic, 0.0)

    def offer(self, changes: dict) -> None:
        candidate = {**self.state, **changes}
        value = self.error(candidate)
        if np.isfinite(value) and value <= self.value:
            self.state, self.value = candidate, value


def _run(monitor: _Monotone, sweep, iterations: int, tol: float) -> _Monotone:
    for _ in range(int(iterations)):
        before = monitor.value
        sweep(monitor)
        monitor.history.append(monitor.value)
        if before <= 0 or (before - monitor.value) / before < tol:
            break
    return monitor


def _times_kron_identity(matrix: np.ndarray, factor: np.ndarray, k2: int) -> np.ndarray:
    """matrix @ (factor (x) I_k2) without forming the Kronecker product: (M, P k2) @ (P k2, Q k2) -> (M, Q k2),
    entry [m, (q, h)] = sum_p matrix[m, (p, h)] factor[p, q]; k2 times fewer products than the dense form."""
    m, p, q = matrix.shape[0], factor.shape[0], factor.shape[1]
    return np.einsum("mph,pq->mqh", matrix.reshape(m, p, k2), factor, optimize=True).reshape(m, q * k2)


def _kron_identity_sandwich(sigma: np.ndarray, factor: np.ndarray, k2: int) -> np.ndarray:
    """B^T Sigma B for B = factor (x) I_k2, factor (S, R): Sigma (S k2, S k2) -> (R k2, R k2), contracting
    Sigma's two S axes with the factor in turn (k2 times fewer products than with B dense)."""
    s, r = factor.shape
    half = np.einsum("sb,shtg->bhtg", factor, sigma.reshape(s, k2, s, k2), optimize=True)  # B^T Sigma
    return np.einsum("bhtg,tc->bhcg", half, factor, optimize=True).reshape(r * k2, r * k2)


def tucker2_sigma(weight: np.ndarray, sigma: np.ndarray, core: np.ndarray, u_out: np.ndarray, u_in: np.ndarray,
                  *, iterations: int = 30, tol: float = SWEEP_TOLERANCE, cg_iterations: int = 50
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[float]]:
    """Tucker-2 of a conv kernel under the Sigma norm, by ALS from a (Frobenius) start.

    Parameters
    ----------
    weight : (T, S, kh, kw); sigma : (S kh kw, S kh kw), positive definite (see :func:`regularised_sigma`)
    core : (R4, R3, kh, kw), u_out : (T, R4), u_in : (S, R3): the start, e.g. :func:`~.tucker.tucker2`
    iterations : most sweeps; tol : stop when a sweep lowers the error by a relative amount below ``tol``
    cg_iterations : most CG steps of each u_in update

    Returns
    -------
    core, u_out (orthonormal columns), u_in (orthonormal columns), history : the error
    tr(D Sigma D^T) at the start and after every sweep (never increasing)

    Notes
    -----
    W~ = U_T G B^T with W, W~ unfolded (T, S k^2), G the core unfolded (R4, R3 k^2) and B = U_S (x) I_{k^2}.
    A sweep: U_T <- W Sigma A^T (A Sigma A^T)^-1 with A = G B^T, then U_T = QR, R folded into G;
    U_S from its normal equations (W~ is linear in U_S; CG warm-started at the current U_S), then QR, R
    folded into G;
    G <- U_T^T W Sigma B (B^T Sigma B)^-1. An update that raises the error is not taken.
    """
    weight, sigma = _check_inputs(weight, sigma)
    t, s, kh, kw = weight.shape
    k2 = kh * kw
    w2 = weight.reshape(t, -1)
    w_sigma = w2 @ sigma
    r4, r3 = u_out.shape[1], u_in.shape[1]

    def factored(st):  # W~ = U_T A, A = G B^T (R4, S k2)
        return st["u_out"], _times_kron_identity(st["core"].reshape(r4, -1), st["u_in"].T, k2)

    state = {"core": np.asarray(core, np.float64).reshape(r4, r3, k2), "u_out": np.asarray(u_out, np.float64),
             "u_in": np.asarray(u_in, np.float64)}

    def sweep(m: _Monotone):
        st = m.state
        a = _times_kron_identity(st["core"].reshape(r4, -1), st["u_in"].T, k2)  # A = G B^T, (R4, S k2)
        new_out = _spd_solve(a @ sigma @ a.T, a @ w_sigma.T).T  # W Sigma A^T (A Sigma A^T)^-1
        q, r = np.linalg.qr(new_out)
        m.offer({"u_out": q, "core": np.einsum("ab,bch->ach", r, st["core"])})
        st = m.state
        core = st["core"]  # (R4, R3, k2); with U_T orthonormal the U_S problem lives in core space:
        # min tr((U_T^T W - V) Sigma (U_T^T W - V)^T) over V = core x_2 U_S, shape (R4, S k2)
        forward = lambda x: (core.transpose(0, 2, 1) @ x.T).transpose(0, 2, 1).reshape(r4, -1)  # noqa: E731
        adjoint = lambda y: y.reshape(r4, s, k2).transpose(1, 0, 2).reshape(s, -1) @ core.transpose(0, 2, 1).reshape(-1, r3)  # noqa: E731
        new_in = _conjugate_gradient(lambda x: adjoint(forward(x) @ sigma), adjoint(st["u_out"].T @ w_sigma),
                                     st["u_in"], cg_iterations)
        q, r = np.linalg.qr(new_in)
        m.offer({"u_in": q, "core": np.einsum("bc,ach->abh", r, st["core"])})
        st = m.state
        gram = _kron_identity_sandwich(sigma, st["u_in"], k2)  # B^T Sigma B
        core_new = _spd_solve(gram, _times_kron_identity(st["u_out"].T @ w_sigma, st["u_in"], k2).T).T  # (R4, R3 k2)
        m.offer({"core": core_new.reshape(r4, r3, k2)})

    monitor = _run(_Monotone(w2, w_sigma, sigma, factored, state), sweep, iterations, tol)
    st = monitor.state
    return st["core"].reshape(r4, r3, kh, kw), st["u_out"], st["u_in"], monitor.history


def _khatri_rao(factors: list[np.ndarray]) -> np.ndarray:
    """(S, kh, kw, R) with entries a_S[s, r] a_H[i, r] a_W[j, r] (the Khatri-Rao product, unflattened)."""
    a_s, a_h, a_w = factors
    return a_s[:, None, None, :] * a_h[None, :, None, :] * a_w[None, None, :, :]




def cp_sigma(weight: np.ndarray, sigma: np.ndarray, factors: list[np.ndarray], *, iterations: int = 30,
             tol: float = SWEEP_TOLERANCE, cg_iterations: int = 30) -> tuple[list[np.ndarray], list[float]]:
    """CP decomposition of a conv kernel under the Sigma norm, by ALS from a (Frobenius) start.

    Parameters
    ----------
    weight : (T, S, kh, kw); sigma : (S kh kw, S kh kw), positive definite
    factors : [a_T (T, R), a_S (S, R), a_H (kh, R), a_W (kw, R)], the start (e.g. :func:`~.cp.cp_als`)

    Returns
    -------
    factors : the four refined factors (column scale carried by a_T); history : tr(D Sigma D^T) at the start
    and after every sweep (never increasing)

    Notes
    -----
    W~ = a_T Z^T with Z = a_S (.) a_H (.) a_W (Khatri-Rao, (S kh kw, R)). a_T <- W Sigma Z (Z^T Sigma Z)^-1;
    each other factor solves its normal equations (W~ is linear in it) by CG warm-started at the current
    factor. Columns of a_S, a_H, a_W are then rescaled to unit norm, the scale
    moving into a_T (W~ unchanged). An update that raises the error is not taken.
    """
    weight, sigma = _check_inputs(weight, sigma)
    t = weight.shape[0]
    w2 = weight.reshape(t, -1)
    w_sigma = w2 @ sigma
    shape = weight.shape

    def factored(st):  # W~ = a_T Z^T
        return st["f"][0], _khatri_rao(st["f"][1:]).reshape(-1, st["f"][0].shape[1]).T

    def sweep(m: _Monotone):
        for mode in range(4):
            fs = m.state["f"]
            if mode == 0:
                z = _khatri_rao(fs[1:]).reshape(-1, fs[0].shape[1])
                new = _spd_solve(z.T @ sigma @ z, z.T @ w_sigma.T).T
            else:  # min over this factor of tr(Z^T Sigma Z G) - 2 tr(a_T^T W Sigma Z), G = a_T^T a_T
                gram = fs[0].T @ fs[0]
                rest = list(fs[1:])

                def forward(x, mode=mode, rest=rest):
                    parts = list(rest)
                    parts[mode - 1] = x
                    return _khatri_rao(parts).reshape(sigma.shape[0], -1)

                def adjoint(y, mode=mode, rest=rest):
                    parts = list(rest)
                    parts[mode - 1] = np.ones_like(parts[mode - 1])
                    axes = tuple(n for n in range(3) if n != mode - 1)
                    return (y.reshape(*shape[1:], -1) * _khatri_rao(parts)).sum(axis=axes)

                new = _conjugate_gradient(lambda x: adjoint(sigma @ forward(x) @ gram), adjoint(w_sigma.T @ fs[0]),
                                          fs[mode], cg_iterations)
            parts = list(fs)
            parts[mode] = new
            m.offer({"f": parts})
        fs = list(m.state["f"])
        for mode in (1, 2, 3):
            norms = np.linalg.norm(fs[mode], axis=0)
            norms = np.where(norms > 0, norms, 1.0)
            fs[mode] = fs[mode] / norms
            fs[0] = fs[0] * norms
        m.state = {"f": fs}

    start = {"f": [np.asarray(f, dtype=np.float64) for f in factors]}
    monitor = _run(_Monotone(w2, w_sigma, sigma, factored, start), sweep, iterations, tol)
    return monitor.state["f"], monitor.history
