import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("LOWRANK_FM_CACHE", str(ROOT / ".cache" / "test-models"))

# One torch and one BLAS thread: the test models are tiny, and two OpenMP threads on a busy 2-core machine
# ran a forward pass up to 80x slower than one (resnet18 at 32x32: 9 ms vs 712 ms).
torch.set_num_threads(1)
try:
    from threadpoolctl import threadpool_limits  # a dependency of scikit-learn

    threadpool_limits(1)
except ImportError:  # pragma: no cover
    pass

FMNIST_PRESENT = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz").is_file()
needs_fmnist = pytest.mark.skipif(not FMNIST_PRESENT, reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")


def needs_checkpoint(name):
    from lowrank_fm.zoo.models import checkpoint_path

    return pytest.mark.skipif(not checkpoint_path(name).is_file(), reason=f"shipped checkpoint {name}.pt is absent")


@pytest.fixture(scope="session")
def digits():
    """scikit-learn's digits, split as lowrank_fm.zoo.data does (1,437 train / 360 test)."""
    from lowrank_fm.zoo.data import load_dataset

    return load_dataset("digits")


@pytest.fixture(scope="session")
def vgg_digits():
    """The embedded reference model, trained on first use and cached."""
    from lowrank_fm.zoo.models import create_model

    return create_model("vgg-digits")


def layer_context(conv, x):
    """A LayerContext for ``conv`` with the shapes and positions measured on input ``x``."""
    from torch import nn

    from lowrank_fm.cost import measure_costs
    from lowrank_fm.methods import LayerContext

    costs = measure_costs(nn.Sequential(conv), x)["0"]
    return LayerContext("c", conv, costs.positions, None, costs.in_shape, costs.out_shape)
