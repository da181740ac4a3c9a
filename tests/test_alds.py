"""Grouped SVD (ALDS): the grouped layer equals the dense conv of its reconstructed kernel, the error table
equals the directly computed error, and the min-max allocation is optimal (brute force)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import layer_context
from lowrank_fm.config import ApproxConfig
from lowrank_fm.methods import get_method
from lowrank_fm.planner import plan_ranks
from lowrank_fm.methods.grouped_svd import Candidate, group_bases, grouped_errors, grouped_factors, minmax_allocation


@pytest.mark.parametrize("groups", [1, 2, 4])
@pytest.mark.parametrize("with_sigma", [False, True])
def test_error_table_equals_direct_error(groups: int, with_sigma: bool) -> None:
    rng = np.random.default_rng(groups)
    w = rng.standard_normal((6, 16))
    b = rng.standard_normal((16, 16))
    sigma = b @ b.T if with_sigma else None
    bases = group_bases(w, sigma, groups)
    table = grouped_errors(w, sigma, bases)
    for j in range(0, 7):
        approx = np.zeros_like(w)
        size = 16 // groups
        for g in range(groups):
            u = bases[g][:, :j]
            approx[:, g * size:(g + 1) * size] = u @ u.T @ w[:, g * size:(g + 1) * size]
        d = w - approx
        direct = np.sum((d @ (np.eye(16) if sigma is None else sigma)) * d)
        assert table[j] == pytest.approx(direct, rel=1e-9, abs=1e-9)
    if groups == 1 and not with_sigma:  # k = 1 is the truncated SVD: tail sums of squared singular values
        s = np.linalg.svd(w, compute_uv=False) ** 2
        np.testing.assert_allclose(table[:7], [s[j:].sum() for j in range(7)], rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="divide"):
        group_bases(w, sigma, 5)


@pytest.mark.parametrize("geometry", [dict(padding=1), dict(stride=(2, 1), padding=(1, 0), dilation=(1, 2))])
def test_grouped_layer_equals_dense_conv_of_reconstructed_kernel(geometry) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 6, 3, **geometry).double()
    x = torch.randn(2, 8, 9, 9, dtype=torch.float64)
    method = get_method("alds")
    ctx = method.with_groups(layer_context(conv, x), 4)
    chain = method.build(ctx, 8)  # 4 groups of rank 2
    assert chain[0].groups == 4 and chain[0].out_channels == 8 and chain[1].in_channels == 8
    w = conv.weight.detach().double().reshape(6, -1).numpy()
    first, second = grouped_factors(w, group_bases(w, None, 4), 2)
    kernel = np.concatenate([second[:, 2 * g:2 * g + 2] @ first[2 * g:2 * g + 2] for g in range(4)], axis=1)
    dense = F.conv2d(x.double(), torch.from_numpy(kernel).reshape(6, 8, 3, 3), conv.bias.double(), conv.stride,
                     conv.padding, conv.dilation)
    with torch.no_grad():
        torch.testing.assert_close(chain.double()(x.double()), dense, rtol=1e-9, atol=1e-9)
    assert method.macs(ctx, 8) == sum(c.weight[0].numel() * c.out_channels for c in chain) * ctx.positions


def test_minmax_allocation_matches_brute_force() -> None:
    rng = np.random.default_rng(0)
    layers = {}
    for name in "abc":
        macs = np.sort(rng.integers(1, 100, 5))[::-1]
        errors = np.sort(rng.random(5))  # more MACs, less error
        layers[name] = [Candidate(100, 0.0, None)] + [Candidate(int(m), float(e), int(m)) for m, e in zip(macs, errors)]
    for budget in (60, 120, 200, 290, 5):
        chosen, level, reachable = minmax_allocation(layers, budget)
        feasible = [combo for combo in itertools.product(*layers.values()) if sum(c.macs for c in combo) <= budget]
        assert reachable == bool(feasible)
        if feasible:
            best = min(max(c.error for c in combo) for combo in feasible)
            assert level == pytest.approx(best) and max(c.error for c in chosen.values()) == pytest.approx(best)
            assert sum(c.macs for c in chosen.values()) <= budget


def test_select_ranks_meets_the_budget_and_balances_errors() -> None:
    torch.manual_seed(1)
    convs = {"a": nn.Conv2d(8, 8, 3, padding=1), "b": nn.Conv2d(8, 16, 3, padding=1)}
    x = torch.randn(1, 8, 6, 6)
    contexts = {n: layer_context(c, x) for n, c in convs.items()}
    contexts = {n: type(c)(n, c.module, c.positions, None, c.in_shape, c.out_shape) for n, c in contexts.items()}
    macs = {n: c.out_channels * 72 * c.positions for n, c in contexts.items()}
    method = get_method("alds")
    plan = plan_ranks(method, convs, contexts, macs, {n: None for n in convs}, ApproxConfig(method="alds", speedup=2.0))
    # MACs counted independently of the plan, from each layer's groups k and width k j: j p + d k j per position
    total = 0
    for name, layer in plan.layers.items():
        k = layer.options.get("groups", 1)
        total += macs[name] if layer.rank is None else (layer.rank // k * 72 + contexts[name].out_channels * layer.rank) * 36
    assert plan.selection["reachable"] and sum(macs.values()) / total >= 2.0
    assert plan.selection["max_rel_error"] > 0
    assert plan.selection["allocation"] == "alds-minmax"


@pytest.mark.parametrize("plain, sigma_method", [("alds", "alds-sigma"), ("svd", "svd-sigma")])
def test_sigma_variant_at_identity_builds_the_plain_layer(plain: str, sigma_method: str) -> None:
    from lowrank_fm.methods import InputStats

    torch.manual_seed(2)
    conv = nn.Conv2d(8, 6, 3, padding=1).double()
    x = torch.randn(2, 8, 7, 7, dtype=torch.float64)
    base = layer_context(conv, x)
    ctx = type(base)(base.name, conv, base.positions, None, base.in_shape, base.out_shape,
                     InputStats(np.zeros(72), np.eye(72), 1000))
    with torch.no_grad():
        torch.testing.assert_close(get_method(sigma_method).build(ctx, 3)(x), get_method(plain).build(base, 3)(x),
                                   rtol=1e-9, atol=1e-9)
    if plain == "alds":
        layers, macs = {base.name: conv, "rest": nn.Linear(2, 2)}, {base.name: 6 * 72 * base.positions, "rest": 1000}
        reasons = {base.name: None, "rest": "not targeted"}
        plain_method, sigma_m = get_method("alds"), get_method("alds-sigma", {"group_options": (1, 2, 4, 8)})
        plans = [plan_ranks(m, layers, {base.name: ctx}, macs, reasons, ApproxConfig(method=m.name, speedup=1.8))
                 for m in (plain_method, sigma_m)]
        assert [(p.rank, p.options) for p in plans[0].layers.values()] == [(p.rank, p.options) for p in plans[1].layers.values()]


def test_groups_a_layer_cannot_take_are_refused() -> None:
    """A Linear layer takes k = 1 only and a conv only the group counts of its settings that divide its input
    channels: another k in the context is refused, not built into a chain of the wrong width."""
    method = get_method("alds")
    linear = layer_context(nn.Linear(8, 6), torch.randn(2, 8))
    with pytest.raises(ValueError, match=r"cannot take 2 groups \(it may take \[1\]\)"):
        method.build(method.with_groups(linear, 2), 4)
    conv = layer_context(nn.Conv2d(6, 4, 3), torch.randn(1, 6, 5, 5))
    with pytest.raises(ValueError, match=r"cannot take 4 groups \(it may take \[1, 2\]\)"):
        method.build(method.with_groups(conv, 4), 4)
    assert method.build(method.with_groups(conv, 2), 4)[0].groups == 2
