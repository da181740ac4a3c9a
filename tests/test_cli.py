"""The ``approximate`` command line (DESIGN.md, "Contracts"): exit codes, one-line errors, report.json fields,
the saved model, and reuse of a calibration file.

The embedded default (vgg-digits on scikit-learn's digits) is run once per module; its model is trained on
first use and cached under $LOWRANK_FM_CACHE (see conftest.py).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Subset

import lowrank_fm
from lowrank_fm.allocator import _glibc, _preloaded
from lowrank_fm.cli import calibration_indices, main
from lowrank_fm.config import ApproxConfig
from lowrank_fm.zoo.data import load_dataset
from lowrank_fm.zoo.evaluate import accuracy
from lowrank_fm.zoo.models import create_model, load_bundled_approximated

ROOT = Path(__file__).resolve().parents[1]

LAYER_FIELDS = ("name", "kind", "shape", "rank", "energy", "params_before", "params_after", "macs_before",
                "macs_after", "rel_error", "status")
TOTALS_FIELDS = ("params_before", "params_after", "macs_before", "macs_after", "theoretical_speedup")
ACCURACY_FIELDS = ("top1_before", "top1_after", "eval_images")
LATENCY_FIELDS = ("before_ms", "after_ms", "measured_speedup", "batch_size", "threads", "device")
TIMING_FIELDS = ("fold_s", "calibrate_s", "statistics_s", "plan_s", "build_s", "approximate_s", "heldout_error_s",
                 "evaluate_s")




def one_error_line(stderr: str) -> str:
    """The single line a runtime failure prints on stderr (fails when there are several or none)."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got {lines!r}"
    assert lines[0].startswith("error: "), lines[0]
    return lines[0]


def ranks(report: dict) -> dict:
    return {layer["name"]: layer["rank"] for layer in report["layers"]}


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """``approximate.py --out OUT --quiet``, no model: (exit code, OUT, report.json as a dict)."""
    out = tmp_path_factory.mktemp("default-run")
    code = main(["vgg-digits", "--out", str(out), "--quiet", "--no-speed-gate"])  # reproducible ranks: no timings
    report = json.loads((out / "report.json").read_text()) if (out / "report.json").is_file() else None
    return code, out, report


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


# --- argument errors: argparse, exit 2 --------------------------------------------------------------------


@pytest.mark.parametrize("energy", ["1.5", "0", "-0.1", "abc"])
def test_bad_energy_exits_2(energy, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["vgg-digits", "--energy", energy, "--quiet"])
    assert exc.value.code == 2
    assert "--energy" in capsys.readouterr().err


def test_energy_and_speedup_are_exclusive(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["vgg-digits", "--energy", "0.9", "--speedup", "2"])
    assert exc.value.code == 2
    assert "not allowed with" in capsys.readouterr().err


# --- runtime failures: exit 1, one line on stderr ----------------------------------------------------------


def test_missing_data_dir_exits_1_with_one_line(tmp_path, capsys):
    code = main(["resnet18", "--weights", "none", "--dataset", "imagefolder", "--data-dir", "/nonexistent/dir",
                 "--quiet", "--out", str(tmp_path / "out")])
    assert code == 1
    line = one_error_line(capsys.readouterr().err)
    assert "--data-dir" in line
    assert not (tmp_path / "out" / "report.json").exists()


def test_imagefolder_without_data_dir_names_the_flag(tmp_path, capsys):
    code = main(["resnet18", "--weights", "none", "--quiet", "--out", str(tmp_path / "out")])
    assert code == 1
    assert "--data-dir" in one_error_line(capsys.readouterr().err)


def test_default_torchvision_weights_exit_1_naming_weights(tmp_path, capsys):
    # --dataset digits so that the data loads and the failure is the weights (nothing downloads)
    code = main(["vgg16", "--weights", "default", "--dataset", "digits", "--quiet", "--out", str(tmp_path / "out")])
    assert code == 1
    line = one_error_line(capsys.readouterr().err)
    assert "--weights" in line


def test_missing_weights_file_exits_1(tmp_path, capsys):
    code = main(["vgg-digits", "--weights", str(tmp_path / "absent.pt"), "--quiet", "--out", str(tmp_path / "out")])
    assert code == 1
    line = one_error_line(capsys.readouterr().err)
    assert "--weights" in line and "absent.pt" in line


