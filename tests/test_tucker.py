"""Tucker-2 / Tucker-1 against independent numpy computations and dense convs of the reconstructed kernels."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import layer_context
from lowrank_fm.cost import measure_costs
from lowrank_fm.methods import LayerContext, get_method
from lowrank_fm.methods.tucker import Tucker1, coupled_ranks, tucker1, tucker2


def _tucker2_kernel(core, u_out, u_in):
    """core x_1 U_out x_2 U_in in numpy."""
    return np.einsum("abhw,ta,sb->tshw", core.numpy(), u_out.numpy(), u_in.numpy())


def _relative_error(weight, approximation):
    return np.linalg.norm(weight - approximation) / np.linalg.norm(weight)


def _methods():
    return {"tucker2": get_method("tucker2"), "tucker1": get_method("tucker1"), "tucker1-input": Tucker1({"mode": "input"})}


def _reconstructed(name, weight, rank):
    """The kernel the method's chain should apply at ``rank``, from the pure functions, in numpy."""
    if name == "tucker2":
        rank_out, rank_in = coupled_ranks(weight.shape[0], weight.shape[1], rank)
        return _tucker2_kernel(*tucker2(weight, rank_out, rank_in))
    if name == "tucker1":
        core, u_out = tucker1(weight, rank, mode="output")
        return np.einsum("ashw,ta->tshw", core.numpy(), u_out.numpy())
    core, u_in = tucker1(weight, rank, mode="input")
    return np.einsum("tbhw,sb->tshw", core.numpy(), u_in.numpy())


@pytest.mark.parametrize("ranks", [(3, 2), (5, 7), (1, 1), (12, 10)])
@pytest.mark.parametrize("iterations", [0, 50])
def test_a_kernel_of_known_multilinear_rank_is_recovered(ranks, iterations):
    rng = np.random.default_rng(0)
    rank_out, rank_in = ranks
    weight = np.einsum("abhw,ta,sb->tshw", rng.standard_normal((rank_out, rank_in, 3, 3)),
                       rng.standard_normal((12, rank_out)), rng.standard_normal((10, rank_in)))
    core, u_out, u_in = tucker2(torch.from_numpy(weight), rank_out, rank_in, iterations=iterations)
    assert core.shape == (rank_out, rank_in, 3, 3) and u_out.shape == (12, rank_out) and u_in.shape == (10, rank_in)
    assert _relative_error(weight, _tucker2_kernel(core, u_out, u_in)) < 1e-6
    np.testing.assert_allclose(u_out.T @ u_out, np.eye(rank_out), atol=1e-10)
    np.testing.assert_allclose(u_in.T @ u_in, np.eye(rank_in), atol=1e-10)


@pytest.mark.parametrize("ranks", [(4, 3), (8, 5), (2, 10), (16, 1)])
def test_hooi_fits_at_least_as_well_as_the_hosvd_which_takes_the_leading_singular_vectors(ranks):
    rng = np.random.default_rng(1)
    weight = rng.standard_normal((16, 12, 3, 3))
    rank_out, rank_in = ranks
    hosvd = tucker2(torch.from_numpy(weight), rank_out, rank_in, iterations=0)
    hooi = tucker2(torch.from_numpy(weight), rank_out, rank_in)
    error_hosvd = _relative_error(weight, _tucker2_kernel(*hosvd))
    error_hooi = _relative_error(weight, _tucker2_kernel(*hooi))
    assert error_hooi <= error_hosvd + 1e-12
    if ranks != (16, 1):  # with the full output mode, the HOSVD is already optimal
        assert error_hooi < error_hosvd - 1e-4
    # HOSVD: projectors onto the leading left singular vectors of each unfolding (numpy SVD)
    for factor, unfolding, rank in [(hosvd[1], weight.reshape(16, -1), rank_out),
                                    (hosvd[2], weight.transpose(1, 0, 2, 3).reshape(12, -1), rank_in)]:
        u = np.linalg.svd(unfolding, full_matrices=False)[0][:, :rank]
        np.testing.assert_allclose(factor.numpy() @ factor.numpy().T, u @ u.T, atol=1e-10)
    # the core is the projection of the kernel onto the factors, so the error is ||K||^2 - ||core||^2
    core, u_out, u_in = hooi
    np.testing.assert_allclose(core.numpy(), np.einsum("tshw,ta,sb->abhw", weight, u_out.numpy(), u_in.numpy()),
                               atol=1e-12)


