"""Adapter files on disk: atomic writes, safetensors only (never pickle), validated reads."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Mapping, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save as st_save

from ..errors import CheckpointError

#: the two files of a PEFT adapter directory
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
#: weight files rewriter refuses to read: they are pickles, and pickles run code when loaded
PICKLE_NAMES = ("adapter_model.bin", "pytorch_model.bin", "adapter.bin", "adapter.pt", "adapter.pth")


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file in the same directory and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def remove_leftover_temps(directory: Path, names: Sequence[str]) -> None:
    """Delete the temp files :func:`atomic_write` left for ``names`` (glob patterns) when a process was
    killed mid-write; a save calls it once its own files are in place."""
    for name in names:
        for junk in directory.glob(f".{name}.*.tmp"):
            junk.unlink(missing_ok=True)


def tensor_bytes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> bytes:
    return st_save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=dict(metadata or {}))


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():
        for name in PICKLE_NAMES:
            if (path.parent / name).exists():
                raise CheckpointError(f"found '{name}', a pickle file; rewriter never unpickles",
                                      where=str(path.parent),
                                      fix="convert it to safetensors in a trusted environment (safetensors.torch.save_file)")
        raise CheckpointError("weights file is missing", where=str(path))
    try:
        out = {}
        with safe_open(str(path), framework="pt") as fh:
            for key in fh.keys():
                out[key] = fh.get_tensor(key)
        return out
    except Exception as exc:  # safetensors raises several types for corrupt files
        raise CheckpointError(f"not a valid safetensors file ({type(exc).__name__}: {str(exc)[:200]})",
                              where=str(path), fix="the file is truncated or corrupt: save the adapter again") from None


def check_finite(tensors: Mapping[str, torch.Tensor], where: str) -> None:
    for key, t in tensors.items():
        if not t.is_floating_point():
            raise CheckpointError(f"tensor '{key}' has dtype {t.dtype}; adapter weights must be floating point",
                                  where=where)
        if not torch.isfinite(t.float() if t.element_size() == 1 else t).all():  # no isfinite for float8
            raise CheckpointError(f"tensor '{key}' contains NaN or Inf", where=where,
                                  fix="the adapter diverged or the file is corrupt; use an earlier checkpoint")
