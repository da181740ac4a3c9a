"""End to end through the Python API on the embedded vgg-digits model."""

import copy

import pytest
import torch
from torch.utils.data import DataLoader, Subset

from lowrank_fm import ApproxConfig, approximate, load_approximated, save_approximated
from lowrank_fm.zoo.evaluate import accuracy
from lowrank_fm.zoo.models import create_model, load_bundled_approximated


@pytest.fixture(scope="module")
def model(vgg_digits):
    return vgg_digits


def _loader(digits, n=200):
    return DataLoader(Subset(digits.train, range(n)), batch_size=32, shuffle=False)


@pytest.fixture(scope="module")
def approximated(digits, model):
    original = copy.deepcopy(model.state_dict())
    new_model, report = approximate(model, _loader(digits), method="fm-linear", energy=0.95, progress=False,
                                    speed_gate=False,  # exact ranks and MACs, not timings
                                    model_name="vgg-digits")
    return new_model, report, original


def test_original_model_is_untouched(approximated, model):
    _, _, original = approximated
    state = model.state_dict()
    assert state.keys() == original.keys()
    assert all(torch.equal(state[k], original[k]) for k in state)


def test_params_and_macs_drop_and_totals_are_sums(approximated):
    _, report, _ = approximated
    totals = report.totals
    assert totals["params_after"] < totals["params_before"]
    assert totals["macs_after"] < totals["macs_before"]
    for key in ("params_before", "params_after", "macs_before", "macs_after"):
        assert totals[key] == sum(getattr(layer, key) for layer in report.layers)
    assert totals["theoretical_speedup"] == pytest.approx(totals["macs_before"] / totals["macs_after"])
    first, last = report.layers[0], report.layers[-1]
    assert first.status == "kept" and "first layer" in first.reason
    assert last.name == "classifier.4" and last.status == "kept" and last.reason.startswith("output layer")
    assert any(l.status == "approximated" and 0 < l.rel_error < 0.5 for l in report.layers)


def test_macs_after_are_counted_in_the_new_model(approximated):
    new_model, report, _ = approximated
    for layer in report.layers:
        if layer.status == "approximated":
            chain = new_model.get_submodule(layer.name)
            d_prime = chain[0].out_channels if layer.kind == "conv" else chain[0].out_features
            assert d_prime == layer.rank
            if layer.kind == "conv":
                k = chain[0].kernel_size
                positions = layer.macs_before // (layer.shape[0] * layer.shape[1] * k[0] * k[1])
                expected = positions * (layer.rank * layer.shape[1] * k[0] * k[1] + layer.shape[0] * layer.rank)
            else:
                expected = layer.rank * layer.shape[1] + layer.shape[0] * layer.rank
            assert layer.macs_after == expected


def test_accuracy_drop_is_bounded(approximated, digits, model):
    new_model, _, _ = approximated
    before = accuracy(model, digits.test, progress=False)["top1"]
    after = accuracy(new_model, digits.test, progress=False)["top1"]
    # 95% energy per layer on a 99.7% digits model: measured -0.8 points; allow 3
    assert before - after <= 0.03


def test_energy_one_forced_reproduces_the_whole_model(digits, model):
    new_model, report = approximate(model, _loader(digits, 64), method="fm-linear", energy=1.0, force=True, speed_gate=False,
                                    keep_first_layer=False, keep_last_layer=False, progress=False)
    assert all(l.status == "approximated" for l in report.layers)
    x = torch.stack([digits.test[i][0] for i in range(64)])
    with torch.no_grad():
        expected, got = model(x), new_model(x)
    assert float((got - expected).norm() / expected.norm()) < 1e-4
    assert all(l.rel_error < 1e-4 for l in report.layers)


def test_layer_rank_overrides_and_exclude(digits, model):
    _, report = approximate(model, _loader(digits, 64), ApproxConfig(method="fm-linear", speed_gate=False, layer_ranks={"features.3": 5},
                            exclude=("classifier",), progress=False))
    by_name = {l.name: l for l in report.layers}
    assert by_name["features.3"].rank == 5 and by_name["features.3"].status == "approximated"
    assert by_name["classifier.1"].status == "kept" and by_name["classifier.1"].reason == "not targeted"


def test_ipca_backend_gives_the_same_ranks(digits, model):
    loader = _loader(digits, 64)
    _, a = approximate(model, loader, method="fm-linear", energy=0.9, progress=False, speed_gate=False)
    _, b = approximate(model, loader, method="fm-linear", energy=0.9, covariance="ipca", progress=False, speed_gate=False)
    assert [l.rank for l in a.layers] == [l.rank for l in b.layers]


def test_save_and_reload_give_the_same_outputs(approximated, digits, tmp_path):
    new_model, report, _ = approximated
    save_approximated(new_model, tmp_path, folded=report.folded_batchnorm, model_name="vgg-digits")
    x = torch.stack([digits.test[i][0] for i in range(32)])
    manifests = []

    def build(manifest):  # a builder is given the checked manifest
        manifests.append(manifest)
        return create_model(manifest["model"], weights="none")

    for reloaded in (load_approximated(tmp_path, model=create_model("vgg-digits", weights="none")),
                     load_approximated(tmp_path, model=build), load_bundled_approximated(tmp_path)):
        assert not reloaded.training
        with torch.no_grad():
            torch.testing.assert_close(reloaded(x), new_model(x), rtol=0, atol=0)
    assert [m["model"] for m in manifests] == ["vgg-digits"]


