"""``--method auto``: each layer's decomposition chosen under one budget.

The predicted errors are checked against least squares on explicit samples (the moments are those samples'),
the probe against the chain run as modules on images, the envelope on known points, the plan against fm's own
plan when fm is the only candidate, and the whole pipeline on vgg-digits (each layer built by its method)."""

from __future__ import annotations

import math

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset

from conftest import layer_context
from lowrank_fm import approximate
from lowrank_fm.config import ApproxConfig
from lowrank_fm.methods import InputStats, ResponseStats, get_method
from lowrank_fm.methods.auto import CandidatePoint, chain_error
from lowrank_fm.planner import pareto_envelope, plan_ranks
from lowrank_fm.predicted_error import LayerMoments, affine_error, refit_error, tail_error


def _moments_of(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (1/n) covariance of the rows of X: the population moments of the sample."""
    mean = X.mean(0)
    return mean, (X - mean).T @ (X - mean) / len(X)


def _context_with_exact_statistics(conv: nn.Conv2d, images: torch.Tensor):
    """The LayerContext of a 3x3, padding-1 ``conv`` on ``images`` with the response statistics and input-patch
    moments of every position of every image (computed here with numpy, not by calibration)."""
    c = conv.in_channels * 9
    patches = F.unfold(images, 3, padding=1).transpose(1, 2).reshape(-1, c).double().numpy()
    y = conv(images).permute(0, 2, 3, 1).reshape(-1, conv.out_channels).detach().double().numpy()
    eigenvalues, eigenvectors = np.linalg.eigh(np.cov(y.T, bias=True))
    ctx = layer_context(conv, images[:1])
    return type(ctx)(ctx.name, conv, ctx.positions, ResponseStats(y.mean(0), eigenvalues[::-1].copy(),
                     eigenvectors[:, ::-1].copy(), len(y)), ctx.in_shape, ctx.out_shape,
                     InputStats(*_moments_of(patches), len(patches)))


def _relative_residual(Y: np.ndarray, Z: np.ndarray) -> float:
    """sqrt(min over B, c of sum ||y - B z - c||^2 / sum ||y||^2), by numpy lstsq on [Z, 1]."""
    design = np.hstack([Z, np.ones((len(Z), 1))])
    solution = np.linalg.lstsq(design, Y, rcond=None)[0]
    return float(np.sqrt(np.sum((Y - design @ solution) ** 2) / np.sum(Y ** 2)))


def test_refit_error_is_the_least_squares_residual_of_the_samples():
    rng = np.random.default_rng(0)
    n, p, d, q = 4000, 12, 7, 5
    X = rng.standard_normal((n, p)) @ rng.standard_normal((p, p)) + rng.standard_normal(p)
    W, b, A = rng.standard_normal((d, p)), rng.standard_normal(d), rng.standard_normal((q, p))
    Y, Z = X @ W.T + b, X @ A.T + 3.0  # the offset a of z does not matter
    mean, cov = _moments_of(X)
    moments = LayerMoments.of(W, b, mean, cov)
    assert refit_error(moments, A) == pytest.approx(_relative_residual(Y, Z), rel=1e-9)
    # a rank-deficient A (a repeated row) explains no more than its independent rows: G is singular, so the
    # Cholesky solve declines it and G's eigenvalues above the tolerance are used
    from lowrank_fm.predicted_error import _explained_by_cholesky

    repeated = np.vstack([A, A[:1]])
    assert _explained_by_cholesky(W @ cov @ repeated.T, repeated @ cov @ repeated.T, 1e-10) is None
    assert _explained_by_cholesky(W @ cov @ A.T, A @ cov @ A.T, 1e-10) is not None
    assert refit_error(moments, repeated) == pytest.approx(_relative_residual(Y, Z), rel=1e-7)
    # A = W explains everything; A = 0 explains only the mean
    assert refit_error(moments, W) == pytest.approx(0.0, abs=1e-6)
    centred_share = np.sum((Y - Y.mean(0)) ** 2) / np.sum(Y ** 2)
    assert refit_error(moments, np.zeros((1, p))) == pytest.approx(np.sqrt(centred_share), rel=1e-9)


def test_affine_error_is_the_relative_error_of_the_samples():
    rng = np.random.default_rng(1)
    X = rng.standard_normal((3000, 9)) + 0.5
    W, b = rng.standard_normal((4, 9)), rng.standard_normal(4)
    W_hat, b_hat = W + 0.1 * rng.standard_normal((4, 9)), b - 0.2
    Y, Y_hat = X @ W.T + b, X @ W_hat.T + b_hat
    expected = np.sqrt(np.sum((Y - Y_hat) ** 2) / np.sum(Y ** 2))
    assert affine_error(LayerMoments.of(W, b, *_moments_of(X)), W_hat, b_hat) == pytest.approx(expected, rel=1e-9)


def test_the_tail_of_the_response_spectrum_is_the_refit_error_of_the_top_response_directions():
    rng = np.random.default_rng(2)
    X = rng.standard_normal((5000, 10)) @ rng.standard_normal((10, 10))
    W, b = rng.standard_normal((6, 10)), rng.standard_normal(6)
    mean, cov = _moments_of(X)
    values, vectors = np.linalg.eigh(W @ cov @ W.T)
    values, vectors = values[::-1], vectors[:, ::-1]
    tails = tail_error(values, W @ mean + b)
    moments = LayerMoments.of(W, b, mean, cov)
    for r in (1, 3, 5):
        assert tails[r] == pytest.approx(refit_error(moments, vectors[:, :r].T @ W), rel=1e-7)
    assert tails[6] == 0.0 and tails[0] == pytest.approx(refit_error(moments, np.zeros((1, 10))), rel=1e-9)


@pytest.mark.parametrize("method, rank", [("spatial", 4), ("tucker2-sigma", 3), ("fm-3d", 3)])
def test_the_probe_predicts_the_refit_of_the_chain_run_on_images(method, rank):
    """The chain is run as modules on images: its last factor's inputs there, regressed on by lstsq, leave the
    residual the probe predicts from the input patches' moments (the same patches)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 8, 3, padding=1, stride=1).double()
    images = torch.randn(40, 6, 7, 7, dtype=torch.float64)
    patches = F.unfold(images, 3, padding=1).transpose(1, 2).reshape(-1, 54).numpy()  # (n, c kh kw)
    mean, cov = _moments_of(patches)
    y = conv(images).permute(0, 2, 3, 1).reshape(-1, 8).detach().numpy()
    ctx = layer_context(copy.deepcopy(conv).float(), images[:1].float())  # shapes and positions only
    eigenvalues, eigenvectors = np.linalg.eigh(np.cov(y.T, bias=True))
    ctx = type(ctx)(ctx.name, conv, ctx.positions, ResponseStats(y.mean(0), eigenvalues[::-1].copy(),
                    eigenvectors[:, ::-1].copy(), len(y)), ctx.in_shape, ctx.out_shape, InputStats(mean, cov, len(patches)))
    built = get_method(method).build(ctx, rank).double()
    with torch.no_grad():
        z = images
        for factor in list(built)[:-1]:
            z = factor(z)
        last = built[-1]
        windows = F.unfold(z, last.kernel_size, padding=last.padding, stride=last.stride)
        Z = windows.transpose(1, 2).reshape(-1, windows.shape[1]).numpy()
    W = conv.weight.detach().reshape(8, -1).numpy()
    moments = LayerMoments.of(W, conv.bias.detach().numpy(), mean, cov)
    chain = get_method(method).build(ctx, rank)
    assert chain_error(chain, conv, moments) == pytest.approx(_relative_residual(y, Z), rel=1e-6)
    assert all(p.dtype == torch.float64 for p in chain.parameters())  # the caller's chain is left in its dtype


def test_the_envelope_keeps_the_points_no_other_beats():
    points = [CandidatePoint("a", 1, 10, 0.9), CandidatePoint("b", 1, 10, 0.8), CandidatePoint("a", 2, 20, 0.5),
              CandidatePoint("b", 2, 25, 0.6), CandidatePoint("b", 3, 30, 0.2), CandidatePoint("a", 3, 40, 0.3),
              CandidatePoint("a", 4, 100, 0.0)]
    envelope = pareto_envelope(points, 100)
    # equal MACs: the first listed wins; (b, 25) and (a, 40) are beaten by cheaper points; 100 MACs is not cheaper
    assert [(p.method, p.rank) for p in envelope] == [("a", 1), ("a", 2), ("b", 3)]


@pytest.fixture(scope="module")
def digits_loader(digits):
    return DataLoader(Subset(digits.train, list(range(120))), batch_size=40, shuffle=False)


def test_auto_with_fm_alone_plans_what_fm_plans(vgg_digits, digits_loader):
    common = dict(speedup=2.0, speed_gate=False, progress=False)
    _, fm = approximate(vgg_digits, digits_loader, ApproxConfig(method="fm", **common))
    _, auto = approximate(vgg_digits, digits_loader, ApproxConfig(method="auto", method_settings={"candidates": ("fm",)},
                                                                  allocation="auto", **common))  # unweighted
    assert {l.name: l.rank for l in auto.layers} == {l.name: l.rank for l in fm.layers}
    approximated = [l for l in auto.layers if l.status == "approximated"]
    assert approximated and all(l.extra["method"] == "fm" for l in approximated)


def test_auto_builds_each_layer_with_its_method_and_says_why(vgg_digits, digits_loader, digits):
    from lowrank_fm.zoo.evaluate import accuracy

    config = ApproxConfig(method="auto", speedup=2.5, speed_gate=False, progress=False)
    new_model, report = approximate(vgg_digits, digits_loader, config)
    approximated = [l for l in report.layers if l.status == "approximated"]
    assert report.totals["theoretical_speedup"] >= 2.5
    chosen = {l.extra["method"] for l in approximated}
    assert chosen <= {"fm", "fm-3d", "tucker2-sigma", "spatial", "svd-sigma", "cp"}
    for layer in approximated:
        assert layer.extra["why"].startswith(f"{layer.extra['method']} rank {layer.rank}: predicted error")
        if layer.extra["method"] in ("fm", "fm-3d"):
            assert "solver" in layer.extra  # fitted its samples itself
        else:
            assert layer.extra["correction"]["kept"] in ("original", "linear", "refined")
    assert sum(report.selection["auto"]["methods"].values()) == len(approximated)
    assert report.timing["candidates_s"] > 0
    assert accuracy(new_model, digits.test)["top1"] > 0.9


def _separable_layer():
    """A 16 -> 16 3x3 conv whose kernel is a sum of two separable (kh x 1)(1 x kw) terms, its context with exact
    statistics on 30 random 8x8 images, and the MACs of it and of a free rest of the model."""
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 16, 3, padding=1)
    vertical, horizontal = torch.randn(2, 16, 3), torch.randn(16, 2, 3)
    with torch.no_grad():
        conv.weight.copy_(torch.einsum("kch,dkw->dchw", vertical, horizontal))
    ctx = _context_with_exact_statistics(conv, torch.randn(30, 16, 8, 8))
    return conv, ctx, {ctx.name: 16 * 144 * ctx.positions, "rest": 0}


