"""``alds-sigma``: ``alds`` with every layer's error measured in the Sigma norm of its input patches,
||(W - W~) Sigma^1/2||_F / ||W Sigma^1/2||_F (the relative mean squared output error), each group's basis
from W_g Sigma_gg W_g^T, and the bias b + (W - W~) mu (ALGORITHMS.md sections 6 and 7).
"""

from __future__ import annotations

import numpy as np

from .alds import ALDS
from .base import LayerContext
from .sigma_math import regularised_sigma

__all__ = ["ALDSSigma"]


class ALDSSigma(ALDS):
    """``alds-sigma``: data-aware ALDS."""

    name = "alds-sigma"
    needs_input_covariance = True

    def __init__(self, config=None) -> None:
        super().__init__(config)
        self._sigmas: dict[str, np.ndarray] = {}

    def sigma(self, ctx: LayerContext) -> np.ndarray:
        if ctx.name not in self._sigmas:
            self._sigmas[ctx.name] = regularised_sigma(ctx.require_input_stats(self.name).covariance)
        return self._sigmas[ctx.name]

    def mean(self, ctx: LayerContext) -> np.ndarray:
        return ctx.require_input_stats(self.name).mean
