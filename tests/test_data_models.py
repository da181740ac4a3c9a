"""Data sets and the model zoo: splits, missing data, the bundled reference model, name lookup, and that
state_dict files are read without unpickling arbitrary objects."""

import os

import pytest
import torch
from conftest import needs_fmnist

from lowrank_fm.zoo.data import DataNotFoundError, load_dataset
from lowrank_fm.zoo.evaluate import accuracy
from lowrank_fm.zoo.models import (
    ModelSpec,
    WeightsNotFoundError,
    create_model,
    list_models,
    load_state_dict_file,
    register_model,
)


class Payload:
    """Unpickling this object runs ``os.makedirs(marker)``: a stand-in for arbitrary code in a .pt file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.makedirs, (self.marker,)


# --- data -------------------------------------------------------------------------------------------------


def test_digits_splits(digits):
    assert (len(digits.train), len(digits.test)) == (1437, 360)
    assert digits.num_classes == 10 and digits.image_shape == (1, 8, 8)
    image, label = digits.train[0]
    assert image.shape == (1, 8, 8) and image.dtype == torch.float32
    labels = torch.tensor([int(digits.test[i][1]) for i in range(len(digits.test))])
    assert labels.min() == 0 and labels.max() == 9
    assert len(labels.unique()) == 10


def test_digits_split_is_fixed_and_disjoint(digits):
    again = load_dataset("digits")
    assert torch.equal(again.train.tensors[0], digits.train.tensors[0])
    assert torch.equal(again.test.tensors[1], digits.test.tensors[1])
    train = {tuple(x.flatten().tolist()) for x in digits.train.tensors[0]}
    test = {tuple(x.flatten().tolist()) for x in digits.test.tensors[0]}
    assert len(train) == 1437 and len(test) == 360  # the 1,797 digits are distinct images
    assert not train & test


def test_missing_fashion_mnist_names_data_dir(tmp_path):
    with pytest.raises(DataNotFoundError, match="--data-dir"):
        load_dataset("fashion-mnist", data_dir=tmp_path / "nonexistent")


def test_missing_imagefolder_names_data_dir(tmp_path):
    with pytest.raises(DataNotFoundError, match="--data-dir"):
        load_dataset("imagefolder", data_dir=tmp_path / "nonexistent")
    (tmp_path / "train").mkdir()
    with pytest.raises(DataNotFoundError, match="val/"):
        load_dataset("imagefolder", data_dir=tmp_path)
    with pytest.raises(DataNotFoundError, match="--data-dir"):
        load_dataset("imagefolder")


def test_unknown_dataset():
    with pytest.raises(ValueError, match="dataset must be one of"):
        load_dataset("imagenet-on-the-moon")


@needs_fmnist
def test_fashion_mnist_loads():
    data = load_dataset("fashion-mnist")
    assert (len(data.train), len(data.test)) == (60000, 10000)
    assert data.image_shape == (1, 28, 28) and data.num_classes == 10
    for split in (data.train, data.test):
        images, labels = split.tensors
        assert images.shape[1:] == (1, 28, 28) and images.dtype == torch.float32
        assert labels.dtype == torch.int64
        assert int(labels.min()) == 0 and int(labels.max()) == 9
        assert len(labels.unique()) == 10
    # normalised with the training split's statistics
    assert abs(float(data.train.tensors[0].mean())) < 0.05
    assert abs(float(data.train.tensors[0].std()) - 1.0) < 0.05


# --- models -----------------------------------------------------------------------------------------------


def test_vgg_digits_is_deterministic_and_accurate(vgg_digits, digits):
    again = create_model("vgg-digits")
    state, other = vgg_digits.state_dict(), again.state_dict()
    assert list(state) == list(other)
    for key in state:
        assert torch.equal(state[key], other[key]), key
    assert not vgg_digits.training
    result = accuracy(vgg_digits, digits.test, progress=False)
    assert result["images"] == 360
    assert result["top1"] >= 0.95


def test_bundled_models_are_listed():
    assert {"vgg-digits", "vgg-fmnist", "resnet-fmnist"} <= set(list_models())


def test_register_duplicate_name_raises(vgg_digits):
    before = list_models()
    with pytest.raises(ValueError, match="already registered"):
        register_model(ModelSpec("vgg-digits", lambda: torch.nn.Linear(1, 1), "digits", "train-on-first-use"))
    assert list_models() == before
    assert type(create_model("vgg-digits", "none")) is type(vgg_digits)  # the original entry is untouched


def test_unknown_model_names_torchvision():
    with pytest.raises(ValueError, match="torchvision") as exc:
        create_model("not-a-model")
    assert "not-a-model" in str(exc.value)


def test_torchvision_default_weights_refuse_to_download():
    with pytest.raises(WeightsNotFoundError, match="--weights"):
        create_model("resnet18", "default")


def test_torchvision_weights_none_and_num_classes():
    model = create_model("resnet18", "none", num_classes=7)
    assert model.fc.out_features == 7 and not model.training


def test_state_dict_file_round_trip(tmp_path, vgg_digits):
    path = tmp_path / "state.pt"
    torch.save(vgg_digits.state_dict(), path)
    model = create_model("vgg-digits", str(path))
    for key, value in vgg_digits.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    torch.save({"state_dict": vgg_digits.state_dict(), "epoch": 3}, tmp_path / "ckpt.pt")  # a training checkpoint
    assert set(load_state_dict_file(tmp_path / "ckpt.pt")) == set(vgg_digits.state_dict())


def test_state_dict_file_is_loaded_weights_only(tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pt"
    torch.save({"weight": torch.zeros(2), "extra": Payload(marker)}, path)
    with pytest.raises(ValueError, match="evil.pt: not a plain state_dict .* refused without loading them"):
        load_state_dict_file(path)
    assert not marker.exists(), "load_state_dict_file ran code from the file"
    torch.load(path, weights_only=False)  # the payload is live: a full unpickle does run it
    assert marker.exists()


def test_state_dict_file_errors(tmp_path):
    with pytest.raises(WeightsNotFoundError, match="--weights"):
        load_state_dict_file(tmp_path / "absent.pt")
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    with pytest.raises(ValueError, match="state_dict"):
        load_state_dict_file(tmp_path / "tensor.pt")


@pytest.mark.parametrize("name,floor", [("vgg-fmnist", 0.93), ("vgg-fmnist-narrow", 0.93), ("resnet-fmnist", 0.925)])
def test_shipped_checkpoints_load_safely_and_keep_their_accuracy(name, floor):
    from conftest import FMNIST_PRESENT
    from lowrank_fm.zoo.models import checkpoint_path, checkpoint_record

    if not FMNIST_PRESENT:
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    if not checkpoint_path(name).is_file():
        pytest.skip(f"shipped checkpoint {name}.pt is absent")
    record = checkpoint_record(name)
    model = create_model(name)  # loads with weights_only=True
    data = load_dataset("fashion-mnist")
    top1 = accuracy(model, data.test, progress=False)["top1"]
    assert top1 >= floor
    assert top1 == pytest.approx(record["test_top1"], abs=0.002)  # the JSON beside the checkpoint tells the truth
