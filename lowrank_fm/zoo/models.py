"""Models by name: the bundled reference models and torchvision architectures.

Bundled (registered with :func:`register_model`):

- ``vgg-digits``: a small VGG on scikit-learn's digits; trained on first use (seconds, deterministic) and
  cached under ``$LOWRANK_FM_CACHE`` (default ``~/.cache/lowrank_fm``).
- ``vgg-fmnist`` (VGG, 64-64-128-128-256-256), ``vgg-fmnist-narrow`` (the same at half width; the reference
  VGG until 2026-11-23) and ``resnet-fmnist``: Fashion-MNIST models whose checkpoints ship in
  ``lowrank_fm/zoo/checkpoints`` (made by ``scripts/train_reference.py``; see the JSON beside each).
- CIFAR-10 models (data ``cifar10-jpeg``, images normalised as ``imagefolder`` does): ``resnet20-cifar10`` and
  ``resnet56-cifar10`` (the classic CIFAR ResNets; checkpoints shipped when trained), and torchvision's
  ``alexnet``, ``resnet18``, ``vgg16_bn``, ``shufflenet_v2_x1_0``, ``densenet161`` with 10-class heads as
  ``alexnet-cifar10`` etc., whose checkpoints are too large to ship: ``scripts/train_reference.py NAME
  --device cuda`` writes them to the cache folder (weights kind ``cache``).

Any other name is looked up in ``torchvision.models`` (``weights``: ``none``, ``default`` or a path to a
state_dict). Nothing downloads: ``default`` fails with one line saying to pass ``--weights PATH``.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .networks import ResNetCifar, ResNetSmall, VGGSmall

__all__ = [
    "model_data",
    "ModelSpec",
    "register_model",
    "list_models",
    "create_model",
    "load_state_dict_file",
    "load_weights",
    "checkpoint_path",
    "load_bundled_approximated",
    "WeightsNotFoundError",
]

log = logging.getLogger(__name__)

CHECKPOINT_DIR = Path(__file__).parent / "checkpoints"


class WeightsNotFoundError(FileNotFoundError):
    """Weights were asked for that are not on this machine; the message says what to pass instead."""


@dataclass(frozen=True)
class ModelSpec:
    """A bundled model: how to build it, which data set it belongs to, where its weights come from."""

    name: str
    build: Callable[[], nn.Module]
    dataset: str
    weights: str  # "checkpoint" (shipped file), "train-on-first-use" or "cache" (made by train_reference.py)
    input_size: int | None = None  # the image size the model was trained on, where its data set can resize


_REGISTRY: dict[str, ModelSpec] = {}


def model_data(spec: ModelSpec, data_dir: str | os.PathLike | None = None):
    """The bundled model's data set (:func:`lowrank_fm.zoo.data.load_dataset`) at the image size it was trained
    on (CIFAR-10 JPEGs decoded at 32 px, not at the 224 px default)."""
    from .data import load_dataset

    return load_dataset(spec.dataset, data_dir, image_size=spec.input_size or 224)


def register_model(spec: ModelSpec) -> ModelSpec:
    """Add a bundled model; a duplicate name raises."""
    if spec.name in _REGISTRY:
        raise ValueError(f"model {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def list_models() -> list[str]:
    """Names of the bundled models (torchvision names are accepted too)."""
    return sorted(_REGISTRY)


def bundled_spec(name: str) -> ModelSpec | None:
    """The registry entry of a bundled model, or None for other names."""
    return _REGISTRY.get(name)


register_model(
    ModelSpec(
        "vgg-digits",
        lambda: VGGSmall([32, 32, "M", 64, 64, "M"], in_channels=1, image_size=8, hidden=128, dropout=0.2),
        "digits",
        "train-on-first-use",
    )
)
register_model(
    ModelSpec("vgg-fmnist", lambda: VGGSmall([64, 64, "M", 128, 128, "M", 256, 256, "M"]), "fashion-mnist", "checkpoint")
)
register_model(  # the reference VGG until 2026-11-23: half the width, less redundant, harder to approximate
    ModelSpec("vgg-fmnist-narrow", lambda: VGGSmall([32, 32, "M", 64, 64, "M", 128, 128, "M"]), "fashion-mnist",
              "checkpoint")
)
register_model(
    ModelSpec("resnet-fmnist", lambda: ResNetSmall((32, 64, 128), blocks=2), "fashion-mnist", "checkpoint")
)


def _torchvision_cifar(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision

        return torchvision.models.get_model(name, weights=None, num_classes=10)

    return build


register_model(ModelSpec("resnet20-cifar10", lambda: ResNetCifar(20), "cifar10-jpeg", "checkpoint", 32))
register_model(ModelSpec("resnet56-cifar10", lambda: ResNetCifar(56), "cifar10-jpeg", "checkpoint", 32))
# torchvision architectures as designed, 10-class heads, at the smallest input each accepts: 32 px, except
# AlexNet (11x11 stride-4 stem and three 3x3 stride-2 pools need at least 63 px; 64 = 2 x 32 gives the same maps)
for _name, _size in (("alexnet", 64), ("resnet18", 32), ("vgg16_bn", 32), ("shufflenet_v2_x1_0", 32),
                     ("densenet161", 32)):
    register_model(ModelSpec(f"{_name}-cifar10", _torchvision_cifar(_name), "cifar10-jpeg", "cache", _size))


def checkpoint_path(name: str) -> Path:
    """Where the shipped checkpoint of bundled model ``name`` lies."""
    return CHECKPOINT_DIR / f"{name}.pt"


def cache_dir() -> Path:
    return Path(os.environ.get("LOWRANK_FM_CACHE", Path.home() / ".cache" / "lowrank_fm"))


def load_state_dict_file(path: str | os.PathLike) -> dict:
    """Load a state_dict without unpickling arbitrary objects (``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsNotFoundError(f"--weights {path}: no such file; pass --weights PATH to a state_dict, or none")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "GLOBAL" not in str(error):  # no objects named: the bytes are damaged or of another format
            raise ValueError(f"--weights {path}: not a state_dict file saved by torch.save (it does not unpickle: "
                             f"damaged, or another format); pass --weights PATH to a state_dict, or none") from None
        # objects other than tensors: unpickling them could run code
        raise ValueError(f"--weights {path}: not a plain state_dict (it holds Python objects other than tensors, "
                         f"refused without loading them: that could run code from the file); pass --weights PATH "
                         f"to a state_dict saved with torch.save(model.state_dict(), PATH)") from None
    except Exception as error:  # a text file, a truncated file
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ValueError(f"--weights {path}: not a state_dict file saved by torch.save ({type(error).__name__}: "
                         f"{first[:200]}); pass --weights PATH to a state_dict, or none") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(torch.is_tensor(value) for value in state.values()):
        raise ValueError(f"--weights {path}: expected a state_dict (dict of tensors), got {type(state).__name__}")
    return state


def load_weights(model: nn.Module, path: str | os.PathLike, name: str, hint: str = "") -> nn.Module:
    """Load the state_dict file ``path`` into ``model`` (architecture ``name``); when it does not fit, the
    error names the file, the architecture, and which keys are missing or unexpected and which shapes differ."""
    from ..serialize import state_dict_diff

    state = load_state_dict_file(path)
    try:
        model.load_state_dict(state)
    except RuntimeError:
        raise ValueError(f"--weights {path} is not a state_dict of {name} ({type(model).__name__}): "
                         f"{state_dict_diff(model, state)}{hint}") from None
    return model


def _train_digits_model(spec: ModelSpec) -> nn.Module:
    from .data import load_dataset
    from .training import TrainSettings, train_classifier

    torch.manual_seed(0)
    model = spec.build()
    data = load_dataset("digits")
    train_classifier(model, data.train, None, TrainSettings(epochs=30, batch_size=64, lr=0.05, augment=False, progress=False))
    return model


def _bundled(spec: ModelSpec, weights: str) -> nn.Module:
    if weights == "none":
        return spec.build()
    if weights not in ("default", ""):
        return load_weights(spec.build(), weights, spec.name)
    if spec.weights == "checkpoint":
        path = checkpoint_path(spec.name)
        if not path.is_file():
            raise WeightsNotFoundError(
                f"{spec.name}: shipped checkpoint {path} is missing; run scripts/train_reference.py {spec.name} "
                "or pass --weights PATH"
            )
        model = spec.build()
        model.load_state_dict(load_state_dict_file(path))
        return model
    cached = cache_dir() / f"{spec.name}.pt"
    model = spec.build()
    if cached.is_file():
        model.load_state_dict(load_state_dict_file(cached))
        return model
    if spec.weights == "cache":
        raise WeightsNotFoundError(
            f"{spec.name}: no trained checkpoint at {cached}; train it with 'python scripts/train_reference.py "
            f"{spec.name} --device cuda' or pass --weights PATH"
        )
    log.info("training %s on first use (cached at %s)", spec.name, cached)
    model = _train_digits_model(spec)
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(f".tmp{os.getpid()}")
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, cached)
    return model