def test_bad_settings_raise_clear_errors(digits, model):
    with pytest.raises(ValueError, match="0 < energy <= 1"):
        ApproxConfig(energy=1.5)
    with pytest.raises(ValueError, match="method must be one of"):
        ApproxConfig(method="nope")
    with pytest.raises(ValueError, match="unknown ApproxConfig keys"):
        ApproxConfig.from_dict({"energy": 0.9, "bogus": 1})
    assert ApproxConfig.from_dict(ApproxConfig(energy=0.9).to_dict()) == ApproxConfig(energy=0.9)


def test_a_layer_run_twice_per_forward_is_kept_with_its_reason():
    class Shared(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = torch.nn.Conv2d(1, 16, 3, padding=1)
            self.shared = torch.nn.Conv2d(16, 16, 3, padding=1)
            self.head = torch.nn.Linear(16, 4)

        def forward(self, x):
            x = torch.relu(self.shared(torch.relu(self.shared(torch.relu(self.stem(x))))))
            return self.head(x.mean(dim=(2, 3)))

    torch.manual_seed(0)
    data = [torch.randn(4, 1, 8, 8) for _ in range(3)]
    _, report = approximate(Shared().eval(), data, method="fm-linear", energy=0.5, n_images=12, progress=False,
                            speed_gate=False)
    shared = {l.name: l for l in report.layers}["shared"]
    assert shared.status == "kept" and shared.reason == "runs 2 times per forward (shared weights)"
    assert shared.macs_before == 2 * 64 * 16 * 16 * 9


def test_weights_with_another_head_are_refused_with_the_flag_to_use(tmp_path):
    import torchvision

    path = tmp_path / "resnet18.pt"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    with pytest.raises(ValueError, match="--num-classes"):
        create_model("resnet18", str(path), num_classes=3)
    assert create_model("resnet18", str(path), num_classes=1000).fc.out_features == 1000


def test_vbmf_ranks_are_refused_for_methods_without_them(digits, model):
    with pytest.raises(ValueError, match="applies to tucker2 and tucker1"):
        approximate(model, _loader(digits, 32), method="fm-linear", ranks="vbmf", progress=False)


def test_layer_errors_against_prefix_forwards():
    """Layer l's in-network error from hooks equals ||A[:l+1](x) - B[:l+1](x)|| / ||A[:l+1](x)|| computed by
    running each network's prefix (nn.Sequential slicing), and its error alone equals
    ||A[:l+1](x) - B[l](A[:l](x))|| / ||A[:l+1](x)||, over several batches and chunks, from one pass of each
    network; the in-place ReLU after layer 2 must not change the output kept for it."""
    from lowrank_fm.building import layer_errors

    torch.manual_seed(0)
    reference = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                                    torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU(inplace=True),
                                    torch.nn.Conv2d(8, 8, 1)).eval()
    approximated = copy.deepcopy(reference)
    with torch.no_grad():
        for index in (2, 4):
            approximated[index].weight.add_(0.1 * torch.randn_like(approximated[index].weight))
    batches = [torch.randn(11, 3, 6, 6), torch.randn(5, 3, 6, 6)]
    calls = {"reference": 0}
    reference.register_forward_pre_hook(lambda *_: calls.__setitem__("reference", calls["reference"] + 1))
    replacements = {"2": approximated[2], "4": approximated[4]}
    alone, errors = layer_errors(reference, approximated, replacements, batches)
    assert calls["reference"] == 2 + 1  # one forward of the reference per chunk of 8 images: 11 -> 2, 5 -> 1
    x = torch.cat(batches)
    with torch.no_grad():
        for index in (2, 4):
            y, y_hat = reference[:index + 1](x), approximated[:index + 1](x)
            assert errors[str(index)] == pytest.approx(float((y - y_hat).norm() / y.norm()), rel=1e-5)
            y_alone = approximated[index](reference[:index](x))
            assert alone[str(index)] == pytest.approx(float((y - y_alone).norm() / y.norm()), rel=1e-5)
    assert errors["4"] > alone["4"] > 0  # layer 4's input carries layer 2's error inside the approximated network
    only_alone, none = layer_errors(reference, None, replacements, batches)
    assert none == {} and only_alone == pytest.approx(alone, rel=1e-9)


def test_report_gives_each_layers_error_inside_the_approximated_network(approximated):
    """The first approximated layer sees the same input in both networks (the layers before it are kept), so its
    in-network error is its held-out error; every approximated layer has one, no kept layer does."""
    _, report, _ = approximated
    done = [l for l in report.layers if l.status == "approximated"]
    assert len(done) >= 2 and all(l.rel_error_network is not None and l.rel_error_network > 0 for l in done)
    assert all(l.rel_error_network is None for l in report.layers if l.status == "kept")
    assert done[0].rel_error_network == pytest.approx(done[0].rel_error, rel=1e-6)
    assert "rel.err in network" in report.format_table()
    assert "rel_error_network" in report.to_dict()["layers"][0]
