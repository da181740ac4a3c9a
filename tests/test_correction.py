"""The whole-model correction of a built layer's last factor (issue 17; lowrank_fm/correction.py, the chain
helpers of lowrank_fm/layers.py, the layer-wise pass of lowrank_fm/building.py).

Each refit is checked against an independent least-squares solution (numpy.linalg.lstsq of the same samples),
the last factor's inputs against the chain's own forward, the refitted chain against the dense conv of its
reconstructed kernel (F.conv2d), the held-out rule, and the pipeline on vgg-digits with and without it.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset

from lowrank_fm.config import ApproxConfig
from lowrank_fm.correction import affine_least_squares, refit_output_factor
from lowrank_fm.cost import measure_costs
from lowrank_fm.layers import (last_factor_inputs, last_factor_matrix, last_factor_refittable, set_last_factor,
                               two_factor_chain)
from lowrank_fm.methods import LayerContext, get_method
from lowrank_fm.patches import output_grid, patches_at


def _lstsq(Z: np.ndarray, Y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """B (d, q), c (d,) of min ||Y - Z B^T - c|| by numpy's lstsq on [Z, 1]."""
    solution = np.linalg.lstsq(np.hstack([Z, np.ones((Z.shape[0], 1))]), Y, rcond=None)[0]
    return solution[:-1].T, solution[-1]


