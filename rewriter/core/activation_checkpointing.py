"""Activation checkpointing as a pure graph pass.

torch.export inlines HF's gradient checkpointing, so it is put back on the rewritten graph: one
``torch.utils.checkpoint`` segment per layer (the nodes whose module stack shares a
``...layers.<i>`` prefix).  Outputs and gradients are the same; less memory, one more forward."""
from __future__ import annotations

import contextlib
import operator
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import fx, nn
from torch.utils.checkpoint import checkpoint

from ..errors import RewriterError

#: submodule of the live GraphModule holding the checkpointed segments
SEGMENTS_ATTR = "rewriter_recomputed"

_LAYER_PATH = re.compile(r"\.\d+$")
#: keyword options of non-reentrant ``torch.utils.checkpoint.checkpoint``
_CHECKPOINT_OPTIONS = frozenset({"preserve_rng_state", "context_fn", "determinism_check", "debug", "early_stop"})


@dataclass(frozen=True)
class ActivationCheckpointing:
    """Which layers to checkpoint and how (HF's ``activation_checkpointing_enable`` arguments)."""
    every_n_layers: int = 1       #: checkpoint layers 0, n, 2n, ... (in graph order)
    offload: bool = False         #: keep the tensors saved for recomputation in CPU memory
    #: more keyword arguments for ``torch.utils.checkpoint.checkpoint`` (always non-reentrant)
    checkpoint_kwargs: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.every_n_layers, bool) or not isinstance(self.every_n_layers, int) \
                or self.every_n_layers < 1:
            raise RewriterError(f"every_n_layers must be an integer >= 1, got {self.every_n_layers!r}")
        options = dict(self.checkpoint_kwargs)
        if options.pop("use_reentrant", False):
            raise RewriterError("reentrant checkpointing is not supported: it gives no gradients to adapters in "
                                "layers whose inputs do not require grad (a frozen base)",
                                fix="leave use_reentrant out, or set it to False")
        unknown = sorted(set(options) - _CHECKPOINT_OPTIONS)
        if unknown:
            raise RewriterError(f"unknown torch.utils.checkpoint option(s) {unknown}",
                                fix=f"known: {', '.join(sorted(_CHECKPOINT_OPTIONS))}")
        object.__setattr__(self, "checkpoint_kwargs", options)


class RecomputedSegment(nn.Module):
    """Runs a graph segment under ``torch.utils.checkpoint`` when gradients are on.  The segment
    is held unregistered: the modules it calls belong to the outer graph and must not be listed
    (or saved) twice."""
    segment: fx.GraphModule  # set with object.__setattr__, so nn.Module does not register it

    def __init__(self, segment: fx.GraphModule, config: ActivationCheckpointing) -> None:
        super().__init__()
        object.__setattr__(self, "segment", segment)
        self.config = config

    def forward(self, *args: Any) -> Any:
        if not torch.is_grad_enabled():  # nothing is saved for backward: nothing to recompute
            return self.segment(*args)
        saving = torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available()) if self.config.offload \
            else contextlib.nullcontext()
        with saving:
            return checkpoint(self.segment, *args, use_reentrant=False, **self.config.checkpoint_kwargs)


def _layer_of(node: fx.Node) -> str | None:
    """The outermost module path ending in an index (``model.layers.3``, ``encoder.block.0``)."""
    for path, _ in (node.meta.get("nn_module_stack") or {}).values():
        if isinstance(path, str) and _LAYER_PATH.search(path):
            return path
    return None


def layer_segments(graph: fx.Graph) -> list[list[fx.Node]]:
    """The nodes of each layer, in graph order: from a layer's first to its last node, including
    the unstamped nodes between them (casts), excluding ``get_attr`` (read outside, passed in).
    Layers whose nodes interleave form one segment."""
    nodes = list(graph.nodes)
    spans: dict[str, list[int]] = {}
    for i, node in enumerate(nodes):
        layer = _layer_of(node)
        if layer is not None and node.op not in ("placeholder", "get_attr", "output"):
            spans.setdefault(layer, [i, i])[1] = i
    merged: list[list[int]] = []
    for first, last in sorted(spans.values()):
        if merged and first <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], last)
        else:
            merged.append([first, last])
    return [[n for n in nodes[first:last + 1] if n.op != "get_attr"] for first, last in merged]


def _outline(gm: fx.GraphModule, nodes: list[fx.Node], name: str, config: ActivationCheckpointing) -> None:
    """Move ``nodes`` into a :class:`RecomputedSegment` ``name`` and call it from where they were."""
    inside = set(nodes)
    inputs = list(dict.fromkeys(a for n in nodes for a in n.all_input_nodes if a not in inside))
    outputs = [n for n in nodes if any(u not in inside for u in n.users)]
    sub = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for a in inputs:
        env[a] = sub.placeholder(a.name)
        env[a].meta = dict(a.meta)
    for n in nodes:
        env[n] = sub.node_copy(n, env.__getitem__)
    sub.output(tuple(env[o] for o in outputs))
    segment = RecomputedSegment(fx.GraphModule(gm, sub), config)  # shares gm's (adapter) submodules
    gm.get_submodule(SEGMENTS_ATTR).add_module(name, segment)

    graph = gm.graph
    with graph.inserting_after(nodes[-1]):
        call = graph.call_module(f"{SEGMENTS_ATTR}.{name}", tuple(inputs))
    last = call
    for i, out in enumerate(outputs):
        with graph.inserting_after(last):
            last = graph.call_function(operator.getitem, (call, i))
        if "val" in out.meta:
            last.meta["val"] = out.meta["val"]
        out.replace_all_uses_with(last, delete_user_cb=lambda user: user not in inside)
    for n in reversed(nodes):
        graph.erase_node(n)


def is_checkpointed(gm: fx.GraphModule) -> bool:
    return any(n.op == "call_module" and str(n.target).startswith(SEGMENTS_ATTR + ".") for n in gm.graph.nodes)


def checkpoint_layers(gm: fx.GraphModule, config: ActivationCheckpointing = ActivationCheckpointing()) -> fx.GraphModule:
    """Run every ``config.every_n_layers``-th layer of ``gm`` under ``torch.utils.checkpoint``
    (its activations are recomputed in backward instead of kept).  In place; returns ``gm``.
    Outputs and gradients are the same; a graph already checkpointed is left as it is."""
    if is_checkpointed(gm):
        return gm
    segments = layer_segments(gm.graph)
    if not segments:
        raise RewriterError("no layers to checkpoint: no graph node belongs to a module path ending in an index "
                            "(like 'model.layers.0')",
                            fix="trace the model with torch.export (rewriter.apply does), which records module paths")
    setattr(gm, SEGMENTS_ATTR, nn.Module())  # replaces the segments of an earlier graph
    for i, nodes in enumerate(segments[::config.every_n_layers]):
        _outline(gm, nodes, f"segment_{i}", config)
    gm.graph.lint()
    gm.recompile()
    return gm
