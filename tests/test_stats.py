import numpy as np
import pytest

from lowrank_fm.stats import StreamingCovariance, incremental_pca_basis, principal_components


def _samples(n=500, d=12, seed=0):
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(d, d)) * np.linspace(3, 0.1, d)
    return rng.normal(size=(n, d)) @ mixing.T + rng.normal(size=d) * 5


@pytest.mark.parametrize("block", [1, 7, 64, 500])
def test_streaming_equals_batch_whatever_the_block_size(block):
    x = _samples()
    est = StreamingCovariance.from_blocks(x[i : i + block] for i in range(0, len(x), block))
    np.testing.assert_allclose(est.mean_, x.mean(axis=0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(est.covariance_, np.cov(x.T, bias=True), rtol=1e-10, atol=1e-10)
    assert est.n_samples_seen_ == len(x)


def test_merge_equals_one_pass():
    x = _samples()
    a = StreamingCovariance().partial_fit(x[:123])
    b = StreamingCovariance().partial_fit(x[123:])
    np.testing.assert_allclose(a.merge(b).covariance_, np.cov(x.T, bias=True), rtol=1e-10, atol=1e-10)


def test_principal_components_descending_and_reconstruct():
    cov = np.cov(_samples().T, bias=True)
    values, vectors = principal_components(cov)
    assert np.all(np.diff(values) <= 0)
    np.testing.assert_allclose(vectors @ np.diag(values) @ vectors.T, cov, atol=1e-9)


def test_incremental_pca_gives_the_same_basis():
    x = _samples()
    est = StreamingCovariance.from_blocks(x[i : i + 50] for i in range(0, len(x), 50))
    values, vectors = principal_components(est.covariance_)
    mean, ivalues, ivectors = incremental_pca_basis(x[i : i + 50] for i in range(0, len(x), 50))
    np.testing.assert_allclose(mean, est.mean_, atol=1e-10)
    np.testing.assert_allclose(ivalues, values, rtol=1e-8)
    # same directions up to sign
    np.testing.assert_allclose(np.abs(np.sum(ivectors * vectors, axis=0)), 1.0, atol=1e-8)


def test_bad_input_raises():
    with pytest.raises(ValueError, match=r"shape \(n, d\)"):
        StreamingCovariance().partial_fit(np.zeros(3))
    est = StreamingCovariance().partial_fit(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="4 features, earlier ones had 3"):
        est.partial_fit(np.zeros((2, 4)))
    with pytest.raises(ValueError, match="no samples"):
        StreamingCovariance().covariance_


def test_incremental_pca_with_fewer_samples_than_features_completes_the_basis():
    x = _samples(n=5, d=12)
    mean, values, vectors = incremental_pca_basis([x[:3], x[3:]])
    assert vectors.shape == (12, 12) and values.shape == (12,)
    np.testing.assert_allclose(vectors.T @ vectors, np.eye(12), atol=1e-10)
    assert np.all(values[5:] == 0)
    exact, _ = principal_components(np.cov(x.T, bias=True))
    np.testing.assert_allclose(values[:4], exact[:4], rtol=1e-8)


def test_merge_moments_is_the_streaming_update_for_numpy_and_torch() -> None:
    import torch

    from lowrank_fm.stats import merge_moments

    rng = np.random.default_rng(5)
    a, b = rng.normal(3e4, 1.0, (40, 6)), rng.normal(3e4, 2.0, (25, 6))

    def moments(x):
        return x.shape[0], x.mean(0), (x - x.mean(0)).T @ (x - x.mean(0))

    count, mean, scatter = merge_moments(*moments(a), *moments(b))
    both = np.concatenate([a, b])
    assert count == 65
    np.testing.assert_allclose(mean, both.mean(0), rtol=1e-14)
    np.testing.assert_allclose(scatter / count, np.cov(both.T, bias=True), rtol=1e-10, atol=1e-12)
    torch_parts = [tuple(torch.as_tensor(v) if isinstance(v, np.ndarray) else v for v in moments(x)) for x in (a, b)]
    t_count, t_mean, t_scatter = merge_moments(*torch_parts[0], *torch_parts[1])
    assert t_count == count and np.allclose(t_mean.numpy(), mean, rtol=1e-15)
    np.testing.assert_allclose(t_scatter.numpy(), scatter, rtol=1e-12)
    restored = StreamingCovariance.from_moments(count, mean, scatter)
    np.testing.assert_array_equal(restored.scatter_, scatter)
    assert StreamingCovariance.from_moments(0, None, None).n_samples_seen_ == 0
