"""Adapter checkpoints: rewriter's own format and PEFT's, safetensors only.

One adapter goes in the directory itself, several in one sub-directory each.  Loading reads and
validates every adapter found before any is installed.  Method-specific data goes through the
method's hooks (``MethodSpec.checkpoint_hooks``, ``MethodSpec.peft_layout``): nothing here knows
a method by name."""
from __future__ import annotations

from ..core.files import PEFT_CONFIG, PEFT_WEIGHTS, atomic_write, read_tensors
from ..core.statedict import fill_modules
from .common import FORMAT_VERSION, MANIFEST, PEFT_PREFIX
from .dispatch import adapter_dirs, load_adapter_into, read_adapter_modules, save_adapter
from .peft import save_modules_peft

__all__ = ["MANIFEST", "PEFT_CONFIG", "PEFT_WEIGHTS", "PEFT_PREFIX", "FORMAT_VERSION", "save_adapter",
           "load_adapter_into", "read_adapter_modules", "adapter_dirs", "save_modules_peft", "atomic_write",
           "read_tensors", "fill_modules"]
