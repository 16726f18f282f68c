"""Validate-then-copy: tensors go into modules only once every key, shape and value fits."""
from __future__ import annotations

from typing import Any, Callable, Mapping

import torch

from ..errors import CheckpointError


def cast_checked(tensor: torch.Tensor, like: torch.Tensor, key: str, where: str) -> torch.Tensor:
    """``tensor`` in ``like``'s dtype and device; a finite value that overflows there is refused."""
    out = tensor.to(dtype=like.dtype, device=like.device)
    if out.is_floating_point() and not torch.isfinite(out).all():
        raise CheckpointError(f"tensor '{key}' ({tensor.dtype}) has values too large for {like.dtype}", where=where,
                              fix="the adapter diverged or was saved in a wider dtype than this model can hold")
    return out


def fill_modules(modules: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], key_of: Callable[[str, str], str],
                 where: str) -> None:
    """Copy ``tensors`` into ``modules`` after checking every key and shape; raise naming the
    modules with missing, unexpected or mismatched keys, and change nothing in that case."""
    expected = {}
    for site, module in modules.items():
        for param, value in module.state_dict().items():
            expected[key_of(site, param)] = (site, param, value)
    missing = sorted(k for k in expected if k not in tensors)
    unexpected = sorted(k for k in tensors if k not in expected)
    mismatched = [f"{k}: checkpoint {tuple(tensors[k].shape)} vs model {tuple(v[2].shape)}"
                  for k, v in expected.items() if k in tensors and tuple(tensors[k].shape) != tuple(v[2].shape)]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} key(s): {', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} key(s): {', '.join(unexpected[:6])}"
                        f"{' ...' if len(unexpected) > 6 else ''}")
    if mismatched:
        problems.append(f"shape mismatch: {'; '.join(mismatched[:6])}")
    if problems:
        raise CheckpointError("checkpoint does not fit the model: " + " | ".join(problems), where=where,
                              fix="load it onto the model (and rules) it was trained for; if the model's modules "
                                  "were renamed, pass remap= (CLI: --remap) with a [remap] table")
    cast = {key: cast_checked(tensors[key], value, key, where) for key, (_, _, value) in expected.items()}
    with torch.no_grad():
        for key, (site, param, value) in expected.items():
            value.copy_(cast[key])
