"""The live graph as a function of the adapter state and the pristine base graph.

``live_graph`` = graph-scope rewrites ∘ trained-copy reads ∘ site stacks and merged weights,
applied to a copy of the base graph.  The engine calls it on every state change, so the
forward is always straight-line code for one configuration."""
from __future__ import annotations

import linecache
from typing import Any, Callable, Mapping, Sequence

from torch import fx
from torch.fx import graph_module

from ..core.graph import ADAPTERS_ATTR, MIX_ATTR, StackEntry, build_graph
from ..core.sites import Site
from .state import AdapterState
from .trained import gate_trained_modules, read_trained_copies

#: ``(method, target name) -> target``: a site, or a graph-scope method's own target
TargetOf = Callable[[str, str], Any]


def entry(adapter: str, record, d, key: str, gate: str | None = None) -> StackEntry:
    """Adapter ``adapter``'s entry for decision ``d`` (one site) of its plan."""
    return StackEntry(f"{ADAPTERS_ATTR}.{adapter}.{key}", record.modules[d.site],
                      {"adapter": adapter, "rule": d.rule, "method": d.method}, gate=gate)


def site_stacks(state: AdapterState, sites: Mapping[str, Site]) -> dict[str, list[StackEntry]]:
    """Site name -> the unmerged active site adapters on it, bottom to top."""
    stacks: dict[str, list[StackEntry]] = {}
    for name in state.live():
        record = state.records[name]
        if record.graph_scope is not None:
            continue  # applied by rewrite_graph_scope
        for d in record.plan.decisions:
            stacks.setdefault(d.site, []).append(entry(name, record, d, sites[d.site].key))
    return stacks


def rewrite_graph_scope(graph: fx.Graph, state: AdapterState, target_of: TargetOf, model) -> fx.Graph:
    """Apply the active graph-scope adapters (bottom first) to the graph with site adapters."""
    for name in state.live():
        record = state.records[name]
        scope = record.graph_scope
        if scope is None:
            continue
        entries = []
        for d in record.plan.decisions:
            target = target_of(d.method, d.site)
            entries.append((target, entry(name, record, d, target.key)))
        graph = scope.rewrite(graph, entries, model)
        graph.lint()
    return graph


def live_graph(base: fx.Graph, sites: Mapping[str, Site], state: AdapterState,
               merged: Mapping[str, tuple[str, str | None]], trained: Mapping[str, str],
               target_of: TargetOf, model) -> fx.Graph:
    """The graph the model runs now: ``merged`` swaps in folded weights (site -> attribute paths),
    ``trained`` points reads of modules trained whole at the live adapter's copies."""
    graph = build_graph(base, dict(sites), site_stacks(state, sites), {} if state.disabled else dict(merged))
    graph = read_trained_copies(graph, {} if state.disabled else trained)
    return rewrite_graph_scope(graph, state, target_of, model)


def mixed_graph(base: fx.Graph, sites: Mapping[str, Site], state: AdapterState, used: Sequence[str],
                trained_copies: Mapping[str, Mapping[str, str]]) -> fx.Graph:
    """The graph for a mixed batch: every adapter in ``used`` gated by its per-sample mask
    ``rewriter_mix.<adapter>`` (``trained_copies``: adapter -> original path -> copy path)."""
    stacks: dict[str, list[StackEntry]] = {}
    for name in used:
        record = state.records[name]
        for d in record.plan.decisions:
            stacks.setdefault(d.site, []).append(entry(name, record, d, sites[d.site].key,
                                                       gate=f"{MIX_ATTR}.{name}"))
    graph = build_graph(base, dict(sites), stacks, {})
    gate_trained_modules(graph, trained_copies)
    return graph


def code_key(gm: fx.GraphModule) -> str | None:
    """The cache key under which torch.fx stored the generated source of ``gm.forward``."""
    code = getattr(getattr(type(gm), "forward", None), "__code__", None)
    return code.co_filename if code is not None and code.co_filename.startswith("<eval_with_key>") else None


def forget_code(key: str | None) -> None:
    """torch.fx keeps every generated source forever (for tracebacks); the live graph is regenerated
    on every adapter state change, so drop the sources of graphs that are gone."""
    if key is None:
        return
    graph_module._loader.eval_cache.pop(key, None)
    linecache.cache.pop(key, None)
