"""Llama-Adapter's rewrite: the prompt projected as the live graph projects the tokens, and the gated
attention over it added to each block's output."""
from __future__ import annotations

import torch
from torch import fx

from .config import select
from .find import Attention, Projection, SiteResult, find_targets


class _Inserter:
    """Inserts nodes one after another, stamped with the adapter's provenance."""

    def __init__(self, graph: fx.Graph, after: fx.Node, entry):
        self.graph, self.last, self.entry = graph, after, entry
        self.stack = after.meta.get("nn_module_stack")

    def add(self, op: str, target, args, kwargs=None) -> fx.Node:
        with self.graph.inserting_after(self.last):
            return self._stamp(self.graph.create_node(op, target, tuple(args), kwargs or {}))

    def copy(self, node: fx.Node, env: dict) -> fx.Node:
        with self.graph.inserting_after(self.last):
            return self._stamp(self.graph.node_copy(node, lambda n: env.get(n, n)))

    def _stamp(self, node: fx.Node) -> fx.Node:
        node.meta = {"rewrite": dict(self.entry.meta)}  # no "val": these run on the prompt's shapes
        if self.stack is not None:
            node.meta["nn_module_stack"] = self.stack
        self.last = node
        return node


def rewrite(graph: fx.Graph, entries, adapted) -> fx.Graph:
    nodes = {n.name: n for n in graph.nodes}
    order = {n: i for i, n in enumerate(graph.nodes)}
    for target, entry in entries:
        _insert(graph, nodes, order, target, entry)
    return graph


def _insert(graph: fx.Graph, nodes, order, target: Attention, entry) -> None:
    attention = nodes[target.node]
    at = _Inserter(graph, attention, entry)
    prompt = at.add("call_method", "to", (at.add("get_attr", f"{entry.target}.adaption_prompt", ()), target.dtype))
    projected = {}
    for projection in (target.keys, target.values):
        if projection.result.reader not in projected:  # GPT-2: keys and values share c_attn
            projected[projection.result.reader] = _project(at, nodes, order, projection, prompt, target.in_features)
    keys, values = (projected[p.result.reader] for p in (target.keys, target.values))
    out = at.add("call_module", entry.target, (attention.args[0], keys, values))
    if entry.module.project_output:
        total = at.add("call_function", torch.add, (attention, out))
        attention.replace_all_uses_with(total, delete_user_cb=lambda user: user is not total)
        return
    result = _live_result(nodes, target.output)
    at.last = result
    flat = at.add("call_method", "reshape_as", (at.add("call_method", "transpose", (out, 1, 2)), result))
    total = at.add("call_function", torch.add, (result, flat))
    result.replace_all_uses_with(total, delete_user_cb=lambda user: user not in (flat, total))


def _live_result(nodes, result: SiteResult) -> fx.Node:
    """A site's result in the live graph: after its adapters, whatever nodes they added."""
    return nodes[result.reader].args[result.arg]


def _project(at: _Inserter, nodes, order, projection: Projection, prompt: fx.Node, width: int) -> fx.Node:
    """The prompt through the site as the live graph computes it (pre hooks, matmul, adapters)."""
    source = nodes[projection.input]
    value = at.add("call_method", "reshape", (prompt, -1, width)) if projection.flat_input else prompt
    result = _live_result(nodes, projection.result)
    env = {source: value}
    for node in sorted(_between(source, result), key=order.__getitem__):
        env[node] = at.copy(node, env)
    return env[result]


def _between(source: fx.Node, result: fx.Node) -> list[fx.Node]:
    """The nodes on a path from ``source`` to ``result`` (``result`` included, ``source`` not)."""
    reaches = {source: True}
    todo = [result]
    while todo:
        node = todo[-1]
        pending = [i for i in node.all_input_nodes if i not in reaches]
        if pending:
            todo.extend(pending)
            continue
        todo.pop()
        reaches[node] = any(reaches[i] for i in node.all_input_nodes)
    return [n for n, on in reaches.items() if on and n is not source]


class AttentionBlocks:
    """The graph scope: targets are attention blocks; the rewrite inserts the prompt attention."""
    find_targets = staticmethod(find_targets)
    select = staticmethod(select)
    rewrite = staticmethod(rewrite)
