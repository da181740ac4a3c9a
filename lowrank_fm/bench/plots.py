"""PNG plots of benchmark results: accuracy against theoretical and measured speedup per method, and each
layer's spectrum with the chosen rank marked.

Needs the optional extra ``pip install -e ".[plots]"`` (matplotlib); it is imported only when a plot is
drawn, with the Agg backend (no display needed).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

__all__ = ["plot_accuracy_vs_speedup", "plot_spectra", "matplotlib_available"]


def matplotlib_available() -> str | None:
    """None when matplotlib imports, else why not (the extra to install)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return 'matplotlib is not installed: pip install -e ".[plots]"'
    return None


def _pyplot():
    reason = matplotlib_available()
    if reason:
        raise ImportError(reason)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, figure, path: str | Path) -> Path:
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_accuracy_vs_speedup(rows: Sequence[Mapping], path: str | Path, *, title: str = "") -> Path:
    """Top-1 after approximation against theoretical (left) and measured (right) speedup, one line per method.

    Parameters
    ----------
    rows : benchmark rows with ``label``, ``theoretical_speedup``, ``top1_after`` (fraction), optionally
        ``measured_speedup`` (rows without it are left out of the right panel) and ``top1_before``.
    path : the PNG to write.
    """
    if not rows:
        raise ValueError("plot_accuracy_vs_speedup needs at least one benchmark row")
    plt = _pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    labels = list(dict.fromkeys(r["label"] for r in rows))
    for label in labels:
        mine = sorted((r for r in rows if r["label"] == label), key=lambda r: r["theoretical_speedup"])
        axes[0].plot([r["theoretical_speedup"] for r in mine], [100 * r["top1_after"] for r in mine], "o-", label=label)
        measured = [r for r in mine if r.get("measured_speedup")]
        if measured:
            axes[1].plot([r["measured_speedup"] for r in measured], [100 * r["top1_after"] for r in measured], "o-",
                         label=label)
    before = [r["top1_before"] for r in rows if r.get("top1_before") is not None]
    for axis, name in zip(axes, ("theoretical speedup (MACs before / after)", "measured speedup (latency before / after)")):
        if before:
            axis.axhline(100 * before[0], color="gray", linestyle=":", label="original")
        axis.set_xlabel(name)
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("top-1 after (%)")
    axes[1].legend(fontsize=7, loc="lower left")
    if title:
        figure.suptitle(title)
    return _save(plt, figure, path)


def plot_spectra(spectra: Mapping[str, np.ndarray], ranks: Mapping[str, int | None], path: str | Path, *,
                 title: str = "") -> Path:
    """Each layer's normalised spectrum s_a / s_1 (log scale) against the index a, the chosen rank marked.

    Parameters
    ----------
    spectra : layer name -> (d,) descending non-negative spectrum (e.g. eigenvalues of the response
        covariance).
    ranks : layer name -> the rank kept (None or missing: kept original, no mark).
    """
    if not spectra:
        raise ValueError("plot_spectra needs at least one layer spectrum")
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for name, values in spectra.items():
        values = np.asarray(values, dtype=np.float64)
        scaled = values / values[0] if values.size and values[0] > 0 else values
        index = np.arange(1, values.size + 1)
        (line,) = axis.semilogy(index, np.maximum(scaled, 1e-12), label=name)
        rank = ranks.get(name)
        if rank is not None and 1 <= rank <= values.size:
            axis.plot([rank], [max(scaled[rank - 1], 1e-12)], "o", color=line.get_color(), markersize=7)
    axis.set_xlabel("index a (dots: the chosen rank)")
    axis.set_ylabel("s_a / s_1")
    axis.grid(alpha=0.3, which="both")
    axis.legend(fontsize=7)
    if title:
        axis.set_title(title)
    return _save(plt, figure, path)
