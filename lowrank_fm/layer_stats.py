"""The statistics each method needs, read from the calibration store: the principal components of a layer's
responses (streaming float64 covariance, merged across ranks in a multi-process run, or incremental PCA)
and the input-patch mean and covariance."""

from __future__ import annotations

from .methods.base import InputStats, ResponseStats
from .stats import StreamingCovariance, incremental_pca_basis, principal_components

__all__ = ["response_stats", "read_layer_stats"]


def _fit_rows(reader, name: str, n_fit: int):
    ordinals = reader.image_ordinal(name)
    fit_rows = ordinals < n_fit
    if not fit_rows.any():
        raise ValueError(f"layer {name}: no calibration samples to fit on; pass more calibration images")
    return ordinals, fit_rows


def _blocks(reader, name: str, rows):
    """The layer's stored responses, block by block, restricted to ``rows`` (a boolean mask over all rows)."""
    start = 0
    for block in reader.iter_responses(name):
        mask = rows[start : start + len(block)]
        start += len(block)
        if mask.any():
            yield block[mask]


def response_covariance(reader, name: str, n_fit: int, shard: tuple[int, int] | None = None) -> StreamingCovariance:
    """The streaming float64 mean and covariance of the responses of images with ordinal < n_fit.

    With ``shard=(start, stop)`` (a rank of a multi-process run), this rank reads only its images' rows and
    the ranks' statistics are merged (:func:`~lowrank_fm.distributed.reduce_covariance`): the same on every rank.
    """
    from .distributed import reduce_covariance

    ordinals, fit_rows = _fit_rows(reader, name, n_fit)
    mine = fit_rows if shard is None else fit_rows & (ordinals >= shard[0]) & (ordinals < shard[1])
    return reduce_covariance(StreamingCovariance.from_blocks(_blocks(reader, name, mine)))


def response_stats(reader, name: str, n_fit: int, backend: str, shard: tuple[int, int] | None = None) -> ResponseStats:
    """Mean and principal components of the responses of images with ordinal < n_fit (float64); ``backend``
    ``"streaming"`` (:func:`response_covariance`, then its eigendecomposition) or ``"ipca"``."""
    if backend == "ipca":
        _, fit_rows = _fit_rows(reader, name, n_fit)
        mean, values, vectors = incremental_pca_basis(_blocks(reader, name, fit_rows))
        return ResponseStats(mean, values, vectors, int(fit_rows.sum()))
    estimator = response_covariance(reader, name, n_fit, shard)
    values, vectors = principal_components(estimator.covariance_)
    return ResponseStats(estimator.mean_, values, vectors, estimator.n_samples_seen_)


def read_layer_stats(calib_file, targets: list[str], method, n_fit: int, backend: str,
                     shard: tuple[int, int] | None = None, progress: bool = False, input_layers=()
                     ) -> tuple[dict[str, ResponseStats], dict[str, InputStats]]:
    """The response statistics of every target layer (methods with ``needs_responses``) and the input
    statistics of the ``input_layers`` (a progress bar per layer with ``progress``).

    In a multi-process run (``shard`` given, streaming backend) each rank reads its own images' rows, the
    covariances are merged on every rank, and the eigendecompositions are shared out: each rank decomposes
    every size-th layer and the results are exchanged (:func:`~lowrank_fm.distributed.computed_round_robin`),
    the same on every rank as if each had decomposed them all."""
    from tqdm.auto import tqdm

    from calibration import open_calibration, read_input_stats  # lazy: lowrank_fm must not import h5py

    from .distributed import computed_round_robin

    stats, inputs, covariances = {}, {}, {}
    split = shard is not None and backend == "streaming"
    with open_calibration(str(calib_file)) as reader:
        for name in tqdm(targets, desc="statistics", disable=not progress, leave=False):
            if method.needs_responses and split:
                covariances[name] = response_covariance(reader, name, n_fit, shard)
            elif method.needs_responses:
                stats[name] = response_stats(reader, name, n_fit, backend)
            if name in input_layers:
                inputs[name] = InputStats(*read_input_stats(reader, name))
    if covariances:
        components = computed_round_robin(list(covariances), lambda name: principal_components(covariances[name].covariance_))
        for name, estimator in covariances.items():
            stats[name] = ResponseStats(estimator.mean_, *components[name], estimator.n_samples_seen_)
    return stats, inputs
