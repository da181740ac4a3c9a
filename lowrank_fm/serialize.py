"""Save and load an approximated model without pickling code: a state_dict (read back with
``torch.load(weights_only=True)``) plus a JSON manifest of the surgery (folded BatchNorms, and the shape of
every factorized layer), applied to a freshly built architecture before loading the weights."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from .layers import chain_from_spec
from .surgery import get_module, set_module

__all__ = ["save_approximated", "load_approximated", "apply_manifest", "state_dict_diff", "MANIFEST_NAME",
           "WEIGHTS_NAME"]

MANIFEST_NAME = "manifest.json"
WEIGHTS_NAME = "model_state.pt"
FORMAT_VERSION = 2  # 2: with checksums of the surgery and the weights (1 is read, unverified)

log = logging.getLogger(__name__)


def save_approximated(
    model: nn.Module, out_dir: str | Path, *, folded: list, model_name: str | None = None, model_kwargs: dict | None = None
) -> Path:
    """Write ``model_state.pt`` and ``manifest.json`` into ``out_dir``; returns the manifest path.

    ``folded`` lists the (conv, batchnorm) names that were folded; factorized layers are found in the model
    by their ``spec()`` method. The manifest records a SHA-256 of the weights file and of its own surgery
    (``checksums``), verified on loading. Each file is written under a temporary name and renamed, so an
    interrupted save leaves the previous files whole.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    layers = {name: module.spec() for name, module in model.named_modules() if name and hasattr(module, "spec")}
    manifest = {
        "format_version": FORMAT_VERSION,
        "model": model_name,
        "model_kwargs": model_kwargs or {},
        "folded_batchnorm": [list(pair) for pair in folded],
        "layers": layers,
    }
    weights_tmp = out / f".{WEIGHTS_NAME}.tmp{os.getpid()}"
    manifest_tmp = out / f".{MANIFEST_NAME}.tmp{os.getpid()}"
    try:
        torch.save(model.state_dict(), weights_tmp)
        manifest["checksums"] = {"weights_sha256": _file_sha256(weights_tmp), "surgery_sha256": _surgery_sha256(manifest)}
        manifest_tmp.write_text(json.dumps(manifest, indent=2) + "\n")
        os.replace(weights_tmp, out / WEIGHTS_NAME)
        os.replace(manifest_tmp, out / MANIFEST_NAME)
    finally:
        for tmp in (weights_tmp, manifest_tmp):
            tmp.unlink(missing_ok=True)
    return out / MANIFEST_NAME


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _surgery_sha256(manifest: dict) -> str:
    """SHA-256 of the manifest's surgery (everything but its checksums), in a canonical JSON form."""
    fields = {key: value for key, value in manifest.items() if key != "checksums"}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def apply_manifest(model: nn.Module, manifest: dict) -> nn.Module:
    """Apply the manifest's surgery to an original architecture (in place): BatchNorms become Identity and
    their convs gain a bias; factorized layers replace the originals with uninitialised chains.

    Raises ValueError when a name does not fit the architecture: a folded pair that is not (Conv2d or
    Linear, BatchNorm), or a factorized layer that is not a Conv2d / Linear of the model.
    """
    for pair in manifest["folded_batchnorm"]:
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            raise ValueError(f"manifest folded_batchnorm entry {pair!r} is not a [conv, batchnorm] pair of names")
        conv_name, bn_name = pair
        conv, bn = _module(model, conv_name, "folded conv"), _module(model, bn_name, "folded BatchNorm")
        if not isinstance(conv, (nn.Conv2d, nn.Linear)):
            raise ValueError(f"manifest folds BatchNorm {bn_name!r} into {conv_name!r}, which is a "
                             f"{type(conv).__name__}, not a Conv2d/Linear: the manifest does not fit this architecture")
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
            raise ValueError(f"manifest names {bn_name!r} as the BatchNorm folded into {conv_name!r}, but it is a "
                             f"{type(bn).__name__}: the manifest does not fit this architecture")
        if conv.bias is None:
            out_features = conv.out_channels if isinstance(conv, nn.Conv2d) else conv.out_features
            conv.bias = nn.Parameter(torch.zeros(out_features, dtype=conv.weight.dtype))
        set_module(model, bn_name, nn.Identity())
    for name, spec in manifest["layers"].items():
        original = _module(model, name, "factorized layer")
        if not isinstance(original, (nn.Conv2d, nn.Linear)):
            raise ValueError(f"manifest factorizes {name!r}, which is a {type(original).__name__} in this "
                             f"architecture, not a Conv2d/Linear: the manifest does not fit it")
        set_module(model, name, chain_from_spec(spec))
    return model


def _module(model: nn.Module, name: str, role: str) -> nn.Module:
    try:
        return get_module(model, name)
    except AttributeError:
        raise ValueError(f"manifest names {role} {name!r}, which {type(model).__name__} does not have: the manifest "
                         f"belongs to another architecture") from None


