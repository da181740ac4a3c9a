"""Deterministic choice of the spatial positions sampled from one image's feature map.

The positions of an image depend only on ``(seed, layer_index, image_ordinal)`` and the map size, never on
the batch the image came in nor on whether the run was resumed, so a later pass can replay exactly the same
samples from the ordinals and positions kept in the store.
"""

from __future__ import annotations

import numpy as np

__all__ = ["SAMPLER", "sample_positions", "sample_positions_batch", "position_keys", "check_positions_per_image"]


def check_positions_per_image(positions_per_image: int | None) -> int | None:
    """Validate the number of positions sampled per image.

    Parameters
    ----------
    positions_per_image : int or None
        A positive number of positions per image and layer, or None for all positions.

    Returns
    -------
    int or None
        The value, as a Python int (or None).

    Raises
    ------
    ValueError
        If it is not None nor a positive integer.
    """
    if positions_per_image is None:
        return None
    if isinstance(positions_per_image, bool) or not isinstance(positions_per_image, (int, np.integer)):
        raise ValueError(
            f"positions_per_image must be a positive int or None (all positions), "
            f"got {positions_per_image!r} of type {type(positions_per_image).__name__}"
        )
    if positions_per_image <= 0:
        raise ValueError(
            f"positions_per_image must be a positive int or None (all positions), got {positions_per_image}"
        )
    return int(positions_per_image)


def _check_non_negative_int(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    return int(value)


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)

#: Name of the draw below, recorded in every calibration store.
SAMPLER = "splitmix64-smallest-keys"


def _mix(z: np.ndarray) -> np.ndarray:
    """SplitMix64's output function (Steele, Lea, Flood, OOPSLA 2014) on uint64 arrays, wrapping mod 2^64."""
    with np.errstate(over="ignore"):
        z = z + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _MIX1
        z = (z ^ (z >> np.uint64(27))) * _MIX2
        return z ^ (z >> np.uint64(31))


def position_keys(seed: int, layer_index: int, ordinals: np.ndarray, total: int) -> np.ndarray:
    """Pseudo-random 64-bit key of every position of every image: uint64 (len(ordinals), total).

    ``key = mix(mix(mix(mix(seed) ^ layer_index) ^ ordinal) ^ position)`` with ``mix`` SplitMix64's output
    function; a position's key depends on (seed, layer_index, ordinal, position) only.
    """
    ordinals = np.asarray(ordinals, dtype=np.uint64)
    image = _mix(_mix(_mix(np.full(ordinals.shape, seed, dtype=np.uint64)) ^ np.uint64(layer_index)) ^ ordinals)
    return _mix(image[:, None] ^ np.arange(total, dtype=np.uint64)[None, :])


def sample_positions(
    seed: int, layer_index: int, image_ordinal: int, height: int, width: int, count: int | None
) -> np.ndarray:
    """Spatial positions sampled, without replacement, from one image's feature map.

    Parameters
    ----------
    seed : int
        Non-negative seed of the calibration run.
    layer_index : int
        Non-negative index of the layer in the run's list of target layers.
    image_ordinal : int
        Non-negative 0-based index of the image in the calibration stream.
    height, width : int
        Size of the feature map (a Linear output with P positions is a map of height P and width 1).
    count : int or None
        Number of positions to draw. None, ``count <= 0`` or ``count >= height * width`` mean all positions.

    Returns
    -------
    ndarray of shape (n, 2), int32
        (row, col) of each position, n = min(count, height * width), sorted in row-major order, all distinct.

    Notes
    -----
    Each of the ``height * width`` positions gets a pseudo-random key (:func:`position_keys`); the ``count``
    positions with the smallest keys are drawn, a uniform draw without replacement. It depends on its
    arguments only, and is vectorised over the images of a batch (:func:`sample_positions_batch`), so the
    draw costs little next to the forward pass.
    """
    return sample_positions_batch(seed, layer_index, image_ordinal, 1, height, width, count)[0]


def sample_positions_batch(
    seed: int, layer_index: int, first_ordinal: int, n_images: int, height: int, width: int, count: int | None
) -> np.ndarray:
    """:func:`sample_positions` of the images with ordinals ``first_ordinal .. first_ordinal + n_images - 1``.

    Returns
    -------
    ndarray of shape (n_images, n, 2), int32
        Row i holds ``sample_positions(seed, layer_index, first_ordinal + i, height, width, count)``.
    """
    seed = _check_non_negative_int("seed", seed)
    layer_index = _check_non_negative_int("layer_index", layer_index)
    first_ordinal = _check_non_negative_int("first_ordinal", first_ordinal)
    n_images = _check_non_negative_int("n_images", n_images)
    height = _check_non_negative_int("height", height)
    width = _check_non_negative_int("width", width)
    total = height * width
    if count is None or count <= 0 or count >= total:
        flat = np.broadcast_to(np.arange(total, dtype=np.int64), (n_images, total))
    else:
        ordinals = np.arange(first_ordinal, first_ordinal + n_images, dtype=np.uint64)
        keys = position_keys(seed, layer_index, ordinals, total)
        flat = np.sort(np.argpartition(keys, int(count) - 1, axis=1)[:, : int(count)], axis=1)
    positions = np.empty(flat.shape + (2,), dtype=np.int32)
    if width > 0:
        positions[..., 0] = flat // width
        positions[..., 1] = flat % width
    return positions
