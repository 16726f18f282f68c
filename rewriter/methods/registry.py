"""The method registry: every module under ``rewriter/methods/`` registers its spec on import."""
from __future__ import annotations

import difflib
import importlib
import pkgutil

from ..errors import RewriterError
from .base import MethodSpec

METHODS: dict[str, MethodSpec] = {}
_NOT_METHODS = {"base", "registry", "checks"}
_loaded = False


def register(spec: MethodSpec) -> MethodSpec:
    if spec.name in METHODS and METHODS[spec.name] is not spec:
        raise RuntimeError(f"method '{spec.name}' registered twice")
    METHODS[spec.name] = spec
    return spec


def load_all() -> None:
    """Import every method module (each registers itself)."""
    global _loaded
    if _loaded:
        return
    package = __name__.rpartition(".")[0]
    path = importlib.import_module(package).__path__
    for info in pkgutil.iter_modules(path):
        if info.name not in _NOT_METHODS and not info.name.startswith("_"):
            importlib.import_module(f"{package}.{info.name}")
    _loaded = True


def get_method(name: str) -> MethodSpec:
    load_all()
    if name not in METHODS:
        close = difflib.get_close_matches(name, list(METHODS), n=1)
        raise RewriterError(
            f"unknown method '{name}'",
            fix=(f"did you mean '{close[0]}'? " if close else "") + f"available: {', '.join(sorted(METHODS))}",
        )
    return METHODS[name]