def _check_shapes(manifest: dict, state: dict, weights_path: Path) -> None:
    """Compare every factorized layer's parameter shapes (built on the meta device: nothing is allocated)
    with the state_dict's before anything is built for real."""
    for name, spec in manifest["layers"].items():
        with torch.device("meta"):
            chain = chain_from_spec(spec)
        for key, tensor in chain.state_dict().items():
            full = f"{name}.{key}"
            if full not in state:
                raise ValueError(f"{weights_path} has no {full} but the manifest's layer {name!r} needs it: the "
                                 f"manifest and the weights are from different runs")
            if tuple(state[full].shape) != tuple(tensor.shape):
                raise ValueError(f"{full}: the manifest describes shape {tuple(tensor.shape)} but {weights_path} "
                                 f"holds {tuple(state[full].shape)}: the manifest and the weights are from "
                                 f"different runs")


def load_approximated(path: str | Path, model: nn.Module | Callable[[dict], nn.Module] | None = None) -> nn.Module:
    """Rebuild a saved approximated model in eval mode.

    Parameters
    ----------
    path : the directory written by :func:`save_approximated` (or its manifest.json)
    model : the original architecture (any weights; the manifest's surgery is applied to it in place), or a
        function that builds it from the manifest (a dict; its ``model`` and ``model_kwargs`` are what
        :func:`save_approximated` was given), called once the manifest and the weights have been checked.
        Required: the package knows no model by name. For the bundled models and torchvision names,
        :func:`lowrank_fm.zoo.models.load_bundled_approximated` builds the manifest's model.

    Raises
    ------
    ValueError : no ``model``; a damaged or edited manifest or weights file (checksums, shapes); weights that
        do not fit the architecture.
    FileNotFoundError : the manifest or the weights are missing.
    """
    if model is None:
        raise ValueError("load_approximated: pass model= (the original architecture, or a function building it "
                         "from the manifest); for a bundled or torchvision model name use "
                         "lowrank_fm.zoo.models.load_bundled_approximated(path)")
    if not (isinstance(model, nn.Module) or callable(model)):
        raise TypeError(f"load_approximated: model must be an nn.Module or a function of the manifest returning one, "
                        f"got {type(model).__name__}")
    path = Path(path)
    directory = path.parent if path.is_file() else path
    manifest_path = directory / MANIFEST_NAME
    weights_path = directory / WEIGHTS_NAME
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{manifest_path} not found: pass the --out directory of an approximation run")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{manifest_path} is not valid JSON ({error}): the file is truncated or damaged; "
                         f"restore it or run the approximation again") from None
    if not isinstance(manifest, dict):
        raise ValueError(f"{manifest_path} holds a {type(manifest).__name__}, not a manifest object")
    version = manifest.get("format_version")
    if version not in (1, FORMAT_VERSION):
        raise ValueError(f"{manifest_path}: format_version {version} is not {FORMAT_VERSION}")
    for key, kind in (("folded_batchnorm", list), ("layers", dict)):
        if not isinstance(manifest.get(key), kind):
            raise ValueError(f"{manifest_path}: '{key}' is missing or not a {kind.__name__}: the manifest is damaged")
    if not weights_path.is_file():
        raise FileNotFoundError(f"{weights_path} not found beside {manifest_path}")
    checksums = manifest.get("checksums")
    if version == FORMAT_VERSION:
        if not isinstance(checksums, dict):
            raise ValueError(f"{manifest_path} has no checksums: the manifest is damaged")
        if checksums.get("surgery_sha256") != _surgery_sha256(manifest):
            raise ValueError(f"{manifest_path} does not match its checksum: it was edited or damaged after it was "
                             f"saved (layer shapes, padding, folded BatchNorm...); restore it or run the "
                             f"approximation again")
        if checksums.get("weights_sha256") != _file_sha256(weights_path):
            raise ValueError(f"{weights_path} does not match the checksum in {manifest_path}: the weights were "
                             f"replaced or damaged after saving; restore them or run the approximation again")
    else:
        log.warning("%s has format_version 1 (no checksums): its surgery and weights cannot be verified",
                    manifest_path)
    try:
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
    except Exception as error:  # a text file, a truncated zip, a pickle of other objects
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ValueError(f"{weights_path} is not a state_dict saved by torch.save ({type(error).__name__}: "
                         f"{first}); restore it or run the approximation again") from None
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"{weights_path} is not a state_dict (a dict of tensors), got {type(state).__name__}")
    _check_shapes(manifest, state, weights_path)
    if not isinstance(model, nn.Module):
        model = model(manifest)
    apply_manifest(model, manifest)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError:
        raise ValueError(f"{weights_path} does not fit the architecture rebuilt from {manifest_path}: "
                         f"{state_dict_diff(model, state)}") from None
    return model.eval()


def state_dict_diff(model: nn.Module, state: dict, limit: int = 5) -> str:
    """Which keys are missing, unexpected, or of another shape, between ``model`` and ``state``."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {tuple(state[k].shape)} in the file, {tuple(v.shape)} expected" for k, v in expected.items()
              if k in state and tuple(state[k].shape) != tuple(v.shape)]
    parts = []
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shapes differ", shapes)):
        if items:
            more = f" and {len(items) - limit} more" if len(items) > limit else ""
            parts.append(f"{label}: {', '.join(items[:limit])}{more}")
    return "; ".join(parts) or "no key or shape differs"
