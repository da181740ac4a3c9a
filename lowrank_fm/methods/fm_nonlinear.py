"""``fm``: the output-feature-map method with whole-model (asymmetric) correction and nonlinear refinement
(Zhang, Zou, He, Sun, TPAMI 2016, sections 3.2-3.3; ALGORITHMS.md section 1).

Per layer, in network order (the pipeline's layer-wise pass supplies the data):

1. Asymmetric linear start: reduced-rank regression of the original responses y on yhat = W xhat + b,
   where xhat are the layer's inputs in the network approximated so far.
2. Nonlinear refinement with the chosen solver (``rmsprop`` or ``closed-form``) of || f(y) - f(y') ||^2,
   f being the activation that follows the layer (identity for a conv whose output is summed with a
   shortcut before its ReLU: see :func:`lowrank_fm.layerwise.activation_after`).
3. Whichever of (linear start, refined) has the lower objective on held-out calibration images is kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..layers import two_factor_chain
from .base import LayerContext, LayerData, unfold_weight
from .fm import FeatureMapLinear
from .shards import shards_or_local, total
from .solvers import closed_form_nonlinear, nonlinear_objective, reduced_rank_regression, rmsprop_refine, to_layer_factors

__all__ = ["FeatureMap", "fit_two_factors", "SOLVERS"]

SOLVERS = ("rmsprop", "closed-form", "none")


def fit_two_factors(weight: torch.Tensor, bias: torch.Tensor | None, data: LayerData, rank: int, *,
                    solver: str = "rmsprop", steps: int | None = None, seed: int = 0):
    """Asymmetric start + nonlinear refinement of y' = P (Q^T (W x + b)) + c on a layer's samples.

    Parameters
    ----------
    weight : (d, p) the layer's weight unfolded along its output mode; bias : (d,) or None
    data : LayerData whose ``inputs`` (n, p) are the regressor patches x (so yhat = W x + b) and ``targets``
        (n, d) the original network's responses y; with ``data.shards`` they are one process's rows, and every
        sum over rows (regression moments, objectives, RMSProp gradients) is added over the processes, so each
        computes yhat and its sums on its own rows only (the result equals one process's up to summation order)
    rank : r; solver : "rmsprop", "closed-form" or "none"; steps : RMSProp steps (None: the default)

    Returns
    -------
    factors : (first_weight (r, p), first_bias (r,), second_weight (d, r), second_bias (d,)), float64, of
        whichever of (linear start, refined) has the lower objective on the held-out rows
    info : solver, iterations, error_before / error_after (objective relative to E||f(y)||^2), kept
    """
    X, Y = data.inputs, data.targets.double()  # X stays in its own precision: it is the largest array
    fit, val = data.fit_and_validation()
    shards = data.shards
    # yhat = W xhat + b: the product in float32 (n x p x d multiply-adds, the bulk of the cost), then float64
    # for the regression's covariances
    yhat = (X.float() @ weight.float().T).double() + (0.0 if bias is None else bias)
    P, Q, c = reduced_rank_regression(Y[fit], yhat[fit], rank, shards=shards)
    act = data.activation
    linear_val = nonlinear_objective(Y[val], yhat[val], P, Q, c, activation=act, shards=shards)
    fy_val = torch.relu(Y[val]) if act == "relu" else Y[val]
    squares, count = total(shards_or_local(shards), float(fy_val.pow(2).sum()), fy_val.shape[0])
    scale = squares / max(count, 1.0)
    info = {"solver": solver, "iterations": 0, "error_before": linear_val / max(scale, 1e-30)}
    factors = to_layer_factors(weight, bias, P, Q, c)
    after = linear_val
    if solver == "closed-form":
        result = closed_form_nonlinear(Y[fit], yhat[fit], rank, init=(P, Q, c), activation=act, shards=shards)
        refined_val = nonlinear_objective(Y[val], yhat[val], result.P, result.Q, result.c, activation=act,
                                          shards=shards)
        info["iterations"] = result.iterations
        if refined_val < linear_val:
            factors, after = to_layer_factors(weight, bias, result.P, result.Q, result.c), refined_val
    elif solver == "rmsprop":
        kwargs = {} if steps is None else {"steps": int(steps)}
        result = rmsprop_refine(X[fit], Y[fit], weight, bias, P, Q, c, activation=act, seed=seed,
                                X_val=X[val], Y_val=Y[val], shards=shards, **kwargs)
        info["iterations"] = result.iterations
        if result.objective_after < linear_val:  # float64 on the same held-out rows, as linear_val
            factors = (result.first_weight, result.first_bias, result.second_weight, result.second_bias)
            after = result.objective_after
    elif solver != "none":
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    info["error_after"] = after / max(scale, 1e-30)
    info["kept"] = "refined" if after < linear_val else "linear"
    return factors, info


@dataclass(frozen=True)
class FeatureMapSettings:
    """Settings of ``fm`` and ``fm-3d``: the nonlinear refinement (``"rmsprop"``, ``"closed-form"`` or
    ``"none"``) and its RMSProp steps per layer (None: the solver's default)."""

    solver: str = "rmsprop"
    solver_steps: int | None = None

    def __post_init__(self) -> None:
        if self.solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got {self.solver!r}")
        if self.solver_steps is not None and int(self.solver_steps) < 1:
            raise ValueError(f"solver_steps must be >= 1 or None, got {self.solver_steps}")


class FeatureMap(FeatureMapLinear):
    """``fm``: asymmetric output-feature-map approximation refined against the nonlinear responses."""

    name = "fm"
    needs_inputs = True
    solves_shards = True  # fit_two_factors adds its sums over the processes (every solver)
    Settings = FeatureMapSettings

    def solver_settings(self) -> dict:
        """The keyword arguments of :func:`fit_two_factors`: solver, steps and seed."""
        return {"solver": self.settings.solver, "steps": self.settings.solver_steps, "seed": self.seed}

    def build(self, ctx: LayerContext, rank: int, data: LayerData | None = None, info: dict | None = None
              ) -> nn.Module:
        if data is None:  # no layer-wise pass (the model could not be traced): the symmetric linear solution
            done = {"solver": "symmetric-linear", "note": "no layer-wise pass: model not traceable"}
            module = super().build(ctx, rank)
        else:
            bias = None if ctx.module.bias is None else ctx.module.bias.detach().double()
            factors, done = fit_two_factors(unfold_weight(ctx.module), bias, data, rank, **self.solver_settings())
            module = two_factor_chain(ctx.module, *factors)
        if info is not None:
            info.update(done)
        return module
