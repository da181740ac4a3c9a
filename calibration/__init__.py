"""Calibration stage: stream sampled layer responses of a CNN into an HDF5 store.

Forward hooks (:class:`ResponseRecorder`) sample each target layer's output y (pre-activation) at a fixed
number of spatial positions per image (:func:`sample_positions`, deterministic in the seed, layer and image
ordinal); :func:`calibrate` drives a model over calibration batches and writes the samples batch by batch
(:class:`CalibrationWriter`, from a writer thread), resuming an interrupted run; :func:`open_calibration`
reads a complete store. Under ``torch.distributed`` each rank writes a shard of the images and rank 0
merges the shards into one store (:mod:`calibration.distributed`).

This package is a stage of its own: it does not import ``lowrank_fm``, and it is the only one that imports
h5py.
"""

from .input_stats import InputPatchStats, input_patches, read_input_stats
from .recorder import ResponseRecorder, Samples, layer_spec
from .distributed import merge_shards, process_group, shard_path, shard_range
from .run import calibrate, check_finite_images, image_digests, resolve_layers, weights_fingerprint
from .sampling import sample_positions
from .store import (
    FORMAT_VERSION,
    CalibrationMismatchError,
    CalibrationReader,
    CalibrationWriter,
    IncompleteCalibrationError,
    open_calibration,
)

__all__ = [
    "FORMAT_VERSION",
    "CalibrationMismatchError",
    "CalibrationReader",
    "CalibrationWriter",
    "IncompleteCalibrationError",
    "InputPatchStats",
    "ResponseRecorder",
    "Samples",
    "calibrate",
    "check_finite_images",
    "image_digests",
    "input_patches",
    "layer_spec",
    "merge_shards",
    "open_calibration",
    "process_group",
    "read_input_stats",
    "resolve_layers",
    "sample_positions",
    "shard_path",
    "shard_range",
    "weights_fingerprint",
]