def test_a_separable_layer_goes_to_the_method_that_is_exact_on_it():
    """A kernel that is a sum of two separable (kh x 1)(1 x kw) terms: spatial at rank 2 is exact, while a
    channel rank 2 of fm leaves most of the response. auto picks spatial for that layer."""
    conv, ctx, macs = _separable_layer()
    config = ApproxConfig(method="auto", speedup=4.0)
    plan = plan_ranks(get_method("auto"), {ctx.name: conv, "rest": nn.Linear(2, 2)}, {ctx.name: ctx}, macs,
                      {ctx.name: None, "rest": "not targeted"}, config).layers[ctx.name]
    assert plan.options == {"method": "spatial"} and plan.rank >= 2
    assert "predicted error 0.000" in plan.note


def test_a_latency_budget_costs_each_candidate_by_its_measured_time():
    """The separable layer again, where spatial is exact: under a MAC budget auto takes spatial; when the latency
    model says spatial's chain runs slower than the original at every rank (cp's depthwise convs on a CPU can),
    the latency budget gives the layer to fm instead, at a rank whose measured time meets the budget."""
    from lowrank_fm.speedgate import LatencyCurve

    conv, ctx, macs = _separable_layer()
    method = get_method("auto", {"candidates": ("fm", "spatial")})
    assert set(method.timing_variants(ctx)) == {"fm", "spatial"}
    layers, reasons = {ctx.name: conv, "rest": nn.Linear(2, 2)}, {ctx.name: None, "rest": "not targeted"}
    by_macs = plan_ranks(method, layers, {ctx.name: ctx}, macs, reasons, ApproxConfig(method="auto", speedup=2.0))
    assert by_macs.layers[ctx.name].options == {"method": "spatial"}
    original_ms, rest_ms = 1.0, 0.5
    curves = {"fm": LatencyCurve(original_ms, 0.0, 0.05, {}), "spatial": LatencyCurve(original_ms, 1.5, 0.01, {})}
    config = ApproxConfig(method="auto", speedup=1.3, budget="latency")
    plan = plan_ranks(method, layers, {ctx.name: ctx}, macs, reasons, config, latency=({ctx.name: curves}, rest_ms))
    chosen = plan.layers[ctx.name]
    assert chosen.options == {"method": "fm"} and plan.selection["budget"] == "latency"
    # the budget by hand: rest + fm's time at the rank <= (rest + original) / speedup, and one rank more breaks it
    budget_ms = (rest_ms + original_ms) / 1.3
    assert rest_ms + 0.05 * chosen.rank <= budget_ms < rest_ms + 0.05 * (chosen.rank + 1)


