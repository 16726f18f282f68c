"""Llama-Adapter (PEFT's "adaption prompt"): learned prompt tokens that the top attention layers
also attend to, through a separate softmax scaled by a zero-initialised gate (Zhang et al. 2023).

This is not a per-linear rewrite: the targets are attention blocks, found in the graph.  Each
``aten.scaled_dot_product_attention`` node is one block, named by the module that computes it
(``nn_module_stack``).  From its key and value arguments the finder walks back through layout
ops (view, reshape, transpose, expand, slice, split + getitem of a fused projection) and the
RoPE ops (mul, add, cat, neg by position tensors) to the one linear site each comes from, and
reads the head count, head size and softmax scale off the node and its metadata.  Nothing here
is per-model code, so Qwen2, Gemma, Phi-3, OPT or BERT work as Llama and GPT-2 do; an op the walk
does not know (a key norm, say) makes the block unsupported, with its name and the op.

Per block, with prompt ``P`` (1, L, hidden) and gate ``g`` (1,)::

    K, V = the block's key and value projections of P   (no RoPE; GQA heads repeated)
    a    = g * softmax_fp32(q K^T * scale).to(q.dtype) @ V   (q: the block's own RoPE'd query)

The prompt is projected by replaying the live graph's computation of the projection sites,
so merged weights and unmerged adapters on k/v (LoRA below this adapter) apply to the prompt
exactly as they apply to the tokens: merging them changes nothing but rounding.

Where ``a`` goes, ``project_output``:

* true: added to the attention output (B, H, T, hd) before the block's output projection,
  which then projects both.  For Llama this is PEFT's ``o_proj(attn) + o_proj(a)`` up to
  rounding, except that a biased ``o_proj`` adds its bias once here, twice in PEFT.
* false: added, unprojected, to the output projection's result (PEFT's GPT-2 convention).
* unset (default): as PEFT does for the architecture: unprojected when the output projection
  is a GPT-2 ``Conv1D`` (the one such model PEFT supports), projected otherwise.  PEFT's
  checkpoints do not record the convention, so this default is what makes a PEFT GPT-2
  checkpoint reproduce PEFT's outputs; every other architecture gets the paper's projected form.

Dtypes: the parameters are stored in float32 on half-precision bases like every adapter here
(master weights for training), but the forward computes as PEFT does, in the base dtype: the
prompt is cast to it before the projections, the gate before it scales the scores.  The scale
is the attention node's own (PEFT always uses 1/sqrt(head_dim), the same on its models).

With the gate at zero the block's output is bit-identical to the base: the adapter adds exact
zeros.  Not mergeable: it attends over learned tokens, which no weight change expresses.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..errors import ConfigError
from ..core.sites import canonical_name
from ..core.adapter import AdapterModule
from .base import MethodSpec
from .checks import check_bool, check_int, round_like_base
from .registry import register

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
class AdaptionPromptConfig:
    adapter_len: int                     #: prompt tokens L
    adapter_layers: int                  #: how many attention blocks, counted from the top
    target_modules: str | None = None    #: keep blocks whose name ends with "." + this (None: all)
    project_output: bool | None = None   #: see the module docstring (None: as PEFT does)

    def __post_init__(self):
        check_int("adapter_len", self.adapter_len, minimum=1)
        check_int("adapter_layers", self.adapter_layers, minimum=1)
        if self.target_modules is not None and (not isinstance(self.target_modules, str) or not self.target_modules):
            raise ConfigError(f"'target_modules' must be the name of the attention modules (a string), got "
                              f"{self.target_modules!r}", field="target_modules",
                              fix="e.g. target_modules = \"self_attn\"; leave it out to use every attention block")
        if self.project_output is not None:
            check_bool("project_output", self.project_output)


# ---- targets: attention blocks, found in the base graph -----------------------------------------

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


def select(pairs: Sequence[tuple[Attention, AdaptionPromptConfig]]) -> list[Attention]:
    """PEFT's choice: of the blocks whose name ends with "." + target_modules, the last adapter_layers."""
    kept = []
    for config in dict.fromkeys(c for _, c in pairs):
        blocks = [t for t, c in pairs if c == config]
        suffix = config.target_modules
        named = [t for t in blocks if suffix is None or t.name.endswith("." + suffix)]
        if not named:
            raise ConfigError(f"no attention block is named '*.{suffix}'", field="target_modules",
                              fix=f"attention blocks: {', '.join(t.name for t in blocks[:4])}"
                                  f"{' ...' if len(blocks) > 4 else ''}; name the last part of theirs, or leave "
                                  "target_modules out to use them all")
        if len(named) < config.adapter_layers:
            raise ConfigError(f"adapter_layers = {config.adapter_layers}, but the rules match only {len(named)} "
                              f"attention block(s){f' named *.{suffix}' if suffix else ''}", field="adapter_layers",
                              fix=f"use adapter_layers <= {len(named)}")
        kept += named[-config.adapter_layers:]
    return kept


