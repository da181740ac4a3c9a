"""The contract every registered decomposition method keeps (issue 16): one common test over the registry.

The tests are parametrized over ``list_methods()``, so a method joins them by being registered. For every
method and every layer of :data:`LAYERS` (convs of several kernels, strides, paddings, dilations and groups,
and Linear layers):

1. ``supports``: a refused layer gets a non-empty reason, which is what the pipeline records for it
   (:func:`~lowrank_fm.planner.keep_reasons`), so a refused layer is never a target and never built; here it
   is never built either.
2. Full-rank exactness: ``build(ctx, full_rank(ctx))`` gives the original layer's output, checked against an
   independent computation (``F.conv2d`` / ``F.linear`` of the original weights, float64, tight tolerance).
   Exception: for ``cp`` / ``cp-sigma`` ``full_rank`` is only the generic upper bound on a CP rank, which ALS
   is not guaranteed to reach (see :class:`~lowrank_fm.methods.cp.CPDecomposition`), so their exactness is
   checked on a kernel of known CP rank at that rank (:data:`EXACT_AT_KNOWN_CP_RANK`).
3. MACs: ``macs(ctx, r)`` equals the MACs that :func:`~lowrank_fm.cost.measure_costs` counts on the built
   module's forward, at several ranks.
4. dtype and device: a float64 layer gives a float64 module, a float32 layer a float32 module (close to the
   layer's output at float32 precision); parameters stay on the layer's device.
5. Settings: the defaults construct; an unknown setting is refused by name.
6. Timing: ``timing_module(ctx, r)``, what the speed gate and the latency model time, has the submodules,
   geometry and parameter shapes of ``build(ctx, r)``.
7. Probes: ``chains_at(ctx, ranks)`` (the chains ``auto`` predicts errors of) gives at each rank the output of
   ``build(ctx, r)`` without samples, and the layer's own output at full rank.

:class:`ToyIdentitySplit`, a method defined here, goes through the same :func:`check_layer` and
:func:`check_settings` once registered: nothing else names it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowrank_fm import methods
from lowrank_fm.config import ApproxConfig
from lowrank_fm.cost import measure_costs
from lowrank_fm.layers import two_factor_chain
from lowrank_fm.methods import (InputStats, LayerContext, Method, ResponseStats, get_method, list_methods,
                                method_class, register_method)
from lowrank_fm.methods.base import LayerData, unfold_weight, unfolded_shape
from lowrank_fm.planner import keep_reasons
from lowrank_fm.stats import principal_components

# settings that keep the data-driven solvers short (a method not named here runs with its defaults); cp gets
# one ALS start (instead of 3) of up to 3000 sweeps (instead of 500): on an exact CP-rank-2 kernel with a size-1
# spatial mode (conv3x1) ALS converges slowly, 1 - fit = 9e-6 after 300 sweeps, 1.4e-7 after 3000 (the sweeps
# stop at cp_als's tol, so the well-conditioned kernels take a few dozen)
FAST = {
    "fm": {"solver_steps": 20},
    "fm-3d": {"solver_steps": 20},
    "cp": {"restarts": 1, "iterations": 3000},
    "cp-sigma": {"restarts": 1, "iterations": 3000},
}
# settings of the builds that only count MACs (the fit does not matter there)
CHEAP = {**FAST, "cp": {"restarts": 1, "iterations": 5}, "cp-sigma": {"restarts": 1, "iterations": 5},
         "fm": {"solver": "none"}, "fm-3d": {"solver": "none"}}

# Methods whose full rank is not exact by construction: cp's full_rank is the generic bound on a CP rank and
# ALS need not find a decomposition at it, so these are checked for exactness on a kernel of CP rank
# CP_RANK (which the method represents exactly at that rank) instead of at full rank.
EXACT_AT_KNOWN_CP_RANK = {"cp", "cp-sigma"}
CP_RANK = 2

TOLERANCE = 1e-10  # relative to the largest |output| (float64; measured: at most 2.5e-15)
# CP-ALS stops when a sweep changes the fit by < 1e-10 (cp_als's tol, not a setting), which leaves a relative
# kernel error of order 1e-8 on an exact-rank kernel (measured: up to 1.5e-7 of the output, conv3x1): the
# tolerance of tests/test_cp.py's exact-rank test
CP_TOLERANCE = 1e-6
# fm and fm-3d fit with data (LayerData) form yhat = W x + b in float32 by design (the n x p x d product is the
# bulk of their cost; lowrank_fm.methods.fm_nonlinear.fit_two_factors), so their data-driven full-rank layer is
# exact to float32 rounding only (measured: up to 4.3e-7 of outputs of order 1); without data (the pipeline's
# fallback for a model it cannot trace) they are checked at TOLERANCE
DATA_TOLERANCE = 1e-6


def _conv(c, d, kernel, **kwargs):
    return lambda: nn.Conv2d(c, d, kernel, **kwargs)


# (id, factory of the float32 layer); the layers are small so that every method builds them in milliseconds
LAYERS = [
    ("conv3x3", _conv(4, 6, 3, padding=1)),
    ("conv3x3-stride2-nobias", _conv(4, 6, 3, stride=2, bias=False)),
    ("conv3x5-stride2-pad12-dil2", _conv(4, 6, (3, 5), stride=2, padding=(1, 2), dilation=2)),
    ("conv5x3-stride12-dil21", _conv(5, 3, (5, 3), stride=(1, 2), dilation=(2, 1))),
    ("conv2x4-pad11", _conv(3, 5, (2, 4), padding=(1, 1))),
    ("conv1x3-stride21-pad01", _conv(4, 6, (1, 3), stride=(2, 1), padding=(0, 1))),
    ("conv3x1-dil2", _conv(6, 4, (3, 1), padding=(2, 0), dilation=2)),
    ("conv1x1", _conv(4, 6, 1)),
    ("conv1x1-stride2", _conv(6, 4, 1, stride=2)),
    ("conv3x3-groups2", _conv(4, 6, 3, padding=1, groups=2)),
    ("conv3x3-depthwise", _conv(4, 4, 3, padding=1, groups=4)),
    ("conv1x1-groups2", _conv(4, 6, 1, groups=2)),
    ("conv3x3-same", _conv(4, 6, 3, padding="same")),
    ("conv3x3-reflect", _conv(4, 6, 3, padding=1, padding_mode="reflect")),
    ("linear", lambda: nn.Linear(12, 7)),
    ("linear-wide-nobias", lambda: nn.Linear(5, 9, bias=False)),
]
LAYER_IDS = [name for name, _ in LAYERS]


def make_layer(layer_id: str, dtype=torch.float64, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """The layer (seeded weights, in ``dtype``) and an input batch for it."""
    torch.manual_seed(seed)
    module = dict(LAYERS)[layer_id]().to(dtype)
    if isinstance(module, nn.Linear):
        x = torch.randn(16, module.in_features, dtype=dtype)
    else:
        x = torch.randn(3, module.in_channels, 9, 8, dtype=dtype)
    return module, x


def reference(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's output computed independently of the module (and of any method), in float64."""
    weight = module.weight.detach().double()
    bias = None if module.bias is None else module.bias.detach().double()
    if isinstance(module, nn.Linear):
        return F.linear(x.double(), weight, bias)
    return F.conv2d(x.double(), weight, bias, module.stride, module.padding, module.dilation, module.groups)


