"""Modules trained whole (``train`` rules; PEFT's modules_to_save).

Each adapter owns copies of the modules its train rules name, under
``rewriter_trained.<adapter>.<module key>__<param>``: adapters never share trained weights, and
the model's own module stays as it was (used when the adapters are disabled).  The live graph's
reads of those parameters are pointed at the topmost active adapter's copy."""
from __future__ import annotations

from typing import Mapping, Sequence

from torch import fx, nn

from ..core.graph import MIX_ATTR, gate_rows
from ..errors import RewriterError

TRAINED_ATTR = "rewriter_trained"


def trained_key(module: str, pname: str) -> str:
    return f"{module.replace('.', '__')}__{pname}"


def copy_trained_modules(gm: fx.GraphModule, base_graph: fx.Graph, adapter: str, modules: Sequence[str],
                         shared: Mapping[str, nn.Parameter] | None = None) -> nn.Module:
    """A holder with ``adapter``'s own copy of every parameter of ``modules`` (or the ``shared``
    copies, by path); refuses modules the graph calls whole instead of reading their parameters."""
    read = {n.target for n in base_graph.nodes if n.op == "get_attr"}
    holder = nn.Module()
    for module in modules:
        for pname, param in gm.get_submodule(module).named_parameters(recurse=False):
            if f"{module}.{pname}" not in read:
                raise RewriterError(f"module '{module}' is called as a whole in the graph, so adapter "
                                    f"'{adapter}' cannot give it its own trained copy",
                                    fix="trace the model with torch.export (rewriter.trace), which reads "
                                        "parameters one by one, or drop the train rule for it")
            copy = shared[f"{module}.{pname}"] if shared is not None else \
                nn.Parameter(param.detach().clone(), requires_grad=False)
            holder.register_parameter(trained_key(module, pname), copy)
    return holder


def trained_parameters(gm: fx.GraphModule, adapter: str, modules: Sequence[str]) -> dict[str, nn.Parameter]:
    """``adapter``'s copies of its trained modules' parameters, by original path."""
    holder = getattr(gm.get_submodule(TRAINED_ATTR), adapter, None)
    if holder is None:
        return {}
    return {f"{m}.{p}": getattr(holder, trained_key(m, p))
            for m in modules for p, _ in gm.get_submodule(m).named_parameters(recurse=False)}


def copy_paths(adapter: str, paths) -> dict[str, str]:
    """Original parameter path -> the path of ``adapter``'s copy."""
    out = {}
    for path in paths:
        module, _, pname = path.rpartition(".")
        out[path] = f"{TRAINED_ATTR}.{adapter}.{trained_key(module, pname)}"
    return out


def read_trained_copies(graph: fx.Graph, trained: Mapping[str, str]) -> fx.Graph:
    """Point the graph's reads of modules trained whole at the copies in ``trained``."""
    for node in graph.nodes:
        if node.op == "get_attr" and node.target in trained:
            node.target = trained[node.target]
    return graph


def gate_trained_modules(graph: fx.Graph, copies: Mapping[str, Mapping[str, str]]) -> None:
    """Mixed batches: an op that reads a module trained whole runs once per adapter with that
    adapter's copy (``copies``: adapter -> original path -> copy path), and every sample takes the
    result of its own adapter (the original for others)."""
    trained = {path for table in copies.values() for path in table}
    readers = {user for node in graph.nodes if node.op == "get_attr" and node.target in trained
               for user in node.users}
    for op in [n for n in graph.nodes if n in readers]:  # graph order
        last = out = op
        made = []
        for name, table in copies.items():
            swap = {a: table[a.target] for a in op.all_input_nodes if a.op == "get_attr" and a.target in table}
            if not swap:
                continue
            fetched = {}
            for original, target in swap.items():
                with graph.inserting_after(last):
                    last = fetched[original] = graph.get_attr(target)
            with graph.inserting_after(last):
                last = variant = graph.node_copy(op, lambda a: fetched.get(a, a))
            with graph.inserting_after(last):
                last = mask = graph.get_attr(f"{MIX_ATTR}.{name}")
            with graph.inserting_after(last):
                last = out = graph.call_function(gate_rows, (mask, variant, out))
            made.append(out)
        op.replace_all_uses_with(out, delete_user_cb=lambda user: user not in made)