def test_a_candidate_the_speed_gate_finds_slower_gives_way_to_another_method_of_the_same_layer():
    """The separable layer under a 2x MAC budget takes spatial; when the gate finds spatial's chain slower than
    the original at every rank, the plan is made again with spatial at most half that rank (exact from rank 2,
    so still chosen, and slower again), then without spatial on that layer, which takes fm at a rank that still
    halves its MACs instead of being kept original."""
    conv, ctx, macs = _separable_layer()
    method = get_method("auto", {"candidates": ("fm", "spatial")})
    layers, reasons = {ctx.name: conv, "rest": nn.Linear(2, 2)}, {ctx.name: None, "rest": "not targeted"}
    config = ApproxConfig(method="auto", speedup=2.0)
    first = plan_ranks(method, layers, {ctx.name: ctx}, macs, reasons, config).layers[ctx.name]
    assert first.options == {"method": "spatial"}
    gated = []

    def gate(name, layer_ctx, rank):
        gated.append((layer_ctx.options["method"], rank))
        return layer_ctx.options["method"] != "spatial"

    plan = plan_ranks(method, layers, {ctx.name: ctx}, macs, reasons, config, gate=gate)
    chosen = plan.layers[ctx.name]
    assert chosen.options == {"method": "fm"} and chosen.reason is None
    # fm's chain on 16 -> 16 3x3: a 3x3 conv to r channels and a 1x1 back, r (16 * 9 + 16) MACs per position
    assert chosen.macs_after == 160 * chosen.rank * ctx.positions <= macs[ctx.name] / 2
    assert gated[0] == gated[1] == ("spatial", first.rank)  # slower twice: a second timing agrees
    assert gated[2] == gated[3] and gated[2][0] == "spatial" and 2 <= gated[2][1] <= first.rank // 2
    assert gated[4:] == [("fm", chosen.rank)]
    assert plan.selection["speed_gate"] == {"slower": [], "replans": 2, "rank_caps": {ctx.name: {"spatial": 0}}}


