"""PNG plots of benchmark rows and layer spectra."""

import numpy as np
import pytest

from lowrank_fm.bench.plots import matplotlib_available, plot_accuracy_vs_speedup, plot_spectra

pytestmark = pytest.mark.skipif(matplotlib_available() is not None, reason=str(matplotlib_available()))

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_accuracy_plot_is_a_png(tmp_path):
    rows = [{"label": "fm", "theoretical_speedup": s, "measured_speedup": 0.7 * s, "top1_after": 0.9 - 0.01 * s,
             "top1_before": 0.94} for s in (2.0, 3.0, 4.0)]
    rows.append({"label": "svd", "theoretical_speedup": 2.0, "top1_after": 0.8})  # no measured speedup
    path = plot_accuracy_vs_speedup(rows, tmp_path / "acc.png", title="t")
    assert path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 5000
    with pytest.raises(ValueError, match="at least one benchmark row"):
        plot_accuracy_vs_speedup([], tmp_path / "none.png")


def test_spectra_plot_is_a_png(tmp_path):
    spectra = {"a": np.array([4.0, 2.0, 1.0, 0.5]), "b": np.array([1.0, 1.0, 0.0])}
    path = plot_spectra(spectra, {"a": 2, "b": None}, tmp_path / "spec.png")
    assert path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 5000
    with pytest.raises(ValueError, match="at least one layer spectrum"):
        plot_spectra({}, {}, tmp_path / "none.png")