def _torchvision(name: str, weights: str, num_classes: int | None) -> nn.Module:
    import torchvision

    try:
        builder = torchvision.models.get_model_builder(name)
    except ValueError as error:
        raise ValueError(
            f"unknown model {name!r}: use one of {list_models()} or a torchvision name such as vgg16, resnet18"
        ) from error
    if weights == "default":
        raise WeightsNotFoundError(
            f"{name}: --weights default would download torchvision weights and there is no network; "
            "pass --weights PATH to a state_dict file, or --weights none for random weights"
        )
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    model = builder(weights=None, **kwargs)
    if weights not in ("none", ""):
        load_weights(model, weights, f"{name} with num_classes={num_classes}",
                     "; pass --num-classes to match the checkpoint's head")
    return model


def create_model(name: str, weights: str = "default", *, num_classes: int | None = None) -> nn.Module:
    """Build a model by name, in eval mode.

    Parameters
    ----------
    name : a bundled name (:func:`list_models`) or a torchvision architecture name.
    weights : ``"default"`` (bundled checkpoint / trained on first use; for torchvision this would need a
        download and raises), ``"none"`` (random initialisation) or a path to a state_dict file.
    num_classes : for torchvision architectures, the size of the classifier head when weights are random.
    """
    spec = _REGISTRY.get(name)
    model = _bundled(spec, weights) if spec is not None else _torchvision(name, weights, num_classes)
    return model.eval()


def checkpoint_record(name: str) -> dict | None:
    """The JSON record written beside a shipped checkpoint (seed, command, accuracy), if present."""
    path = CHECKPOINT_DIR / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def model_from_manifest(manifest: dict) -> nn.Module:
    """The architecture a saved approximation's manifest names (``model``, ``model_kwargs``), with random
    weights: the builder :func:`load_bundled_approximated` hands to :func:`lowrank_fm.load_approximated`."""
    if not manifest.get("model"):
        raise ValueError("the manifest names no model: pass the original architecture to "
                         "lowrank_fm.load_approximated(path, model=...)")
    return create_model(manifest["model"], weights="none", **manifest.get("model_kwargs", {}))


def load_bundled_approximated(path: str | os.PathLike) -> nn.Module:
    """Rebuild an approximated model saved by the command line (or by ``save_approximated`` with
    ``model_name``), whose architecture is a bundled or torchvision name: :func:`lowrank_fm.load_approximated`
    with the manifest's model built by :func:`create_model`."""
    from ..serialize import load_approximated

    return load_approximated(path, model=model_from_manifest)
