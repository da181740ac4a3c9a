"""Grouped SVD of a layer and ALDS-style min-max budget allocation: pure float64 numpy, no modules.

ALDS (Liebenwein et al., NeurIPS 2021; ALGORITHMS.md section 7) splits a conv's input channels into k equal
groups and approximates each group's block of columns W_g (d, p/k) of the unfolded weight W = [W_1 ... W_k]
by rank j: W~_g = P_g W_g with P_g = U_g U_g^T, U_g (d, j). The layer becomes a grouped conv (k groups of j
filters U_g^T W_g) then a 1x1 conv [U_1 ... U_k] (d, k j).

The error is measured in a Sigma norm (Sigma = I: the Frobenius norm, weight-only ALDS; Sigma = the input
covariance: the data-aware variant): with Q_g = I - P_g,

    err(j) = tr(D Sigma D^T) = sum_{g, h} tr(Q_g A_gh Q_h),   A_gh = W_g Sigma_gh W_h^T (d, d),

and each U_g is the top-j eigenvectors of A_gg (the best choice for its own block). Expanding the trace, every
j from 0 to d costs only prefix sums of the d x d matrices U_g^T A_gh U_h and U_h^T U_g (:func:`grouped_errors`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["group_bases", "grouped_errors", "grouped_factors", "Candidate", "minmax_allocation"]


def _blocks(weight: np.ndarray, groups: int) -> list[slice]:
    p = weight.shape[1]
    if groups < 1 or p % groups:
        raise ValueError(f"groups must divide the {p} columns of the unfolded weight, got {groups}")
    size = p // groups
    return [slice(g * size, (g + 1) * size) for g in range(groups)]


def group_bases(weight: np.ndarray, sigma: np.ndarray | None, groups: int) -> list[np.ndarray]:
    """U_g (d, d) per group: eigenvectors of A_gg = W_g Sigma_gg W_g^T, eigenvalues descending.

    weight : (d, p), columns grouped in ``groups`` equal consecutive blocks; sigma : (p, p) or None (= I)
    """
    bases = []
    for block in _blocks(weight, groups):
        w = weight[:, block]
        gram = w @ w.T if sigma is None else w @ sigma[block, block] @ w.T
        bases.append(np.linalg.eigh(0.5 * (gram + gram.T))[1][:, ::-1])
    return bases


def grouped_errors(weight: np.ndarray, sigma: np.ndarray | None, bases: list[np.ndarray]) -> np.ndarray:
    """err(j) = tr(D Sigma D^T) of the grouped rank-j approximation for j = 0 .. d, shape (d + 1,).

    Notes
    -----
    tr(Q_g A Q_h) = tr A - tr(P_g A) - tr(A P_h) + tr(P_g A P_h); with Z = U_g^T A U_h and O = U_h^T U_g,
    tr(P_g A) and tr(A P_h) are prefix sums of diag(U_g^T A U_g), diag(U_h^T A U_h), and
    tr(P_g A P_h) = sum_{a, b < j} Z[a, b] O[b, a].
    """
    blocks = _blocks(weight, len(bases))
    d = weight.shape[0]
    errors = np.zeros(d + 1)
    for g, bg in enumerate(blocks):
        for h, bh in enumerate(blocks):
            if sigma is None and g != h:
                continue
            cross = np.eye(bg.stop - bg.start) if sigma is None else sigma[bg, bh]
            a = weight[:, bg] @ cross @ weight[:, bh].T
            u_g, u_h = bases[g], bases[h]
            left = np.concatenate([[0.0], np.cumsum(np.einsum("ta,ts,sa->a", u_g, a, u_g))])
            right = np.concatenate([[0.0], np.cumsum(np.einsum("ta,ts,sa->a", u_h, a, u_h))])
            both = (u_g.T @ a @ u_h) * (u_h.T @ u_g).T
            square = np.concatenate([[0.0], np.diag(np.cumsum(np.cumsum(both, axis=0), axis=1))])
            errors += np.trace(a) - left - right + square
    return np.clip(errors, 0.0, None)


def grouped_factors(weight: np.ndarray, bases: list[np.ndarray], rank: int) -> tuple[np.ndarray, np.ndarray]:
    """first (k j, p/k): rows g j .. (g+1) j - 1 are U_gj^T W_g; second (d, k j) = [U_1j ... U_kj].

    W~ = [U_1j U_1j^T W_1, ..., U_kj U_kj^T W_k]: the grouped layer applies ``first`` group by group.
    """
    blocks = _blocks(weight, len(bases))
    first = np.concatenate([u[:, :rank].T @ weight[:, b] for u, b in zip(bases, blocks)])
    second = np.concatenate([u[:, :rank] for u in bases], axis=1)
    return first, second


@dataclass(frozen=True)
class Candidate:
    """One setting of one layer: its MACs, its relative error, and what it is (e.g. (groups, rank), None:
    the original layer)."""

    macs: int
    error: float
    choice: object = None


def minmax_allocation(layers: dict[str, list[Candidate]], budget: float) -> tuple[dict[str, Candidate], float, bool]:
    """Per layer one candidate, minimising the largest error subject to total MACs <= ``budget``.

    For an error level e each layer takes its cheapest candidate with error <= e; the total is non-increasing
    in e, so a binary search over the candidates' errors finds the smallest feasible level (optimal for
    the min-max objective over these candidates). Every layer must offer a candidate; the original layer
    (error 0) makes every level feasible for it.

    Returns (choice per layer, the level reached, whether the budget is met); when it is not, every layer
    takes its cheapest candidate.
    """
    for name, options in layers.items():
        if not options:
            raise ValueError(f"layer {name!r} has no candidate")
    levels = np.unique([c.error for options in layers.values() for c in options])

    def pick(level: float) -> dict[str, Candidate]:
        return {name: min((c for c in options if c.error <= level), key=lambda c: (c.macs, c.error))
                for name, options in layers.items()}

    def total(choice: dict[str, Candidate]) -> int:
        return sum(c.macs for c in choice.values())

    lo, hi = 0, len(levels) - 1
    if total(pick(levels[hi])) > budget:
        cheapest = {name: min(options, key=lambda c: (c.macs, c.error)) for name, options in layers.items()}
        return cheapest, max(c.error for c in cheapest.values()), False
    while lo < hi:
        mid = (lo + hi) // 2
        if total(pick(levels[mid])) <= budget:
            hi = mid
        else:
            lo = mid + 1
    return pick(levels[lo]), float(levels[lo]), True
