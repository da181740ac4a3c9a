"""Data sets by name: train/test splits as ``torch.utils.data.Dataset`` objects that never download.

- ``digits``: scikit-learn's 1,797 real 8x8 digit images (embedded), a fixed seeded 80/20 split.
- ``fashion-mnist-sample``: embedded in the package (``lowrank_fm/zoo/embedded``, 4 MB): the 600 training images the
  command line draws for calibration by default (1%, seed 0) and the whole 10,000-image test split of
  Fashion-MNIST. Its train split *is* the calibration sample (``DataSplits.calibration_sample``).
- ``fashion-mnist``: the IDX files of Fashion-MNIST (Debian's ``dataset-fashion-mnist`` puts them in
  /usr/share/datasets/fashion-mnist/, or pass ``data_dir``), 60,000 train / 10,000 test.
- ``imagefolder``: ``data_dir/train`` and ``data_dir/val`` class folders of images (ImageNet layout).
- ``cifar10``: torchvision's CIFAR-10 loader on a local copy (``download=False``).
- ``cifar10-jpeg``: the project's CIFAR-10 JPEG archive (``../shared/data/cifar10-jpeg.tar.gz`` beside the
  checkout, or ``data_dir``: the archive or its extracted folder), decoded once and cached; 32 px images
  (resized bilinearly to ``image_size`` when it differs), normalised with the ImageNet mean/std as
  ``imagefolder`` does. The CIFAR-10 models of :mod:`lowrank_fm.zoo.models` are trained on exactly this.

Every image is returned as a float tensor (C, H, W) normalised with the split's fixed mean/std.
"""

from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

__all__ = ["DataSplits", "load_dataset", "list_datasets", "FASHION_MNIST_DIRS", "DataNotFoundError"]

EMBEDDED_DIR = Path(__file__).parent / "embedded"
FASHION_MNIST_SAMPLE = EMBEDDED_DIR / "fashion-mnist-sample.npz"

FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)
_FMNIST_MEAN, _FMNIST_STD = 0.2860, 0.3530
_DIGITS_MEAN, _DIGITS_STD = 0.3, 0.4
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # imagefolder, cifar10-jpeg


class DataNotFoundError(FileNotFoundError):
    """A data set's files are not where they were looked for; the message says which flag to pass."""


@dataclass(frozen=True)
class DataSplits:
    """A data set's two splits and what a model needs to know about its images."""

    name: str
    train: Dataset
    test: Dataset
    num_classes: int
    image_shape: tuple[int, int, int]
    # the train split holds only the calibration images, already drawn (their indices in the full split)
    calibration_sample: np.ndarray | None = None


def list_datasets() -> list[str]:
    """Names accepted by :func:`load_dataset`."""
    return ["digits", "fashion-mnist", "fashion-mnist-sample", "imagefolder", "cifar10", "cifar10-jpeg"]


def load_dataset(name: str, data_dir: str | os.PathLike | None = None, *, image_size: int = 224) -> DataSplits:
    """Load a data set by name without downloading anything.

    Raises
    ------
    DataNotFoundError
        The files are missing; the message names ``--data-dir`` (or the Debian package) to fix it.
    ValueError
        Unknown name.
    """
    if name == "digits":
        return _digits()
    if name == "fashion-mnist-sample":
        return _fashion_mnist_sample()
    if name in ("fashion-mnist", "fmnist"):
        return _fashion_mnist(data_dir)
    if name == "imagefolder":
        return _image_folder(data_dir, image_size)
    if name == "cifar10":
        return _cifar10(data_dir)
    if name == "cifar10-jpeg":
        return _cifar10_jpeg(data_dir, image_size)
    raise ValueError(f"dataset must be one of {list_datasets()}, got {name!r}")


def _digits() -> DataSplits:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(bunch.target, dtype=torch.int64)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    n_train = int(0.8 * len(labels))
    images = (images - _DIGITS_MEAN) / _DIGITS_STD
    train = TensorDataset(images[order[:n_train]], labels[order[:n_train]])
    test = TensorDataset(images[order[n_train:]], labels[order[n_train:]])
    return DataSplits("digits", train, test, 10, (1, 8, 8))


