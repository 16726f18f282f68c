"""Adapter methods: one module each, registered in :data:`METHODS` on import."""
from __future__ import annotations

import importlib
import pkgutil

from .base import METHODS, AdapterModule, MethodSpec, get_method, register

_loaded = False


def load_all() -> None:
    """Import every method module in this package (each registers itself)."""
    global _loaded
    if _loaded:
        return
    for info in pkgutil.iter_modules(__path__):
        if info.name != "base" and not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")
    _loaded = True


__all__ = ["METHODS", "AdapterModule", "MethodSpec", "get_method", "register", "load_all"]
