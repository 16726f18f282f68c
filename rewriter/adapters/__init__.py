"""The adapter engine: adapter state as data, the live graph as a function of it, and
:class:`AdaptedModel`, which performs state changes.  No files, no HF: features sit above."""
from __future__ import annotations

from .model import AdaptedModel, adapter_dtype_for
from .state import AdapterRecord, AdapterState
from .trained import TRAINED_ATTR
from .weighted import add_weighted_adapter

__all__ = ["AdaptedModel", "AdapterRecord", "AdapterState", "TRAINED_ATTR", "adapter_dtype_for",
           "add_weighted_adapter"]
