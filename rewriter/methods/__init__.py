"""Adapter methods: one module (or package) each, registered in :data:`METHODS` on import."""
from __future__ import annotations

from ..core.adapter import AdapterModule
from .base import SITE, GraphScope, MethodSpec
from .registry import METHODS, get_method, load_all, register

__all__ = ["METHODS", "AdapterModule", "MethodSpec", "GraphScope", "SITE", "get_method", "register", "load_all"]