def test_a_latency_plan_that_misses_is_planned_again_on_the_same_candidate_points(monkeypatch):
    """A whole-plan measurement that always misses the target makes the planner plan twice more; the layer's
    candidates are probed once for the three plans."""
    from lowrank_fm.methods.auto import Auto
    from lowrank_fm.speedgate import LatencyCurve

    conv, ctx, macs = _separable_layer()
    probed = []
    original = Auto.candidate_points
    monkeypatch.setattr(Auto, "candidate_points",
                        lambda self, c, m: probed.append(c.name) or original(self, c, m))
    method = get_method("auto", {"candidates": ("fm", "spatial")})
    curves = {"fm": LatencyCurve(1.0, 0.0, 0.05, {}), "spatial": LatencyCurve(1.0, 0.0, 0.05, {})}
    missed = lambda ranks, contexts: {"median": 1.0, "min": 1.0, "max": 1.0, "rounds": 5}  # noqa: E731
    plan = plan_ranks(method, {ctx.name: conv, "rest": nn.Linear(2, 2)}, {ctx.name: ctx}, macs,
                      {ctx.name: None, "rest": "not targeted"}, ApproxConfig(method="auto", speedup=1.3, budget="latency"),
                      latency=({ctx.name: curves}, 0.5), measure_plan=missed)
    assert len(plan.selection["latency_checks"]) == 3
    assert probed == [ctx.name]