@pytest.mark.parametrize("name", ["tucker2", "tucker1", "tucker1-input"])
# the geometry grid is tests/test_method_contract.py's (full rank exact, MACs counted, default settings)
@pytest.mark.parametrize("kernel,stride,padding,dilation", [(3, 1, 1, 1), ((3, 5), (2, 1), (1, 2), 2)])
def test_the_chain_is_the_dense_conv_of_its_reconstructed_kernel_and_macs_are_the_counted_ones(
        name, kernel, stride, padding, dilation):
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 8, kernel, stride=stride, padding=padding, dilation=dilation).double()
    x = torch.randn(2, 6, 13, 12, dtype=torch.float64)
    method, ctx = _methods()[name], layer_context(conv, x)
    rank = 3
    chain = method.build(ctx, rank)
    kernel_tilde = torch.from_numpy(_reconstructed(name, conv.weight.detach(), rank))
    expected = F.conv2d(x, kernel_tilde, conv.bias, stride=stride, padding=padding, dilation=dilation)
    torch.testing.assert_close(chain(x), expected, rtol=1e-10, atol=1e-10)
    full = method.build(ctx, method.full_rank(ctx))
    torch.testing.assert_close(full(x), conv(x), rtol=1e-9, atol=1e-9)
    for r, module in [(rank, chain), (method.full_rank(ctx), full)]:
        assert method.macs(ctx, r) == sum(c.macs for c in measure_costs(module, x).values())


def test_tucker2_layers_and_report():
    torch.manual_seed(2)
    conv = nn.Conv2d(6, 8, (3, 5), stride=2, padding=(1, 2), bias=False).double()
    x = torch.randn(1, 6, 10, 10, dtype=torch.float64)
    method, ctx = get_method("tucker2"), layer_context(conv, x)
    info = {}
    chain = method.build(ctx, 4, None, info)  # (R4, R3) = (4, 3)
    first, middle, last = chain
    assert (first.in_channels, first.out_channels, first.kernel_size) == (6, 3, (1, 1))
    assert (middle.in_channels, middle.out_channels, middle.kernel_size) == (3, 4, (3, 5))
    assert (middle.stride, middle.padding, middle.dilation) == ((2, 2), (1, 2), (1, 1))
    assert (last.in_channels, last.out_channels, last.kernel_size) == (4, 8, (1, 1))
    assert first.bias is None and middle.bias is None and last.bias is None
    assert info["ranks"] == [4, 3]
    assert info["compression"] == pytest.approx(15 * 6 * 8 / (6 * 3 + 15 * 3 * 4 + 8 * 4))
    weight = conv.weight.detach().numpy()
    assert info["kernel_rel_error"] == pytest.approx(
        _relative_error(weight, _reconstructed("tucker2", conv.weight.detach(), 4)), rel=1e-9)
    # the bias goes on the last 1x1 conv
    biased = nn.Conv2d(6, 8, 3).double()
    chain = method.build(layer_context(biased, x), 4)
    torch.testing.assert_close(chain[2].bias, biased.bias.detach())


def test_tucker1_output_is_the_best_rank_r_kernel_and_input_the_best_input_rank():
    torch.manual_seed(3)
    conv = nn.Conv2d(7, 9, 3, padding=1).double()
    x = torch.randn(2, 7, 8, 8, dtype=torch.float64)
    w = conv.weight.detach().numpy()
    rank = 4
    u, s, vt = np.linalg.svd(w.reshape(9, -1), full_matrices=False)
    best_out = ((u[:, :rank] * s[:rank]) @ vt[:rank]).reshape(w.shape)
    u, s_in, vt = np.linalg.svd(w.transpose(1, 0, 2, 3).reshape(7, -1), full_matrices=False)
    best_in = ((u[:, :rank] * s_in[:rank]) @ vt[:rank]).reshape(7, 9, 3, 3).transpose(1, 0, 2, 3)
    for method, best in [(get_method("tucker1"), best_out), (Tucker1({"mode": "input"}), best_in)]:
        ctx = layer_context(conv, x)
        expected = F.conv2d(x, torch.from_numpy(best.copy()), conv.bias, padding=1)
        torch.testing.assert_close(method.build(ctx, rank)(x), expected, rtol=1e-10, atol=1e-10)
    # output mode: the same layer as truncated SVD
    torch.testing.assert_close(get_method("tucker1").build(ctx, rank)(x), get_method("svd").build(ctx, rank)(x),
                               rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(Tucker1({"mode": "input"}).spectrum(ctx), s_in ** 2, rtol=1e-10)
    assert Tucker1({"mode": "input"}).full_rank(ctx) == 7


def test_spectra_are_the_output_unfolding_padded_to_the_full_rank():
    conv = nn.Conv2d(2, 30, 3).double()  # the unfolding is 30 x 18: 12 zero singular values
    x = torch.randn(1, 2, 6, 6, dtype=torch.float64)
    s = np.linalg.svd(conv.weight.detach().numpy().reshape(30, -1), compute_uv=False)
    for name in ("tucker2", "tucker1"):
        method = get_method(name)
        ctx = layer_context(conv, x)
        spectrum = method.spectrum(ctx)
        assert spectrum.size == method.full_rank(ctx) == 30
        np.testing.assert_allclose(spectrum[:18], s ** 2, rtol=1e-10)
        assert np.all(spectrum[18:] == 0)
        # a rank above the unfolding's (R4 = 25 > 18) still builds an exact layer
        torch.testing.assert_close(method.build(ctx, 30)(x), conv(x), rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(method.build(ctx, 25)(x), conv(x), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("shape,rank,expected", [((64, 32), 10, (10, 5)), ((64, 3), 10, (10, 1)),
                                                 ((32, 64), 32, (32, 64)), ((8, 6), 3, (3, 2)),
                                                 ((4, 2), 1, (1, 1)), ((4, 6), 2, (2, 3)), ((8, 4), 3, (3, 2))])
def test_coupled_ranks(shape, rank, expected):
    assert coupled_ranks(*shape, rank) == expected


def test_tucker2_macs_grow_strictly_with_the_rank():
    conv = nn.Conv2d(3, 64, 3, padding=1).double()
    method, ctx = get_method("tucker2"), layer_context(conv, torch.randn(1, 3, 8, 8, dtype=torch.float64))
    macs = [method.macs(ctx, r) for r in range(1, 65)]
    assert all(b > a for a, b in zip(macs, macs[1:]))


def test_vbmf_ranks_of_a_noisy_low_rank_kernel():
    rng = np.random.default_rng(4)
    out_rank, in_rank = 5, 3
    low_out = rng.standard_normal((32, out_rank)) @ rng.standard_normal((out_rank, 16 * 9))
    conv = nn.Conv2d(16, 32, 3).double()
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(low_out.reshape(32, 16, 3, 3) + 0.05 * rng.standard_normal((32, 16, 3, 3))))
    ctx = LayerContext("c", conv, 1)
    assert get_method("tucker2").vbmf_rank(ctx) == out_rank
    assert get_method("tucker1").vbmf_rank(ctx) == out_rank
    low_in = rng.standard_normal((16, in_rank)) @ rng.standard_normal((in_rank, 32 * 9))
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(low_in.reshape(16, 32, 3, 3).transpose(1, 0, 2, 3).copy()))
    assert Tucker1({"mode": "input"}).vbmf_rank(ctx) == in_rank
    assert get_method("tucker2").vbmf_ranks(ctx)[1] == in_rank
    # pure noise: VBMF finds nothing, the method still returns a buildable rank
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(rng.standard_normal((32, 16, 3, 3))))
    assert get_method("tucker2").vbmf_rank(ctx) == 1


