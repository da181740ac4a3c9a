"""The Python API on part of a bigger model (DESIGN.md): the backbone of a torchvision Faster R-CNN, fed by
lists of unlabelled image tensors, approximated with ``include=("backbone",)``.

The detector is torchvision's ``FasterRCNN`` on its own MobileNetV3-small FPN backbone (``mobilenet_backbone``,
FrozenBatchNorm2d as with pretrained detectors), no weights, small images (min_size 96): the same code path as
``fasterrcnn_mobilenet_v3_large_320_fpn`` at a third of the cost. Random initialisation with the default
BatchNorm statistics makes the backbone's features vanish (~1e-9), so that every detection is the same
whatever the backbone computes; the fixture sets the statistics from the images instead (as training would),
which gives O(1) features and detections that do depend on the backbone.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import mobilenet_backbone
from torchvision.ops.misc import FrozenBatchNorm2d

import lowrank_fm

N_CALIB = 6  # calibration images, 2 per batch




def digit_images(start, count):
    """Real digits as (3, 64, 80) float images in [0, 1], a different tint per channel."""
    from sklearn.datasets import load_digits

    images = torch.tensor(load_digits().images[start : start + count], dtype=torch.float32)[:, None] / 16
    images = F.interpolate(images, size=(64, 80), mode="bilinear", align_corners=False)
    tint = torch.tensor([1.0, 0.6, 0.3]).view(1, 3, 1, 1)
    return [image.contiguous() for image in (images * tint + 0.1 * (1 - tint)).clamp(0, 1)]


@pytest.fixture(scope="module")
def calib_batches():
    images = digit_images(0, N_CALIB)
    return [images[i : i + 2] for i in range(0, N_CALIB, 2)]


@pytest.fixture(scope="module")
def eval_images():
    return digit_images(100, 3)


@pytest.fixture(scope="module")
def detector(calib_batches):
    """An eval-mode Faster R-CNN and a deep copy of its state_dict taken before any approximation."""
    torch.manual_seed(0)
    backbone = mobilenet_backbone(backbone_name="mobilenet_v3_small", weights=None, fpn=True, trainable_layers=6)
    anchors = AnchorGenerator(((16, 32, 64),) * 3, ((0.5, 1.0, 2.0),) * 3)
    model = FasterRCNN(backbone, num_classes=5, rpn_anchor_generator=anchors, min_size=96, max_size=128,
                       box_score_thresh=0.0, box_detections_per_img=20, rpn_pre_nms_top_n_test=50,
                       rpn_post_nms_top_n_test=20).eval()

    def set_statistics(module, args):  # each BatchNorm normalises what it sees, as after training
        module.running_mean.copy_(args[0].mean((0, 2, 3)))
        module.running_var.copy_(args[0].var((0, 2, 3)))

    norms = [m for m in model.backbone.modules() if isinstance(m, FrozenBatchNorm2d)]
    assert norms, "the backbone uses FrozenBatchNorm2d"
    handles = [m.register_forward_pre_hook(set_statistics) for m in norms]
    with torch.no_grad():
        model.backbone(model.transform([image for batch in calib_batches for image in batch])[0].tensors)
    for handle in handles:
        handle.remove()
    return model, copy.deepcopy(model.state_dict())


def detect(model, images):
    with torch.no_grad():
        return model(images)


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    return tmp_path_factory.mktemp("detector") / "calibration.h5"


@pytest.fixture(scope="module")
def exact(detector, calib_batches, calib_file):
    """fm-linear at energy 1.0, forced: every supported backbone layer factorized at full rank."""
    model, _ = detector
    return lowrank_fm.approximate(model, calib_batches, method="fm-linear", include=("backbone",), energy=1.0,
                                  force=True, n_images=N_CALIB, progress=False, calib_file=calib_file,
                                  speed_gate=False)


@pytest.fixture(scope="module")
def reduced(detector, calib_batches, calib_file, exact):
    """The default method at energy 0.95 (reuses the calibration file of ``exact``: same layers and seed)."""
    model, _ = detector
    return lowrank_fm.approximate(model, calib_batches, include=("backbone",), energy=0.95, n_images=N_CALIB,
                                  progress=False, calib_file=calib_file, speed_gate=False)


def test_detections_depend_on_the_backbone(detector, eval_images):
    """Guards the exactness test below: the detections are not constant (features of scale 1, spread scores)."""
    model, _ = detector
    with torch.no_grad():
        features = model.backbone(model.transform(eval_images)[0].tensors)
    assert all(0.05 < float(f.abs().mean()) < 100 for f in features.values())
    outputs = detect(model, eval_images)
    assert float(outputs[0]["scores"].max() - outputs[0]["scores"].min()) > 1e-3
    assert not torch.equal(outputs[0]["boxes"], outputs[1]["boxes"])


def test_energy_1_reproduces_detections(detector, exact, eval_images):
    """At full rank fm-linear is U U^T (y - ybar) + ybar with U orthonormal and square: the identity up to
    float32 rounding (~1e-7 relative per layer). Through ~40 factorized layers and the box decoding
    (anchors of 16-64 px) that is observed <= 5e-5 px on boxes and <= 3e-7 on scores; atol 1e-3 px / 1e-5
    leaves margin, while a real defect (a lost bias, a rank short by one) moves boxes by pixels."""
    model, _ = detector
    new_model, report = exact
    assert sum(layer.status == "approximated" for layer in report.layers) >= 30
    factorized = [name for name, module in new_model.named_modules() if hasattr(module, "spec")]
    assert factorized and all(name.startswith("backbone.") for name in factorized)

    expected, got = detect(model, eval_images), detect(new_model, eval_images)
    assert len(got) == len(expected) == len(eval_images)
    for want, have in zip(expected, got):
        assert have["boxes"].shape == want["boxes"].shape and want["boxes"].shape[0] > 0
        torch.testing.assert_close(have["labels"], want["labels"], rtol=0, atol=0)
        torch.testing.assert_close(have["scores"], want["scores"], rtol=0, atol=1e-5)
        torch.testing.assert_close(have["boxes"], want["boxes"], rtol=0, atol=1e-3)
    for layer in report.layers:
        if layer.status == "approximated":
            assert layer.rank == layer.shape[0]
            assert layer.rel_error < 1e-5, (layer.name, layer.rel_error)


def test_only_the_backbone_is_approximated(detector, exact):
    model, _ = detector
    _, report = exact
    records = {layer.name: layer for layer in report.layers}
    outside = [name for name in records if not name.startswith("backbone.")]
    assert outside, "the RPN and box heads are candidate layers too"
    for name in outside:
        assert records[name].status == "kept" and records[name].reason == "not targeted", name
    for name, layer in records.items():
        if layer.status == "approximated":
            assert name.startswith("backbone."), name
        elif name.startswith("backbone."):  # kept inside the backbone only for a structural reason
            assert "first layer" in layer.reason or "grouped" in layer.reason, (name, layer.reason)
    # every FrozenBatchNorm2d of the backbone follows a conv and was folded into it
    frozen = [n for n, m in model.named_modules() if isinstance(m, FrozenBatchNorm2d)]
    assert sorted(bn for _, bn in report.folded_batchnorm) == sorted(frozen)


def test_energy_095_runs_on_a_detector(detector, reduced, eval_images):
    model, _ = detector
    new_model, report = reduced
    assert report.totals["macs_after"] < report.totals["macs_before"]
    approximated = [layer for layer in report.layers if layer.status == "approximated"]
    assert approximated and all(layer.name.startswith("backbone.") for layer in approximated)
    # the detector is not traceable, its backbone is: the whole-model pass runs on the backbone
    assert all(layer.extra["solver"] == "rmsprop" for layer in approximated)
    outputs = detect(new_model, eval_images)
    assert isinstance(outputs, list) and len(outputs) == len(eval_images)
    for output in outputs:
        assert set(output) >= {"boxes", "scores", "labels"}
        assert output["boxes"].ndim == 2 and output["boxes"].shape[1] == 4
        assert output["scores"].shape == output["labels"].shape == output["boxes"].shape[:1]
    original = detect(model, eval_images)
    assert not all(torch.allclose(a["boxes"], b["boxes"]) for a, b in zip(original, outputs)
                   if a["boxes"].shape == b["boxes"].shape)  # the approximation is not the identity


def test_input_model_is_unchanged(detector, exact, reduced):
    model, before = detector
    after = model.state_dict()
    assert list(after) == list(before)
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    assert not model.training
    assert not any(hasattr(module, "spec") for module in model.modules())
    assert sum(isinstance(m, FrozenBatchNorm2d) for m in model.modules()) == len(exact[1].folded_batchnorm)
    assert exact[0] is not model and reduced[0] is not model
