"""Importing the library must not import h5py (DESIGN.md: only the calibration package does)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def modules_after(statement: str) -> set[str]:
    """Top-level module names in sys.modules after running ``statement`` in a fresh interpreter."""
    code = f"import sys; {statement}; print(' '.join(sorted({{m.split('.')[0] for m in sys.modules}})))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    return set(result.stdout.split())


def test_import_lowrank_fm_does_not_import_h5py():
    loaded = modules_after("import lowrank_fm, lowrank_fm.cli, lowrank_fm.zoo.models, lowrank_fm.zoo.data, "
                           "lowrank_fm.serialize")
    assert "lowrank_fm" in loaded
    assert "h5py" not in loaded
    assert "calibration" not in loaded


def test_calibration_package_does_import_h5py():
    """The check above can fail: the calibration package, imported on its own, brings h5py in."""
    assert "h5py" in modules_after("import calibration")
