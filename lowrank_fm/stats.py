"""Streaming mean and covariance of layer responses, in float64.

:class:`StreamingCovariance` follows scikit-learn's estimator shape: ``partial_fit(x) -> self`` streams
blocks of samples, learned state ends in an underscore. It merges blocks with the pairwise update of
Chan, Golub and LeVeque (1979), so the result does not depend on how the samples are split into blocks.

:func:`principal_components` turns the covariance into the eigen-decomposition the output-feature-map method
uses (eigenvalues descending); :func:`incremental_pca_basis` gives the same basis with scikit-learn's
IncrementalPCA, offered as an option and used in tests as an independent computation.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

__all__ = ["StreamingCovariance", "principal_components", "incremental_pca_basis"]


class StreamingCovariance:
    """Running mean and covariance of d-dimensional samples.

    Attributes
    ----------
    n_samples_seen_ : int
    mean_ : ndarray (d,) float64
    covariance_ : ndarray (d, d) float64, the population covariance (1/n) sum (y - mean)(y - mean)^T

    Notes
    -----
    Merging a block B (n_b samples, mean m_b, scatter S_b) into the state (n, m, S):
    S <- S + S_b + (n n_b / (n + n_b)) (m_b - m)(m_b - m)^T,  m <- m + (n_b / (n + n_b)) (m_b - m).
    """

    def __init__(self) -> None:
        self.n_samples_seen_ = 0
        self.mean_: np.ndarray | None = None
        self._scatter: np.ndarray | None = None

    def partial_fit(self, x: np.ndarray) -> "StreamingCovariance":
        """Add samples ``x`` of shape (n, d); returns self."""
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2:
            raise ValueError(f"partial_fit expects samples of shape (n, d), got shape {x.shape}")
        if self.mean_ is not None and x.shape[1] != self.mean_.shape[0]:
            raise ValueError(f"partial_fit: samples have {x.shape[1]} features, earlier ones had {self.mean_.shape[0]}")
        if x.shape[0] == 0:
            return self
        mean_b = x.mean(axis=0)
        centred = x - mean_b
        return self._merge(x.shape[0], mean_b, centred.T @ centred)

    def merge(self, other: "StreamingCovariance") -> "StreamingCovariance":
        """Fold another estimator's state into this one (e.g. from another process); returns self."""
        if other.n_samples_seen_ == 0:
            return self
        return self._merge(other.n_samples_seen_, other.mean_, other._scatter)

    def _merge(self, n_b: int, mean_b: np.ndarray, scatter_b: np.ndarray) -> "StreamingCovariance":
        """Fold a block's (count, mean, scatter) into the state (the update in the class Notes)."""
        if self.mean_ is None:
            self.mean_, self._scatter, self.n_samples_seen_ = mean_b.copy(), scatter_b.copy(), n_b
            return self
        n = self.n_samples_seen_
        delta = mean_b - self.mean_
        total = n + n_b
        self._scatter = self._scatter + scatter_b + (n * n_b / total) * np.outer(delta, delta)
        self.mean_ = self.mean_ + (n_b / total) * delta
        self.n_samples_seen_ = total
        return self

    @property
    def covariance_(self) -> np.ndarray:
        if self._scatter is None:
            raise ValueError("StreamingCovariance has seen no samples; call partial_fit first")
        return self._scatter / self.n_samples_seen_

    @classmethod
    def from_blocks(cls, blocks: Iterable[np.ndarray]) -> "StreamingCovariance":
        """Fit on an iterable of (n_i, d) blocks."""
        estimator = cls()
        for block in blocks:
            estimator.partial_fit(block)
        return estimator


def principal_components(covariance: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigen-decomposition of a symmetric PSD matrix, eigenvalues descending and clipped at 0.

    Parameters
    ----------
    covariance : (d, d)

    Returns
    -------
    eigenvalues : (d,) float64, descending
    eigenvectors : (d, d) float64, column a belongs to eigenvalue a
    """
    covariance = np.asarray(covariance, dtype=np.float64)
    values, vectors = np.linalg.eigh(0.5 * (covariance + covariance.T))
    order = np.argsort(values)[::-1]
    return np.clip(values[order], 0.0, None), vectors[:, order]


def incremental_pca_basis(blocks: Iterable[np.ndarray], n_components: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean, explained variances and components with scikit-learn's IncrementalPCA.

    Each block must hold at least ``n_components`` samples (scikit-learn's rule); blocks are merged into the
    next one when they are too small. When the whole stream holds fewer samples n than features d, the
    basis is completed with an orthonormal complement carrying zero variance.

    Returns
    -------
    mean : (d,)
    eigenvalues : (k,) descending (population variances, comparable to :func:`principal_components`)
    eigenvectors : (d, k)
    """
    from sklearn.decomposition import IncrementalPCA

    ipca = None
    pending: list[np.ndarray] = []
    for block in blocks:
        block = np.asarray(block, dtype=np.float64)
        pending.append(block)
        stacked = np.concatenate(pending)
        wanted = n_components or block.shape[1]
        if stacked.shape[0] >= wanted:
            ipca = ipca or IncrementalPCA(n_components=wanted)
            ipca.partial_fit(stacked)
            pending = []
    if ipca is None and not pending:
        raise ValueError("incremental_pca_basis got no samples")
    if ipca is None:  # fewer samples than components in the whole stream
        stacked = np.concatenate(pending)
        ipca = IncrementalPCA(n_components=min(stacked.shape)).fit(stacked)
    elif pending:
        ipca.partial_fit(np.concatenate(pending))
    n = ipca.n_samples_seen_
    # scikit-learn reports variances with 1/(n-1); rescale to the population covariance's eigenvalues
    values = ipca.explained_variance_ * (n - 1) / n
    vectors = ipca.components_.T
    d = vectors.shape[0]
    wanted = n_components or d
    if vectors.shape[1] < wanted:
        q, _ = np.linalg.qr(np.concatenate([vectors, np.eye(d)], axis=1))
        vectors = np.concatenate([vectors, q[:, vectors.shape[1] : wanted]], axis=1)
        values = np.concatenate([values, np.zeros(wanted - values.size)])
    return ipca.mean_, values, vectors
