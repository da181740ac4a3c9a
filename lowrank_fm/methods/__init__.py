"""Decomposition methods, one file each, registered by name.

A new method is one new file (a :class:`~lowrank_fm.methods.base.Method` subclass, with its ``Settings``
dataclass when it has options) plus one :func:`register_method` line below; the pipeline, the CLI and the
common method test (tests/test_method_contract.py) reach it through the registry.
"""

from __future__ import annotations

from .base import InputStats, LayerContext, Method, ResponseStats, settings_from
from .alds import ALDS
from .alds_sigma import ALDSSigma
from .auto import Auto
from .cp import CPDecomposition
from .cp_sigma import CPSigma
from .fm import FeatureMapLinear
from .fm3d import FeatureMap3D
from .fm_nonlinear import FeatureMap
from .spatial import SpatialSeparable
from .svd import TruncatedSVD
from .svd_sigma import SVDSigma
from .tucker import Tucker1, Tucker2
from .tucker2_sigma import Tucker2Sigma

__all__ = ["get_method", "list_methods", "register_method", "method_class", "Method", "LayerContext", "ResponseStats",
           "InputStats"]

_REGISTRY: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Register a Method subclass under ``cls.name``; a duplicate name raises."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in _REGISTRY:
        raise ValueError(f"method {cls.name!r} is already registered")
    _REGISTRY[cls.name] = cls
    return cls


def list_methods() -> list[str]:
    return sorted(_REGISTRY)


def method_class(name: str) -> type[Method]:
    """The class registered as ``name`` (ValueError listing the names otherwise)."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"method must be one of {list_methods()}, got {name!r}") from None


def get_method(name: str, settings=None, *, seed: int = 0) -> Method:
    """A new instance of the method registered as ``name``, with its settings (an instance of its
    ``Settings`` class, or a mapping of setting names to values; unknown names are refused) and the seed of
    anything random it does."""
    cls = method_class(name)
    return cls(settings_from(cls.Settings, settings), seed=seed)


register_method(FeatureMapLinear)
register_method(FeatureMap)
register_method(FeatureMap3D)
register_method(TruncatedSVD)
register_method(SpatialSeparable)
register_method(Tucker2)
register_method(Tucker1)
register_method(CPDecomposition)
register_method(SVDSigma)
register_method(Tucker2Sigma)
register_method(CPSigma)
register_method(ALDS)
register_method(ALDSSigma)
register_method(Auto)