@pytest.mark.parametrize("settings, message", [
    (dict(method="auto"), r"under a --speedup budget: pass --speedup, or name a method"),
    (dict(method="auto", speedup=2.0, allocation="error"), r"method 'auto' plans its budget with \['output', 'auto'\] only"),
    (dict(method="fm", speedup=2.0, allocation="auto"), r"method 'fm' plans its budget with"),
    (dict(method="auto", speedup=2.0, method_settings={"candidates": ("auto",)}), r"other than 'auto'"),
])
def test_a_policy_auto_cannot_honour_is_refused_up_front(settings, message):
    with pytest.raises(ValueError, match=message):
        config = ApproxConfig(**settings)
        get_method(config.method, config.method_settings)


def test_tucker2_sigma_without_sweeps_is_its_frobenius_start():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 8, 3, padding=1)
    ctx = layer_context(conv, torch.randn(1, 8, 5, 5))
    patches = np.random.default_rng(0).standard_normal((500, 72))
    ctx = type(ctx)(ctx.name, conv, ctx.positions, None, ctx.in_shape, ctx.out_shape,
                    InputStats(*_moments_of(patches), 500))
    info: dict = {}
    get_method("tucker2-sigma", {"als_iterations": 0}).build(ctx, 4, info=info)
    assert info["als_sweeps"] == 0 and info["sigma_error"] == info["sigma_error_start"]
    get_method("tucker2-sigma", {"als_iterations": 3}).build(ctx, 4, info=info)
    assert 1 <= info["als_sweeps"] <= 3 and info["sigma_error"] < info["sigma_error_start"]


def test_layers_wider_than_the_probe_limit_take_fm_without_an_input_covariance(vgg_digits, digits_loader, tmp_path):
    from calibration import open_calibration, read_input_stats
    from lowrank_fm.surgery import find_layers

    limit = 300  # vgg-digits: features.3 (288 inputs) and classifier.1 (256) are probed; 3x3 convs over 32, 64 are not
    config = ApproxConfig(method="auto", speedup=2.0, speed_gate=False, progress=False,
                          method_settings={"probe_limit": limit})
    _, report = approximate(vgg_digits, digits_loader, config, calib_file=tmp_path / "c.h5")
    widths = {name: int(np.prod(m.weight.shape[1:])) for name, m in find_layers(vgg_digits).items()}
    approximated = [l for l in report.layers if l.status == "approximated"]
    assert any(widths[l.name] > limit for l in approximated) and any(widths[l.name] <= limit for l in approximated)
    with open_calibration(str(tmp_path / "c.h5")) as reader:
        for layer in approximated:
            if widths[layer.name] > limit:
                assert layer.extra["method"] == "fm"
                with pytest.raises(ValueError, match="no input covariance"):
                    read_input_stats(reader, layer.name)
            else:
                assert read_input_stats(reader, layer.name)[2] > 0


