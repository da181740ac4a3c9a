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

__all__ = ["StreamingCovariance", "merge_moments", "principal_components", "incremental_pca_basis"]


def merge_moments(count_a: int, mean_a, scatter_a, count_b: int, mean_b, scatter_b):
    """(count, mean, scatter) of two blocks of samples together, from each block's own (Chan et al., 1979).

    Parameters
    ----------
    count_a, count_b : int, the blocks' sample counts (both > 0)
    mean_a, mean_b : (d,) float64, the blocks' means
    scatter_a, scatter_b : (d, d) float64, sum over each block of (x - its mean)(x - its mean)^T

    Returns
    -------
    count : int; mean : (d,); scatter : (d, d), new arrays of the inputs' kind

    Notes
    -----
    With n = n_a + n_b and delta = m_b - m_a: S = S_a + S_b + (n_a n_b / n) delta delta^T,
    m = m_a + (n_b / n) delta. Only centred quantities are added, so no digits are lost to a large mean
    (unlike sum x x^T / n - m m^T). Written with arithmetic operators only, it takes numpy arrays or torch
    tensors alike (e.g. running sums kept on a GPU).
    """
    delta = mean_b - mean_a
    count = count_a + count_b
    scatter = scatter_a + scatter_b + (count_a * count_b / count) * (delta[:, None] * delta[None, :])
    return count, mean_a + (count_b / count) * delta, scatter


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
        self.n_samples_seen_, self.mean_, self._scatter = merge_moments(
            self.n_samples_seen_, self.mean_, self._scatter, n_b, mean_b, scatter_b)
        return self

    @classmethod
    def from_moments(cls, count: int, mean: np.ndarray, scatter: np.ndarray) -> "StreamingCovariance":
        """The state after ``count`` samples of mean (d,) and scatter (d, d) = sum (x - mean)(x - mean)^T
        (e.g. read back from a store, to merge with others); ``count`` = 0 gives an empty estimator."""
        estimator = cls()
        if count:
            estimator._merge(int(count), np.asarray(mean, dtype=np.float64), np.asarray(scatter, dtype=np.float64))
        return estimator

    @property
    def scatter_(self) -> np.ndarray:
        """sum (y - mean)(y - mean)^T over the samples seen, (d, d) float64 (covariance_ times n)."""
        if self._scatter is None:
            raise ValueError("StreamingCovariance has seen no samples; call partial_fit first")
        return self._scatter

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
