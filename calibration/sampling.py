"""Deterministic choice of the spatial positions sampled from one image's feature map.

The positions of an image depend only on ``(seed, layer_index, image_ordinal)`` and the map size, never on
the batch the image came in nor on whether the run was resumed, so a later pass can replay exactly the same
samples from the ordinals and positions kept in the store.
"""

from __future__ import annotations

import numpy as np

__all__ = ["sample_positions", "check_positions_per_image"]


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
    The draw is uniform over the ``height * width`` positions and uses
    ``np.random.default_rng([seed, layer_index, image_ordinal])``, so it depends on its arguments only.
    """
    seed = _check_non_negative_int("seed", seed)
    layer_index = _check_non_negative_int("layer_index", layer_index)
    image_ordinal = _check_non_negative_int("image_ordinal", image_ordinal)
    height = _check_non_negative_int("height", height)
    width = _check_non_negative_int("width", width)
    total = height * width
    if count is None or count <= 0 or count >= total:
        flat = np.arange(total, dtype=np.int64)
    else:
        rng = np.random.default_rng([seed, layer_index, image_ordinal])
        flat = np.sort(rng.choice(total, size=int(count), replace=False))
    positions = np.empty((flat.shape[0], 2), dtype=np.int32)
    if width > 0:
        positions[:, 0] = flat // width
        positions[:, 1] = flat % width
    return positions
