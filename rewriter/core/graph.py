"""The rewrite pass: a pristine base graph plus adapter stacks -> the live graph.

The live graph is regenerated whenever the adapter state changes (active set,
merge, disable), so it is always straight-line code for one configuration: no
Python branching on adapter state inside the forward.

One function, :func:`chain`, describes how a site's stacked adapters compute; it
drives both the graph emitter and the eager evaluator used by checks and tests.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence, TypeVar, cast

import torch
import torch.nn.functional as F
from torch import fx
from torch.fx.node import Argument, Target

from ..errors import MergeError
from .adapter import AdapterModule
from .sites import Operands, Site, site_operands

ADAPTERS_ATTR = "rewriter_adapters"
MERGED_ATTR = "rewriter_merged"
MIX_ATTR = "rewriter_mix"


@dataclass(frozen=True)
class StackEntry:
    """One adapter at one site, in a concrete graph."""
    target: str            #: submodule path in the GraphModule
    module: AdapterModule
    meta: dict[str, Any]   #: provenance stamped on inserted nodes
    gate: str | None = None  #: mixed batches: path of this adapter's per-sample mask buffer


#: what :func:`chain` computes with: tensors (eager) or graph arguments (emitted nodes)
V = TypeVar("V")


class _Ops(Protocol[V]):
    """What :func:`chain` needs: pre/post hooks, the base op, a final cast."""

    def pre(self, entry: StackEntry, x: V) -> V: ...
    def post(self, entry: StackEntry, x: V, y: V | None, bias: V | None, with_weight: bool) -> V: ...
    def base(self, x: V) -> V: ...
    def cast(self, y: V, dtype: torch.dtype) -> V: ...
    def fold_bias(self, entry: StackEntry, bias: V | None) -> V | None: ...


def chain(ops: _Ops[V], x: V, bias: V | None, stack: Sequence[StackEntry], out_dtype: torch.dtype | None) -> V:
    """Stacked adapters ``f_1..f_n`` (bottom to top) compute ``W_eff = f_n(...f_1(W))``:
    level k sees input ``x_k`` (after the input transforms of the levels above it),
    pre-transforms it for the levels below, and post-processes their output.

    Gated entries (mixed batches) each act on their own samples only, so every sample sees
    exactly one adapter: no level sees another's weight or bias.

    An additive ``needs_weight`` adapter only uses the weight to fold its delta into the base
    matmul when it is the lowest; above others it gets ``weight=None`` and adds its delta to ``y``."""
    gated = any(e.gate for e in stack)
    for k, entry in enumerate(stack):
        if entry.module.needs_weight and not entry.module.additive and k > 0 and not gated:
            raise MergeError(f"{type(entry.module).__name__} reads the layer weight, so it must be the lowest "
                             "unmerged adapter on its site", fix="merge or remove the adapters below it first")
    xs = [x] * (len(stack) + 1)
    for k in reversed(range(len(stack))):
        xs[k] = ops.pre(stack[k], xs[k + 1]) if stack[k].module.has_pre else xs[k + 1]
    skip_base = bool(stack) and stack[0].module.replaces_base and not gated
    y = None if skip_base else ops.base(xs[0])
    for k, entry in enumerate(stack):
        if entry.module.has_post:
            y = ops.post(entry, xs[k + 1], y, bias, with_weight=entry.module.needs_weight and (k == 0 or gated))
        if not gated and any(e.module.reads_bias for e in stack[k + 1:]):  # hand on the bias this level leaves
            bias = ops.fold_bias(entry, bias)
    y = cast(V, y)  # None only if the lowest adapter replaced the base and no level had a post: none does that
    if out_dtype is not None and any(e.module.adapter_dtype != out_dtype for e in stack):
        y = ops.cast(y, out_dtype)
    return y


class _EagerOps(_Ops[torch.Tensor]):
    def __init__(self, base: Callable[[torch.Tensor], torch.Tensor], weight: torch.Tensor) -> None:
        self._base, self.weight = base, weight  # an instance attribute may not shadow the method base

    def base(self, x: torch.Tensor) -> torch.Tensor:
        return self._base(x)

    # Module.__call__ is typed as returning Any: the adapter stages return tensors here
    def pre(self, entry: StackEntry, x: torch.Tensor) -> torch.Tensor:
        return cast(torch.Tensor, entry.module(x, stage="pre"))

    def post(self, entry: StackEntry, x: torch.Tensor, y: torch.Tensor | None, bias: torch.Tensor | None,
             with_weight: bool) -> torch.Tensor:
        if entry.module.needs_weight:
            return cast(torch.Tensor,
                        entry.module(x, y, bias, stage="post", weight=self.weight if with_weight else None))
        return cast(torch.Tensor, entry.module(x, y, bias, stage="post"))

    def cast(self, y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return y.to(dtype)

    def fold_bias(self, entry: StackEntry, bias: torch.Tensor | None) -> torch.Tensor | None:
        return entry.module.fold_bias(bias)


def run_site(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, modules: Sequence[AdapterModule],
             *, fan_in_fan_out: bool = False) -> torch.Tensor:
    """Evaluate a site eagerly: base matmul plus stacked adapter modules (bottom to top).
    ``weight`` is in the site's own layout (``[in, out]`` when ``fan_in_fan_out``)."""
    if fan_in_fan_out:
        def base(inp: torch.Tensor) -> torch.Tensor:
            flat = inp.reshape(-1, inp.shape[-1])
            out = torch.addmm(bias, flat, weight) if bias is not None else flat @ weight
            return out.reshape(*inp.shape[:-1], weight.shape[1])
    else:
        def base(inp: torch.Tensor) -> torch.Tensor:
            return F.linear(inp, weight, bias)
    stack = [StackEntry("", m, {}) for m in modules]
    return chain(_EagerOps(base, weight.t() if fan_in_fan_out else weight), x, bias, stack, weight.dtype)


