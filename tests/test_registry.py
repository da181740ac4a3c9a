"""Every registered method through the whole pipeline (the registry is the test matrix)."""

import pytest
import torch
from torch.utils.data import DataLoader, Subset

from lowrank_fm import approximate, list_methods, save_approximated
from lowrank_fm.zoo.models import load_bundled_approximated


@pytest.mark.parametrize("method", list_methods())
def test_every_method_meets_a_speedup_and_reloads(method, vgg_digits, digits, tmp_path):
    loader = DataLoader(Subset(digits.train, range(96)), batch_size=32, shuffle=False)
    fast = {"solver_steps": 50} if method in ("fm", "fm-3d") else {}
    new_model, report = approximate(vgg_digits, loader, method=method, speedup=1.5, speed_gate=False,
                                    model_name="vgg-digits", progress=False, **fast)
    totals = report.totals
    assert any(l.status == "approximated" for l in report.layers)
    assert totals["theoretical_speedup"] >= 1.5
    assert all(l.rel_error is not None and l.rel_error < 1.0 for l in report.layers if l.status == "approximated")
    save_approximated(new_model, tmp_path, folded=report.folded_batchnorm, model_name="vgg-digits")
    x = torch.stack([digits.test[i][0] for i in range(16)])
    with torch.no_grad():
        torch.testing.assert_close(load_bundled_approximated(tmp_path)(x), new_model(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["svd", "fm", "fm-linear", "alds", "spatial"])
def test_mac_and_rank_counts_read_shapes_not_weights(name):
    """Counting MACs must not copy the weight (vgg16's classifier.0 is 800 MB in float64, once per candidate
    rank): on a meta-device layer, which holds no values, the counts still come out, equal to the formulas."""
    from lowrank_fm.methods import get_method
    from lowrank_fm.methods.base import LayerContext

    method = get_method(name)
    conv = torch.nn.Conv2d(96, 128, 3, device="meta")
    ctx = LayerContext("layer", conv, positions=49, in_shape=(96, 9, 9), out_shape=(128, 7, 7))
    if name == "spatial":  # (kh x 1, K) over 7 x 9 positions, then (1 x kw, N) over 7 x 7; full rank min(c kh, N kw)
        assert method.full_rank(ctx) == min(96 * 3, 128 * 3)
        assert method.macs(ctx, 10) == 7 * 9 * 10 * 96 * 3 + 7 * 7 * 128 * 10 * 3
        return
    assert method.macs_per_position(ctx, 10) == 10 * 96 * 9 + 128 * 10  # (r x c k k) then (d x r)
    if name in ("svd", "alds"):
        assert method.full_rank(ctx) == min(128, 96 * 9)
