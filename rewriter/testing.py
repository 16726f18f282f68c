"""Helpers for users' own test suites (and ours): merge equivalence, lock drift, Hypothesis
strategies for a traced model's inputs, stand-alone sites.  See ``examples/test_my_rules.py``.

    from rewriter.testing import assert_lock_holds, assert_merge_equivalent, model_inputs
    def test_my_rules_merge_exactly(adapted):
        assert_merge_equivalent(adapted)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .adapted import Adapted
from .check import check_merge
from .core.graph import fold_site, run_site
from .core.sites import Site
from .core.tolerance import matmul_tolerance
from .core.tracing import trace_model
from .errors import RewriterError
from .lock import check_lock, read_lock
from .models import load_model


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


def assert_merge_equivalent(adapted, inputs=None, atol: float | None = None, adapter_names=None):
    """Fail with the per-site table when any site's merged output differs from the unmerged one,
    for the active adapters (or ``adapter_names``) stacked; ``inputs`` default to the traced
    example.  Fresh adapters are no-ops: train or ``rewriter.check.perturb`` them first."""
    report = check_merge(adapted, inputs=inputs, atol=atol, adapter_names=adapter_names)
    assert report.ok, "merge equivalence failed:\n" + report.format()
    return report


def assert_lock_holds(lock_path, adapted=None):
    """Fail with the site-by-site drift when the rule files of a lock (``rewriter lock``) no longer
    resolve to the locked plan: on ``adapted``'s base graph, or by default on the lock's model."""
    lock = read_lock(lock_path)
    if adapted is None:
        dtype = getattr(torch, lock.dtype) if lock.dtype else None
        adapted = Adapted(trace_model(load_model(lock.model, dtype=dtype)))
    report = check_lock(lock, adapted)
    assert report.ok, report.format()
    return report


# ---- Hypothesis strategies ----------------------------------------------------------------------

def model_inputs(model, *, max_size: int = 16):
    """A Hypothesis strategy of inputs for a traced model (an ``Adapted`` or a ``Traced``).

    Every dynamic dimension is drawn within the range torch.export allowed for it (capped at
    ``max_size``); dimensions that must agree (one symbol, or the same position with the same
    example size, such as the batch of ``input_ids`` and ``attention_mask``) get one size.  Token
    ids (``*input_ids``) come from the model's vocabulary, other integer inputs from the range of
    their example (an all-ones attention mask stays all ones), floats from a standard normal.
    Draws a dict of keyword tensors, or a tuple for a model traced with positional inputs::

        @given(data=st.data())
        def test_merge_on_any_input(data):
            assert_merge_equivalent(adapted, inputs=data.draw(model_inputs(adapted)))
    """
    from hypothesis import strategies as st  # an optional dependency, for users' test suites
    traced = getattr(model, "traced", model)
    if not traced.example_inputs:
        raise RewriterError("this model was given as a GraphModule, so there are no example inputs to draw like",
                            fix="build it with rewriter.apply(model, rules, example_inputs=...)")
    layout, ranges = _input_layout(traced, max_size)
    vocab = _vocab_size(traced.source)

    @st.composite
    def inputs(draw):
        sizes = {group: draw(st.integers(lo, hi)) for group, (lo, hi) in ranges.items()}
        gen = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 31 - 1)))
        out = {name: _random_like(name, example, [sizes.get(d, d) for d in dims], gen, vocab)
               for name, (example, dims) in layout.items()}
        return tuple(out.values()) if traced.positional else out

    return inputs()


def _input_layout(traced, max_size: int):
    """Per tensor input: its example and its dims (an int, or the group of a dynamic dim); per
    group: the (low, high) range of its size."""
    examples = {k: v for k, v in traced.example_inputs.items() if isinstance(v, torch.Tensor)}
    holders = [n for n in traced.gm.graph.nodes
               if n.op == "placeholder" and isinstance(n.meta.get("val"), torch.Tensor)]
    by_name = {n.target: n for n in holders}
    nodes = holders if traced.positional else [by_name.get(k) for k in examples]
    parent: dict = {}

    def find(x):
        while parent.setdefault(x, x) != x:
            x = parent[x]
        return x

    symbolic = []  # (input, dim index, symbol)
    for (name, example), node in zip(examples.items(), nodes):
        for i, size in enumerate(node.meta["val"].shape if node is not None else ()):
            if isinstance(size, torch.SymInt) and size.node.expr.is_Symbol:
                symbolic.append((name, i, size.node))
                parent[find(("sym", str(size.node.expr)))] = find(("pos", i, example.shape[i]))
    layout = {name: (example, list(example.shape)) for name, example in examples.items()}
    ranges: dict = {}
    for name, i, sym in symbolic:
        group = find(("sym", str(sym.expr)))
        layout[name][1][i] = group
        bounds = sym.shape_env.var_to_range[sym.expr]
        lo, hi = ranges.get(group, (0, max_size))
        ranges[group] = (max(lo, int(bounds.lower)), min(hi, int(bounds.upper) if bounds.upper.is_Integer else hi))
    return layout, {g: (lo, max(lo, hi)) for g, (lo, hi) in ranges.items()}


def _vocab_size(model) -> int | None:
    config = getattr(model, "config", None)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(config, "vocab_size", None)


def _random_like(name: str, example: torch.Tensor, shape, gen, vocab: int | None) -> torch.Tensor:
    if example.is_floating_point():
        return torch.randn(shape, generator=gen).to(example.dtype)
    if name.endswith("input_ids") and vocab:
        low, high = 0, vocab
    else:
        low, high = (int(example.min()), int(example.max()) + 1) if example.numel() else (0, 1)
    return torch.randint(low, high, shape, generator=gen).to(example.dtype)
