"""Tolerances derived from dtype and sizes, never hand-tuned.

A dot product of length n rounded in a dtype with unit roundoff u is off by at most
about ``u * sqrt(n) * sum_i |x_i w_i|`` for random rounding (``u * n * ...`` worst case).
Merged and unmerged forms round differently (one sum vs. two, a rounded merged weight),
so we allow a few such errors.
"""
from __future__ import annotations

import math

import torch

#: independent rounding steps allowed between the two forms
ROUNDINGS = 4


def unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


def matmul_tolerance(x: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype | None = None) -> float:
    """Allowed |difference| between two ways of computing ``x @ weight.T`` (weight ``[out, in]``)
    rounded in ``dtype`` (default: ``x``'s dtype)."""
    dtype = dtype or x.dtype
    n = weight.shape[-1]
    scale = (x.detach().abs().float().reshape(-1, n) @ weight.detach().abs().float().t()).max().item()
    return ROUNDINGS * unit_roundoff(dtype) * math.sqrt(n) * scale + torch.finfo(dtype).tiny


def output_tolerance(reference: torch.Tensor, dtype: torch.dtype, depth: int = 1) -> float:
    """Allowed |difference| of a model output after ``depth`` stacked layers whose weights
    were rounded independently: relative ``u * sqrt(depth)`` per layer, a few times over."""
    scale = reference.detach().abs().float().max().item()
    return 8 * ROUNDINGS * unit_roundoff(dtype) * math.sqrt(max(depth, 1)) * max(scale, 1.0)
