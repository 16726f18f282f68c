"""Mixed batches (``forward(..., adapter_names=[...])``): one graph per set of adapters, each
adapter gated per sample, cached until the adapter state changes."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import fx, nn

from ..core.graph import MIX_ATTR
from ..errors import RewriterError
from . import builder
from .trained import copy_paths


class MixedBatches:
    """The engine's mixed-batch graphs, by adapter set."""

    def __init__(self):
        self.graphs: dict[tuple[str, ...], fx.GraphModule] = {}

    def clear(self) -> None:
        for gm in self.graphs.values():
            builder.forget_code(builder.code_key(gm))
        self.graphs.clear()

    def graph(self, model, adapter_names: Sequence[str]) -> fx.GraphModule:
        """The graph for a mixed batch of ``model`` (an AdaptedModel), with every sample's adapter
        gated by a per-sample mask."""
        names = list(adapter_names)
        used = tuple(sorted({n for n in names if n != "__base__"}))
        for n in used:
            if model.require(n).graph_scope is not None:
                raise RewriterError(f"adapter '{n}' ({model.adapters[n].method}) rewrites the graph as a whole, so "
                                    "it cannot be chosen per sample", fix="run its samples in a batch of their own")
        if model.merged:
            raise RewriterError("mixed-batch inference needs unmerged adapters", fix="call unmerge() first")
        if model.disabled:
            raise RewriterError("adapter_names cannot be used inside disable_adapters()")
        gm = self.graphs.get(used)
        if gm is None:
            holder = nn.Module()
            for name in used:
                holder.register_buffer(name, torch.zeros(0, dtype=torch.bool), persistent=False)
            model.gm.add_submodule(MIX_ATTR, holder)
            copies = {name: copy_paths(name, model.trained_parameters(name)) for name in used}
            graph = builder.mixed_graph(model.base_graph, model.sites, model.state, used, copies)
            gm = fx.GraphModule(model.gm, graph)
            for attr in ("_in_spec", "_out_spec"):
                if hasattr(model.gm, attr):
                    setattr(gm, attr, getattr(model.gm, attr))
            self.graphs[used] = gm
        device = next(iter(model.gm.parameters())).device
        for name in used:
            gm.get_submodule(MIX_ATTR).register_buffer(
                name, torch.tensor([n == name for n in names], device=device), persistent=False)
        return gm
