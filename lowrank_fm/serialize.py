"""Save and load an approximated model without pickling code: a state_dict (read back with
``torch.load(weights_only=True)``) plus a JSON manifest of the surgery (folded BatchNorms, and the shape of
every factorized layer), applied to a freshly built architecture before loading the weights."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from .layers import chain_from_spec
from .surgery import get_module, set_module

__all__ = ["save_approximated", "load_approximated", "apply_manifest", "MANIFEST_NAME", "WEIGHTS_NAME"]

MANIFEST_NAME = "manifest.json"
WEIGHTS_NAME = "model_state.pt"
FORMAT_VERSION = 1


def save_approximated(
    model: nn.Module, out_dir: str | Path, *, folded: list, model_name: str | None = None, model_kwargs: dict | None = None
) -> Path:
    """Write ``model_state.pt`` and ``manifest.json`` into ``out_dir``; returns the manifest path.

    ``folded`` lists the (conv, batchnorm) names that were folded; factorized layers are found in the model
    by their ``spec()`` method.
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
    torch.save(model.state_dict(), out / WEIGHTS_NAME)
    (out / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    return out / MANIFEST_NAME


def apply_manifest(model: nn.Module, manifest: dict) -> nn.Module:
    """Apply the manifest's surgery to an original architecture (in place): BatchNorms become Identity and
    their convs gain a bias; factorized layers replace the originals with uninitialised chains."""
    for conv_name, bn_name in manifest["folded_batchnorm"]:
        conv = get_module(model, conv_name)
        if conv.bias is None:
            conv.bias = nn.Parameter(torch.zeros(conv.out_channels, dtype=conv.weight.dtype))
        set_module(model, bn_name, nn.Identity())
    for name, spec in manifest["layers"].items():
        set_module(model, name, chain_from_spec(spec))
    return model


def load_approximated(path: str | Path, model: nn.Module | None = None) -> nn.Module:
    """Rebuild a saved approximated model in eval mode.

    Parameters
    ----------
    path : the directory written by :func:`save_approximated` (or its manifest.json)
    model : the original architecture (any weights); when None, the manifest's model name is built with
        :func:`lowrank_fm.models.create_model` (bundled or torchvision names).
    """
    path = Path(path)
    directory = path.parent if path.is_file() else path
    manifest_path = directory / MANIFEST_NAME
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{manifest_path} not found: pass the --out directory of an approximation run")
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{manifest_path}: format_version {manifest.get('format_version')} is not {FORMAT_VERSION}")
    if model is None:
        if not manifest.get("model"):
            raise ValueError(f"{manifest_path} names no model: pass the original architecture as model=")
        from .models import create_model

        model = create_model(manifest["model"], weights="none", **manifest.get("model_kwargs", {}))
    apply_manifest(model, manifest)
    state = torch.load(directory / WEIGHTS_NAME, map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.eval()