# ---- the adapter --------------------------------------------------------------------------------

class AdaptionPromptModule(AdapterModule):
    """The prompt and gate of one attention block; ``forward`` is the gated attention over them."""

    has_post = False
    not_mergeable = ("Llama-Adapter adds attention over learned prompt tokens, which no change of the "
                     "weights expresses")

    def __init__(self, target: Attention, config: AdaptionPromptConfig):
        if target.problem:
            raise ConfigError(f"attention block '{target.name}' cannot take Llama-Adapter: {target.problem}")
        super().__init__(target, config)
        self.adapter_len = config.adapter_len
        self.heads, self.kv_heads, self.head_dim, self.scale = (target.heads, target.kv_heads, target.head_dim,
                                                                target.scale)
        self.key_channels, self.value_channels = target.keys.channels, target.values.channels
        self.compute_dtype = target.dtype
        self.project_output = (config.project_output if config.project_output is not None
                               else not target.output_conv1d)
        if not self.project_output and target.output is None:
            raise ConfigError(f"attention block '{target.name}' has no output projection to add the unprojected "
                              "adapter output to", field="project_output", fix="set project_output = true")
        self.adaption_prompt = nn.Parameter(torch.empty(1, config.adapter_len, target.in_features))
        self.adaption_gate = nn.Parameter(torch.zeros(1))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.adaption_prompt.normal_()
        self.adaption_prompt.copy_(round_like_base(self.adaption_prompt, self.compute_dtype))
        self.adaption_gate.zero_()

    def forward(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """``query`` (B, H, T, hd); ``keys``/``values``: the block's projections of the prompt."""
        k = self._heads(keys, self.key_channels)
        v = self._heads(values, self.value_channels)
        scores = torch.matmul(query, k.transpose(2, 3).to(query.dtype)) * self.scale
        probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        return torch.matmul(self.adaption_gate.to(query.dtype) * probs, v)

    def _heads(self, projected: torch.Tensor, channels: tuple[int, int]) -> torch.Tensor:
        """(1, heads, L, hd) from a projection's output (1, L, C) or (L, C)."""
        start, stop = channels
        mine = projected.reshape(self.adapter_len, -1)[:, start:stop]
        heads = mine.reshape(1, self.adapter_len, self.kv_heads, self.head_dim).transpose(1, 2)
        return heads.repeat_interleave(self.heads // self.kv_heads, dim=1)

    def extra_repr(self) -> str:
        return (f"{self.adapter_len} prompt tokens, {self.heads} heads ({self.kv_heads} kv) x {self.head_dim}, "
                f"{'projected' if self.project_output else 'unprojected'} output")


# ---- the rewrite --------------------------------------------------------------------------------

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


SPEC = register(MethodSpec(
    name="adaption_prompt",
    config_cls=AdaptionPromptConfig,
    module_cls=AdaptionPromptModule,
    peft_type="ADAPTION_PROMPT",
    peft_keys={"adaption_prompt": "adaption_prompt", "adaption_gate": "adaption_gate"},
    scope=AttentionBlocks(),
    summary="Llama-Adapter: gated learned prompt tokens attended to by the top attention layers (Zhang et al. 2023)",
))
