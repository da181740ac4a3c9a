"""Every registered method through the whole pipeline (the registry is the test matrix)."""

import pytest
import torch
from torch.utils.data import DataLoader, Subset

from lowrank_fm import approximate, list_methods, load_approximated, save_approximated


@pytest.mark.parametrize("method", list_methods())
def test_every_method_meets_a_speedup_and_reloads(method, vgg_digits, digits, tmp_path):
    loader = DataLoader(Subset(digits.train, range(96)), batch_size=32, shuffle=False)
    new_model, report = approximate(vgg_digits, loader, method=method, speedup=1.5, solver_steps=50, speed_gate=False,
                                    model_name="vgg-digits", progress=False)
    totals = report.totals
    assert any(l.status == "approximated" for l in report.layers)
    assert totals["theoretical_speedup"] >= 1.5
    assert all(l.rel_error is not None and l.rel_error < 1.0 for l in report.layers if l.status == "approximated")
    save_approximated(new_model, tmp_path, folded=report.folded_batchnorm, model_name="vgg-digits")
    x = torch.stack([digits.test[i][0] for i in range(16)])
    with torch.no_grad():
        torch.testing.assert_close(load_approximated(tmp_path)(x), new_model(x), rtol=0, atol=0)
