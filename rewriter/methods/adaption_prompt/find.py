"""Llama-Adapter's targets: attention blocks, found in the base graph (see the package docstring)."""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import fx

from ...errors import ConfigError
from ...core.sites import canonical_name

aten = torch.ops.aten
_ATTENTION = {aten.scaled_dot_product_attention.default}
_SPLITS = {aten.split.Tensor, aten.split_with_sizes.default}
#: ops that move or cast a projection's output on its way to attention
_LAYOUT = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.transpose.int,
           aten.permute.default, aten.expand.default, aten.clone.default, aten.contiguous.default,
           aten.slice.Tensor, aten.unsqueeze.default, aten.squeeze.dim, aten.alias.default, aten.to.dtype,
           aten._to_copy.default, operator.getitem, *_SPLITS}
#: RoPE: the keys times position tensors (cos, sin), rotated halves, sums of those
_ROPE_ARITHMETIC = {aten.mul.Tensor, aten.add.Tensor}
_ROPE_REARRANGE = {aten.cat.default, aten.neg.default}
#: a KV cache write (generation's static cache): the new keys reach attention through the cache buffer
_CACHE_WRITES = {aten.index_copy_.default, aten.index_copy.default}
#: ops that keep a projection's channels where they are (before the split into heads)
_SAME_CHANNELS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.clone.default,
                  aten.contiguous.default, aten.alias.default, aten.to.dtype, aten._to_copy.default}


@dataclass(frozen=True)
class SiteResult:
    """Where the live graph holds a site's result: argument ``arg`` of node ``reader``."""
    site: str
    reader: str
    arg: int


@dataclass(frozen=True)
class Projection:
    """How a block computes its keys (or values) from its input: a site and its channels."""
    result: SiteResult
    input: str                  #: the node the site reads (the prompt takes its place)
    flat_input: bool            #: the input is flattened to 2-D (GPT-2's Conv1D)
    channels: tuple[int, int]   #: [start, stop) of the site's output channels used


@dataclass(frozen=True)
class Attention:
    """One attention block (Site-like: rules match ``name``)."""
    name: str
    weight: str                  #: the adapter follows this parameter's device and dtype
    in_features: int             #: hidden size: the prompt's width
    out_features: int            #: heads * head_dim
    dtype: torch.dtype
    node: str = ""               #: the scaled_dot_product_attention node
    heads: int = 0
    kv_heads: int = 0
    head_dim: int = 0
    scale: float = 0.0
    keys: Projection | None = None
    values: Projection | None = None
    output: SiteResult | None = None   #: the output projection's result, when one follows
    output_conv1d: bool = False
    problem: str | None = None   #: why the block cannot be adapted (None: it can)
    bias: None = None

    @property
    def key(self) -> str:
        return self.name.replace(".", "__")


class _Unsupported(Exception):
    pass


def find_targets(adapted) -> list[Attention]:
    graph, sites = adapted.base_graph, adapted.sites
    site_of = {n: s for s in sites.values() for n in s.nodes}
    calls = [n for n in graph.nodes if n.op == "call_function" and n.target in _ATTENTION]
    if not calls:
        raise ConfigError("no attention found: the graph has no scaled_dot_product_attention node",
                          fix="Llama-Adapter needs attention computed by torch's scaled_dot_product_attention "
                              "(transformers' default attn_implementation='sdpa')")
    if not sites:
        raise ConfigError("the graph has no linear layers, so no attention block has key and value projections")
    derived = _site_derived(graph, site_of)
    blocks: dict[str, list[fx.Node]] = {}
    for node in calls:
        blocks.setdefault(_owner(node), []).append(node)
    fallback = next(iter(sites.values()))
    out = []
    for name, nodes in blocks.items():
        try:
            if len(nodes) > 1:
                raise _Unsupported(f"it computes attention {len(nodes)} times; Llama-Adapter needs one attention "
                                   "node per block")
            out.append(_analyse(name, nodes[0], sites, site_of, derived))
        except _Unsupported as exc:
            out.append(Attention(name=name, weight=fallback.weight, in_features=0, out_features=0,
                                 dtype=fallback.dtype, problem=str(exc)))
    return out