def test_a_linear_layer_takes_svd_sigma_for_the_response_projection_unless_too_wide_to_probe():
    """On a Linear layer fm, fm-3d and svd-sigma build the same chain with one predicted error: svd-sigma takes
    it (its closed-form factors; fm's RMSProp refinement overfits one row per image), fm where the layer is too
    wide for an input covariance; on a conv fm stays first."""
    from lowrank_fm.methods.auto import LINEAR_PROJECTION

    linear = nn.Linear(64, 32)
    ctx = layer_context(linear, torch.randn(200, 64))
    narrow, wide = get_method("auto"), get_method("auto", {"probe_limit": 32})
    assert LINEAR_PROJECTION == "svd-sigma"
    assert narrow._applicable(ctx)[:3] == ["svd-sigma", "fm", "fm-3d"]
    assert wide._applicable(ctx)[0] == "fm"  # (a layer too wide to probe takes the first candidate alone)
    conv = nn.Conv2d(4, 8, 3, padding=1)
    assert narrow._applicable(layer_context(conv, torch.randn(6, 4, 8, 8)))[0] == "fm"
    # their points tie (same MACs, the same tail error): the envelope keeps the one listed first
    tied = [CandidatePoint(name, 4, 1000, 0.1) for name in narrow._applicable(ctx)[:3]]
    assert [p.method for p in pareto_envelope(tied, 2048, lambda p: p.macs)] == ["svd-sigma"]


def test_auto_keeps_the_input_moments_over_about_input_rows_times_p_patches(vgg_digits, digits_loader, tmp_path):
    """Each probed layer's moments come from ceil(input_rows p / n) positions of each of the n calibration images
    (all of a smaller map): count n min(k, L); None keeps every patch, n L."""
    from calibration import open_calibration, read_input_stats
    from lowrank_fm.surgery import find_layers

    n = len(digits_loader.dataset)
    maps = {}
    hooks = [m.register_forward_hook(lambda m, a, o, name=name: maps.__setitem__(name, int(np.prod(o.shape[2:]))))
             for name, m in find_layers(vgg_digits).items()]
    with torch.no_grad():
        vgg_digits(next(iter(digits_loader))[0][:1])
    for h in hooks:
        h.remove()
    widths = {name: int(np.prod(m.weight.shape[1:])) for name, m in find_layers(vgg_digits).items()}
    counts = {}
    for rows in (3.0, None):
        config = ApproxConfig(method="auto", speedup=2.0, speed_gate=False, progress=False,
                              method_settings={"input_rows": rows})
        path = tmp_path / f"c{rows}.h5"
        approximate(vgg_digits, digits_loader, config, calib_file=path)
        with open_calibration(str(path)) as reader:
            counts[rows] = {name: read_input_stats(reader, name)[2] for name in reader.layers
                            if reader.stats_counts("input_stats", name) is not None}
    assert counts[3.0] and set(counts[3.0]) == set(counts[None])
    for name, count in counts[3.0].items():
        assert count == n * min(math.ceil(3.0 * widths[name] / n), maps[name]), name
        assert counts[None][name] == n * maps[name]
    assert any(counts[3.0][name] < counts[None][name] for name in counts[3.0])