def with_cp_rank_kernel(module: nn.Conv2d, rank: int, seed: int = 1) -> nn.Conv2d:
    """``module`` with its kernel replaced by a random one of CP rank ``rank`` (sum of rank-one tensors)."""
    rng = np.random.default_rng(seed)
    factors = [rng.standard_normal((n, rank)) for n in module.weight.shape]
    kernel = np.einsum("tr,sr,ir,jr->tsij", *factors)
    with torch.no_grad():
        module.weight.copy_(torch.from_numpy(kernel / np.abs(kernel).max()))
    return module


def _patches(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(n, p) input patches of every output position, flattened like the unfolded weight, float64."""
    if isinstance(module, nn.Linear):
        return x.double()
    cols = F.unfold(x.double(), module.kernel_size, module.dilation, module.padding, module.stride)
    return cols.permute(0, 2, 1).reshape(-1, cols.shape[1])


def _responses(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(n, d) outputs at the same positions as :func:`_patches`, float64."""
    y = reference(module, x)
    return y if y.ndim == 2 else y.permute(0, 2, 3, 1).reshape(-1, y.shape[1])


def make_context(method: Method, module: nn.Module, x: torch.Tensor) -> tuple[LayerContext, LayerData | None]:
    """The layer's context with whatever statistics the method's flags ask for, and its LayerData when the
    method ``needs_inputs`` (all positions of the batch; the last image held out)."""
    costs = measure_costs(nn.Sequential(module), x)["0"]
    stats = input_stats = data = None
    if method.needs_responses:
        y = _responses(module, x).numpy()
        values, vectors = principal_components(np.cov(y.T, bias=True))
        stats = ResponseStats(y.mean(0), values, vectors, y.shape[0])
    if method.needs_input_covariance:
        patches = _patches(module, x).numpy()
        input_stats = InputStats(patches.mean(0), np.cov(patches.T, bias=True), patches.shape[0])
    if method.needs_inputs:
        patches, targets = _patches(module, x), _responses(module, x)
        image = torch.arange(x.shape[0]).repeat_interleave(patches.shape[0] // x.shape[0])
        data = LayerData(patches, targets, image == x.shape[0] - 1, "identity")
    ctx = LayerContext("layer", module, costs.positions, stats, costs.in_shape, costs.out_shape, input_stats)
    return ctx, data


def structure(module: nn.Module) -> list[tuple]:
    """What a layer's run time depends on: each submodule's type and geometry, each parameter's shape and
    dtype (not the values)."""
    geometry = ("stride", "padding", "dilation", "groups", "padding_mode")
    return [(name, type(sub).__name__, tuple(getattr(sub, g, None) for g in geometry),
             tuple((n, tuple(p.shape), p.dtype) for n, p in sub.named_parameters(recurse=False)))
            for name, sub in module.named_modules()]


def counted_macs(module: nn.Module, x: torch.Tensor) -> int:
    return sum(cost.macs for cost in measure_costs(module, x).values())


def _exact_rank(name: str, method: Method, ctx: LayerContext) -> int:
    return CP_RANK if name in EXACT_AT_KNOWN_CP_RANK else method.full_rank(ctx)


def check_refused(name: str, module: nn.Module) -> bool:
    """True when ``name`` refuses ``module``; then its reason is a non-empty string, and it is the reason the
    pipeline keeps the layer for (so the layer is not a target: :func:`keep_reasons` decides what is built)."""
    method = get_method(name, FAST.get(name))
    reason = method.supports(module)
    if reason is None:
        return False
    assert isinstance(reason, str) and reason.strip(), f"{name} refuses {module} without a reason: {reason!r}"
    # a budget, since auto plans only under one (keep_reasons does not depend on it)
    config = ApproxConfig(method=name, keep_first_layer=False, keep_last_layer=False, speedup=2.0)
    costs = measure_costs(nn.Sequential(module), make_layer_input(module))
    assert keep_reasons({"0": module}, costs, method, config) == {"0": reason}
    return True


def make_layer_input(module: nn.Module) -> torch.Tensor:
    dtype = module.weight.dtype
    if isinstance(module, nn.Linear):
        return torch.randn(2, module.in_features, dtype=dtype)
    return torch.randn(2, module.in_channels, 9, 8, dtype=dtype)


def check_layer(name: str, layer_id: str) -> None:
    """Every per-layer check of the contract for method ``name`` on layer ``layer_id``."""
    module, x = make_layer(layer_id)
    if check_refused(name, module):
        return
    method = get_method(name, FAST.get(name))
    if name in EXACT_AT_KNOWN_CP_RANK:
        with_cp_rank_kernel(module, CP_RANK)
    ctx, data = make_context(method, module, x)
    expected = reference(module, x)

    # exactness (float64), dtype and device of the built module
    rank = _exact_rank(name, method, ctx)
    tolerance = CP_TOLERANCE if name in EXACT_AT_KNOWN_CP_RANK else TOLERANCE
    builds = [("", None, tolerance)] + ([(" with data", data, DATA_TOLERANCE)] if data is not None else [])
    for what, layer_data, tol in builds:
        built = method.build(ctx, rank, layer_data, {})
        params = list(built.parameters())
        assert params and all(p.dtype == torch.float64 for p in params), f"{name}: {[p.dtype for p in params]}"
        assert all(p.device == module.weight.device for p in params)
        with torch.no_grad():
            got = built(x)
        assert got.shape == expected.shape
        error = float((got - expected).abs().max())
        assert error <= tol * max(1.0, float(expected.abs().max())), (
            f"{name}{what} at rank {rank} of {layer_id}: max |error| {error:.3g}")

    # MACs per image as counted on the built module's forward, at a few ranks (the full one included)
    cheap = get_method(name, CHEAP.get(name))
    full = cheap.full_rank(ctx)
    for r in sorted({1, max(1, full // 2), full}):
        for layer_data in ([None, data] if data is not None else [None]):
            counted = counted_macs(cheap.build(ctx, r, layer_data, {}), x)
            assert method.macs(ctx, r) == counted, f"{name} at rank {r} of {layer_id}: {method.macs(ctx, r)} != {counted}"

    # the timing module (what the speed gate and the latency model time) has the built module's structure
    for r in sorted({1, max(1, full // 2)}):
        assert structure(method.timing_module(ctx, r)) == structure(cheap.build(ctx, r, None, {})), (
            f"{name} at rank {r} of {layer_id}: the timing module differs from the build")

    # the chains auto probes: at each rank the module build(ctx, r) gives without samples (one shared
    # factorization where a method overrides chains_at), exact at full rank
    ranks = sorted({1, max(1, full // 2), full})
    chains = cheap.chains_at(ctx, ranks)
    assert sorted(chains) == ranks, f"{name} on {layer_id}: chains at {sorted(chains)}, asked {ranks}"
    with torch.no_grad():
        for r in ranks:
            torch.testing.assert_close(chains[r](x), cheap.build(ctx, r)(x), rtol=1e-9, atol=1e-12)
        if name not in EXACT_AT_KNOWN_CP_RANK:
            error = float((chains[full](x) - expected).abs().max())
            assert error <= TOLERANCE * max(1.0, float(expected.abs().max())), (name, layer_id, error)

    # float32 in, float32 out, close to the layer at float32 precision
    module32, x32 = make_layer(layer_id, torch.float32)
    if name in EXACT_AT_KNOWN_CP_RANK:
        with_cp_rank_kernel(module32, CP_RANK)
    ctx32, data32 = make_context(method, module32, x32)
    built32 = method.build(ctx32, _exact_rank(name, method, ctx32), data32, {})  # with data where it takes data
    assert all(p.dtype == torch.float32 for p in built32.parameters()), f"{name}: float32 layer, float64 module"
    with torch.no_grad():
        got32 = built32(x32)
    assert got32.dtype == torch.float32
    torch.testing.assert_close(got32.double(), reference(module32, x32), rtol=1e-4, atol=1e-4)


def check_settings(name: str) -> None:
    """The default settings construct; an unknown setting is refused, naming it."""
    method = get_method(name)
    assert method.name == name and isinstance(method, method_class(name))
    assert method.settings == method_class(name).Settings()
    with pytest.raises(ValueError, match="no_such_setting"):
        get_method(name, {"no_such_setting": 1})


@pytest.mark.parametrize("layer_id", LAYER_IDS)
@pytest.mark.parametrize("name", list_methods())
def test_method_contract_on_every_layer(name, layer_id):
    check_layer(name, layer_id)


@pytest.mark.parametrize("name", list_methods())
def test_settings_contract(name):
    check_settings(name)


@pytest.mark.parametrize("name", list_methods())
def test_every_method_supports_some_of_the_layers(name):
    """The per-layer checks really exercise the method: it supports at least one of the grid's layers."""
    supported = [i for i in LAYER_IDS if get_method(name, FAST.get(name)).supports(make_layer(i)[0]) is None]
    assert supported, f"{name} supports none of the test layers"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("name", list_methods())
def test_built_module_runs_on_the_layers_cuda_device(name):
    """As the pipeline does it (api.py: the methods' math runs on a CPU copy of each layer, the module then
    moves to the model's device): the moved module gives the CUDA layer's output, its parameters on CUDA."""
    layer_id = "conv3x3" if get_method(name).supports(make_layer("conv3x3")[0]) is None else "linear"
    module, x = make_layer(layer_id)
    method = get_method(name, FAST.get(name))
    if name in EXACT_AT_KNOWN_CP_RANK:
        with_cp_rank_kernel(module, CP_RANK)
    ctx, data = make_context(method, module, x)
    built = method.build(ctx, _exact_rank(name, method, ctx), data, {})
    with torch.no_grad():
        on_cpu = built(x)
    built = built.to("cuda")
    assert all(p.device.type == "cuda" for p in built.parameters())
    with torch.no_grad():
        on_cuda, expected = built(x.cuda()).cpu(), module.to("cuda")(x.cuda()).cpu()
    scale = max(1.0, float(expected.abs().max()))
    # the move changes nothing but the device (float64 on both: summation order alone)
    assert float((on_cuda - on_cpu).abs().max()) <= 1e-12 * scale
    # and the CUDA output is the layer's within the contract's exactness for this build (check_layer's tolerances:
    # fm / fm-3d / auto are built from data here, cp / cp-sigma at a known CP rank)
    tolerance = DATA_TOLERANCE if data is not None else (
        CP_TOLERANCE if name in EXACT_AT_KNOWN_CP_RANK else TOLERANCE)
    assert float((on_cuda - expected).abs().max()) <= tolerance * scale


# ----------------------------------------------------------------------------------------------------------
# A method defined here: once registered, the same checks cover it with no other change
# ----------------------------------------------------------------------------------------------------------


class ToyIdentitySplit(Method):
    """The conv's first ``rank`` filters, then a 1x1 conv with the first ``rank`` columns of the identity:
    the layer itself at full rank."""

    name = "toy-identity-split"
    needs_responses = False

    def supports(self, module):
        return "toy-identity-split: convs only" if not isinstance(module, nn.Conv2d) else super().supports(module)

    def spectrum(self, ctx):
        return np.ones(self.full_rank(ctx))

    def full_rank(self, ctx):
        return ctx.out_channels

    def macs_per_position(self, ctx, rank):
        d, p = unfolded_shape(ctx.module)
        return rank * p + d * rank

    def build(self, ctx, rank, data=None, info=None):
        bias = ctx.module.bias
        return two_factor_chain(ctx.module, unfold_weight(ctx.module)[:rank],
                                None if bias is None else bias.detach().double()[:rank],
                                torch.eye(ctx.out_channels, dtype=torch.float64)[:, :rank], None)


@pytest.fixture
def toy_registered():
    register_method(ToyIdentitySplit)
    try:
        yield ToyIdentitySplit.name
    finally:
        methods._REGISTRY.pop(ToyIdentitySplit.name)


def test_a_newly_registered_method_is_covered_by_the_contract(toy_registered):
    assert toy_registered in list_methods()
    for layer_id in LAYER_IDS:
        check_layer(toy_registered, layer_id)
    check_settings(toy_registered)


def test_the_contract_catches_a_method_that_breaks_it():
    """The checks are not vacuous: the toy with a wrong MAC count fails them."""

    class Miscounted(ToyIdentitySplit):
        name = "toy-miscounted"

        def macs_per_position(self, ctx, rank):
            return super().macs_per_position(ctx, rank) + 1

    register_method(Miscounted)
    try:
        with pytest.raises(AssertionError, match="toy-miscounted at rank"):
            check_layer(Miscounted.name, "conv3x3")
    finally:
        methods._REGISTRY.pop(Miscounted.name)
