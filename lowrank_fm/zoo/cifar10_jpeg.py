"""CIFAR-10 as JPEG files (``cifar10-jpeg.tar.gz``, ImageNet folder layout) decoded once into uint8 arrays.

The archive holds ``cifar10-jpeg/{train,val}/<class>/NNNN.jpg`` (50,000 / 10,000 images of 32 x 32 RGB).
Decoding 60,000 small JPEGs takes tens of seconds, so the decoded splits are cached as one ``.npz`` beside
the other cached files (``$LOWRANK_FM_CACHE``), keyed by the archive's size and modification time.

Arrays are ``images`` (N, 32, 32, 3) uint8 and ``labels`` (N,) int64; classes are the sorted folder names,
as ``torchvision.datasets.ImageFolder`` orders them, so a model trained here agrees with an ImageFolder
reading of the extracted archive.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import tarfile
from pathlib import Path

import numpy as np

__all__ = ["CIFAR10_ARCHIVE_DIRS", "find_archive", "read_cifar10_jpeg"]

log = logging.getLogger(__name__)

# where the project's shared data lies beside a checkout (../shared/data) and its usual extracted place
CIFAR10_ARCHIVE_DIRS = (
    Path(__file__).resolve().parents[3] / "shared" / "data",  # parents[2]: the checkout
    Path(__file__).resolve().parents[2] / "shared" / "data",
)
ARCHIVE_NAME = "cifar10-jpeg.tar.gz"


def find_archive(data_dir: str | os.PathLike | None) -> Path:
    """The archive (or extracted folder) to read: ``data_dir`` itself, ``data_dir/cifar10-jpeg.tar.gz``,
    or the shared data folder beside the checkout.

    Raises FileNotFoundError naming ``--data-dir`` when none is found (nothing is downloaded).
    """
    candidates: list[Path] = []
    if data_dir:
        path = Path(data_dir)
        candidates += [path, path / ARCHIVE_NAME]
    else:
        candidates += [d / ARCHIVE_NAME for d in CIFAR10_ARCHIVE_DIRS]
    for candidate in candidates:
        if candidate.is_file() or (candidate.is_dir() and (candidate / "train").is_dir()):
            return candidate
    where = data_dir or CIFAR10_ARCHIVE_DIRS[0] / ARCHIVE_NAME
    raise FileNotFoundError(
        f"CIFAR-10 JPEG data not found at {where}: pass --data-dir with {ARCHIVE_NAME} or its extracted folder "
        "(train/ and val/ class folders)"
    )


def _decode(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"), dtype=np.uint8)


def _members(source: Path):
    """Yield (split, class_name, file_name, bytes) for every image of the archive or folder."""
    if source.is_dir():
        for path in sorted(source.glob("*/*/*.jpg")):
            yield path.parts[-3], path.parts[-2], path.name, path.read_bytes()
        return
    with tarfile.open(source, "r:*") as archive:
        for member in archive:
            parts = Path(member.name).parts
            if not member.isfile() or len(parts) < 3 or not parts[-1].lower().endswith((".jpg", ".jpeg")):
                continue
            handle = archive.extractfile(member)
            if handle is not None:
                yield parts[-3], parts[-2], parts[-1], handle.read()


def _decode_all(source: Path) -> dict[str, np.ndarray]:
    from tqdm.auto import tqdm

    found: dict[str, list[tuple[str, str, np.ndarray]]] = {"train": [], "val": []}
    for split, class_name, file_name, data in tqdm(_members(source), desc="decoding CIFAR-10 JPEGs", unit="img",
                                                   total=60000, mininterval=2.0):
        if split in found:
            found[split].append((class_name, file_name, _decode(data)))
    classes = sorted({c for c, _, _ in found["train"]})
    if len(classes) != 10 or not found["val"]:
        raise ValueError(f"{source}: expected train/ and val/ with 10 class folders, found classes {classes}")
    index = {name: i for i, name in enumerate(classes)}
    arrays: dict[str, np.ndarray] = {"classes": np.array(classes)}
    for split, items in found.items():
        items.sort(key=lambda item: (item[0], item[1]))  # ImageFolder order: class, then file name
        arrays[f"{split}_images"] = np.stack([image for _, _, image in items])
        arrays[f"{split}_labels"] = np.array([index[c] for c, _, _ in items], dtype=np.int64)
    return arrays


def read_cifar10_jpeg(data_dir: str | os.PathLike | None = None, cache: str | os.PathLike | None = None) -> dict:
    """Decoded CIFAR-10: ``train_images`` (50000, 32, 32, 3) uint8, ``train_labels`` (50000,), ``val_images``,
    ``val_labels``, ``classes``; cached in ``cache`` (a folder; default ``$LOWRANK_FM_CACHE``)."""
    from .models import cache_dir

    source = find_archive(data_dir)
    folder = Path(cache) if cache else cache_dir()
    # an archive is keyed by its content (a fresh copy gets a new mtime: keying by it decoded and stored 185 MB
    # again each time), an extracted folder by its size and time
    if source.is_file():
        key = hashlib.sha256(source.read_bytes()).hexdigest()[:16]
    else:
        stat = source.stat()
        key = f"{stat.st_size}-{int(stat.st_mtime)}"
    cached = folder / f"cifar10-jpeg-{key}.npz"
    if cached.is_file():
        with np.load(cached, allow_pickle=False) as stored:
            return {key: stored[key] for key in stored.files}
    log.info("decoding %s once (cached at %s)", source, cached)
    arrays = _decode_all(source)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_name(cached.name + f".tmp{os.getpid()}.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, cached)
    return arrays
