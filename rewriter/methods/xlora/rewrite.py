"""X-LoRA's graph rewrite: the scaling pass, the classifier, and the mixture at every expert layer."""
from __future__ import annotations

from torch import fx

from ...core.sites import site_operands
from ...errors import RewriterError
from .module import XLoraModule
from .target import find_targets


def rewrite(graph: fx.Graph, entries, adapted) -> fx.Graph:
    ((target, entry),) = entries
    module: XLoraModule = entry.module
    check_alone(adapted, entry.meta["adapter"], module)
    nodes = {n.name: n for n in graph.nodes}
    layer_of = {node: layer for layer, site in enumerate(module.layers) for node in target.sites[site].nodes}
    missing = [name for name in layer_of if name not in nodes]
    if missing:
        raise RewriterError(f"X-LoRA '{entry.meta['adapter']}': expert layer node(s) {missing[:3]} are not in the "
                            "live graph (another adapter replaced them)", fix="activate the X-LoRA adapter alone")

    def stamp(node: fx.Node) -> fx.Node:
        node.meta["rewrite"] = dict(entry.meta)
        return node

    # (1) the scaling pass: a copy of what the hidden state needs, before the first computation
    hidden = nodes[target.hidden]
    needed = ancestors(hidden)
    anchor = [n for n in graph.nodes if n.op == "placeholder"][-1].next  # the inputs are all defined here
    scaled = module.config.scaling_pass_value != 0 or has_bias(module)
    env: dict[fx.Node, fx.Node] = {}
    with graph.inserting_before(anchor):
        for node in [n for n in graph.nodes if n in needed and n.op != "placeholder"]:
            env[node] = graph.node_copy(node, lambda n: env.get(n, n))
            if scaled and node.name in layer_of:
                x = site_operands(env[node])[0]
                env[node] = stamp(graph.call_module(entry.target, (x, env[node]),
                                                    {"stage": "constant", "layer": layer_of[node.name]}))
        detached = graph.call_method("detach", (env[hidden],))
        # (2) the classifier
        scalings = stamp(graph.call_module(entry.target, (detached,), {"stage": "scalings"}))
    # (3) the main pass: every expert layer gets its weighted experts
    for name, layer in layer_of.items():
        node = nodes[name]
        x = site_operands(node)[0]
        with graph.inserting_after(node):
            mixed = stamp(graph.call_module(entry.target, (x, node, scalings), {"stage": "mix", "layer": layer}))
        node.replace_all_uses_with(mixed, delete_user_cb=lambda user: user is not mixed)
    return graph


def ancestors(node: fx.Node) -> set[fx.Node]:
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo.extend(n.all_input_nodes)
    return seen


def has_bias(module: XLoraModule) -> bool:
    return any(m.lora_B_bias is not None for experts in module.experts for m in experts.values())


def check_alone(adapted, name: str, module: XLoraModule) -> None:
    """X-LoRA's experts replace whatever else would adapt its layers: refuse overlaps."""
    for other in adapted.active_adapters:
        if other == name or other in adapted.merged:
            continue
        record = adapted.adapters[other]
        overlap = sorted(set(record.modules) & set(module.layers))
        if overlap or any(isinstance(m, XLoraModule) for m in record.modules.values()):
            raise RewriterError(f"X-LoRA adapter '{name}' must be the only unmerged adapter at its expert layers, "
                                f"but '{other}' is active there too ({', '.join(overlap[:3]) or 'another X-LoRA'})",
                                fix=f"set_adapter('{name}') alone (its experts are copies, their source adapters "
                                    f"need not be active), or merge '{other}' first")


class WholeModel:
    """The graph scope: one target, the whole model."""
    find_targets = staticmethod(find_targets)
    rewrite = staticmethod(rewrite)

    @staticmethod
    def select(chosen):
        return [target for target, _ in chosen]
