import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("LOWRANK_FM_CACHE", str(ROOT / ".cache" / "test-models"))

# one thread: the test models are tiny, and two OpenMP threads on a busy 2-core machine can be 50x slower
torch.set_num_threads(1)

FMNIST_PRESENT = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz").is_file()
needs_fmnist = pytest.mark.skipif(not FMNIST_PRESENT, reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")


def needs_checkpoint(name):
    from lowrank_fm.models import checkpoint_path

    return pytest.mark.skipif(not checkpoint_path(name).is_file(), reason=f"shipped checkpoint {name}.pt is absent")
