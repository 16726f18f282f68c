"""Merging: folded weights beside the originals, and writing them back for ``merge_and_unload``.

Folded weights are computed in float32 from the untouched originals, cast once, and kept as
non-persistent buffers under ``rewriter_merged``: the model's own parameters never change, so
unmerge is exact and repeated cycles cannot drift."""
from __future__ import annotations

import warnings
from typing import Mapping, Sequence

import torch
from torch import fx, nn

from ..core.adapter import AdapterModule
from ..core.graph import MERGED_ATTR, fold_site
from ..core.sites import Site, site_operands
from ..errors import MergeError
from ..progress import bar

Folded = dict[Site, tuple[torch.Tensor, torch.Tensor | None]]


@torch.no_grad()
def fold_sites(gm: fx.GraphModule, sites: Mapping[str, Site], stacks: Mapping[str, Sequence[AdapterModule]],
               *, safe: bool, names: Sequence[str]) -> Folded:
    """Each site's weight and bias with its stack (bottom to top) folded in.  ``safe``: refuse
    non-finite results before anything changes."""
    folded: Folded = {}
    for site in bar(sites.values(), desc="merging", unit="site"):
        stack = stacks.get(site.name)
        if not stack:
            continue
        weight = gm.get_parameter(site.weight)
        bias = gm.get_parameter(site.bias) if site.bias else None
        w, b = fold_site(weight, bias, stack, fan_in_fan_out=site.fan_in_fan_out)
        if safe:
            for what, t in (("weight", w), ("bias", b)):
                if t is not None and not torch.isfinite(t).all():
                    raise MergeError(f"merging {list(names)} gives non-finite values in the {what} of '{site.name}'",
                                     fix="the model was left unchanged; inspect that site's adapter weights")
        folded[site] = (w, b)
    return folded


def store(holder: nn.Module, folded: Folded) -> None:
    clear(holder)
    for site, (w, b) in folded.items():
        holder.register_buffer(f"{site.key}__weight", w, persistent=False)
        if b is not None:
            holder.register_buffer(f"{site.key}__bias", b, persistent=False)


def clear(holder: nn.Module) -> None:
    for key in list(holder._buffers):
        delattr(holder, key)


def merged_attrs(holder: nn.Module, sites: Mapping[str, Site]) -> dict[str, tuple[str, str | None]]:
    """Site name -> paths of its folded (weight, bias) in the GraphModule."""
    out = {}
    for site in sites.values():
        w = f"{site.key}__weight"
        if hasattr(holder, w):
            b = f"{site.key}__bias"
            out[site.name] = (f"{MERGED_ATTR}.{w}", f"{MERGED_ATTR}.{b}" if hasattr(holder, b) else None)
    return out


def folded_tensors(holder: nn.Module, sites: Mapping[str, Site]) -> dict[str, torch.Tensor]:
    """Parameter path -> the folded tensor that replaces it."""
    out = {}
    for site in sites.values():
        if hasattr(holder, f"{site.key}__weight"):
            out[site.weight] = getattr(holder, f"{site.key}__weight")
            if site.bias and hasattr(holder, f"{site.key}__bias"):
                out[site.bias] = getattr(holder, f"{site.key}__bias")
    return out


@torch.no_grad()
def write_back(gm: fx.GraphModule, source: nn.Module | None, base_graph: fx.Graph, path: str,
               value: torch.Tensor) -> fx.Graph:
    """Copy ``value`` into the parameter at ``path``; a tied parameter is untied first, so the other
    users keep the original.  Returns the base graph, with non-matmul readers of the tie retargeted."""
    param = gm.get_parameter(path)
    aliases = [n for n, p in gm.named_parameters(remove_duplicate=False) if p is param]
    if len(aliases) == 1:
        param.copy_(value)
        return base_graph
    untied = nn.Parameter(value.clone(), requires_grad=param.requires_grad)
    owner, _, attr = path.rpartition(".")
    for root in [gm] + ([source] if source is not None else []):
        try:
            setattr(root.get_submodule(owner), attr, untied)
        except AttributeError:
            pass
    if source is not None and getattr(getattr(source, "config", None), "tie_word_embeddings", False):
        source.config.tie_word_embeddings = False
    warnings.warn(f"'{path}' was tied to {[a for a in aliases if a != path]}; it was untied so the merge "
                  "does not change them", stacklevel=3)
    return retarget(base_graph, path, aliases)


def retarget(graph: fx.Graph, path: str, aliases: list[str]) -> fx.Graph:
    """Point non-matmul readers of a tied weight at another alias of the original tensor."""
    others = [a for a in aliases if a != path]
    for node in graph.nodes:
        if node.op == "get_attr" and node.target == path:
            for user in list(node.users):
                ops = site_operands(user)
                if ops is None or ops[1] is not node:
                    with graph.inserting_before(user):
                        user.replace_input_with(node, graph.get_attr(others[0]))
    return graph
