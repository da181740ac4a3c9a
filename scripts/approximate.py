"""Approximate a trained CNN by low-rank layers: ``python scripts/approximate.py [MODEL] [options]``.

With no arguments it runs the embedded default (vgg-fmnist on the embedded Fashion-MNIST sample). See --help.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lowrank_fm.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