def test_the_default_method_is_auto_for_a_mac_budget_and_fm_otherwise():
    assert ApproxConfig().method_name == "fm"  # an --energy run, as the design card prescribes
    assert ApproxConfig(speedup=3.0).method_name == "auto"
    assert ApproxConfig(speedup=3.0, budget="latency").method_name == "fm"  # auto plans it only when named
    assert ApproxConfig(speedup=3.0, allocation="output").method_name == "auto"  # weighted by output sensitivity
    assert ApproxConfig(speedup=3.0, allocation="energy").method_name == "fm"
    assert ApproxConfig(speedup=3.0).replace(solver="none").method_name == "fm"  # a setting of fm names fm
    assert ApproxConfig().replace(speedup=3.0).method_name == "auto"  # chosen again when the settings change
    assert ApproxConfig(method="fm", speedup=3.0).method_name == "fm"  # fm stays available by name
    config = ApproxConfig(speedup=3.0)
    assert config.method is None and ApproxConfig.from_dict(config.to_dict()) == config


def test_the_sensitivity_from_sparse_ranks_interpolates_the_ratio_not_the_output_error() -> None:
    """e_out measured at ranks 1 and 5 only (in between the curve is e_out interpolated linearly, as
    output_error_curves gives it): the ratio interpolated between them is the true 3, where the ratio of the
    interpolated curve overstates it at ranks 2-4."""
    from lowrank_fm.planner import _sensitivity

    values, mean = np.array([8.0, 4.0, 2.0, 1.0, 0.5, 0.25]), np.zeros(6)
    ctx = type("Ctx", (), {"stats": ResponseStats(mean, values, np.eye(6), 100)})()
    own = tail_error(values, mean)
    curve = np.interp(np.arange(7), [1, 5], [3.0 * own[1], 3.0 * own[5]])
    curve[6] = curve[5]
    naive = np.median([curve[r] / own[r] for r in range(1, 6)])
    assert naive > 3.3
    assert _sensitivity(curve, ctx, [1, 5]) == pytest.approx(3.0)


def test_the_output_allocation_weighs_each_layer_by_how_much_of_its_error_reaches_the_output(vgg_digits, digits_loader):
    from lowrank_fm.planner import _sensitivity

    values, mean = np.array([4.0, 2.0, 1.0, 0.5]), np.array([1.0, 0.0, 0.0, 0.0])
    ctx = type("Ctx", (), {"stats": ResponseStats(mean, values, np.eye(4), 100)})()
    own = tail_error(values, mean)
    curve = np.concatenate([[0.0], 3.0 * own[1:]])
    assert _sensitivity(curve, ctx, [1, 2, 3, 4]) == pytest.approx(3.0)  # rank 4 (no error left) is not counted
    config = ApproxConfig(speedup=2.0, allocation="output", speed_gate=False, progress=False)
    assert config.method_name == "auto"
    _, report = approximate(vgg_digits, digits_loader, config)
    auto = report.selection["auto"]
    approximated = {l.name for l in report.layers if l.status == "approximated"}
    assert approximated and set(auto["sensitivity"]) >= approximated and all(v > 0 for v in auto["sensitivity"].values())
    assert report.selection["allocation_signal"].startswith("output error on")


def test_the_output_allocation_weighs_every_layer_whatever_candidate_comes_first(vgg_digits, digits_loader):
    """The sensitivity is measured on the responses (d principal directions), not in the first candidate's ranks:
    with ``spatial`` first (a CP-like full rank, no Linear layers) every approximated layer is still weighed (it
    was silently unweighted), and a Linear layer without a choice falls to the first candidate supporting it."""
    config = ApproxConfig(method="auto", speedup=2.0, speed_gate=False, progress=False,
                          method_settings={"candidates": ("spatial", "fm")})
    _, report = approximate(vgg_digits, digits_loader, config)
    approximated = {l.name for l in report.layers if l.status == "approximated"}
    assert approximated and set(report.selection["auto"]["sensitivity"]) >= approximated
    assert "classifier.1" in report.selection["auto"]["sensitivity"]
    assert get_method("auto", {"candidates": ("spatial", "fm")}).for_layer(
        layer_context(nn.Linear(16, 8), torch.randn(4, 16))).name == "fm"