def _owner(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return canonical_name(list(stack.values())[-1][0]) if stack else node.name


def _site_derived(graph: fx.Graph, site_of) -> set[fx.Node]:
    """Nodes computed from some site's output (position tensors, masks and constants are not)."""
    derived: set[fx.Node] = set()
    for node in graph.nodes:
        if node.name in site_of or any(i in derived for i in node.all_input_nodes):
            derived.add(node)
    return derived


def _analyse(name: str, node: fx.Node, sites, site_of, derived) -> Attention:
    query = node.args[0]
    shape = tuple(query.meta["val"].shape) if "val" in query.meta else ()
    if len(shape) != 4:
        raise _Unsupported(f"its query is not a (batch, heads, tokens, head_dim) tensor ({shape})")
    heads, head_dim = int(shape[1]), int(shape[3])
    scale = node.kwargs.get("scale", node.args[6] if len(node.args) > 6 else None)
    keys = _projection(name, "keys", node.args[1], sites, site_of, derived, head_dim)
    values = _projection(name, "values", node.args[2], sites, site_of, derived, head_dim)
    k_site, v_site = sites[keys.result.site], sites[values.result.site]
    if k_site.in_features != v_site.in_features:
        raise _Unsupported(f"its key and value projections read inputs of different widths "
                           f"({k_site.in_features}, {v_site.in_features})")
    kv_heads = (keys.channels[1] - keys.channels[0]) // head_dim
    if (values.channels[1] - values.channels[0]) // head_dim != kv_heads or heads % kv_heads:
        raise _Unsupported(f"{heads} query heads cannot share {kv_heads} key/value heads")
    output, conv1d = _output_projection(node, sites, site_of)
    return Attention(name=name, weight=k_site.weight, in_features=k_site.in_features, out_features=heads * head_dim,
                     dtype=k_site.dtype, node=node.name, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                     scale=float(scale) if scale is not None else head_dim ** -0.5, keys=keys, values=values,
                     output=output, output_conv1d=conv1d)


def _projection(block: str, what: str, start: fx.Node, sites, site_of, derived, head_dim: int) -> Projection:
    """Walk from an attention argument back to the one site it is computed from."""
    found, path, todo = set(), set(), [start]
    while todo:
        node = todo.pop()
        if node in path:
            continue
        path.add(node)
        if node.name in site_of:
            found.add(node)
            continue
        if node not in derived:
            continue  # positions (RoPE's cos and sin), shapes, constants
        if not _passes(node):
            raise _Unsupported(f"its {what} go through '{node.target}' ({node.name}), not a layout or RoPE op, "
                               f"so the prompt's {what} cannot be computed as the block computes its own")
        todo.extend(node.all_input_nodes)
    names = sorted({site_of[n.name].name for n in found})
    if len(names) != 1 or not names[0].startswith(block + "."):
        raise _Unsupported(f"its {what} come from {names or 'no linear layer'}, expected one projection inside "
                           f"'{block}'")
    if len(found) != 1:
        raise _Unsupported(f"its {what} come from {len(found)} uses of '{names[0]}', expected one")
    site, (matmul,) = sites[names[0]], found
    x = matmul.args[0] if site.op == "linear" else matmul.args[1]
    result, channels = _channels(site, matmul, path, head_dim, what)
    return Projection(result=result, input=x.name, flat_input=x.meta["val"].dim() == 2, channels=channels)


def _passes(node: fx.Node) -> bool:
    """Layout ops, and RoPE's: products and sums of tensors (a number would scale the keys)."""
    if node.target in _ROPE_ARITHMETIC:
        return all(isinstance(a, fx.Node) for a in node.args[:2])
    return node.target in _LAYOUT or node.target in _ROPE_REARRANGE or node.target in _CACHE_WRITES


def _channels(site, matmul: fx.Node, path: set, head_dim: int, what: str):
    """Follow a projection's output to the split into heads: which of its channels are used."""
    width = site.out_features
    start, stop, node, result = 0, width, matmul, None
    while True:
        users = [u for u in node.users if u in path]
        if len(users) != 1:
            raise _Unsupported(f"the {what} projection's output takes {len(users)} paths to attention")
        user = users[0]
        if result is None:  # the first reader: where the live graph holds the site's result
            arg = next(i for i, a in enumerate(user.args) if a is node)
            result = SiteResult(site=site.name, reader=user.name, arg=arg)
        val = user.meta.get("val")
        if isinstance(val, torch.Tensor) and val.dim() == 4:  # (batch, tokens, heads, head_dim)
            if val.shape[-1] != head_dim or val.shape[-2] * head_dim != stop - start:
                raise _Unsupported(f"the {what} are split into heads as {tuple(val.shape)}, expected "
                                   f"(..., {(stop - start) // head_dim}, {head_dim})")
            return result, (start, stop)
        if user.target in _SPLITS:
            dim = user.args[2] if len(user.args) > 2 else user.kwargs.get("dim", 0)
            (part,) = [u for u in user.users if u in path]
            if dim not in (-1, part.meta["val"].dim() - 1):
                raise _Unsupported(f"the {what} projection's output is split along dimension {dim}, not channels")
            index = part.args[1]
            sizes = user.args[1] if user.target in _SPLITS - {aten.split.Tensor} else [user.args[1]] * (index + 1)
            start, stop = start + sum(sizes[:index]), start + sum(sizes[:index]) + sizes[index]
            user = part
        elif user.target is aten.slice.Tensor and user.args[1] in (-1, val.dim() - 1):
            lo, hi = (list(user.args[2:4]) + [None, None])[:2]
            start, stop = start + (lo or 0), min(stop, start + (hi if hi is not None else width))
        elif user.target not in _SAME_CHANNELS or not isinstance(val, torch.Tensor) or val.shape[-1] != \
                node.meta["val"].shape[-1]:
            raise _Unsupported(f"the {what} projection's output goes through '{user.target}' before the split "
                               "into heads")
        node = user


def _output_projection(node: fx.Node, sites, site_of) -> tuple[SiteResult | None, bool]:
    """The site that projects the attention output back to the hidden size, if layout ops lead to one."""
    while node.name not in site_of:
        users = [u for u in node.users if u.target in _LAYOUT or u.name in site_of]
        if len(users) != 1:
            return None, False
        node = users[0]
    site = sites[site_of[node.name].name]
    readers = list(node.users)
    if len(readers) != 1:
        return None, False
    reader = readers[0]
    arg = next(i for i, a in enumerate(reader.args) if a is node)
    return SiteResult(site=site.name, reader=reader.name, arg=arg), site.op == "conv1d"
