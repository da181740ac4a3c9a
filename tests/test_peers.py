"""The peers benchmark's MAC accounting and row writing, on a tiny model (seconds). The peers themselves are an
optional extra that CI does not install: their tests skip with the reason when a peer does not import."""

import importlib

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from lowrank_fm.bench.peers import PeerMethod, count_macs, count_params, peers_table, run_peers
from lowrank_fm.bench.provenance import read_rows
from lowrank_fm.bench.readme import render_table
from lowrank_fm.cost import measure_costs


def _tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1, stride=2), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4)).eval()


def _data(n: int = 48):
    generator = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(n, 1, 8, 8, generator=generator), torch.randint(0, 4, (n,), generator=generator))


def _peer(name: str):
    try:
        return importlib.import_module(name)
    except Exception as error:  # not installed, or broken with this torch
        pytest.skip(f"{name} is not available ({type(error).__name__}: {error}); pip install -e '.[peers]'")


def test_count_macs_is_measure_costs_for_plain_layers():
    model, example = _tiny(), torch.randn(1, 1, 8, 8)
    expected = 8 * 9 * 64 + 16 * 8 * 9 * 64 + 16 * 16 * 9 * 16 + 16 * 4
    assert count_macs(model, example) == sum(c.macs for c in measure_costs(model, example).values()) == expected
    assert count_params(model) == sum(p.numel() for p in model.parameters())


def _halve_last_conv(model, ctx, target_macs):
    """A toy 'peer': drop half the output channels of the last conv (and the Linear's matching inputs)."""
    conv, linear = model[6], model[10]
    small, head = nn.Conv2d(16, 8, 3, padding=1, stride=2), nn.Linear(8, 4)
    small.weight.data, small.bias.data = conv.weight.data[:8].clone(), conv.bias.data[:8].clone()
    head.weight.data, head.bias.data = linear.weight.data[:, :8].clone(), linear.bias.data.clone()
    model[6], model[10] = small, head
    return model


def _fails(model, ctx, target_macs):
    raise RuntimeError("unsupported layer kind")


def test_run_peers_writes_a_row_per_cell_with_provenance_and_errors(tmp_path):
    out = tmp_path / "peers.jsonl"
    methods = [PeerMethod("toy", "toy halving", _halve_last_conv), PeerMethod("toy", "toy failing", _fails)]
    rows = run_peers(_tiny(), _data(), _data(40), out, model_name="tiny", targets=(1.2,), methods=methods,
                     latency_rounds=5, latency_seconds=0.05)
    written = read_rows(out)
    assert [r["label"] for r in written] == ["toy halving", "toy failing"] == [r["label"] for r in rows]
    ok, failed = written
    assert ok["macs_after"] == ok["macs_before"] - 8 * 16 * 9 * 16 - 8 * 4 and ok["achieved_speedup"] > 1
    assert ok["target_macs"] == int(ok["macs_before"] / 1.2) and ok["params_after"] < ok["params_before"]
    assert 0 <= ok["top1_after"] <= 1 and ok["eval_images"] == 40 and ok["compress_wall_s"] >= 0
    assert set(ok["latency"]) == {"1", "32"} and ok["latency"]["32"]["measured_speedup"] > 0
    assert failed["error"] == "RuntimeError: unsupported layer kind" and "top1_after" not in failed
    for row in written:
        assert {"commit", "date_utc", "load_before", "threads"} <= set(row["provenance"])
    table = peers_table(written)
    assert "| tiny | 1.2x | toy halving |" in table and "error: RuntimeError: unsupported layer kind" in table
    assert render_table("peers tiny", tmp_path) == table


def test_tensorly_torch_factorized_conv_macs_and_target():
    tltorch = _peer("tltorch")
    from lowrank_fm.bench.peers import PeerContext, _tltorch

    conv = nn.Conv2d(16, 16, 3, padding=1)
    factorized = tltorch.FactorizedConv.from_conv(conv, rank=0.5, factorization="cp", implementation="factorized")
    rank = factorized.weight.rank
    example = torch.randn(1, 16, 8, 8)
    # 1x1 to the rank, the kh then kw separable passes on the rank channels, 1x1 back to the outputs
    assert count_macs(nn.Sequential(factorized), example) == 16 * rank * 64 + rank * 3 * 64 + rank * 3 * 64 + rank * 16 * 64
    model, example = _tiny(), torch.randn(1, 1, 8, 8)
    target = int(count_macs(model, example) / 1.5)
    ctx = PeerContext(example=example, loader=None, indices=None, speedup=1.5)
    for factorization in ("cp", "tucker"):
        assert count_macs(_tltorch(factorization)(model, ctx, target), example) <= target


def test_torch_pruning_reaches_the_mac_target():
    _peer("torch_pruning")
    from torch.utils.data import DataLoader

    from lowrank_fm.bench.peers import PeerContext, _torch_pruning

    model, example = _tiny(), torch.randn(1, 1, 8, 8)
    target = int(count_macs(model, example) / 2)
    ctx = PeerContext(example=example, loader=DataLoader(_data(), batch_size=16), indices=None, speedup=2.0)
    for importance in ("magnitude", "taylor"):
        pruned = _torch_pruning(importance)(model, ctx, target)
        assert count_macs(pruned, example) <= target and pruned(example).shape == (1, 4)
