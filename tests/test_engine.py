"""The accuracy engine on vgg-digits: whole-model correction, nonlinear solvers, budgets, output matching."""

import re

import pytest
import torch
from torch.utils.data import DataLoader, Subset

from lowrank_fm import approximate


@pytest.fixture(scope="module")
def model(vgg_digits):
    return vgg_digits


@pytest.fixture(scope="module")
def loader(digits):
    return DataLoader(Subset(digits.train, range(240)), batch_size=48, shuffle=False)


def _output_error(model, new_model, digits):
    x = torch.stack([digits.test[i][0] for i in range(200)])
    with torch.no_grad():
        reference = model(x)
        return float((new_model(x) - reference).norm() / reference.norm())


def test_asymmetric_pass_beats_symmetric_at_equal_ranks(model, digits, loader):
    symmetric, sym_report = approximate(model, loader, speed_gate=False, method="fm-linear", energy=0.8, progress=False)
    asymmetric, asym_report = approximate(model, loader, speed_gate=False, method="fm", solver="none", output_matching=False,
                                          energy=0.8, progress=False)
    assert [l.rank for l in sym_report.layers] == [l.rank for l in asym_report.layers]
    sym_error, asym_error = _output_error(model, symmetric, digits), _output_error(model, asymmetric, digits)
    # measured: 0.41 vs 0.19 relative logit error
    assert asym_error < 0.8 * sym_error


@pytest.mark.parametrize("solver", ["closed-form", "rmsprop"])
def test_solvers_report_their_work_and_never_lose_to_the_linear_start(model, loader, solver):
    _, report = approximate(model, loader, speed_gate=False, method="fm", solver=solver, output_matching=False, energy=0.8,
                            solver_steps=100, progress=False)
    approximated = [l for l in report.layers if l.status == "approximated"]
    assert approximated
    for layer in approximated:
        extra = layer.to_dict()
        assert extra["solver"] == solver
        assert extra["iterations"] > 0 or (solver == "closed-form" and extra["activation"] == "identity")
        assert extra["error_after"] <= extra["error_before"] + 1e-12
        assert extra["activation"] in ("relu", "identity")
    # the first hidden conv of the VGG feeds a ReLU; the last Linear does not
    by_name = {l.name: l.to_dict() for l in approximated}
    assert by_name["features.3"]["activation"] == "relu"


@pytest.mark.parametrize("allocation", ["uniform", "energy", "error", "output"])
@pytest.mark.parametrize("speedup", [2.0, 3.0])
def test_speedup_target_is_met_within_five_percent(model, loader, allocation, speedup):
    _, report = approximate(model, loader, speed_gate=False, method="fm-linear", speedup=speedup, allocation=allocation, progress=False)
    achieved = report.totals["theoretical_speedup"]
    assert speedup <= achieved <= 1.05 * speedup
    assert report.selection["reachable"] is True


def test_unreachable_speedup_is_refused_naming_the_reachable_maximum(model, loader):
    # issue 15: an unreachable target used to run on with every layer at rank 1 (a 79-point drop)
    with pytest.raises(ValueError, match=r"speedup 200x is out of reach .* the cheapest ranks give (\d+\.\d\d)x") as info:
        approximate(model, loader, speed_gate=False, method="fm-linear", speedup=200.0, progress=False)
    most = float(re.search(r"at most (\d+\.\d\d)", str(info.value)).group(1))
    assert 1.0 < most < 200.0
    _, report = approximate(model, loader, speed_gate=False, method="fm-linear", speedup=most, progress=False)
    assert report.selection["reachable"] is True  # the maximum it names is reachable


def test_output_matching_reports_the_heldout_output_error_it_reaches(model, loader, digits):
    new_model, report = approximate(model, loader, speed_gate=False, method="fm", solver="none", speedup=3.0, output_matching=True,
                                    matching_steps=100, progress=False)
    matching = report.output_matching
    assert matching["steps"] == 100 and "output_matching_s" in report.timing
    # independent: the held-out calibration images are the loader's last 10% (24 of 240)
    x = torch.stack([digits.train[i][0] for i in range(216, 240)])
    with torch.no_grad():
        error = float((new_model(x) - model(x)).pow(2).sum() / len(x))
    assert error == pytest.approx(matching["heldout_error_after"], rel=1e-3)
    if matching["applied"]:
        assert matching["heldout_error_after"] < matching["heldout_error_before"]
    else:
        assert matching["heldout_error_after"] == matching["heldout_error_before"]