def fold_site(weight: torch.Tensor, bias: torch.Tensor | None, modules: Sequence[AdapterModule], *,
              fan_in_fan_out: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Fold stacked modules into ``(weight, bias)`` in float32, cast once to the weight dtype."""
    w = weight.detach().float()
    w = w.t() if fan_in_fan_out else w
    b = bias.detach().float() if bias is not None else None
    for module in modules:
        w, b = module.fold(w, b)
    w = w.t() if fan_in_fan_out else w
    # a fold keeps a missing bias missing: b is a tensor only where bias is one
    return w.to(weight.dtype).contiguous(), (b.to(cast(torch.Tensor, bias).dtype) if b is not None else None)


class _GraphOps(_Ops[Argument]):
    """Emits the chain as graph nodes: pre hooks before the site node, posts after it."""

    def __init__(self, graph: fx.Graph, node: fx.Node, x_index: int, weight: fx.Node, transposed: bool) -> None:
        self.graph, self.node, self.x_index = graph, node, x_index
        self.input = node.args[x_index]  # before a pre hook takes its place
        self.weight, self.transposed = weight, transposed
        self.last = node

    def _stamp(self, new: fx.Node, entry: StackEntry) -> fx.Node:
        new.meta["rewrite"] = dict(entry.meta)
        for key in ("nn_module_stack", "stack_trace"):
            if key in self.node.meta:
                new.meta[key] = self.node.meta[key]
        return new

    def _after(self, op: str, target: Target, args: tuple[Argument, ...],
               kwargs: dict[str, Argument] | None = None) -> fx.Node:
        with self.graph.inserting_after(self.last):
            self.last = self.graph.create_node(op, target, args, kwargs)
        return self.last

    def _recompute(self, x: Argument) -> dict[str, Argument]:
        """``recompute=(a, b)`` when the adapter's input is the site input ``a * b`` (rewriter.recompute)."""
        if x is self.input and isinstance(x, fx.Node) and x.op == "call_function" \
                and x.target is torch.ops.aten.mul.Tensor and len(x.args) == 2 \
                and all(isinstance(a, fx.Node) for a in x.args):
            return {"recompute": tuple(x.args)}
        return {}

    def pre(self, entry: StackEntry, x: Argument) -> fx.Node:
        with self.graph.inserting_before(self.node):
            new = self._stamp(self.graph.call_module(entry.target, (x,), {"stage": "pre", **self._recompute(x)}),
                              entry)
            if entry.gate:
                new = self.graph.call_function(gate_rows, (self.graph.get_attr(entry.gate), new, x))
            return new

    def post(self, entry: StackEntry, x: Argument, y: Argument, bias: Argument, with_weight: bool) -> fx.Node:
        kwargs: dict[str, Argument] = {"stage": "post", **self._recompute(x)}
        if entry.module.needs_weight:
            weight = self.weight if with_weight else None
            if weight is not None and self.transposed:  # modules always see [out, in]
                with self.graph.inserting_before(self.node):
                    weight = self.graph.call_method("t", (weight,))
            kwargs["weight"] = weight
        y_in = y
        if entry.gate:  # a post may add into y in place (add_into); gate_rows needs y as it was
            y_in = self._after("call_method", "clone", (y,))
        new = self._stamp(self._after("call_module", entry.target, (x, y_in, bias), kwargs), entry)
        if entry.gate:
            mask = self._after("get_attr", entry.gate, ())
            new = self._after("call_function", gate_rows, (mask, new, y))
        return new

    def base(self, x: Argument) -> fx.Node:
        self.node.update_arg(self.x_index, x)
        return self.node

    def cast(self, y: Argument, dtype: torch.dtype) -> fx.Node:
        return self._after("call_method", "to", (y, dtype))

    def fold_bias(self, entry: StackEntry, bias: Argument) -> Argument:
        if type(entry.module).fold_bias is AdapterModule.fold_bias:
            return bias  # unchanged: no node needed
        return self._stamp(self._after("call_module", entry.target, (bias,), {"stage": "bias"}), entry)


def gate_rows(mask: torch.Tensor, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """Per-sample choice between an adapter's output and the input it got.  ``mask`` is one bool
    per sample; rows are samples, or samples x tokens for flattened (Conv1D) activations."""
    rows = new.shape[0]
    if rows != mask.shape[0]:
        mask = mask.repeat_interleave(rows // mask.shape[0])
    mask = mask.view(rows, *([1] * (new.dim() - 1)))
    return torch.where(mask, new, old.to(new.dtype))


def copy_graph(graph: fx.Graph) -> fx.Graph:
    new = fx.Graph()
    out = new.graph_copy(graph, {}, return_output_node=True)
    if isinstance(out, tuple):
        value, old_output = out
        new.output(value, type_expr=old_output.type)
        new_output = next(iter(reversed(new.nodes)))
        new_output.meta = copy.copy(old_output.meta)
    else:
        new.output(out)
    new._codegen = copy.deepcopy(graph._codegen)
    return new


def build_graph(base: fx.Graph, sites: dict[str, Site], stacks: dict[str, list[StackEntry]],
                merged: dict[str, tuple[str, str | None]]) -> fx.Graph:
    """A copy of ``base`` with adapter stacks inserted at sites and merged weights swapped in.

    ``stacks``: site name -> entries bottom to top; ``merged``: site name -> attribute paths
    of the folded (weight, bias) to use instead of the originals.
    """
    graph = copy_graph(base)
    by_node = {n: s for s in sites.values() for n in s.nodes}
    for node in list(graph.nodes):
        if node.name not in by_node:
            continue
        site = by_node[node.name]
        x, w, b, op = cast(Operands, site_operands(node))  # a site node: operands are never None
        w_index, b_index, x_index = (1, 2, 0) if op == "linear" else (2, 0, 1)
        if site.name in merged:
            w_attr, b_attr = merged[site.name]
            with graph.inserting_before(node):
                node.update_arg(w_index, graph.get_attr(w_attr))
                if b_attr is not None:
                    b = graph.get_attr(b_attr)
                    if b_index < len(node.args):
                        node.update_arg(b_index, b)
                    else:
                        node.update_kwarg("bias", b)
        stack = stacks.get(site.name)
        if not stack:
            continue
        users = list(node.users)
        bias = node.args[b_index] if b_index < len(node.args) else node.kwargs.get("bias")
        val = node.meta.get("val")
        dtype = val.dtype if isinstance(val, torch.Tensor) else site.dtype  # symbolic_trace graphs have no val
        # the weight is a get_attr node; the chain's output is a node (the site's own, or an inserted one)
        ops = _GraphOps(graph, node, x_index, cast(fx.Node, node.args[w_index]), transposed=(op == "conv1d"))
        y = cast(fx.Node, chain(ops, x, bias, stack, dtype))
        for user in users:
            user.replace_input_with(node, y)
        if not node.users:  # the lowest adapter replaced the base matmul
            graph.erase_node(node)
    graph.lint()
    return graph