def test_unknown_model_exits_2_naming_it_and_the_choices(tmp_path, capsys):
    # issue 15: it used to say "dataset imagefolder needs --data-dir DIR" (exit 1)
    with pytest.raises(SystemExit) as exc:
        main(["not-a-model", "--quiet", "--out", str(tmp_path / "out")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "unknown model 'not-a-model'" in err and "vgg-digits" in err and "vgg16" in err
    assert not (tmp_path / "out").exists()


def test_real_script_exit_codes(tmp_path):
    """The script itself (not only main()) turns argparse errors into 2 and runtime failures into 1."""
    env = dict(os.environ)
    script = [sys.executable, str(ROOT / "scripts" / "approximate.py")]
    bad = subprocess.run(script + ["--energy", "1.5", "--quiet"], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=120)
    assert bad.returncode == 2, bad.stderr
    assert "--energy" in bad.stderr

    failed = subprocess.run(script + ["resnet18", "--weights", "none", "--dataset", "imagefolder", "--data-dir",
                                      "/nonexistent/dir", "--quiet", "--out", str(tmp_path / "out")],
                            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert failed.returncode == 1, failed.stderr
    assert "--data-dir" in one_error_line(failed.stderr)
    assert "Traceback" not in failed.stderr


# --- the embedded default run -----------------------------------------------------------------------------


def test_default_run_succeeds_and_writes_outputs(default_run):
    code, out, report = default_run
    assert code == 0
    for name in ("report.json", "manifest.json", "model_state.pt", "calibration.h5"):
        assert (out / name).is_file(), name
    assert report["model"] == "vgg-digits"
    assert report["dataset"] == "digits"
    assert report["method"] == ApproxConfig().method_name == "fm" and report["config"]["method"] is None  # the default


def test_report_has_contract_fields(default_run):
    _, _, report = default_run
    config = report["config"]
    for key in ("method", "energy", "seed", "device", "positions_per_image", "include", "exclude"):
        assert key in config, key
    assert config["energy"] == 0.95
    assert config["seed"] == 0

    assert report["layers"], "no candidate layers"
    for layer in report["layers"]:
        for key in LAYER_FIELDS:
            assert key in layer, (layer.get("name"), key)
        assert layer["kind"] in ("conv", "linear")
        assert layer["status"] in ("approximated", "kept")
        assert isinstance(layer["shape"], list) and len(layer["shape"]) == (4 if layer["kind"] == "conv" else 2)
        if layer["status"] == "kept":
            assert isinstance(layer["reason"], str) and layer["reason"], layer["name"]
            assert layer["params_after"] == layer["params_before"]
            assert layer["macs_after"] == layer["macs_before"]
        else:
            assert 1 <= layer["rank"] <= layer["shape"][0]
            assert 0.95 <= layer["energy"] <= 1.0
            assert 0.0 <= layer["rel_error"] < 1.0
            assert layer["macs_after"] < layer["macs_before"]
    statuses = {layer["name"]: layer["status"] for layer in report["layers"]}
    assert statuses["features.0"] == "kept"  # the first conv (1 input channel)
    assert "approximated" in statuses.values()

    for section, fields in (("totals", TOTALS_FIELDS), ("accuracy", ACCURACY_FIELDS),
                            ("latency", LATENCY_FIELDS), ("timing", TIMING_FIELDS)):
        for key in fields:
            assert key in report[section], (section, key)
    for key in TIMING_FIELDS:
        assert report["timing"][key] >= 0.0
    stages = ("statistics_s", "plan_s", "candidates_s", "layout_s", "latency_model_s", "speed_gate_s", "build_s")
    assert report["timing"]["approximate_s"] == pytest.approx(sum(report["timing"].get(k, 0.0) for k in stages))
    assert report["latency"]["before_ms"] > 0 and report["latency"]["after_ms"] > 0
    assert report["latency"]["device"] == "cpu"
    assert report["latency"]["batch_size"] == 32
    assert report["latency"]["threads"] == torch.get_num_threads()


def test_report_totals_are_sums_of_layers(default_run):
    _, _, report = default_run
    totals, layers = report["totals"], report["layers"]
    for key in ("params_before", "params_after", "macs_before", "macs_after"):
        assert totals[key] == sum(layer[key] for layer in layers), key
    assert totals["theoretical_speedup"] == pytest.approx(totals["macs_before"] / totals["macs_after"], rel=1e-12)
    assert totals["theoretical_speedup"] > 1.0
    assert totals["params_after"] < totals["params_before"]


def test_report_accuracy_fractions(default_run, digits):
    _, _, report = default_run
    acc = report["accuracy"]
    assert acc["eval_images"] == len(digits.test) == 360
    for key in ("top1_before", "top1_after"):
        assert 0.0 <= acc[key] <= 1.0
        assert acc[key] * acc["eval_images"] == pytest.approx(round(acc[key] * acc["eval_images"]))
    assert acc["top1_before"] >= 0.95  # the reference model is trained
    assert acc["top1_after"] >= 0.9  # energy 0.95 on a trained model keeps it working


def test_reloaded_model_matches_report_and_in_memory_model(default_run, digits):
    _, out, report = default_run
    reloaded = load_bundled_approximated(out)
    assert not reloaded.training

    # the reloaded model's accuracy on the same test images is the report's, exactly
    top1 = accuracy(reloaded, digits.test, eval_images=report["accuracy"]["eval_images"], progress=False)["top1"]
    assert top1 == report["accuracy"]["top1_after"]

    # the CLI's pipeline redone in memory: same calibration images and loader, the report's own settings
    indices = calibration_indices(len(digits.train), 0.01, None, 0)
    assert report["calibration"]["images"] == len(indices)
    loader = DataLoader(Subset(digits.train, indices.tolist()), batch_size=64, shuffle=False)
    original = create_model("vgg-digits")
    settings = dict(report["config"])
    assert settings.pop("run")["model"] == "vgg-digits"  # the CLI's own settings sit beside the engine's
    config = ApproxConfig.from_dict(settings)
    in_memory, mem_report = lowrank_fm.approximate(original, loader, config, n_images=len(indices))
    assert ranks(mem_report.to_dict()) == ranks(report)

    images = torch.stack([digits.test[i][0] for i in range(64)])
    with torch.no_grad():
        expected, got = in_memory(images), reloaded(images)
        original_out = original(images)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert not torch.allclose(got, original_out, atol=1e-3)  # the approximation did change the model


def test_calib_file_reuse_and_seed_mismatch(default_run, tmp_path, capsys):
    _, out, report = default_run
    calib = out / "calibration.h5"
    before = calib.stat().st_mtime_ns, calib.stat().st_size

    code = main(["vgg-digits", "--calib-file", str(calib), "--out", str(tmp_path / "again"), "--quiet", "--no-speed-gate"])
    assert code == 0
    again = json.loads((tmp_path / "again" / "report.json").read_text())
    assert ranks(again) == ranks(report)
    assert again["accuracy"]["top1_after"] == report["accuracy"]["top1_after"]
    assert not (tmp_path / "again" / "calibration.h5").exists()  # --calib-file pointed elsewhere
    assert (calib.stat().st_mtime_ns, calib.stat().st_size) == before  # reused, not rewritten
    capsys.readouterr()

    code = main(["vgg-digits", "--calib-file", str(calib), "--seed", "1", "--out", str(tmp_path / "other-seed"), "--quiet"])
    assert code == 1
    line = one_error_line(capsys.readouterr().err)
    assert "calibration" in line
    assert not (tmp_path / "other-seed" / "report.json").exists()
    assert (calib.stat().st_mtime_ns, calib.stat().st_size) == before  # the mismatching run left it alone


def test_calibration_file_records_the_run(default_run):
    h5py = pytest.importorskip("h5py")
    _, out, report = default_run
    with h5py.File(out / "calibration.h5", "r") as f:
        assert bool(f.attrs["complete"])
        assert int(f.attrs["seed"]) == 0
        assert int(f.attrs["n_images_done"]) == report["calibration"]["images"]
        stored = json.loads(f.attrs["layers_json"])
        ids = np.asarray(f["image_ids"][()])
    targeted = [layer["name"] for layer in report["layers"] if layer.get("reason") is None or "MACs" in layer["reason"]]
    assert stored == targeted
    np.testing.assert_array_equal(ids, calibration_indices(1437, 0.01, None, 0))



def test_speed_gate_latency_and_export_in_the_report(tmp_path):
    """The default (gated) run: every layer is approximated faster than its original or kept as 'slower';
    latency at batch 1 and 32 with the layout used; TorchScript and ONNX forms pass parity."""
    out = tmp_path / "gated"
    code = main(["vgg-digits", "--out", str(out), "--quiet", "--speedup", "1.5", "--method", "svd", "--export", "--rank-multiple", "4"])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    gate = report["rank_selection"]["speed_gate"]
    assert gate["batch"] == 32
    for layer in report["layers"]:
        if layer["status"] == "approximated":
            assert layer["factorized_ms"] < layer["original_ms"]
            assert layer["rank"] % 4 == 0 or layer["rank"] == layer["shape"][0]
        elif layer["name"] in gate["slower"]:
            assert layer["reason"] == "slower" and layer["factorized_ms"] >= layer["original_ms"]
    latency = report["latency"]
    assert set(latency["batches"]) == {"1", "32"}
    assert latency["memory_format"] in ("nchw", "channels_last")
    # the headline is the median of >= 5 per-round ratios against the BatchNorm-folded original
    assert latency["baseline"] == "BatchNorm folded in both" and latency["folded_batchnorm"]["original"] == 4
    assert latency["rounds"] >= 5 and latency["speedup_min"] <= latency["measured_speedup"] <= latency["speedup_max"]
    assert latency["speedup_min"] <= latency["before_ms"] / latency["after_ms"] <= latency["speedup_max"]
    assert latency["before_unfolded_ms"] > 0 and latency["speedup_vs_unfolded"] > 0  # an extra, not the baseline
    reuse_settable = _glibc() is not None and _preloaded() is None
    assert latency["allocator"]["allocator"] == ("reuse" if reuse_settable else "system")  # the default, recorded
    export = latency["export"]
    assert export["torchscript"]["parity"] and (out / "model.torchscript.pt").is_file()
    assert export["original_eager"]["folded_batchnorm"] == 4 and export["eager"]["speedup_vs_original"] > 0
    assert "skipped" in export["onnx"] or (export["onnx"]["parity"] and (out / "model.onnx").is_file())


def test_latency_budget_needs_a_speedup(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["vgg-digits", "--budget", "latency", "--quiet"])
    assert exit_info.value.code == 2
    assert "--budget latency needs --speedup" in capsys.readouterr().err


def test_the_latency_line_says_what_was_compared_with_its_spread():
    from lowrank_fm.report import format_latency

    line = format_latency({"baseline": "BatchNorm folded in both", "before_ms": 59.3, "after_ms": 26.0,
                           "measured_speedup": 2.28, "rounds": 7, "speedup_min": 2.1, "speedup_max": 2.4,
                           "batch_size": 32, "threads": 1})
    assert line == ("latency (BatchNorm folded in both): 59.30 ms -> 26.00 ms, 2.28x (median of 7 rounds, "
                    "2.10x-2.40x), batch 32, 1 thread")


def test_fit_positions_store_replays_the_calibration_samples(default_run, tmp_path, capsys, monkeypatch):
    """``--fit-positions store``: the layer-wise pass fits the store's samples and runs without the original
    network alongside (one forward less); the result stays as good as the default's on vgg-digits."""
    from lowrank_fm import layerwise

    references = []
    real_init = layerwise.LayerwisePass.__init__

    def recording_init(self, *args, **kwargs):
        references.append(kwargs.get("with_reference", False))
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(layerwise.LayerwisePass, "__init__", recording_init)
    out = tmp_path / "store"
    code = main(["vgg-digits", "--out", str(out), "--quiet", "--no-speed-gate", "--positions-per-image", "64",
                 "--fit-positions", "store"])
    assert code == 0 and references == [False]
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["fit_positions"] is None and report["calibration"]["positions_per_image"] == 64
    assert report["accuracy"]["top1_after"] >= default_run[2]["accuracy"]["top1_after"] - 0.02
    with pytest.raises(SystemExit) as exit_info:
        main(["vgg-digits", "--fit-positions", "0", "--quiet"])
    assert exit_info.value.code == 2 and "must be >= 1" in capsys.readouterr().err
