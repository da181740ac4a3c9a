"""Bad inputs and faults (issue 15): each one gets a clear error, or the correct result, and nothing silently
wrong. tests/bad_inputs.md lists every case with the answer a user sees; add a row there with each new test.

Runs on the embedded vgg-digits model (trained on first use and cached, see conftest.py), method fm-linear
without the speed gate: seconds per test.
"""

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import pytest
import torch

from calibration import CalibrationMismatchError, IncompleteCalibrationError, open_calibration
from calibration.store import CalibrationLockedError
from lowrank_fm import ApproxConfig, approximate, load_approximated, save_approximated
from lowrank_fm.cli import INCOMPLETE_MARKER, main
from lowrank_fm.serialize import MANIFEST_NAME, WEIGHTS_NAME, apply_manifest
from lowrank_fm.zoo.models import bundled_spec, create_model, load_bundled_approximated
from lowrank_fm.zoo.networks import VGGSmall

FAST = ["vgg-digits", "--quiet", "--no-speed-gate", "--method", "fm-linear", "--calib-images", "128", "--eval-images", "64",
        "--latency-batch", "4"]
from test_cli import one_error_line  # noqa: E402  (tests/ is on sys.path under pytest)

API = dict(method="fm-linear", speed_gate=False, progress=False)


def folder_bytes(folder: Path) -> dict:
    """Every entry of ``folder`` (hidden ones too) with its bytes."""
    return {p.name: p.read_bytes() if p.is_file() else None for p in sorted(folder.iterdir())}


class Batches:
    """A re-iterable list of batches; ``stop`` makes every pass end after that many batches."""

    def __init__(self, batches, stop=None):
        self.batches, self.stop = batches, stop

    def __iter__(self):
        return iter(self.batches[: self.stop])


@pytest.fixture(scope="module")
def model(vgg_digits):
    return vgg_digits


@pytest.fixture(scope="module")
def batches(digits):
    """128 calibration images of digits as 4 batches of 32 image tensors."""
    images = torch.stack([digits.train[i][0] for i in range(128)])
    return [images[k : k + 32] for k in range(0, 128, 32)]


