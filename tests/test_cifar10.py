"""CIFAR-10 reference models: the JPEG archive reader, the classic CIFAR ResNets, device-resident training."""

from __future__ import annotations

import io
import json
import math
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from lowrank_fm.zoo.cifar10_jpeg import find_archive, read_cifar10_jpeg
from lowrank_fm.zoo.image_training import ImageTrainSettings, _augment, _learning_rate, normalise, train_on_device
from lowrank_fm.zoo.networks import ResNetCifar

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


@pytest.fixture()
def tiny_archive(tmp_path):
    """An archive in the layout of cifar10-jpeg.tar.gz: 2 train and 1 val image per class, files out of order."""
    path = tmp_path / "cifar10-jpeg.tar.gz"
    with tarfile.open(path, "w:gz") as archive:
        seed = 0
        for split, count in (("val", 1), ("train", 2)):
            for class_name in reversed(CLASSES):
                for number in reversed(range(count)):
                    data = _jpeg(seed)
                    seed += 1
                    info = tarfile.TarInfo(f"cifar10-jpeg/{split}/{class_name}/{number:04d}.jpg")
                    info.size = len(data)
                    archive.addfile(info, io.BytesIO(data))
    return path


def test_resnet_cifar_parameter_counts_match_he_et_al():
    # He et al. 2016, table 6: ResNet-20 0.27 M, ResNet-56 0.85 M parameters
    for depth, millions in ((20, 0.27), (56, 0.85)):
        model = ResNetCifar(depth)
        assert round(sum(p.numel() for p in model.parameters()) / 1e6, 2) == millions
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError, match="6n\\+2"):
        ResNetCifar(21)


def test_option_a_shortcut_is_subsampling_with_zero_channels():
    block = ResNetCifar(20).stages[1][0]
    x = torch.randn(2, 16, 8, 8)
    out = block.shortcut(x)
    assert out.shape == (2, 32, 4, 4)
    torch.testing.assert_close(out[:, :16], x[:, :, ::2, ::2])
    assert out[:, 16:].abs().max() == 0


def test_archive_reader_matches_imagefolder_order_and_pixels(tiny_archive, tmp_path):
    from torchvision.datasets import ImageFolder

    arrays = read_cifar10_jpeg(tiny_archive, cache=tmp_path / "cache")
    assert arrays["train_images"].shape == (20, 32, 32, 3) and arrays["val_images"].shape == (10, 32, 32, 3)
    assert list(arrays["classes"]) == CLASSES
    extracted = tmp_path / "extracted"
    with tarfile.open(tiny_archive) as archive:
        archive.extractall(extracted, filter="data")
    folder = ImageFolder(extracted / "cifar10-jpeg" / "train")  # independent reader: torchvision + PIL
    assert [label for _, label in folder.samples] == arrays["train_labels"].tolist()
    for index, (file, _) in enumerate(folder.samples):
        np.testing.assert_array_equal(np.asarray(Image.open(file).convert("RGB")), arrays["train_images"][index])
    # the extracted folder reads the same, and the second read comes from the cache
    from_dir = read_cifar10_jpeg(extracted / "cifar10-jpeg", cache=tmp_path / "cache2")
    np.testing.assert_array_equal(from_dir["val_images"], arrays["val_images"])
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 1


def test_missing_archive_names_data_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="--data-dir"):
        find_archive(tmp_path / "nowhere")


def test_augment_is_a_shifted_crop_of_the_padded_image():
    images = torch.randint(0, 256, (6, 5, 5, 3), dtype=torch.uint8)
    generator = torch.Generator().manual_seed(3)
    out = _augment(images, 2, generator)
    replay = torch.Generator().manual_seed(3)  # the same draws, applied by hand
    dy = torch.randint(0, 5, (6,), generator=replay)
    dx = torch.randint(0, 5, (6,), generator=replay)
    flip = torch.rand(6, generator=replay) < 0.5
    padded = torch.zeros(6, 9, 9, 3, dtype=torch.uint8)
    padded[:, 2:7, 2:7] = images
    for i in range(6):
        crop = padded[i, dy[i] : dy[i] + 5, dx[i] : dx[i] + 5]
        expected = crop.flip(1) if flip[i] else crop
        torch.testing.assert_close(out[i], expected)


def test_normalise_resizes_and_uses_imagenet_statistics():
    images = torch.full((1, 32, 32, 3), 255, dtype=torch.uint8)
    out = normalise(images, 64)
    assert out.shape == (1, 3, 64, 64)
    torch.testing.assert_close(out[0, :, 0, 0], (1 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225]))


def test_learning_rate_warms_up_then_follows_a_cosine_to_zero():
    settings = ImageTrainSettings(lr=0.2)
    assert _learning_rate(settings, 0, 10, 5) == pytest.approx(0.02)
    assert _learning_rate(settings, 10, 10, 5) == pytest.approx(0.2)
    assert _learning_rate(settings, 30, 10, 5) == pytest.approx(0.2 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert _learning_rate(settings, 50, 10, 5) == pytest.approx(0.0, abs=1e-12)


def test_train_on_device_learns_a_separable_task():
    torch.manual_seed(0)
    labels = torch.arange(256) % 2
    images = torch.zeros(256, 8, 8, 3, dtype=torch.uint8)
    images[labels == 1] = 200  # bright against dark: any working trainer separates them
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(4, 2))
    settings = ImageTrainSettings(epochs=3, batch_size=32, lr=0.05, crop_pad=1, input_size=8, device="cpu",
                                  progress=False)
    record = train_on_device(model, images, labels, images, labels, settings)
    assert record["epochs"] == 3 and record["val_top1"][-1] == (3, 1.0)
    with pytest.raises(ValueError, match="fewer than one batch"):
        train_on_device(model, images[:4], labels[:4], None, None, settings)


def test_shipped_resnet20_reaches_its_recorded_accuracy_on_the_real_data():
    try:
        find_archive(None)
    except FileNotFoundError as error:
        pytest.skip(f"CIFAR-10 JPEG archive not present: {error}")
    from lowrank_fm.zoo.data import load_dataset
    from lowrank_fm.zoo.evaluate import accuracy
    from lowrank_fm.zoo.models import CHECKPOINT_DIR, create_model

    record = json.loads((CHECKPOINT_DIR / "resnet20-cifar10.json").read_text())
    data = load_dataset("cifar10-jpeg", image_size=32)
    result = accuracy(create_model("resnet20-cifar10"), data.test, progress=False)
    assert result["images"] == 10000
    assert abs(result["top1"] - record["test_top1"]) <= 0.002  # trained on a GPU in bfloat16, evaluated here in float32


def test_cache_weights_missing_say_how_to_train(tmp_path, monkeypatch):
    from lowrank_fm.zoo.models import WeightsNotFoundError, create_model

    monkeypatch.setenv("LOWRANK_FM_CACHE", str(tmp_path))
    with pytest.raises(WeightsNotFoundError, match="train_reference.py densenet161-cifar10 --device cuda"):
        create_model("densenet161-cifar10")


def test_large_image_size_is_refused_before_reading_anything():
    from lowrank_fm.zoo.data import load_dataset

    with pytest.raises(ValueError, match="imagefolder"):
        load_dataset("cifar10-jpeg", "/nonexistent", image_size=224)