def test_affine_least_squares_is_numpy_lstsq():
    rng = np.random.default_rng(0)
    Z = rng.normal(size=(300, 7)) @ rng.normal(size=(7, 7)) + rng.normal(size=7)
    Y = Z @ rng.normal(size=(5, 7)).T + rng.normal(size=5) + 0.3 * rng.normal(size=(300, 5))
    B, c = affine_least_squares(torch.from_numpy(Z), torch.from_numpy(Y), ridge=0.0)
    B_ref, c_ref = _lstsq(Z, Y)
    np.testing.assert_allclose(B.numpy(), B_ref, rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(c.numpy(), c_ref, rtol=1e-9, atol=1e-10)
    # q > d and q < d both: the full-rank reduced-rank regression is the plain least squares
    B, c = affine_least_squares(torch.from_numpy(Z[:, :3]), torch.from_numpy(Y), ridge=0.0)
    B_ref, c_ref = _lstsq(Z[:, :3], Y)
    np.testing.assert_allclose(B.numpy(), B_ref, rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(c.numpy(), c_ref, rtol=1e-9, atol=1e-10)


# ------------------------------------------------------------------------------------- chains of every method

def _conv(c, d, kernel, **kwargs):
    return lambda: nn.Conv2d(c, d, kernel, **kwargs).double()


GEOMETRIES = {
    "conv3x3-pad1": _conv(4, 6, 3, padding=1),
    "conv3x5-stride2-pad12-dil2": _conv(4, 6, (3, 5), stride=2, padding=(1, 2), dilation=2),
    "conv5x3-stride12-dil21-nobias": _conv(4, 5, (5, 3), stride=(1, 2), dilation=(2, 1), bias=False),
    "linear": lambda: nn.Linear(12, 7).double(),
}
# (method, settings, context options, rank): every chain shape the pipeline refits
METHODS = [
    ("svd", {}, {}, 3),
    ("tucker2", {}, {}, 3),
    ("tucker1", {"mode": "output"}, {}, 3),
    ("tucker1", {"mode": "input"}, {}, 3),
    ("cp", {"restarts": 1, "iterations": 50}, {}, 4),
    ("spatial", {}, {}, 3),
    ("alds", {}, {"groups": 2}, 4),
]
CASES = [(g, m) for g in GEOMETRIES for m in METHODS
         if g != "linear" or m[0] in ("svd", "alds")]


def _case(geometry, method_spec, seed=0):
    """The layer, its built chain, the approximated input x' and the original input x (both (B, C, H, W) or
    (B, in)), and every output position as (image, position)."""
    name, settings, options, rank = method_spec
    torch.manual_seed(seed)
    layer = GEOMETRIES[geometry]()
    if isinstance(layer, nn.Linear):
        x = torch.randn(64, layer.in_features, dtype=torch.float64)
    else:
        x = torch.randn(6, layer.in_channels, 11, 10, dtype=torch.float64)
    x_approx = x + 0.3 * torch.randn_like(x)  # the approximated network's input: a perturbed x
    cost = measure_costs(nn.Sequential(layer), x[:1])["0"]
    options = {} if isinstance(layer, nn.Linear) else options  # ALDS's planner gives a Linear layer k = 1
    ctx = LayerContext("layer", layer, cost.positions, None, cost.in_shape, cost.out_shape, options=options)
    chain = get_method(name, settings, seed=0).build(ctx, rank)
    h, w = output_grid(layer, x)
    image = torch.arange(x.shape[0]).repeat_interleave(h * w)
    flat = torch.arange(h * w).repeat(x.shape[0])
    position = torch.stack([flat // w, flat % w], dim=1)
    return layer, chain, x_approx, x, image, position


def _responses(module, x, image, position):
    """Rows (n, d) of ``module(x)`` at the given output positions."""
    out = module(x)
    if out.ndim == 2:
        return out[image]
    return out[image, :, position[:, 0], position[:, 1]]


@pytest.mark.parametrize("geometry,method_spec", CASES,
                         ids=[f"{g}-{m[0]}{'-' + m[1]['mode'] if 'mode' in m[1] else ''}" for g, m in CASES])
def test_refit_of_every_chain_is_the_least_squares_and_stays_a_dense_conv(geometry, method_spec):
    layer, chain, x_approx, x, image, position = _case(geometry, method_spec)
    assert last_factor_refittable(chain, layer) is None
    with torch.no_grad():
        patches = patches_at(layer, x_approx, image, position)
        Z = last_factor_inputs(chain, layer, patches)
        # 1. z is what the chain's last factor really reads: the chain without its last factor, run on the
        # whole map, then the last factor's own input patches at the same output positions
        head = nn.Sequential(*list(chain)[:-1])
        Z_ref = patches_at(chain[-1], head(x_approx), image, position)
        torch.testing.assert_close(Z, Z_ref, rtol=1e-10, atol=1e-10)
        Y = _responses(layer, x, image, position)  # the original layer on the original input

    # 2. the linear refit (no held-out rows: the fit rows choose) is numpy's least squares of the same samples
    weight, bias = last_factor_matrix(chain)
    heldout = torch.zeros(Z.shape[0], dtype=torch.bool)
    B, c, info = refit_output_factor(Z, Y, heldout, weight, bias, solver="none")
    B_ref, c_ref = _lstsq(Z.numpy(), Y.numpy())
    assert info["kept"] == "linear" and info["error_linear"] < info["error_original"]
    # the default relative ridge (1e-8 of the mean eigenvalue) moves B by far less than this
    np.testing.assert_allclose(B.numpy(), B_ref, rtol=1e-5, atol=1e-6 * np.abs(B_ref).max())
    np.testing.assert_allclose(c.numpy(), c_ref, rtol=1e-5, atol=1e-6 * np.abs(c_ref).max())

    # 3. the refitted chain computes z B^T + c at those positions, and is still the dense conv (or Linear) of
    # its reconstructed kernel: W_eff from the chain applied to the unit patches, b_eff from the zero patch
    set_last_factor(chain, B, c)
    with torch.no_grad():
        torch.testing.assert_close(_responses(chain, x_approx, image, position), Z @ B.T + c, rtol=1e-9, atol=1e-9)
        p = patches.shape[1]
        b_eff = last_factor_inputs(chain, layer, torch.zeros(1, p, dtype=torch.float64)) @ B.T + c
        W_eff = (last_factor_inputs(chain, layer, torch.eye(p, dtype=torch.float64)) @ B.T + c - b_eff).T
        if isinstance(layer, nn.Linear):
            dense = F.linear(x, W_eff, b_eff[0])
        else:
            dense = F.conv2d(x, W_eff.reshape(layer.weight.shape), b_eff[0], layer.stride, layer.padding,
                             layer.dilation)
        torch.testing.assert_close(chain(x), dense, rtol=1e-9, atol=1e-9)


def test_exact_factorization_on_the_original_inputs_is_left_as_it_is():
    """x' = x and a full-rank (exact) chain: the least squares returns the chain's own last factor."""
    torch.manual_seed(1)
    layer = nn.Conv2d(3, 5, 3, padding=1).double()
    x = torch.randn(8, 3, 7, 7, dtype=torch.float64)
    weight = layer.weight.detach().reshape(5, -1)
    chain = two_factor_chain(layer, weight, layer.bias.detach(), torch.eye(5, dtype=torch.float64),
                             torch.zeros(5, dtype=torch.float64))  # rank d: the layer, then the identity
    image = torch.arange(8).repeat_interleave(49)
    position = torch.stack([torch.arange(49).repeat(8) // 7, torch.arange(49).repeat(8) % 7], dim=1)
    with torch.no_grad():
        Z = last_factor_inputs(chain, layer, patches_at(layer, x, image, position))
        Y = _responses(layer, x, image, position)
    B0, c0 = last_factor_matrix(chain)
    B, c, info = refit_output_factor(Z, Y, torch.arange(Z.shape[0]) % 5 == 0, B0, c0, activation="relu")
    torch.testing.assert_close(B, B0, rtol=0, atol=1e-8)
    torch.testing.assert_close(c, c0, rtol=0, atol=1e-8)
    assert info["error_original"] < 1e-20


# ----------------------------------------------------------------------------------------- the held-out rule

def _samples(seed=0, n=600, q=6, d=4):
    g = torch.Generator().manual_seed(seed)
    Z = torch.randn(n, q, generator=g, dtype=torch.float64)
    B_true = torch.randn(d, q, generator=g, dtype=torch.float64)
    c_true = torch.randn(d, generator=g, dtype=torch.float64)
    heldout = torch.arange(n) >= n - n // 5
    return Z, B_true, c_true, heldout


def test_a_refit_that_does_not_lower_the_heldout_error_is_not_kept():
    # the fit rows follow another map than the held-out rows; the method's factor is the held-out rows' map
    Z, B_true, c_true, heldout = _samples()
    Y = Z @ B_true.T + c_true
    Y[~heldout] = Z[~heldout] @ (-B_true).T  # what least squares (and RMSProp) fit is wrong on held-out rows
    B, c, info = refit_output_factor(Z, Y, heldout, B_true, c_true, activation="relu", steps=50)
    assert info["kept"] == "original"
    assert info["error_linear"] > info["error_original"] and info["error_refined"] > info["error_original"]
    torch.testing.assert_close(B, B_true, rtol=0, atol=0)
    torch.testing.assert_close(c, c_true, rtol=0, atol=0)


def test_a_refit_that_lowers_the_heldout_error_is_kept_and_the_refinement_only_when_it_helps():
    Z, B_true, c_true, heldout = _samples(1)
    g = torch.Generator().manual_seed(2)
    Y = Z @ B_true.T + c_true + 0.05 * torch.randn(Z.shape[0], B_true.shape[0], generator=g, dtype=torch.float64)
    B0 = B_true + 0.5 * torch.randn(B_true.shape, generator=g, dtype=torch.float64)  # a poor factorization
    B, c, info = refit_output_factor(Z, Y, heldout, B0, None, activation="relu", steps=100)
    assert info["kept"] in ("linear", "refined")
    assert min(info["error_linear"], info["error_refined"]) < info["error_original"]
    if info["kept"] == "refined":
        assert info["error_refined"] < info["error_linear"]
    else:
        assert info["error_refined"] >= info["error_linear"]
    assert float((B - B_true).abs().max()) < 0.1


def test_an_offset_compares_the_sums_through_the_activation_and_leaves_the_least_squares():
    """With o (a residual sum's approximated shortcut) the held-out errors are ||f(y + o) - f(B z + c + o)||^2
    (computed here from numpy's lstsq), the linear refit is the plain least squares, and RMSProp's refinement
    fits the sums: it beats the linear refit there, where the ReLU hides most of the rows."""
    Z, B_true, c_true, heldout = _samples(3)
    g = torch.Generator().manual_seed(4)
    Y = Z @ B_true.T + c_true + 0.3 * torch.randn(Z.shape[0], B_true.shape[0], generator=g, dtype=torch.float64)
    offset = -2.0 + torch.randn(Y.shape, generator=g, dtype=torch.float64)  # most sums negative: ReLU zeroes them
    B0 = B_true + 0.5 * torch.randn(B_true.shape, generator=g, dtype=torch.float64)
    B, c, info = refit_output_factor(Z, Y, heldout, B0, None, activation="relu", steps=200, offset=offset)
    B1, c1 = _lstsq(Z[~heldout].numpy(), Y[~heldout].numpy())
    sums = torch.relu(Y[heldout] + offset[heldout])
    scale = float(sums.pow(2).sum(1).mean())
    for error, (Bx, cx) in (("error_linear", (torch.from_numpy(B1), torch.from_numpy(c1))),
                            ("error_original", (B0, torch.zeros(B0.shape[0], dtype=torch.float64)))):
        fitted = torch.relu(Z[heldout] @ Bx.T + cx + offset[heldout])
        assert info[error] == pytest.approx(float((sums - fitted).pow(2).sum(1).mean()) / scale, rel=1e-6)
    assert info["kept"] == "refined" and info["error_refined"] < info["error_linear"]
    plain = refit_output_factor(Z, Y, heldout, B0, None, activation="identity", solver="none", offset=offset)
    torch.testing.assert_close(plain[0], torch.from_numpy(B1), rtol=1e-6, atol=1e-8)  # offsets cancel without f
    with pytest.raises(ValueError, match="offset"):
        refit_output_factor(Z, Y, heldout, B0, None, offset=offset[:3])


def test_bad_arguments_raise():
    Z, B_true, c_true, heldout = _samples()
    Y = Z @ B_true.T
    with pytest.raises(ValueError, match="activation must be one of"):
        refit_output_factor(Z, Y, heldout, B_true, c_true, activation="tanh")
    with pytest.raises(ValueError, match="solver must be one of"):
        refit_output_factor(Z, Y, heldout, B_true, c_true, solver="closed-form")
    with pytest.raises(ValueError, match=r"weight must have shape \(d, q\)"):
        refit_output_factor(Z, Y, heldout, B_true.T, c_true)
    with pytest.raises(ValueError, match="every row is held out"):
        refit_output_factor(Z, Y, torch.ones_like(heldout), B_true, c_true)
    layer = nn.Conv2d(3, 4, 3)
    single = nn.Sequential(nn.Conv2d(3, 4, 3))
    assert "not a chain" in last_factor_refittable(single, layer)
    with pytest.raises(ValueError, match="cannot refit the last factor"):
        last_factor_inputs(single, layer, torch.zeros(2, 27))


# ---------------------------------------------------------------------------------------------- the pipeline

@pytest.fixture(scope="module")
def digits_loader(digits):
    return DataLoader(Subset(digits.train, range(200)), batch_size=32, shuffle=False)


@pytest.mark.parametrize("method,settings", [("tucker2", {}), ("cp", {"restarts": 1}), ("svd", {})])
def test_the_correction_lowers_the_heldout_errors_on_vgg_digits(vgg_digits, digits_loader, method, settings):
    from lowrank_fm import approximate

    config = ApproxConfig(method=method, method_settings=settings, speedup=2.0, speed_gate=False, progress=False)
    _, before = approximate(vgg_digits, digits_loader, dataclasses.replace(config, correction=False))
    _, after = approximate(vgg_digits, digits_loader, config)
    layers_before = {l.name: l for l in before.layers if l.status == "approximated"}
    layers_after = {l.name: l for l in after.layers if l.status == "approximated"}
    assert layers_before and set(layers_before) == set(layers_after)
    for name, layer in layers_after.items():
        assert layer.rank == layers_before[name].rank  # the correction changes weights, not shapes
        assert layer.macs_after == layers_before[name].macs_after
        assert "correction" not in layers_before[name].extra
        done = layer.extra["correction"]
        assert done["kept"] in ("original", "linear", "refined")
        assert min(done.get("error_linear", np.inf), done.get("error_refined", np.inf),
                   done["error_original"]) <= done["error_original"]
    # rel_error: ||y - yhat|| / ||y|| on held-out images (here every layer gains; measured at 2x on 200 images:
    # tucker2 0.54/0.64 -> 0.38/0.54, cp 0.48/0.72/0.60 -> 0.31/0.33/0.42, svd 0.68/0.68 -> 0.52/0.67)
    error_before = np.mean([l.rel_error for l in layers_before.values()])
    error_after = np.mean([l.rel_error for l in layers_after.values()])
    assert error_after < error_before
    assert after.config["correction"] is True and before.config["correction"] is False


def test_no_correction_flag_reaches_the_config():
    from lowrank_fm.cli import build_parser

    assert build_parser().parse_args(["vgg-digits", "--no-correction"]).correction is False
    assert build_parser().parse_args(["vgg-digits"]).correction is True
    assert ApproxConfig.from_dict(ApproxConfig(correction=False).to_dict()).correction is False


def test_without_samples_the_layers_are_built_as_computed_and_say_why(vgg_digits, digits_loader):
    """fit_positions=None replays the calibration store, which a weight-only method does not write: no
    layer-wise pass, so no correction, and each layer's record says why."""
    from lowrank_fm import approximate

    _, report = approximate(vgg_digits, digits_loader, method="tucker2", speedup=2.0, speed_gate=False,
                            fit_positions=None, progress=False)
    approximated = [l for l in report.layers if l.status == "approximated"]
    assert approximated
    for layer in approximated:
        assert layer.extra["correction"]["kept"] == "original"
        assert "no layer-wise pass" in layer.extra["correction"]["reason"]


@pytest.fixture(scope="module")
def residual_digits():
    """A small residual network (two blocks per stage, a projection shortcut) trained briefly on digits."""
    from lowrank_fm.zoo.data import load_dataset
    from lowrank_fm.zoo.networks import ResNetSmall

    torch.manual_seed(0)
    data = load_dataset("digits")
    model = ResNetSmall((8, 16), blocks=2, in_channels=1, num_classes=10)
    images = torch.stack([data.train[i][0] for i in range(len(data.train))])
    labels = torch.tensor([int(data.train[i][1]) for i in range(len(data.train))])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(60):
        for batch in torch.randperm(len(labels)).split(128):
            optimizer.zero_grad()
            F.cross_entropy(model(images[batch]), labels[batch]).backward()
            optimizer.step()
    return model.eval(), data


def _block_output_errors(reference, approximated, images) -> list[float]:
    """||s - shat|| / ||s|| at every block's output (after the sum and its ReLU), each network on its own path."""
    def outputs(network):
        seen = []
        handles = [block.register_forward_hook(lambda m, a, out: seen.append(out))
                   for stage in network.stages for block in stage]
        with torch.no_grad():
            network(images)
        for handle in handles:
            handle.remove()
        return seen

    return [float((s - shat).norm() / s.norm()) for s, shat in zip(outputs(reference), outputs(approximated))]


@pytest.mark.parametrize("method", ["fm", "tucker2"])
def test_shortcut_compensation_makes_every_later_block_output_track_the_original(residual_digits, method):
    """The layers before a residual sum are fitted to y + v - vhat: the block outputs the next layers see err
    less than when each layer is fitted to its own output alone (held-out digits), on the same ranks."""
    from lowrank_fm import approximate
    from lowrank_fm.surgery import folded_copy

    model, data = residual_digits
    loader = DataLoader(Subset(data.train, range(300)), batch_size=50, shuffle=False)
    config = ApproxConfig(method=method, speedup=2.5, speed_gate=False, progress=False)
    plain_model, plain = approximate(model, loader, dataclasses.replace(config, shortcut_compensation=False))
    model_c, compensated = approximate(model, loader, config)
    assert compensated.config["shortcut_compensation"] is True and plain.config["shortcut_compensation"] is False
    flagged = {l.name for l in compensated.layers if l.extra.get("shortcut_compensated")}
    # each block's conv2 feeds its sum, except where the projection conv is approximated too: it comes later in
    # the graph, so it gets the shift (conv2's branch is final by then)
    approximated = {l.name for l in compensated.layers if l.status == "approximated"}
    projection = "stages.1.0.shortcut.0"
    expected = {"stages.0.0.conv2", "stages.0.1.conv2", "stages.1.1.conv2"}
    expected |= {projection} if projection in approximated else {"stages.1.0.conv2"}
    assert flagged == expected & approximated and len(flagged) == 4
    assert not any(l.extra.get("shortcut_compensated") for l in plain.layers)
    assert {l.name: l.rank for l in plain.layers} == {l.name: l.rank for l in compensated.layers}
    test_images = torch.stack([data.test[i][0] for i in range(len(data.test))])
    folded, _ = folded_copy(model, test_images[:2])
    errors_plain = _block_output_errors(folded, plain_model, test_images)
    errors_compensated = _block_output_errors(folded, model_c, test_images)
    # the first block's shortcut carries the kept stem's exact output (no shift: fm fits the same targets; the
    # correction of tucker2 now compares the sums through their ReLU); every later block gains
    assert errors_compensated[0] <= errors_plain[0] * (1 + 1e-4)
    if method == "fm":
        assert errors_compensated[0] == pytest.approx(errors_plain[0], rel=1e-4)
    for plain_error, compensated_error in zip(errors_plain[1:], errors_compensated[1:]):
        assert compensated_error < 0.99 * plain_error, (errors_plain, errors_compensated)


def test_shortcut_compensation_flag_reaches_the_config():
    from lowrank_fm.cli import build_parser

    assert build_parser().parse_args(["vgg-digits", "--no-shortcut-compensation"]).shortcut_compensation is False
    assert build_parser().parse_args(["vgg-digits"]).shortcut_compensation is True
    assert ApproxConfig.from_dict(ApproxConfig(shortcut_compensation=False).to_dict()).shortcut_compensation is False