@pytest.fixture(scope="module")
def weights_file(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "vgg-digits.pt"
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def complete_run(tmp_path_factory):
    """A complete CLI run: (OUT, its files' bytes)."""
    out = tmp_path_factory.mktemp("complete-run")
    assert main(FAST + ["--out", str(out)]) == 0
    return out, folder_bytes(out)


# --- silently wrong before: non-finite values ---------------------------------------------------------------


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_cli_non_finite_weight_names_the_layer_and_writes_nothing(model, tmp_path, capsys, value):
    state = copy.deepcopy(model.state_dict())
    state["features.7.weight"][0, 0, 0, 0] = value
    torch.save(state, tmp_path / "bad.pt")
    out = tmp_path / "out"
    assert main(FAST + ["--weights", str(tmp_path / "bad.pt"), "--out", str(out)]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert "layer 'features.7' has non-finite weights" in line and "features.7.weight" in line
    assert folder_bytes(out) == {}  # no report, no model, no args.json, no calibration file


def test_api_nan_bias_and_broken_batchnorm_are_refused_naming_the_layer(model, batches):
    bad = copy.deepcopy(model)
    with torch.no_grad():
        bad.classifier[1].bias[3] = float("nan")
    with pytest.raises(ValueError, match=r"layer 'classifier.1' has non-finite weights: parameter classifier.1.bias"):
        approximate(bad, batches, n_images=128, **API)
    folded_nan = copy.deepcopy(model)
    folded_nan.features[4].running_var[0] = -1.0  # finite, but folding takes its square root
    with pytest.raises(ValueError, match=r"layer 'features.3' has non-finite weights after folding BatchNorm"):
        approximate(folded_nan, batches, n_images=128, **API)


def test_api_nan_image_names_its_index_and_leaves_no_result(model, batches, tmp_path):
    data = [b.clone() for b in batches]
    data[1][5, 0, 2, 3] = float("nan")  # image 32 + 5
    calib = tmp_path / "c.h5"
    with pytest.raises(ValueError, match=r"calibration image 37 holds NaN or infinite values"):
        approximate(model, data, n_images=128, calib_file=calib, **API)
    if calib.exists():  # only the images before the bad one may be stored, and the store is not usable
        with pytest.raises(IncompleteCalibrationError):
            open_calibration(calib)


# --- silently wrong before: one-shot generators and resumes -------------------------------------------------


def test_one_shot_generator_is_refused_before_anything_is_written(model, batches, tmp_path):
    calib = tmp_path / "c.h5"
    with pytest.raises(TypeError, match=r"data is a one-shot iterator \(generator\)"):
        approximate(model, (b for b in batches), n_images=128, calib_file=calib, **API)
    assert not calib.exists()


def test_resume_must_continue_the_stored_images_and_ends_byte_identical(model, batches, tmp_path):
    reference = tmp_path / "uninterrupted.h5"
    _, expected = approximate(model, Batches(batches), n_images=128, calib_file=reference, **API)

    calib = tmp_path / "resumed.h5"
    with pytest.raises(ValueError, match="ran out after 64 images .* 64 images are stored"):
        approximate(model, Batches(batches, stop=2), n_images=128, calib_file=calib, **API)
    stored = calib.read_bytes()  # a run of 128 images committed before the end (groups of 16, not 1,024)

    shifted = Batches(batches[1:] + batches[:1])  # the case: stored image 0 would be image 32
    with pytest.raises(CalibrationMismatchError, match="image 0 given now is not the image stored at that place"):
        approximate(model, shifted, n_images=128, calib_file=calib, **API)
    assert calib.read_bytes() == stored  # refused before anything was written

    _, report = approximate(model, Batches(batches), n_images=128, calib_file=calib, **API)
    assert calib.read_bytes() == reference.read_bytes()
    assert [l.rank for l in report.layers] == [l.rank for l in expected.layers]


def test_locked_store_says_another_run_is_using_it(model, batches, tmp_path):
    calib = tmp_path / "c.h5"
    with pytest.raises(ValueError, match="ran out"):
        approximate(model, Batches(batches, stop=1), n_images=128, calib_file=calib, **API)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time, h5py; f = h5py.File(sys.argv[1], 'r+'); "
                               "print('open', flush=True); time.sleep(60)", str(calib)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "open"
        with pytest.raises(CalibrationLockedError, match="another run is using it"):
            approximate(model, Batches(batches), n_images=128, calib_file=calib, **API)
    finally:
        holder.kill()
        holder.wait()


# --- silently wrong before: a store made with other weights -------------------------------------------------


def test_api_store_of_other_weights_is_refused_and_left_alone(model, batches, tmp_path):
    calib = tmp_path / "c.h5"
    approximate(model, batches, n_images=128, calib_file=calib, **API)
    before = calib.read_bytes()
    same = copy.deepcopy(model)
    approximate(same, batches, n_images=128, calib_file=calib, **API)  # same weights: reused
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.features[7].weight[0, 0, 0, 0] += 1e-3  # a layer downstream of features.3: still refused
    with pytest.raises(CalibrationMismatchError, match="the model's weights differ from those the file was made with"):
        approximate(other, batches, n_images=128, calib_file=calib, **API)
    assert calib.read_bytes() == before


def test_cli_store_of_other_weights_is_refused(complete_run, tmp_path, capsys):
    out, _ = complete_run
    calib = out / "calibration.h5"
    before = calib.read_bytes()
    code = main(FAST + ["--weights", "none", "--calib-file", str(calib), "--out", str(tmp_path / "other")])
    assert code == 1
    assert "the model's weights differ" in one_error_line(capsys.readouterr().err)
    assert calib.read_bytes() == before
    assert not (tmp_path / "other" / "report.json").exists()



def test_random_weights_are_seeded_so_a_store_can_be_reused(tmp_path):
    """--weights none draws its weights from --seed: a second run reuses the first run's calibration store
    (its weights fingerprint matches) instead of being refused, and gives the same ranks."""
    calib = tmp_path / "calibration.h5"
    for out in ("a", "b"):
        assert main(FAST + ["--weights", "none", "--calib-file", str(calib), "--out", str(tmp_path / out)]) == 0
    reports = [json.loads((tmp_path / out / "report.json").read_text()) for out in ("a", "b")]
    assert [l["rank"] for l in reports[0]["layers"]] == [l["rank"] for l in reports[1]["layers"]]
    assert reports[0]["accuracy"]["top1_before"] == reports[1]["accuracy"]["top1_before"]

# --- silently wrong before: a failed run rewrote args.json of an earlier one --------------------------------


def test_failed_or_interrupted_run_leaves_the_earlier_run_whole(complete_run, model, tmp_path, monkeypatch, capsys):
    out, files = complete_run
    assert {"args.json", "report.json", MANIFEST_NAME, WEIGHTS_NAME, "calibration.h5"} <= set(files)
    state = copy.deepcopy(model.state_dict())
    state["features.3.weight"][0, 0, 0, 0] = float("nan")
    torch.save(state, tmp_path / "bad.pt")
    assert main(FAST + ["--weights", str(tmp_path / "bad.pt"), "--eval-images", "32", "--out", str(out)]) == 1
    assert folder_bytes(out) == files

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("lowrank_fm.approximate", interrupted)
    assert main(FAST + ["--eval-images", "32", "--out", str(out)]) == 1
    assert "interrupted" in capsys.readouterr().err
    assert folder_bytes(out) == files  # nothing added either (no staging folder, no INCOMPLETE marker)


def test_second_complete_run_replaces_every_output(complete_run, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(complete_run[0], out)
    assert main(FAST + ["--eval-images", "32", "--out", str(out)]) == 0
    assert json.loads((out / "args.json").read_text())["eval_images"] == 32
    assert json.loads((out / "report.json").read_text())["accuracy"]["eval_images"] == 32
    assert not (out / INCOMPLETE_MARKER).exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


# --- poor answers before: argument errors are exit 2 --------------------------------------------------------


@pytest.mark.parametrize("args, flag", [
    (["--dataset", "nosuch"], "unknown data set 'nosuch'"),
    (["--calib-images", "1"], "--calib-images: must be >= 2"),
    (["--speedup", "inf"], "--speedup: must be a finite number >= 1"),
    (["--speedup", "nan"], "--speedup: must be a finite number >= 1"),
])
def test_bad_arguments_exit_2_at_parse_time(args, flag, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(args + ["--quiet", "--out", str(tmp_path / "out")])
    assert exc.value.code == 2
    assert flag in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_speedup_inf_is_refused_by_the_api_config():
    with pytest.raises(ValueError, match=r"speedup must be a finite number >= 1 \(a MAC reduction factor\), got inf"):
        ApproxConfig(speedup=float("inf"))


# --- poor answers before: weights files ---------------------------------------------------------------------


def test_weights_text_or_noise_file_names_the_file(tmp_path, capsys):
    (tmp_path / "notes.pt").write_text("these are not weights\n")
    assert main(FAST + ["--weights", str(tmp_path / "notes.pt"), "--out", str(tmp_path / "out")]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert f"--weights {tmp_path / 'notes.pt'}: not a state_dict file saved by torch.save" in line
    (tmp_path / "noise.pt").write_bytes(bytes(range(256)) * 4)  # not a zip, not a pickle of objects either
    assert main(FAST + ["--weights", str(tmp_path / "noise.pt"), "--out", str(tmp_path / "out")]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert f"--weights {tmp_path / 'noise.pt'}: not a state_dict file saved by torch.save" in line


def test_weights_of_another_architecture_say_which_keys_and_shapes_differ(tmp_path, capsys):
    torch.save(bundled_spec("resnet-fmnist").build().state_dict(), tmp_path / "resnet.pt")
    assert main(FAST + ["--weights", str(tmp_path / "resnet.pt"), "--out", str(tmp_path / "a")]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert "resnet.pt is not a state_dict of vgg-digits (VGGSmall)" in line
    assert "missing keys: features.0.weight" in line and "unexpected keys: stem.0.weight" in line

    narrow = VGGSmall([16, 32, "M", 64, 64, "M"], in_channels=1, image_size=8, hidden=128)
    torch.save(narrow.state_dict(), tmp_path / "narrow.pt")
    assert main(FAST + ["--weights", str(tmp_path / "narrow.pt"), "--out", str(tmp_path / "b")]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert "shapes differ: features.0.weight (16, 1, 3, 3) in the file, (32, 1, 3, 3) expected" in line


# --- poor answers before: options that did nothing or did harm ----------------------------------------------


def test_include_matching_no_layer_is_refused(tmp_path, capsys):
    assert main(FAST + ["--include", "nosuchlayer", "--out", str(tmp_path / "out")]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert "include ['nosuchlayer'] matches no Conv2d/Linear layer" in line and "features.3" in line


def test_data_dir_with_digits_and_few_calibration_images_warn(tmp_path, caplog):
    # --include nosuchlayer makes the run stop right after the warnings
    code = main(FAST + ["--data-dir", str(tmp_path), "--calib-images", "3", "--include", "nosuchlayer",
                        "--out", str(tmp_path / "out")])
    assert code == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(f"--data-dir {tmp_path} is ignored: dataset digits is embedded" in m for m in warnings), warnings
    assert any("--calib-images 3 is below 128: too few images" in m for m in warnings), warnings


def test_unreachable_speedup_is_refused_with_the_reachable_maximum(complete_run, capsys):
    out, _ = complete_run
    code = main(FAST + ["--speedup", "1e9", "--calib-file", str(out / "calibration.h5"),
                        "--out", str(out.parent / "speedup")])
    assert code == 1
    line = one_error_line(capsys.readouterr().err)
    assert "speedup 1e+09x is out of reach for this model: the cheapest ranks give" in line and "at most" in line


def test_empty_data_is_a_clear_error(model):
    with pytest.raises(ValueError, match="data yielded no batches but n_images=128 calibration images were expected"):
        approximate(model, [], n_images=128, **API)


# --- poor answers before: damaged saved models ---------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(model, batches, tmp_path_factory):
    new_model, report = approximate(model, batches, n_images=128, energy=0.9, **API)
    folder = tmp_path_factory.mktemp("saved")
    save_approximated(new_model, folder, folded=report.folded_batchnorm, model_name="vgg-digits")
    return folder, new_model


def damaged(saved, tmp_path, edit=None, version=None) -> Path:
    """A copy of the saved model whose manifest is edited by ``edit`` (and set to ``version``: 1 has no
    checksums)."""
    folder = tmp_path / "copy"
    shutil.copytree(saved[0], folder)
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    if edit is not None:
        edit(manifest)
    if version == 1:
        manifest["format_version"] = 1
        manifest.pop("checksums")
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))
    return folder


def test_saved_model_loads_and_verifies(saved, batches):
    loaded = load_bundled_approximated(saved[0])
    with torch.no_grad():
        torch.testing.assert_close(loaded(batches[0]), saved[1](batches[0]))


def test_load_without_a_model_says_what_to_pass(saved, tmp_path):
    with pytest.raises(ValueError, match=r"pass model= .*load_bundled_approximated\(path\)"):
        load_approximated(saved[0])
    with pytest.raises(TypeError, match="model must be an nn.Module or a function of the manifest .* got str"):
        load_approximated(saved[0], model="vgg-digits")

    def unnamed(manifest):
        manifest["model"] = None

    with pytest.raises(ValueError, match=r"the manifest names no model: pass the original architecture to "
                                         r"lowrank_fm.load_approximated\(path, model=...\)"):
        load_bundled_approximated(damaged(saved, tmp_path, unnamed, version=1))


def test_truncated_manifest_names_the_file(saved, tmp_path):
    folder = damaged(saved, tmp_path)
    text = (folder / MANIFEST_NAME).read_text()
    (folder / MANIFEST_NAME).write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match=r"manifest.json is not valid JSON .*: the file is truncated or damaged"):
        load_bundled_approximated(folder)


def test_text_weights_file_is_refused(saved, tmp_path):
    folder = damaged(saved, tmp_path)
    (folder / WEIGHTS_NAME).write_text("not a tensor file\n")
    with pytest.raises(ValueError, match="model_state.pt does not match the checksum"):
        load_bundled_approximated(folder)
    folder = damaged(saved, tmp_path / "v1", version=1)
    (folder / WEIGHTS_NAME).write_text("not a tensor file\n")
    with pytest.raises(ValueError, match="model_state.pt is not a state_dict saved by torch.save"):
        load_bundled_approximated(folder)


def first_layer(manifest) -> dict:
    """The spec of the first factorized conv layer."""
    return next(spec for _, spec in sorted(manifest["layers"].items()) if spec["type"] == "ConvChain")


def test_changed_padding_fails_the_checksum(saved, tmp_path):
    def pad(manifest):
        first_layer(manifest)["convs"][0]["padding"] = [0, 0]

    with pytest.raises(ValueError, match="manifest.json does not match its checksum: it was edited"):
        load_bundled_approximated(damaged(saved, tmp_path, pad))


def test_huge_layer_is_refused_before_allocating(saved, tmp_path):
    def huge(manifest):
        first_layer(manifest)["convs"][0]["out_channels"] = 10**6

    with pytest.raises(ValueError, match="does not match its checksum"):
        load_bundled_approximated(damaged(saved, tmp_path, huge))
    # without checksums (format 1): shapes are compared on the meta device, nothing of 10**6 filters is built
    with pytest.raises(ValueError, match=r"the manifest describes shape \(1000000, .* but .* holds"):
        load_bundled_approximated(damaged(saved, tmp_path / "v1", huge, version=1))


def test_wrong_module_named_as_folded_batchnorm(saved, tmp_path):
    def relu(manifest):
        manifest["folded_batchnorm"][0][1] = "features.2"

    with pytest.raises(ValueError, match="does not match its checksum"):
        load_bundled_approximated(damaged(saved, tmp_path, relu))
    with pytest.raises(ValueError, match="names 'features.2' as the BatchNorm folded into 'features.0', but it is a ReLU"):
        load_bundled_approximated(damaged(saved, tmp_path / "v1", relu, version=1))
    manifest = json.loads((saved[0] / MANIFEST_NAME).read_text())
    manifest["folded_batchnorm"][0] = ["features.nosuch", "features.1"]
    with pytest.raises(ValueError, match="names folded conv 'features.nosuch', which VGGSmall does not have"):
        apply_manifest(create_model("vgg-digits", weights="none"), manifest)


def test_weights_of_another_save_fail_the_checksum(saved, tmp_path):
    folder = damaged(saved, tmp_path)
    other = {k: v + 1 if v.is_floating_point() else v for k, v in saved[1].state_dict().items()}
    torch.save(other, folder / WEIGHTS_NAME)
    with pytest.raises(ValueError, match="model_state.pt does not match the checksum in .*manifest.json"):
        load_bundled_approximated(folder)


def test_calibrate_alone_refuses_a_nan_image_before_running_it(model, batches, tmp_path):
    """The calibration stage checks images itself (calibrate() is public): image 70 is named and only the
    images before its batch are stored."""
    from calibration import calibrate

    data = [b.clone() for b in batches]
    data[2][6, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="calibration image 70 holds NaN or infinite values"):
        calibrate(model, data, ["features.3"], tmp_path / "c.h5", n_images=128, progress=False)
    with h5py.File(tmp_path / "c.h5", "r") as f:
        assert int(f.attrs["n_images_done"]) == 64 and not f.attrs["complete"]
