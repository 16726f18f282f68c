"""Sites: the weight-bearing matmuls of a graph that rules can target.

A site is identified by its weight (a parameter), not by the op: a weight used by
several ops is one site with several nodes, and tied weights used by non-matmul ops
(embeddings) are left alone.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.node import Argument

LINEAR_TARGETS = {torch.ops.aten.linear.default, F.linear}
ADDMM_TARGETS = {torch.ops.aten.addmm.default}
_WRAPPER_PREFIXES = ("_orig_mod.", "module.", "_checkpoint_wrapped_module.")
_LAYER_RE = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")
#: ``(x, weight, bias, op)`` of a matmul node (see :func:`site_operands`)
Operands = tuple[Argument, Argument, Argument, str]


@dataclass(frozen=True)
class Site:
    name: str              #: canonical module name, e.g. ``model.layers.0.self_attn.q_proj``
    weight: str            #: attribute path of the weight in the GraphModule
    bias: str | None       #: attribute path of the bias, if it is a parameter
    op: str                #: "linear" (W [out, in]) or "conv1d" (addmm with W [in, out])
    in_features: int
    out_features: int
    layer: int | None      #: first all-digit component of the name
    dtype: torch.dtype
    nodes: tuple[str, ...]  #: graph nodes that use the weight
    module_type: str = ""

    @property
    def fan_in_fan_out(self) -> bool:
        return self.op == "conv1d"

    @property
    def key(self) -> str:
        """Attribute-safe name used for inserted submodules."""
        return self.name.replace(".", "__")


def canonical_name(path: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if path.startswith(prefix):
                path, changed = path[len(prefix):], True
        path = path.replace("." + "_orig_mod.", ".")
    return path


def layer_index(name: str) -> int | None:
    m = _LAYER_RE.search(name)
    return int(m.group(1)) if m else None


def site_operands(node: fx.Node) -> Operands | None:
    """``(x, weight, bias, op)`` of a matmul node, or None if it is not a weight matmul."""
    if node.op != "call_function":
        return None
    if node.target in LINEAR_TARGETS:
        args = list(node.args) + [None] * 3
        x, w = args[0], args[1]
        b = args[2] if args[2] is not None else node.kwargs.get("bias")
        return x, w, b, "linear"
    if node.target in ADDMM_TARGETS and len(node.args) >= 3 and not node.kwargs:
        b, x, w = node.args[:3]
        return x, w, b, "conv1d"
    return None


def _param(gm: fx.GraphModule, node: Argument) -> nn.Parameter | None:
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    try:
        t = gm.get_parameter(cast(str, node.target))  # a get_attr target is an attribute path
    except AttributeError:
        return None
    return t


def normalize(gm: fx.GraphModule) -> fx.GraphModule:
    """Turn ``call_module`` Linear nodes (symbolic_trace graphs) into ``F.linear`` on get_attr
    weights, so every site has the same form.  Outputs are unchanged."""
    changed = False
    for node in list(gm.graph.nodes):
        if node.op != "call_module":
            continue
        mod = gm.get_submodule(node.target)
        if type(mod) is not nn.Linear or len(node.args) != 1 or node.kwargs:
            continue
        with gm.graph.inserting_before(node):
            w = gm.graph.get_attr(f"{node.target}.weight")
            b = gm.graph.get_attr(f"{node.target}.bias") if mod.bias is not None else None
            lin = gm.graph.call_function(F.linear, (node.args[0], w, b))
        lin.meta = dict(node.meta)
        lin.meta.setdefault("nn_module_stack", {node.target: (node.target, "torch.nn.modules.linear.Linear")})
        node.replace_all_uses_with(lin)
        gm.graph.erase_node(node)
        changed = True
    if changed:
        gm.graph.lint()
        gm.recompile()
    return gm


def find_sites(gm: fx.GraphModule) -> list[Site]:
    """Every parameterised matmul in graph order, grouped by weight."""
    found: dict[str, dict[str, Any]] = {}
    for node in gm.graph.nodes:
        ops = site_operands(node)
        if ops is None:
            continue
        x, w_node, b_node, op = ops
        weight = _param(gm, w_node)
        if weight is None or weight.dim() != 2:
            continue
        bias = _param(gm, b_node)
        # _param found parameters: get_attr nodes, whose targets are attribute paths
        w_path = cast(str, cast(fx.Node, w_node).target)
        entry = found.get(w_path)
        if entry is not None:
            entry["nodes"].append(node.name)
            continue
        out_f, in_f = weight.shape if op == "linear" else weight.shape[::-1]
        path, _, attr = w_path.rpartition(".")
        name = canonical_name(path if attr == "weight" else w_path)
        stack = node.meta.get("nn_module_stack") or {}
        module_type = list(stack.values())[-1][1] if stack else ""
        module_type = module_type if isinstance(module_type, str) else getattr(module_type, "__name__", "")
        val = node.meta.get("val")
        dtype = val.dtype if isinstance(val, torch.Tensor) else weight.dtype
        found[w_path] = dict(
            name=name, weight=w_path, bias=cast(fx.Node, b_node).target if bias is not None else None, op=op,
            in_features=int(in_f), out_features=int(out_f), layer=layer_index(name), dtype=dtype,
            nodes=[node.name], module_type=module_type.rsplit(".", 1)[-1])
    return [Site(**{**d, "nodes": tuple(d["nodes"])}) for d in found.values()]
