"""X-LoRA's one target, the whole model: the classifier's input (the last hidden state) and the
experts, resolved from adapters on the model or from LoRA checkpoints."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Mapping

import torch
from torch import fx

from ...core.sites import Site, site_operands
from ...errors import CheckpointError, ConfigError
from ..registry import get_method
from ..lora import LoraModule
from .config import XLoraConfig

TARGET = "model"


@dataclass(frozen=True)
class XLoraTarget:
    """Site-like description of the whole model, with what the X-LoRA module is built from."""
    hidden: str                        #: graph node of the classifier's input hidden state
    weight: str                        #: a model parameter the classifier follows (device, dtype)
    in_features: int                   #: hidden size
    dtype: torch.dtype
    sites: Mapping[str, Site]
    module_order: tuple[str, ...]      #: site names in the model's module order (PEFT's layer numbers)
    resolve: Callable                  #: config -> [(expert label, {site: LoraModule})]
    name: str = TARGET
    key: str = TARGET
    bias: str | None = None

    @property
    def out_features(self) -> int:
        return self.in_features


def find_targets(adapted) -> list[XLoraTarget]:
    hidden, weight = hidden_state(adapted)
    val = hidden.meta.get("val")
    if not isinstance(val, torch.Tensor):
        raise ConfigError(f"the hidden state node '{hidden.name}' has no shape information",
                          fix="trace the model with torch.export (rewriter.apply does)")
    source = adapted.source_model
    names = [n for n, _ in source.named_modules()] if source is not None else []
    order = [n for n in names if n in adapted.sites]
    order += [n for n in adapted.sites if n not in set(order)]
    return [XLoraTarget(hidden=hidden.name, weight=weight, in_features=int(val.shape[-1]), dtype=val.dtype,
                        sites=adapted.sites, module_order=tuple(order),
                        resolve=lambda config: resolve_experts(adapted, config))]


def hidden_state(adapted) -> tuple[fx.Node, str]:
    """What PEFT's classifier reads (``hidden_states[-1]``): the LM head's input, else the
    ``last_hidden_state`` output; and a parameter for the classifier's dtype."""
    graph = adapted.base_graph
    nodes = {n.name: n for n in graph.nodes}
    source = adapted.source_model
    head = source.get_output_embeddings() if source is not None and hasattr(source, "get_output_embeddings") else None
    head_name = next((n for n, m in source.named_modules() if m is head), None) if head is not None else None
    if head_name in adapted.sites:
        site = adapted.sites[head_name]
        return site_operands(nodes[site.nodes[0]])[0], site.weight
    spec = getattr(adapted.gm, "_out_spec", None)
    keys = list(spec.context) if spec is not None and isinstance(spec.context, (list, tuple)) else []
    output = next(n for n in graph.nodes if n.op == "output")
    leaves = output.args[0] if isinstance(output.args[0], (list, tuple)) else [output.args[0]]
    if "last_hidden_state" in keys and len(leaves) == len(keys):
        first_site = next(iter(adapted.sites.values()))
        return leaves[keys.index("last_hidden_state")], first_site.weight
    raise ConfigError("X-LoRA's classifier reads the model's last hidden state, but this graph has neither an LM "
                      "head layer nor a 'last_hidden_state' output",
                      fix="use a causal LM (…ForCausalLM) or a base model that returns last_hidden_state")


def resolve_experts(adapted, config: XLoraConfig) -> list[tuple[str, dict[str, LoraModule]]]:
    """The experts ``config.adapters`` names, as fresh copies: ``[(label, {site: LoraModule})]``."""
    refs = config.adapters
    if not refs:
        raise ConfigError("X-LoRA needs at least one expert", field="adapters",
                          fix='e.g. adapters = ["math", "code"] (LoRA adapters on the model)')
    if isinstance(refs, dict):
        return [(label, read_expert(adapted, label, path)) for label, path in refs.items()]
    if isinstance(refs[0], dict):  # layouts saved with a checkpoint: shapes only, values come from it
        missing = sorted({site for e in refs for site in e["sites"] if site not in adapted.sites})
        if missing:
            raise ConfigError(f"the saved X-LoRA experts adapt modules this model does not have: {missing[:3]}",
                              field="adapters", fix="load it with remap= (a [remap] table renaming the saved module "
                                                    "names), or on the model it was saved from")
        lora = get_method("lora")
        return [(e["name"], {site: LoraModule(adapted.sites[site], lora.make_config(params))
                             for site, params in e["sites"].items()}) for e in refs]
    out = []
    for name in refs:
        if name not in adapted.adapters:
            raise ConfigError(f"X-LoRA expert '{name}' is not an adapter on this model", field="adapters",
                              fix=f"add it first (adapters: {', '.join(adapted.adapters) or 'none'}), "
                                  "or give checkpoint paths: adapters = {0 = \"path\"}")
        modules = adapted.adapters[name].modules
        if not all(isinstance(m, LoraModule) for m in modules.values()):
            raise ConfigError(f"X-LoRA expert '{name}' is not a LoRA adapter ({adapted.adapters[name].method})",
                              field="adapters", fix="experts must be plain LoRA adapters")
        out.append((name, {site: copy.deepcopy(m) for site, m in modules.items()}))
    return out


def read_expert(adapted, label: str, path: str, remap=None) -> dict[str, LoraModule]:
    try:
        modules = adapted.read_adapter_modules(path, remap)
    except CheckpointError as exc:
        raise ConfigError(f"X-LoRA expert '{label}' ({path}): {exc.what}", field="adapters",
                          fix=exc.fix or "point at a LoRA checkpoint directory") from None
    if not all(isinstance(m, LoraModule) for m in modules.values()):
        raise ConfigError(f"X-LoRA expert '{label}' ({path}) is not a LoRA checkpoint", field="adapters",
                          fix="experts must be plain LoRA adapters")
    return modules
