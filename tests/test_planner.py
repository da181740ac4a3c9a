"""The rank planner: one owner of every rank decision. Rounding never crosses break-even, policies a method
cannot honour are refused before any work, and method settings are taken by name and checked."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch
from torch import nn

from conftest import layer_context
from lowrank_fm.cli import build_parser
from lowrank_fm.config import ApproxConfig
from lowrank_fm.methods import get_method
from lowrank_fm.planner import plan_ranks


def _plan(conv: nn.Conv2d, **settings):
    x = torch.randn(1, conv.in_channels, 6, 6)
    ctx = layer_context(conv, x)
    macs = {ctx.name: conv.out_channels * conv.in_channels * 9 * ctx.positions, "rest": 10**9}
    layers = {ctx.name: conv, "rest": nn.Linear(2, 2)}
    config = ApproxConfig(method="svd", **settings)
    return plan_ranks(get_method("svd"), layers, {ctx.name: ctx}, macs, {ctx.name: None, "rest": "not targeted"},
                      config).layers[ctx.name], ctx


def test_rounding_to_a_multiple_never_crosses_break_even() -> None:
    # svd of a (16, 16, 3, 3) conv: r (16 * 9) + 16 r = 160 r MACs per position against 16 * 144 = 2304, so
    # ranks up to 14 are cheaper. Rank 13 rounds to 16 (nearest multiple of 8), which costs 2560: the planner
    # takes the multiple below break-even, 8, instead of dropping the layer.
    conv = nn.Conv2d(16, 16, 3, padding=1)
    name = layer_context(conv, torch.randn(1, 16, 6, 6)).name
    plan, ctx = _plan(conv, layer_ranks={name: 13}, rank_multiple=8)
    assert plan.rank == 8 and plan.reason is None
    assert plan.macs_after == 160 * 8 * ctx.positions
    plan, _ = _plan(conv, layer_ranks={name: 11}, rank_multiple=8)  # nearest multiple 8 is cheaper: kept as rounded
    assert plan.rank == 8
    plan, _ = _plan(conv, layer_ranks={name: 13}, rank_multiple=1)
    assert plan.rank == 13 and plan.macs_after == 160 * 13 * ctx.positions


def test_a_rank_past_break_even_keeps_the_layer_with_its_reason() -> None:
    conv = nn.Conv2d(16, 16, 3, padding=1)
    name = layer_context(conv, torch.randn(1, 16, 6, 6)).name
    plan, ctx = _plan(conv, layer_ranks={name: 15})
    assert plan.rank is None and plan.chosen == 15
    assert plan.reason == f"rank 15 of 16 would not reduce MACs ({2400 * ctx.positions:,} >= {2304 * ctx.positions:,})"
    forced, _ = _plan(conv, layer_ranks={name: 15}, force=True)
    assert forced.rank == 15


@pytest.mark.parametrize("settings, message", [
    (dict(method="alds", speedup=2.0, allocation="energy"), r"method 'alds' plans its budget with \['alds-minmax'\] only"),
    (dict(method="alds-sigma", speedup=2.0, budget="latency"), r"on MACs only; --budget latency does not apply"),
    (dict(method="fm", speedup=2.0, allocation="alds-minmax"), r"method 'fm' plans its budget with"),
    (dict(method="tucker2", ranks="vbmf", speedup=2.0), r"cannot honour a --speedup target"),
    (dict(method="svd", ranks="vbmf"), r"applies to tucker2 and tucker1, not to svd"),
    (dict(method="fm", allocation="best"), r"allocation must be one of"),
])
def test_a_policy_the_method_cannot_honour_is_refused_up_front(settings, message) -> None:
    with pytest.raises(ValueError, match=message):
        ApproxConfig(**settings)


def test_method_settings_are_taken_by_name_and_checked() -> None:
    config = ApproxConfig(method="cp").replace(restarts=5)
    assert config.method_settings == {"restarts": 5}
    assert get_method("cp", config.method_settings).settings.restarts == 5
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['solver'\].*method 'cp'.*\['iterations', 'restarts', 'ridge'\]"):
        ApproxConfig(method="cp").replace(solver="none")
    with pytest.raises(ValueError, match=r"unknown method setting\(s\) \['restart'\]"):
        ApproxConfig(method="cp", method_settings={"restart": 5})
    with pytest.raises(ValueError, match="solver must be one of"):
        ApproxConfig(method="fm", method_settings={"solver": "adam"})
    assert ApproxConfig.from_dict(config.to_dict()) == config


def test_the_command_line_passes_method_settings_by_name() -> None:
    args = build_parser().parse_args(["--method", "alds", "--method-setting", "group_options=1,2",
                                      "--method-setting", "restarts=3"])
    assert args.method_settings == [("group_options", (1, 2)), ("restarts", 3)]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--method-setting", "no-equals-sign"])


def _gated_plan(speedup: float, gate=None) -> tuple:
    """svd on three (16, 16, 3, 3) convs of 6x6 maps: rank r costs 160 r MACs per position against 2304."""
    torch.manual_seed(0)
    convs = {name: nn.Conv2d(16, 16, 3, padding=1) for name in "abc"}
    contexts = {name: dataclasses.replace(layer_context(conv, torch.randn(1, 16, 6, 6)), name=name)
                for name, conv in convs.items()}
    macs = {name: 2304 * ctx.positions for name, ctx in contexts.items()}
    plan = plan_ranks(get_method("svd"), convs, contexts, macs, {name: None for name in convs},
                      ApproxConfig(method="svd", speedup=speedup), gate=gate)
    positions = contexts["a"].positions
    after = sum(2304 if p.rank is None else 160 * p.rank for p in plan.layers.values()) * positions
    return plan, sum(macs.values()) / after


def test_the_gate_plans_the_other_layers_again_to_make_up_a_mac_budget() -> None:
    plain, plain_speedup = _gated_plan(1.5)
    timed = []

    def gate(name, ctx, rank):  # a is slower than the original at every rank
        timed.append((name, rank))
        return name != "a"

    plan, speedup = _gated_plan(1.5, gate)
    assert plain_speedup >= 1.5 and speedup >= 1.5  # 2304 + 160 (r_b + r_c) <= 3 * 2304 / 1.5
    assert plan.layers["a"].rank is None and plan.layers["a"].reason == "slower"
    # a was timed twice at its rank, tried again at half of it (slower again, twice), then planned without
    half = plain.layers["a"].rank // 2
    ranks_of_a = [r for n, r in timed if n == "a"]
    assert len(ranks_of_a) == 4 and ranks_of_a[0] == ranks_of_a[1] == plain.layers["a"].rank
    assert 1 <= ranks_of_a[2] == ranks_of_a[3] <= half
    for name in "bc":  # a kept at full cost: b and c share 2304 MACs where they had about 3072
        assert plan.layers[name].rank < plain.layers[name].rank
        assert (name, plan.layers[name].rank) in timed  # the new ranks were gated too
    assert plan.layers["b"].rank + plan.layers["c"].rank <= 2304 // 160
    assert plan.selection["speed_gate"] == {"slower": ["a"], "replans": 2, "rank_caps": {"a": {"*": half}}}


def test_a_layer_slower_at_its_rank_takes_at_most_half_of_it_and_stays_factorized() -> None:
    plain, _ = _gated_plan(1.5)
    half = plain.layers["a"].rank // 2
    plan, speedup = _gated_plan(1.5, lambda name, ctx, rank: name != "a" or rank <= half)
    assert speedup >= 1.5 and plan.selection["speed_gate"] == {"slower": [], "replans": 1,
                                                                 "rank_caps": {"a": {"*": half}}}
    assert 1 <= plan.layers["a"].rank <= half and plan.layers["a"].reason is None


def test_when_the_faster_layers_cannot_reach_the_budget_the_plan_stands_with_a_warning(caplog) -> None:
    plain, _ = _gated_plan(2.9)
    with caplog.at_level(logging.WARNING, logger="lowrank_fm.planner"):
        plan, speedup = _gated_plan(2.9, lambda name, ctx, rank: name != "a")
    # without a, b and c would have to fit in 3 * 2304 / 2.9 - 2304 = 79 MACs per position: below rank 1 of
    # each; the plan with a capped at half its rank stands, a kept original
    assert speedup < 2.9 and plan.layers["a"].reason == "slower"
    assert all(plan.layers[n].rank is not None for n in "bc")
    assert plan.selection["speed_gate"]["slower"] == ["a"] and plan.selection["speed_gate"]["replans"] == 1
    assert "theoretical speedup falls short of 2.90x" in caplog.text


def test_a_layer_is_slower_only_when_a_second_timing_agrees() -> None:
    plain, _ = _gated_plan(1.5)
    verdicts = {"a": [False, True]}  # a near tie: slower once, faster when timed again

    def gate(name, ctx, rank):
        return verdicts[name].pop(0) if verdicts.get(name) else True

    plan, _ = _gated_plan(1.5, gate)
    assert {n: p.rank for n, p in plan.layers.items()} == {n: p.rank for n, p in plain.layers.items()}
    assert plan.selection["speed_gate"] == {"slower": [], "replans": 0} and verdicts["a"] == []
