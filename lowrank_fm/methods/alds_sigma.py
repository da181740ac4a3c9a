"""``alds-sigma``: ``alds`` with every layer's error measured in the Sigma norm of its input patches,
||(W - W~) Sigma^1/2||_F / ||W Sigma^1/2||_F (the relative mean squared output error), each group's basis
from W_g Sigma_gg W_g^T, and the bias b + (W - W~) mu (ALGORITHMS.md sections 6 and 7).

Groups: only k = 1 by default (its settings' ``group_options``), where the rank-j factor is the Sigma-optimal
one (:func:`~.sigma_math.svd_sigma`). For k > 1 the per-group bases ignore the covariance between groups; on
vgg-fmnist at 2x the min-max allocation then took k = 4 or 8 in most layers at the same Sigma error (~0.2)
and lost 4.19 top-1 points, against 1.91 with k = 1: a grouped error spreads over every
output direction instead of staying in the discarded low-variance ones. The setting
``group_options=(1, 2, 4, 8)`` restores the grouped candidates.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .alds import ALDS, ALDSSettings
from .base import LayerContext

__all__ = ["ALDSSigma"]


@dataclass(frozen=True)
class ALDSSigmaSettings(ALDSSettings):
    """As :class:`~.alds.ALDSSettings`, with k = 1 only by default (see the module notes)."""

    group_options: tuple[int, ...] = (1,)


class ALDSSigma(ALDS):
    """``alds-sigma``: data-aware ALDS."""

    name = "alds-sigma"
    needs_input_covariance = True
    Settings = ALDSSigmaSettings

    def sigma(self, ctx: LayerContext) -> np.ndarray:
        return ctx.require_input_stats(self.name).regularised_covariance

    def mean(self, ctx: LayerContext) -> np.ndarray:
        return ctx.require_input_stats(self.name).mean
