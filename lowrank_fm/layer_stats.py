"""The statistics each method needs, read from the calibration store: the principal components of a layer's
responses (streaming float64 covariance, merged across ranks in a multi-process run, or incremental PCA)
and the input-patch mean and covariance."""

from __future__ import annotations

from .methods.base import InputStats, ResponseStats
from .stats import StreamingCovariance, incremental_pca_basis, principal_components

__all__ = ["response_stats", "read_layer_stats"]


def response_stats(reader, name: str, n_fit: int, backend: str, shard: tuple[int, int] | None = None) -> ResponseStats:
    """Mean and principal components of the responses of images with ordinal < n_fit (float64).

    With ``shard=(start, stop)`` (a rank of a multi-process run), this rank reads only its images' rows and
    the ranks' streaming statistics are merged (:func:`~lowrank_fm.distributed.reduce_covariance`).
    """
    from .distributed import reduce_covariance

    ordinals = reader.image_ordinal(name)
    fit_rows = ordinals < n_fit
    if not fit_rows.any():
        raise ValueError(f"layer {name}: no calibration samples to fit on; pass more calibration images")

    def blocks(fit_rows=fit_rows):
        start = 0
        for block in reader.iter_responses(name):
            rows = fit_rows[start : start + len(block)]
            start += len(block)
            if rows.any():
                yield block[rows]

    if backend == "ipca":
        mean, values, vectors = incremental_pca_basis(blocks())
        return ResponseStats(mean, values, vectors, int(fit_rows.sum()))
    mine = fit_rows if shard is None else fit_rows & (ordinals >= shard[0]) & (ordinals < shard[1])
    estimator = reduce_covariance(StreamingCovariance.from_blocks(blocks(mine)))
    values, vectors = principal_components(estimator.covariance_)
    return ResponseStats(estimator.mean_, values, vectors, estimator.n_samples_seen_)


def read_layer_stats(calib_file, targets: list[str], method, n_fit: int, backend: str,
                     shard: tuple[int, int] | None = None, progress: bool = False, input_layers=()
                     ) -> tuple[dict[str, ResponseStats], dict[str, InputStats]]:
    """The response statistics of every target layer (methods with ``needs_responses``) and the input
    statistics of the ``input_layers`` (a progress bar per layer with ``progress``)."""
    from tqdm.auto import tqdm

    from calibration import open_calibration, read_input_stats  # lazy: lowrank_fm must not import h5py

    stats, inputs = {}, {}
    with open_calibration(str(calib_file)) as reader:
        for name in tqdm(targets, desc="statistics", disable=not progress, leave=False):
            if method.needs_responses:
                stats[name] = response_stats(reader, name, n_fit, backend, shard)
            if name in input_layers:
                inputs[name] = InputStats(*read_input_stats(reader, name))
    return stats, inputs