def test_supports_refuses_with_reasons():
    tucker2_method, tucker1_method = get_method("tucker2"), get_method("tucker1")
    assert "convs only" in tucker2_method.supports(nn.Linear(3, 4))
    assert "convs only" in tucker1_method.supports(nn.Linear(3, 4))
    assert "1x1" in tucker2_method.supports(nn.Conv2d(3, 4, 1))
    assert tucker1_method.supports(nn.Conv2d(3, 4, 1)) is None
    assert "groups=2" in tucker2_method.supports(nn.Conv2d(4, 4, 3, groups=2))
    assert "asymmetrically" in tucker2_method.supports(nn.Conv2d(3, 4, 4, padding="same"))
    assert tucker2_method.supports(nn.Conv2d(3, 4, 3)) is None


def test_same_padding_and_float32_are_kept():
    torch.manual_seed(5)
    conv = nn.Conv2d(4, 6, 3, padding="same", dilation=2)
    x = torch.randn(2, 4, 9, 9)
    for name in ("tucker2", "tucker1"):
        method = get_method(name)
        chain = method.build(layer_context(conv, x), 6)
        assert all(c.weight.dtype == torch.float32 for c in chain)
        torch.testing.assert_close(chain(x), conv(x), rtol=1e-5, atol=1e-5)


def test_bad_arguments_raise():
    weight = torch.randn(6, 4, 3, 3)
    with pytest.raises(ValueError, match=r"rank_out must be an integer in \[1, 6\]"):
        tucker2(weight, 0, 2)
    with pytest.raises(ValueError, match=r"rank_in must be an integer in \[1, 4\]"):
        tucker2(weight, 2, 5)
    with pytest.raises(ValueError, match="weight must have shape"):
        tucker2(weight[0], 2, 2)
    with pytest.raises(ValueError, match="iterations"):
        tucker2(weight, 2, 2, iterations=-1)
    with pytest.raises(ValueError, match="mode must be one of"):
        tucker1(weight, 2, mode="both")
    with pytest.raises(ValueError, match="mode must be one of"):
        Tucker1({"mode": "both"})
    with pytest.raises(ValueError, match=r"rank must be an integer in \[1, 4\]"):
        tucker1(weight, 5, mode="input")
    with pytest.raises(ValueError, match="ctx.in_shape"):
        get_method("tucker2").macs(LayerContext("c", nn.Conv2d(4, 6, 3), 1), 2)


def test_vbmf_ranks_through_the_pipeline(vgg_digits, digits):
    from lowrank_fm import approximate

    loader = [digits.train[i][0][None] for i in range(8)]
    _, report = approximate(vgg_digits, loader, method="tucker2", ranks="vbmf", n_images=8, progress=False,
                            speed_gate=False)
    approximated = [l for l in report.layers if l.status == "approximated"]
    assert approximated
    for layer in approximated:
        assert layer.macs_after < layer.macs_before
        assert layer.extra["ranks"][0] == layer.rank