def test_the_output_allocation_keeps_the_sensitivity_weighting_whose_simulated_plan_moves_the_outputs_least(
        vgg_digits, digits_loader):
    """Several exponents: each plan simulated, the least divergent one kept, and it is the plan that exponent
    alone gives; one exponent: no simulation; exponent 0 alone: the unweighted allocation's plan."""
    common = dict(method="auto", speedup=2.5, allocation="output", speed_gate=False, progress=False)

    def plan(**settings):
        _, report = approximate(vgg_digits, digits_loader, ApproxConfig(**common, method_settings=settings))
        return {l.name: (l.rank, l.extra.get("method")) for l in report.layers}, report.selection

    chosen_plan, selection = plan(sensitivity_exponents=(0.0, 0.5, 1.0))
    auto = selection["auto"]
    simulated = auto["simulated_divergence"]
    assert set(simulated) == {"0.0", "0.5", "1.0"} and all(v > 0 for v in simulated.values())
    assert auto["sensitivity_exponent"] == float(min(simulated, key=simulated.get))
    assert "plans compared on" in selection["allocation_signal"]
    alone, alone_selection = plan(sensitivity_exponents=(auto["sensitivity_exponent"],))
    assert alone == chosen_plan and "simulated_divergence" not in alone_selection["auto"]
    other = next(g for g in (0.0, 1.0) if g != auto["sensitivity_exponent"])
    assert plan(sensitivity_exponents=(other,))[0] != chosen_plan  # the choice is between different plans
    unweighted_exponent, _ = plan(sensitivity_exponents=(0.0,))
    _, unweighted = approximate(vgg_digits, digits_loader, ApproxConfig(**{**common, "allocation": "auto"}))
    assert unweighted_exponent == {l.name: (l.rank, l.extra.get("method")) for l in unweighted.layers}
    for bad in ((1.0, -0.5), "high", (), float("nan")):
        with pytest.raises(ValueError, match="sensitivity_exponents must be one or more finite numbers >= 0"):
            ApproxConfig(**common, method_settings={"sensitivity_exponents": bad})
    with pytest.raises(ValueError, match="divergence_images must be a whole number"):
        ApproxConfig(**common, method_settings={"divergence_images": 2.5})


def test_cp_is_a_candidate_only_on_small_kernels_and_below_the_als_share_of_the_macs():
    """CP-ALS is the costliest probe: cp's points stop at the highest rank of at most als_macs_fraction of the
    layer's MACs (counted independently here: S R H W + R kh H' W + R kw H' W' + T R H' W'), and a kernel of
    more than als_kernel_limit weights gets no cp point at all; the layers auto builds with cp take one ALS
    start."""
    torch.manual_seed(0)
    conv = nn.Conv2d(12, 16, 3, padding=1)
    ctx = _context_with_exact_statistics(conv, torch.randn(20, 12, 8, 8))
    original = 16 * 108 * 64
    auto = get_method("auto", {"candidates": ("spatial", "cp")})
    cp_points = [p for p in auto.candidate_points(ctx, original) if p.method == "cp"]
    cp_macs = {r: 12 * r * 64 + r * 3 * 64 + r * 3 * 64 + 16 * r * 64 for r in range(1, 100)}
    highest = max(r for r, m in cp_macs.items() if m <= 0.5 * original)
    assert [p.rank for p in cp_points] == list(range(1, highest + 1))
    assert all(p.macs == cp_macs[p.rank] for p in cp_points) and all(0 <= p.error <= 1 for p in cp_points)
    assert cp_points[-1].error < cp_points[0].error
    small_limit = get_method("auto", {"candidates": ("spatial", "cp"), "als_kernel_limit": conv.weight.numel() - 1})
    assert {p.method for p in small_limit.candidate_points(ctx, original)} == {"spatial"}
    assert auto.delegates["cp"].settings.restarts == 1 and get_method("cp").settings.restarts == 3
