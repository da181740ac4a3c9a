"""The CLI on torchvision architectures and an ImageFolder data set (DESIGN.md: ``--weights none|PATH``,
``--dataset imagefolder --data-dir DIR``), on a tiny tree of real digit images made in tmp_path."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from lowrank_fm.cli import main
from lowrank_fm.zoo.models import create_model, load_bundled_approximated

CLASSES = 3
TRAIN_PER_CLASS, VAL_PER_CLASS = 12, 6
# --method fm-linear: the symmetric linear solution, the fast one (this file checks the torchvision path)
COMMON = ["--method", "fm-linear", "--dataset", "imagefolder", "--image-size", "32", "--calib-images", "16",
          "--latency-batch", "2", "--batch-size", "8", "--quiet",
          "--no-speed-gate"]  # these tests check ranks and MACs; the gate is tested in test_speed.py




@pytest.fixture(scope="module")
def image_tree(tmp_path_factory):
    """``train/`` and ``val/`` class folders of 32x32 RGB PNGs made from scikit-learn's digits 0, 1, 2."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    root = tmp_path_factory.mktemp("imagefolder")
    for label in range(CLASSES):
        images = digits.images[digits.target == label][: TRAIN_PER_CLASS + VAL_PER_CLASS]
        for i, image in enumerate(images):
            split = "train" if i < TRAIN_PER_CLASS else "val"
            folder = root / split / f"class{label}"
            folder.mkdir(parents=True, exist_ok=True)
            gray = Image.fromarray((image * (255 / 16)).astype(np.uint8)).resize((32, 32), Image.BILINEAR)
            gray.convert("RGB").save(folder / f"{i:03d}.png")
    return root


def run_cli(model, weights, tree, out, *extra):
    code = main([model, "--weights", str(weights), "--num-classes", str(CLASSES), "--data-dir", str(tree),
                 "--out", str(out), *COMMON, *extra])
    report = json.loads((out / "report.json").read_text()) if (out / "report.json").is_file() else None
    return code, report


def by_name(report):
    return {layer["name"]: layer for layer in report["layers"]}


def check_totals_drop(report):
    totals = report["totals"]
    assert totals["params_after"] < totals["params_before"]
    assert totals["macs_after"] < totals["macs_before"]
    assert totals["theoretical_speedup"] > 1.0
    assert totals["macs_before"] == sum(layer["macs_before"] for layer in report["layers"])


def test_tree_is_an_imagefolder(image_tree):
    from lowrank_fm.zoo.data import load_dataset

    data = load_dataset("imagefolder", image_tree, image_size=32)
    assert (len(data.train), len(data.test), data.num_classes) == (36, 18, 3)
    image, label = data.test[0]
    assert image.shape == (3, 32, 32) and label == 0


def test_resnet18_random_weights(image_tree, tmp_path):
    code, report = run_cli("resnet18", "none", image_tree, tmp_path / "out", "--eval-images", "12")
    assert code == 0
    layers = by_name(report)
    for name in ("conv1", "layer1.0.conv1", "layer1.0.conv2", "layer2.0.downsample.0", "layer4.1.conv2", "fc"):
        assert name in layers, name
    assert layers["conv1"]["status"] == "kept"
    assert "first layer" in layers["conv1"]["reason"]
    approximated = [name for name, layer in layers.items() if layer["status"] == "approximated"]
    assert approximated
    assert all(layers[name]["rank"] < layers[name]["shape"][0] for name in approximated)
    check_totals_drop(report)
    assert report["accuracy"]["eval_images"] == 12
    assert report["latency"]["batch_size"] == 2
    assert report["calibration"]["images"] == 16
    assert len(report["folded_batchnorm"]) == 20  # every BatchNorm of resnet18 follows a conv

    # the saved model reloads from its manifest alone (resnet18 with a 3-class head)
    reloaded = load_bundled_approximated(tmp_path / "out")
    with torch.no_grad():
        assert reloaded(torch.randn(2, 3, 32, 32)).shape == (2, CLASSES)


def test_resnet18_state_dict_file(image_tree, tmp_path):
    """--weights PATH loads the file: a head that always answers class 2 gives 1/3 top-1 on the balanced val
    split, before and after (the head is excluded, so it stays as it was and ignores the features)."""
    torch.manual_seed(1)
    model = create_model("resnet18", "none", num_classes=CLASSES)
    with torch.no_grad():
        model.fc.weight.zero_()
        model.fc.bias.copy_(torch.tensor([0.0, 0.0, 5.0]))
    path = tmp_path / "resnet18-3.pt"
    torch.save(model.state_dict(), path)

    out = tmp_path / "out"
    code, report = run_cli("resnet18", path, image_tree, out, "--exclude", "fc")
    assert code == 0
    assert report["accuracy"]["eval_images"] == CLASSES * VAL_PER_CLASS
    assert report["accuracy"]["top1_before"] == pytest.approx(1 / 3)
    assert report["accuracy"]["top1_after"] == pytest.approx(1 / 3)
    layers = by_name(report)
    assert layers["fc"]["status"] == "kept" and layers["fc"]["reason"] == "not targeted"
    assert any(layer["status"] == "approximated" for layer in layers.values())
    check_totals_drop(report)

    reloaded = load_bundled_approximated(out)
    torch.testing.assert_close(reloaded.fc.weight, model.fc.weight, rtol=0, atol=0)
    torch.testing.assert_close(reloaded.fc.bias, model.fc.bias, rtol=0, atol=0)


def test_mobilenet_keeps_grouped_convs(image_tree, tmp_path):
    code, report = run_cli("mobilenet_v3_small", "none", image_tree, tmp_path / "out", "--eval-images", "6")
    assert code == 0
    layers = by_name(report)
    architecture = create_model("mobilenet_v3_small", "none", num_classes=CLASSES)
    grouped = [name for name, m in architecture.named_modules() if isinstance(m, torch.nn.Conv2d) and m.groups > 1]
    assert grouped, "mobilenet_v3_small has depthwise convs"
    for name in grouped:
        assert layers[name]["status"] == "kept", name
        assert "grouped" in layers[name]["reason"], (name, layers[name]["reason"])
    assert "first layer" in layers["features.0.0"]["reason"]
    assert any(layer["status"] == "approximated" for layer in layers.values())
    check_totals_drop(report)
