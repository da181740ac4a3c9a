"""Rank selection: spectra in, ranks out. Pure numpy, no modules.

- :func:`rank_for_energy`: the smallest rank keeping a fraction of a spectrum's energy.
- :func:`energy_kept`: the fraction a given rank keeps.
"""

from __future__ import annotations

import numpy as np

__all__ = ["rank_for_energy", "energy_kept", "check_energy"]


def check_energy(energy: float, name: str = "energy") -> float:
    """Validate 0 < energy <= 1 and return it as float."""
    energy = float(energy)
    if not (0.0 < energy <= 1.0):
        raise ValueError(f"{name} must satisfy 0 < {name} <= 1, got {energy}; e.g. 0.95 keeps 95% of the energy")
    return energy


def rank_for_energy(eigenvalues: np.ndarray, energy: float) -> int:
    """Smallest d' with sum_{a <= d'} s_a / sum_a s_a >= energy (eigenvalues sorted descending).

    ``energy == 1`` returns the full length d (the layer is then reproduced exactly, whatever rounding
    says about trailing zero eigenvalues). An all-zero spectrum gives rank 1.

    Parameters
    ----------
    eigenvalues : (d,) non-negative, descending
    energy : 0 < energy <= 1
    """
    energy = check_energy(energy)
    values = np.clip(np.asarray(eigenvalues, dtype=np.float64), 0.0, None)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"eigenvalues must be a non-empty 1-D array, got shape {values.shape}")
    if energy >= 1.0:
        return int(values.size)
    total = values.sum()
    if total <= 0.0:
        return 1
    cumulative = np.cumsum(values) / total
    return int(min(values.size, np.searchsorted(cumulative, energy - 1e-12) + 1))


def energy_kept(eigenvalues: np.ndarray, rank: int) -> float:
    """sum_{a <= rank} s_a / sum_a s_a (1.0 for an all-zero spectrum)."""
    values = np.clip(np.asarray(eigenvalues, dtype=np.float64), 0.0, None)
    total = values.sum()
    return 1.0 if total <= 0.0 else float(values[: int(rank)].sum() / total)
