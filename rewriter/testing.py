"""Helpers for users' own test suites (and ours): build sites, check merge equivalence.

    from rewriter.testing import assert_merge_equivalent
    def test_my_rules_merge_exactly(adapted):
        assert_merge_equivalent(adapted)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .graph import fold_site, run_site
from .sites import Site
from .tolerance import matmul_tolerance


def make_site(in_features: int, out_features: int, *, dtype: torch.dtype = torch.float32, name: str = "layer",
              op: str = "linear", bias: bool = True) -> Site:
    """A stand-alone site, for testing adapter modules without a model."""
    return Site(name=name, weight=f"{name}.weight", bias=f"{name}.bias" if bias else None, op=op,
                in_features=in_features, out_features=out_features, layer=None, dtype=dtype, nodes=())


@torch.no_grad()
def fold_magnitude(weight: torch.Tensor, bias, modules) -> torch.Tensor:
    """``|W| + sum_k |W_k - W_(k-1)|`` over the fold steps: the size of the terms the merged and
    unmerged forms add up, so the tolerance does not shrink when terms cancel."""
    w = weight.detach().float()
    b = bias.detach().float() if bias is not None else None
    total = w.abs()
    for module in modules:
        w_next, b = module.fold(w, b)
        total = total + (w_next - w).abs()
        w = w_next
    return total


def site_merge_error(x: torch.Tensor, weight: torch.Tensor, bias, modules) -> tuple[float, float]:
    """(max |unmerged - merged|, tolerance) for one site; ``weight`` is ``[out, in]``."""
    with torch.no_grad():
        unmerged = run_site(x, weight, bias, modules)
        w, b = fold_site(weight, bias, modules)
        merged = F.linear(x.to(w.dtype), w, b)
        err = (unmerged.float() - merged.float()).abs().max().item()
        tol = matmul_tolerance(x, fold_magnitude(weight, bias, modules), weight.dtype)
        if bias is not None:  # the bias adds one more rounding of its own size
            tol += torch.finfo(weight.dtype).eps * fold_bias_scale(bias, modules)
    return err, tol


def fold_bias_scale(bias, modules) -> float:
    b = bias.detach().float()
    scale = b.abs().max().item()
    for module in modules:
        _, b = module.fold(torch.zeros(module.out_features, module.in_features), b)
        scale = max(scale, b.abs().max().item())
    return scale


def assert_site_merge_equivalent(x, weight, bias, modules) -> None:
    err, tol = site_merge_error(x, weight, bias, modules)
    assert err <= tol, f"merged and unmerged differ by {err:.3e} > tolerance {tol:.3e}"


def assert_merge_equivalent(adapted, inputs=None, atol: float | None = None):
    """Fail with the per-site table when any site's merged output differs from the unmerged one."""
    from .check import check_merge
    report = check_merge(adapted, inputs=inputs, atol=atol)
    assert report.ok, "merge equivalence failed:\n" + report.format()
    return report
