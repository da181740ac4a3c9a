"""Decomposition methods, one file each, registered by name.

A new method is one new file (a :class:`~lowrank_fm.methods.base.Method` subclass) plus one line in
``_REGISTRY`` below; the pipeline, the CLI and the tests reach it through :func:`get_method`.
"""

from __future__ import annotations

from .base import InputStats, LayerContext, Method, ResponseStats
from .alds import ALDS
from .alds_sigma import ALDSSigma
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

__all__ = ["get_method", "list_methods", "register_method", "Method", "LayerContext", "ResponseStats", "InputStats"]

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


def get_method(name: str, config=None) -> Method:
    """A new instance of the method registered as ``name`` (``config``: the run's ApproxConfig, for options)."""
    try:
        return _REGISTRY[name](config)
    except KeyError:
        raise ValueError(f"method must be one of {list_methods()}, got {name!r}") from None


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
