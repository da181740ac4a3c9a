"""The rank planner: one owner of every rank decision. Rounding never crosses break-even, policies a method
cannot honour are refused before any work, and method settings are taken by name and checked."""

from __future__ import annotations

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
