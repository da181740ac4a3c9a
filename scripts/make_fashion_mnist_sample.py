"""Write the embedded Fashion-MNIST sample (lowrank_fm/zoo/embedded/fashion-mnist-sample.npz) from the IDX files.

    python scripts/make_fashion_mnist_sample.py [--data-dir /usr/share/datasets/fashion-mnist]

It holds the 600 training images that the command line draws by default for calibration (1% of the 60,000,
seed 0: ``calibration_indices(60000, 0.01, None, 0)``), with their indices, and the whole 10,000-image test
split, as uint8 arrays in a compressed .npz; a run on the sample therefore calibrates and evaluates on
exactly the images of a run on the full data set at seed 0. The README beside it records source, licence
and sha256 (rewritten by this script).
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lowrank_fm.cli import calibration_indices  # noqa: E402
from lowrank_fm.zoo.data import FASHION_MNIST_DIRS, _find_idx, _read_idx  # noqa: E402
from lowrank_fm.zoo.data import EMBEDDED_DIR, FASHION_MNIST_SAMPLE  # noqa: E402

README = """# Embedded data: a Fashion-MNIST sample

`fashion-mnist-sample.npz` ({size:,} bytes, sha256 `{sha}`) lets the first run of lowrank-fm
work on real data with nothing but `pip install`: dataset `fashion-mnist-sample`, the default of
`python scripts/approximate.py`.

| array | shape | what |
| --- | --- | --- |
| `calib_images`, `calib_labels` | (600, 28, 28) uint8, (600,) | the 1% of the training split that the command line draws for calibration by default (seed 0) |
| `calib_indices` | (600,) | their indices in the 60,000-image training split |
| `test_images`, `test_labels` | (10000, 28, 28) uint8, (10000,) | the whole test split |

Source: Fashion-MNIST (Xiao, Rasul, Vollgraf 2017, https://github.com/zalandoresearch/fashion-mnist), as
packaged by Debian (`dataset-fashion-mnist` {version}); IDX files with sha256
{idx_sums}
Licence: MIT (Expat), Copyright 2017 Zalando SE; the licence text is in `LICENSE-fashion-mnist` beside this file.
Made by `python scripts/make_fashion_mnist_sample.py` (reproducible: same inputs, same arrays).
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=FASHION_MNIST_DIRS[0])
    parser.add_argument("--debian-version", default="0.0~git20200523.55506a9-1")
    args = parser.parse_args(argv)
    directory = Path(args.data_dir)
    stems = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
    paths = {stem: _find_idx(directory, stem) for stem in stems}
    if not all(paths.values()):
        raise SystemExit(f"error: Fashion-MNIST IDX files not found in {directory}: pass --data-dir DIR")
    train_images, train_labels = _read_idx(paths[stems[0]]), _read_idx(paths[stems[1]])
    indices = calibration_indices(len(train_labels), 0.01, None, 0)
    arrays = {
        "calib_images": train_images[indices], "calib_labels": train_labels[indices].astype(np.int64),
        "calib_indices": indices.astype(np.int64),
        "test_images": _read_idx(paths[stems[2]]), "test_labels": _read_idx(paths[stems[3]]).astype(np.int64),
    }
    EMBEDDED_DIR.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(FASHION_MNIST_SAMPLE, **arrays)
    data = FASHION_MNIST_SAMPLE.read_bytes()
    sums = "\n".join(f"- `{p.name}`: `{hashlib.sha256(p.read_bytes()).hexdigest()}`" for p in paths.values())
    (EMBEDDED_DIR / "README.md").write_text(README.format(size=len(data), sha=hashlib.sha256(data).hexdigest(),
                                                          version=args.debian_version, idx_sums=sums))
    print(f"wrote {FASHION_MNIST_SAMPLE} ({len(data):,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