def _read_idx(path: Path) -> np.ndarray:
    """Read one (optionally gzipped) IDX file into a uint8 array."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        data = handle.read()
    _zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if dtype_code != 0x08:
        raise ValueError(f"{path}: only unsigned-byte IDX files are supported, got type code {dtype_code:#x}")
    shape = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _find_idx(directory: Path, stem: str) -> Path | None:
    for candidate in (directory / f"{stem}.gz", directory / stem):
        if candidate.is_file():
            return candidate
    return None


def _fashion_mnist(data_dir) -> DataSplits:
    directories = [Path(data_dir)] if data_dir else [Path(d) for d in FASHION_MNIST_DIRS]
    for directory in directories:
        paths = {
            stem: _find_idx(directory, stem)
            for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
        }
        if all(paths.values()):
            break
    else:
        where = data_dir or FASHION_MNIST_DIRS[0]
        raise DataNotFoundError(
            f"Fashion-MNIST IDX files not found in {where}: install them with "
            "'apt-get install dataset-fashion-mnist' or pass --data-dir DIR holding train-images-idx3-ubyte[.gz] etc."
        )

    def split(images_stem: str, labels_stem: str) -> TensorDataset:
        images = torch.from_numpy(_read_idx(paths[images_stem]).copy()).float().unsqueeze(1) / 255.0
        labels = torch.from_numpy(_read_idx(paths[labels_stem]).astype(np.int64))
        return TensorDataset((images - _FMNIST_MEAN) / _FMNIST_STD, labels)

    return DataSplits(
        "fashion-mnist",
        split("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
        split("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
        10,
        (1, 28, 28),
    )


def _fashion_mnist_sample() -> DataSplits:
    """The embedded sample, normalised as the full data set (see lowrank_fm/zoo/embedded/README.md)."""
    with np.load(FASHION_MNIST_SAMPLE, allow_pickle=False) as arrays:

        def split(prefix: str) -> TensorDataset:
            images = torch.from_numpy(arrays[f"{prefix}_images"].copy()).float().unsqueeze(1) / 255.0
            return TensorDataset((images - _FMNIST_MEAN) / _FMNIST_STD, torch.from_numpy(arrays[f"{prefix}_labels"]))

        return DataSplits("fashion-mnist-sample", split("calib"), split("test"), 10, (1, 28, 28),
                          calibration_sample=arrays["calib_indices"].copy())


def _require_dir(data_dir, what: str) -> Path:
    if not data_dir:
        raise DataNotFoundError(f"dataset {what} needs --data-dir DIR (nothing is downloaded)")
    path = Path(data_dir)
    if not path.is_dir():
        raise DataNotFoundError(f"--data-dir {path} does not exist: pass --data-dir DIR holding the {what} data")
    return path


def _image_folder(data_dir, image_size: int) -> DataSplits:
    from torchvision import datasets, transforms

    root = _require_dir(data_dir, "imagefolder")
    for split_name in ("train", "val"):
        if not (root / split_name).is_dir():
            raise DataNotFoundError(
                f"--data-dir {root} has no {split_name}/ folder: pass --data-dir DIR with train/ and val/ class folders"
            )
    transform = transforms.Compose(
        [
            transforms.Resize(int(round(image_size * 256 / 224))),
            transforms.CenterCrop(image_size),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    train = datasets.ImageFolder(root / "train", transform=transform)
    test = datasets.ImageFolder(root / "val", transform=transform)
    return DataSplits("imagefolder", train, test, len(train.classes), (3, image_size, image_size))


def _cifar10(data_dir) -> DataSplits:
    from torchvision import datasets, transforms

    root = _require_dir(data_dir, "cifar10")
    transform = transforms.Compose(
        [transforms.ToTensor(), transforms.Normalize((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))]
    )
    try:
        train = datasets.CIFAR10(root, train=True, transform=transform, download=False)
        test = datasets.CIFAR10(root, train=False, transform=transform, download=False)
    except RuntimeError as error:
        raise DataNotFoundError(
            f"CIFAR-10 not found under --data-dir {root} ({error}): pass --data-dir DIR holding cifar-10-batches-py/"
        ) from error
    return DataSplits("cifar10", train, test, 10, (3, 32, 32))


def _cifar10_jpeg(data_dir, image_size: int) -> DataSplits:
    from .cifar10_jpeg import read_cifar10_jpeg
    from .image_training import normalise

    if image_size > 64:  # both splits are held in memory as float32: 60,000 x 3 x S x S x 4 bytes
        raise ValueError(f"dataset cifar10-jpeg holds its images in memory, {60000 * 3 * image_size ** 2 * 4 / 1e9:.0f} "
                         f"GB at --image-size {image_size}: use at most 64, or extract the archive and pass "
                         "--dataset imagefolder --data-dir DIR (read image by image)")
    try:
        arrays = read_cifar10_jpeg(data_dir)
    except FileNotFoundError as error:
        raise DataNotFoundError(str(error)) from error

    def split(prefix: str) -> TensorDataset:
        images = torch.from_numpy(arrays[f"{prefix}_images"])
        tensors = torch.cat([normalise(images[i : i + 5000], image_size) for i in range(0, len(images), 5000)])
        return TensorDataset(tensors, torch.from_numpy(arrays[f"{prefix}_labels"]))

    return DataSplits("cifar10-jpeg", split("train"), split("val"), 10, (3, image_size, image_size))
