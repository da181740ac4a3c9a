"""Calibration stage: stream sampled layer responses of a CNN into an HDF5 store.

Forward hooks (:class:`ResponseRecorder`) sample each target layer's output y (pre-activation) at a fixed
number of spatial positions per image (:func:`sample_positions`, deterministic in the seed, layer and image
ordinal); :func:`calibrate` drives a model over calibration batches and writes the samples batch by batch
(:class:`CalibrationWriter`, from a writer thread), resuming an interrupted run; :func:`open_calibration`
reads a complete store. Under ``torch.distributed`` each rank writes a shard of the images and rank 0
merges the shards into one store (:mod:`calibration.distributed`).

This package is a stage of its own and the only one that imports h5py. It takes its torch-only helpers from
the core library (:mod:`lowrank_fm.batches`, :func:`lowrank_fm.distributed.world`,
:mod:`lowrank_fm.stats`); ``lowrank_fm`` never imports it at import time (the pipeline imports it lazily).
"""

from lowrank_fm.batches import check_finite_images  # re-exported: its owner is lowrank_fm.batches
from lowrank_fm.distributed import world as process_group  # re-exported under its former name

from .input_stats import InputPatchStats, input_patches, input_positions, read_input_stats, sampled_input_patches
from .recorder import ResponseRecorder, Samples, layer_spec
from .distributed import merge_shards, shard_path, shard_range
from .run import calibrate, image_digests, resolve_layers, weights_fingerprint
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
    "input_positions",
    "sampled_input_patches",
    "resolve_layers",
    "sample_positions",
    "shard_path",
    "shard_range",
    "weights_fingerprint",
]
