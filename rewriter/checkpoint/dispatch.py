"""Saving and loading adapter directories: which format, which adapters, all-or-nothing installs."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from ..core.files import PEFT_CONFIG
from ..errors import CheckpointError
from ..rules import read_remap
from ..rules.peft import method_for_peft_type
from .common import MANIFEST
from .native import load_one, save_one
from .peft import load_one_peft, save_one_peft


def save_adapter(adapted, directory, adapter_names: Sequence[str] | None = None, format: str = "rewriter") -> Path:
    """Save adapters (default: all) to ``directory``; one adapter goes in the directory itself,
    several in one sub-directory each.  ``format`` is "rewriter" or "peft"."""
    directory = Path(directory)
    names = list(adapter_names) if adapter_names is not None else list(adapted.adapters)
    if not names:
        raise CheckpointError("there is no adapter to save")
    for n in names:
        adapted.require(n)
    if format not in ("rewriter", "peft"):
        raise CheckpointError(f"unknown checkpoint format {format!r}", fix="use 'rewriter' or 'peft'")
    writer = save_one_peft if format == "peft" else save_one
    if len(names) == 1:
        writer(adapted, names[0], directory)
    else:
        for n in names:
            writer(adapted, n, directory / n)
    return directory


def adapter_dirs(directory: Path) -> list[Path]:
    """The adapter directories under ``directory``: itself (PEFT's "default") and/or one
    sub-directory per further adapter."""
    def is_adapter(p: Path) -> bool:
        return (p / MANIFEST).exists() or (p / PEFT_CONFIG).exists()

    found = [directory] if is_adapter(directory) else []
    if directory.is_dir() and not owns_subdirectories(directory):
        found += sorted(p for p in directory.iterdir() if p.is_dir() and is_adapter(p))
    if not found:
        raise CheckpointError("no adapter here: expected rewriter_adapter.json or adapter_config.json",
                              where=str(directory), fix="point at the directory save_adapter wrote")
    return found


def owns_subdirectories(directory: Path) -> bool:
    """True when the PEFT adapter here belongs to a method whose layout keeps parts of it in
    sub-directories (X-LoRA's experts): those are not adapters of their own."""
    try:
        peft_type = json.loads((directory / PEFT_CONFIG).read_text(encoding="utf-8")).get("peft_type")
        layout = method_for_peft_type(peft_type).peft_layout
    except (OSError, ValueError, AttributeError, CheckpointError):  # no or unreadable config: the loader says
        return False
    return layout is not None and layout.owns_subdirectories


def load_adapter_into(adapted, directory, adapter_name: str | None = None, *, activate: bool | None = None,
                      low_cpu_mem_usage: bool = False, remap=None) -> list[str]:
    """Load every adapter found in ``directory`` onto ``adapted``; returns their names.  ``remap``
    (a dict, or a TOML file with a ``[remap]`` table) renames the checkpoint's module names first."""
    remap = read_remap(remap)
    directory = Path(directory)
    dirs = adapter_dirs(directory)
    if adapter_name is not None and len(dirs) > 1:
        raise CheckpointError(f"{len(dirs)} adapters found; adapter_name applies to one", where=str(directory),
                              fix="point at one adapter's directory")
    staged = []  # (name, install): every adapter is read and validated before any is installed
    for d in dirs:
        loader = load_one if (d / MANIFEST).exists() else load_one_peft
        name = adapter_name or (d.name if d != directory else None)
        staged.append(loader(adapted, d, name, activate, low_cpu_mem_usage, remap))
    names = [name for name, _ in staged]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise CheckpointError(f"several adapters here are named {twice}", where=str(directory),
                              fix="load them one directory at a time with adapter_name=...")
    for _, install in staged:
        install()
    return names


def read_adapter_modules(adapted, directory, remap=None) -> dict:
    """The ``{site: module}`` of the one adapter in ``directory`` (either format), validated, not installed;
    ``remap`` renames its modules first (see :func:`load_adapter_into`)."""
    directory = Path(directory)
    if adapter_dirs(directory)[0] != directory:
        raise CheckpointError("expected one adapter here, not a directory of adapters", where=str(directory))
    name = "read_only"
    while name in adapted.adapters:
        name += "_"
    loader = load_one if (directory / MANIFEST).exists() else load_one_peft
    return loader(adapted, directory, name, False, False, read_remap(remap))[1].modules
