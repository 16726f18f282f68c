"""X-LoRA: a mixture of LoRA experts weighted per token and per layer by a learned classifier.

One adapter for the whole model (target ``model``).  Its experts are copies of LoRA adapters (by
name, from this model) or LoRA checkpoints (PEFT's ``{"0": path, ...}``), frozen unless
``use_trainable_adapters``.  The live graph computes PEFT 0.21.2's two passes as straight-line code:

1. scaling pass: a copy of only the nodes the classifier's input needs (the LM head's input, i.e.
   after the final norm, or the ``last_hidden_state`` output), with every expert scaled by
   ``scaling_pass_value``.  At 0 (the default) experts without a bias add exactly 0, so that pass
   has no expert nodes at all.  Its hidden state is detached (no gradient reaches the pass);
2. the classifier turns that hidden state into scalings ``(batch, seq, n_layers, n_experts)``;
3. main pass: every expert layer ``l`` computes ``y + sum_i g * s_i * B_i A_i dropout(x * lam_i)``
   with ``lam = scalings[:, :, l]`` after top-k (no renormalisation) and the optional softmax over
   the kept entries, ``g`` the global scaling weight.

``n_layers`` counts the expert layers (the union of the experts' sites) in the model's module order,
as PEFT numbers them.  The output depends on the input, so the adapter is not mergeable.
"""
from __future__ import annotations

import copy
import dataclasses
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..errors import CheckpointError, ConfigError, RewriterError
from ..core.sites import Site, site_operands
from ..core.adapter import AdapterModule
from .base import MethodSpec
from .checks import check_bool, check_int, check_number, check_probability
from .registry import get_method, register
from .lora import LoraModule, add_into, up_projection

TARGET = "model"


# ---- config ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class XLoraConfig:
    #: the experts: names of LoRA adapters on this model, or PEFT's ``{"0": path, ...}`` of LoRA
    #: checkpoint directories (either format); a loaded checkpoint holds its experts' layouts here
    adapters: Any = ()
    hidden_size: int | None = None   #: the classifier's input size; None: read from the graph
    enable_softmax: bool = True
    enable_softmax_topk: bool = False
    softmax_temperature: float = 1.0
    layerwise_scalings: bool = False
    top_k_lora: int | None = None
    xlora_depth: int = 1
    xlora_size: int = 2048
    xlora_dropout_p: float = 0.2
    use_trainable_adapters: bool = False
    scaling_pass_value: float = 0.0
    global_scaling_weight: float = 1.0

    def __post_init__(self):
        object.__setattr__(self, "adapters", _normalise_adapters(self.adapters))
        if self.hidden_size is not None:
            check_int("hidden_size", self.hidden_size, minimum=1)
        for name in ("enable_softmax", "enable_softmax_topk", "layerwise_scalings", "use_trainable_adapters"):
            check_bool(name, getattr(self, name))
        for name in ("softmax_temperature", "scaling_pass_value", "global_scaling_weight"):
            check_number(name, getattr(self, name))
        if self.softmax_temperature <= 0:
            raise ConfigError(f"'softmax_temperature' must be > 0, got {self.softmax_temperature}",
                              field="softmax_temperature")
        if self.top_k_lora is not None:
            check_int("top_k_lora", self.top_k_lora, minimum=1)
        check_int("xlora_depth", self.xlora_depth, minimum=1)
        check_int("xlora_size", self.xlora_size, minimum=1)
        check_probability("xlora_dropout_p", self.xlora_dropout_p)


def _normalise_adapters(adapters):
    """Names -> tuple of str; PEFT's paths -> dict str -> str; saved layouts -> tuple of dicts."""
    bad = ConfigError(f"'adapters' must be a list of LoRA adapter names or a table of checkpoint paths "
                      f"(PEFT's {{\"0\" = \"path\", ...}}), got {adapters!r}", field="adapters",
                      fix='e.g. adapters = ["math", "code"] (adapters on the model) or adapters = {0 = "ckpt/math"}')
    if isinstance(adapters, Mapping):
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in adapters.items()):
            raise bad
        return dict(adapters)
    if isinstance(adapters, (list, tuple)):
        if all(isinstance(a, str) for a in adapters):
            if len(set(adapters)) != len(adapters):
                raise ConfigError(f"'adapters' names an expert twice: {list(adapters)}", field="adapters")
            return tuple(adapters)
        if all(isinstance(a, Mapping) and isinstance(a.get("sites"), Mapping) for a in adapters):
            return tuple({"name": str(a.get("name", i)), "sites": dict(a["sites"])} for i, a in enumerate(adapters))
    raise bad


# ---- the target: the whole model ------------------------------------------------------------

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
    hidden, weight = _hidden_state(adapted)
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


def _hidden_state(adapted) -> tuple[fx.Node, str]:
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
        return [(label, _read_expert(adapted, label, path)) for label, path in refs.items()]
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


def _read_expert(adapted, label: str, path: str, remap=None) -> dict[str, LoraModule]:
    from ..checkpoint import read_adapter_modules
    try:
        modules = read_adapter_modules(adapted, path, remap)
    except CheckpointError as exc:
        raise ConfigError(f"X-LoRA expert '{label}' ({path}): {exc.what}", field="adapters",
                          fix=exc.fix or "point at a LoRA checkpoint directory") from None
    if not all(isinstance(m, LoraModule) for m in modules.values()):
        raise ConfigError(f"X-LoRA expert '{label}' ({path}) is not a LoRA checkpoint", field="adapters",
                          fix="experts must be plain LoRA adapters")
    return modules


# ---- the module -----------------------------------------------------------------------------

class XLoraClassifier(nn.Module):
    """PEFT's classifier (same layer indices, so PEFT's ``internal_xlora_classifier`` keys load)."""

    def __init__(self, hidden: int, n_experts: int, n_layers: int, config: XLoraConfig):
        super().__init__()
        self.n_experts, self.n_layers, self.config = n_experts, n_layers, config
        out = n_experts * n_layers if config.layerwise_scalings else n_experts
        layers: list[nn.Module] = []
        width = hidden
        for _ in range(config.xlora_depth - 1):
            layers += [nn.Linear(width, config.xlora_size), nn.ReLU()]
            if config.xlora_dropout_p > 0:
                layers.append(nn.Dropout(config.xlora_dropout_p))
            width = config.xlora_size
        self.layers = nn.Sequential(*layers, nn.Linear(width, out))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.layers(hidden)
        b, s = hidden.shape[:2]
        if self.config.layerwise_scalings:  # entry l * n + i is expert i at layer l
            logits = logits.reshape(b, s, self.n_layers, self.n_experts)
        else:
            logits = logits.unsqueeze(2).expand(b, s, self.n_layers, self.n_experts)
        if self.config.enable_softmax:
            return torch.softmax(logits / self.config.softmax_temperature, dim=-1)
        return logits


def select_top_k(scalings: torch.Tensor, top_k: int | None, softmax_topk: bool) -> torch.Tensor:
    """PEFT's per-token expert selection: zero all but the top k (no renormalisation), then
    optionally softmax over the entries that are not zero."""
    if top_k is not None:
        keep = torch.zeros_like(scalings, dtype=torch.bool).scatter_(-1, scalings.topk(top_k, dim=-1).indices, True)
        scalings = scalings * keep.to(scalings.dtype)
    if softmax_topk:
        nonzero = scalings != 0
        scalings = scalings.masked_fill(~nonzero, float("-inf")).softmax(-1).masked_fill(~nonzero, 0.0)
    return scalings


class XLoraModule(AdapterModule):
    has_post = False  # not a per-layer adapter: the method's rewrite inserts its nodes
    not_mergeable = ("X-LoRA weights its experts per token with scalings computed from the input, so no fixed "
                     "weight computes it (PEFT 0.21.2 'merges' the unweighted sum of the experts, which changes "
                     "the outputs)")

    def __init__(self, target: XLoraTarget, config: XLoraConfig):
        super().__init__(target, config)
        experts = target.resolve(config)
        used = {site for _, modules in experts for site in modules}
        self.layers = tuple(site for site in target.module_order if site in used)  #: layer l -> site name
        self.layer_keys = tuple(target.sites[site].key for site in self.layers)
        self.expert_names = tuple(label for label, _ in experts)
        n = len(experts)
        hidden = config.hidden_size or target.in_features
        if hidden != target.in_features:
            raise ConfigError(f"'hidden_size' is {hidden} but the model's last hidden state has "
                              f"{target.in_features} features", field="hidden_size",
                              fix=f"set hidden_size = {target.in_features}, or leave it out")
        if config.top_k_lora is not None and config.top_k_lora > n:
            raise ConfigError(f"'top_k_lora' is {config.top_k_lora} but there are only {n} experts",
                              field="top_k_lora")
        self.classifier = XLoraClassifier(hidden, n, len(self.layers), config)
        self.experts = nn.ModuleList(nn.ModuleDict({target.sites[s].key: m for s, m in modules.items()})
                                     for _, modules in experts)
        self.latest_scalings: torch.Tensor | None = None
        self.scalings_log: list[torch.Tensor] = []
        self.logging = False
        self.requires_grad_(False)

    def requires_grad_(self, requires_grad: bool = True):
        """The experts stay frozen unless ``use_trainable_adapters`` (PEFT trains only the classifier)."""
        self.classifier.requires_grad_(requires_grad)
        self.experts.requires_grad_(requires_grad and self.config.use_trainable_adapters)
        return self

    def set_config(self, config: XLoraConfig) -> None:
        self.config = self.classifier.config = config

    def forward(self, x, y=None, scalings=None, *, stage: str, layer: int | None = None):
        if stage == "scalings":
            return self.scalings(x)
        return self.mix(x, y, scalings, layer)

    def scalings(self, hidden: torch.Tensor) -> torch.Tensor:
        """Classifier scalings for the main pass (after top-k); records the raw ones."""
        raw = self.classifier(hidden.to(self.adapter_dtype))
        self.latest_scalings = raw.detach()
        if self.logging:
            self.scalings_log.append(self.latest_scalings)
        return select_top_k(raw, self.config.top_k_lora, self.config.enable_softmax_topk)

    def mix(self, x, y, scalings, layer: int):
        """Layer ``layer``'s output ``y`` plus its experts weighted per token; ``scalings`` None: the
        scaling pass's constant ``scaling_pass_value``.  ``x`` may be flattened to (tokens, in)."""
        n = len(self.experts)
        if scalings is None:
            constant = torch.full((*x.shape[:-1], 1, n), self.config.scaling_pass_value, dtype=self.adapter_dtype,
                                  device=x.device)
            lam = select_top_k(constant, self.config.top_k_lora, self.config.enable_softmax_topk)[..., 0, :]
        else:
            lam = scalings[:, :, layer].reshape(*x.shape[:-1], n)
        weight = self.config.global_scaling_weight
        key = self.layer_keys[layer]
        out_dtype = y.dtype
        present = [(i, experts[key]) for i, experts in enumerate(self.experts) if key in experts]
        if all(_linear_in_x(expert) for _, expert in present):
            return _fused_mix(x, y, lam, present, weight).to(out_dtype)
        for i, experts in enumerate(self.experts):
            if key not in experts:
                continue  # PEFT still counts it: expert i keeps scalings column i
            expert = experts[key]
            x_i = x.to(expert.adapter_dtype) * lam[..., i:i + 1]
            if weight == 1:
                y = expert.post(x_i, y, None)
            else:
                y = y + weight * expert.post(x_i, torch.zeros_like(y, dtype=expert.adapter_dtype), None)
        return y.to(out_dtype)

    def expert_layouts(self) -> list[dict]:
        """Per expert, its sites and LoRA parameters: enough to rebuild the experts' shapes."""
        lora = get_method("lora")
        by_key = dict(zip(self.layer_keys, self.layers))
        return [{"name": label, "sites": {by_key[k]: lora.config_dict(m.config) for k, m in experts.items()}}
                for label, experts in zip(self.expert_names, self.experts)]

    def extra_repr(self) -> str:
        return f"experts={list(self.expert_names)}, layers={len(self.layers)}"


def _linear_in_x(expert: LoraModule) -> bool:
    """The expert's delta is linear in its input: no bias on B, no dropout drawing a mask now."""
    return expert.lora_B_bias is None and (isinstance(expert.dropout, nn.Identity) or not expert.training)


def _fused_mix(x, y, lam, present, weight):
    """``y + sum_i g s_i B_i A_i (x lam_i)`` as two matmuls for all experts: lam_i is one number per
    token, so it moves past A_i and scales expert i's rank columns (exact up to rounding)."""
    dtype = present[0][1].adapter_dtype
    a = torch.cat([expert.lora_A for _, expert in present])
    b = torch.cat([expert.lora_B for _, expert in present], dim=1)
    columns = torch.cat([torch.full((expert.lora_A.shape[0],), i, device=x.device) for i, expert in present])
    per_rank = torch.cat([torch.full((expert.lora_A.shape[0],), expert.scaling * weight, dtype=dtype,
                                     device=x.device) for _, expert in present])
    h = F.linear(x.to(dtype), a) * (lam[..., columns] * per_rank)
    return add_into(y, up_projection(h, b))


# ---- the rewrite ----------------------------------------------------------------------------

def rewrite(graph: fx.Graph, entries, adapted) -> fx.Graph:
    ((target, entry),) = entries
    module: XLoraModule = entry.module
    _check_alone(adapted, entry.meta["adapter"], module)
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
    needed = _ancestors(hidden)
    anchor = [n for n in graph.nodes if n.op == "placeholder"][-1].next  # the inputs are all defined here
    scaled = module.config.scaling_pass_value != 0 or _has_bias(module)
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


def _ancestors(node: fx.Node) -> set[fx.Node]:
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo.extend(n.all_input_nodes)
    return seen


def _has_bias(module: XLoraModule) -> bool:
    return any(m.lora_B_bias is not None for experts in module.experts for m in experts.values())


def _check_alone(adapted, name: str, module: XLoraModule) -> None:
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


# ---- runtime API (PEFT's names, on Adapted) -------------------------------------------------

def xlora_adapter(adapted) -> tuple[str, XLoraModule]:
    """The active X-LoRA adapter, else the only one on the model."""
    found = [(n, r.modules[TARGET]) for n, r in adapted.adapters.items() if r.method == "xlora"]
    active = [(n, m) for n, m in found if n in adapted.active_adapters]
    if len(active) == 1 or len(found) == 1:
        return (active or found)[0]
    raise RewriterError("no X-LoRA adapter on this model" if not found else
                        f"several X-LoRA adapters ({', '.join(n for n, _ in found)}) and not exactly one active",
                        fix="add one with method = \"xlora\"" if not found else "set_adapter() the one you mean")


def update_config(adapted, **changes) -> None:
    """Change runtime settings of the X-LoRA adapter; the plan (what is saved) follows."""
    name, module = xlora_adapter(adapted)
    config = dataclasses.replace(module.config, **changes)
    if config.top_k_lora is not None and config.top_k_lora > len(module.experts):
        raise ConfigError(f"top_k_lora {config.top_k_lora} > {len(module.experts)} experts", field="top_k_lora")
    module.set_config(config)
    plan = adapted.adapters[name].plan
    plan.decisions = [dataclasses.replace(d, config=config) for d in plan.decisions]
    adapted._refresh()


def bucketed(log: list[torch.Tensor]) -> dict[int, tuple[list[int], list[torch.Tensor]]]:
    """PEFT's ``get_bucketed_scalings_log``: ``{seq_len: (positions in the log, tensors)}``."""
    out: dict[int, tuple[list[int], list[torch.Tensor]]] = {}
    for i, s in enumerate(log):
        positions, tensors = out.setdefault(s.shape[1], ([], []))
        positions.append(i)
        tensors.append(s)
    return out


# ---- checkpoints ----------------------------------------------------------------------------

class XLoraCheckpoint:
    """Our format: the module's tensors (classifier and experts) plus the experts' layouts, which
    let a fresh model build the experts before their values are filled in.  PEFT's format: see
    :func:`save_peft` and :func:`load_peft`."""

    @staticmethod
    def save(module: XLoraModule, controller, site: str):
        return module.state_dict(), {"experts": module.expert_layouts()}

    @staticmethod
    def load(module: XLoraModule, tensors, extra) -> None:
        from ..checkpoint import fill_modules
        fill_modules({TARGET: module}, tensors, lambda site, key: key, where=f"X-LoRA adapter '{TARGET}'")

    @staticmethod
    def remap(extra, tensors, remap):
        """Rename the experts' sites in the saved layouts and in the expert tensor keys
        (``experts.<i>.<site key>.<parameter>``, a site key being its name with "." as "__")."""
        experts = [{**e, "sites": {remap.apply(site): params for site, params in e["sites"].items()}}
                   for e in extra["experts"]]

        def key(name: str) -> str:
            parts = name.split(".")
            if len(parts) == 4 and parts[0] == "experts":
                parts[2] = remap.apply(parts[2].replace("__", ".")).replace(".", "__")
            return ".".join(parts)
        return {**extra, "experts": experts}, {key(k): v for k, v in tensors.items()}

    @staticmethod
    def config_with_extra(config: XLoraConfig, extra) -> XLoraConfig:
        experts = extra.get("experts") if isinstance(extra, Mapping) else None
        try:
            return dataclasses.replace(config, adapters=experts)
        except ConfigError as exc:
            raise CheckpointError(f"invalid X-LoRA expert layouts in the manifest: {exc.what}",
                                  fix="the manifest was edited or corrupted: save the adapter again") from None

    @staticmethod
    def save_peft(adapted, name: str, directory) -> None:
        save_peft(adapted, name, directory)

    @staticmethod
    def load_peft(adapted, directory, cfg, name: str, activate, remap=None):
        return load_peft(adapted, directory, cfg, name, activate, remap)


PEFT_CLASSIFIER = "base_model.internal_xlora_classifier."
_PEFT_ONLY_FIELDS = {"peft_type", "task_type", "inference_mode", "base_model_name_or_path", "revision",
                     "auto_mapping", "peft_version"}


def save_peft(adapted, name: str, directory) -> None:
    """PEFT's layout: ``adapter_config.json`` (XLoraConfig, ``adapters`` = absolute paths of the
    expert sub-directories ``<dir>/<i>/``, plain LoRA checkpoints), and the classifier in
    ``adapter_model.safetensors``.  All classifier keys are written (PEFT 0.21.2's own save drops
    those containing ``.<expert name>.``)."""
    import json
    from pathlib import Path
    from ..checkpoint import PEFT_CONFIG, PEFT_WEIGHTS, _tensor_bytes, atomic_write, save_modules_peft
    directory = Path(directory).resolve()
    module: XLoraModule = adapted.adapters[name].modules[TARGET]
    paths = {}
    for i, experts in enumerate(module.experts):
        by_key = dict(zip(module.layer_keys, module.layers))
        save_modules_peft(adapted, "lora", {by_key[k]: m for k, m in experts.items()}, directory / str(i))
        paths[str(i)] = str(directory / str(i))
    fields = dataclasses.asdict(module.config)
    source = adapted.source_model
    config = {**fields, "adapters": paths, "hidden_size": module.classifier.layers[0].in_features,
              "peft_type": "XLORA", "task_type": "CAUSAL_LM", "inference_mode": True, "revision": None,
              "base_model_name_or_path": getattr(getattr(source, "config", None), "_name_or_path", None) or None,
              "auto_mapping": None, "peft_version": "0.21.2"}
    tensors = {PEFT_CLASSIFIER + k: v for k, v in module.classifier.state_dict().items()}
    atomic_write(directory / PEFT_WEIGHTS, _tensor_bytes(tensors, {"format": "pt"}))
    atomic_write(directory / PEFT_CONFIG, json.dumps(dict(sorted(config.items())), indent=2).encode())


def load_peft(adapted, directory, cfg: Mapping[str, Any], name: str, activate, remap=None):
    """Read a PEFT X-LoRA directory; returns ``(name, install)``.  Experts come from the config's
    paths, relative ones also tried against the directory, then PEFT's ``<dir>/<key>/`` copies; with a
    ``remap`` table, they are read renamed.  Classifier keys PEFT 0.21.2 failed to save keep their fresh
    values, with a warning."""
    from pathlib import Path
    from ..checkpoint import PEFT_WEIGHTS, read_tensors
    from ..rules import Decision, Plan
    directory = Path(directory)
    where = str(directory / "adapter_config.json")
    fields = {k: v for k, v in cfg.items() if k not in _PEFT_ONLY_FIELDS}
    paths = fields.get("adapters")
    if not isinstance(paths, Mapping) or not paths:
        raise CheckpointError("X-LoRA config has no 'adapters' table of expert paths", where=where)
    fields["adapters"] = {key: _expert_path(directory, key, path, where) for key, path in paths.items()}
    renamed = {}
    if remap:  # read the experts renamed, then build from their layouts and fill them in below
        renamed = {key: _read_expert(adapted, key, path, remap) for key, path in fields["adapters"].items()}
        lora_spec = get_method("lora")
        fields["adapters"] = [{"name": key, "sites": {site: lora_spec.config_dict(m.config)
                                                      for site, m in modules.items()}}
                              for key, modules in renamed.items()]
    spec = get_method("xlora")
    try:
        config = spec.make_config(fields)
    except ConfigError as exc:
        raise CheckpointError(f"invalid X-LoRA config: {exc.what}", where=where, fix=exc.fix) from None
    p = Plan(adapter=name, decisions=[Decision(site=TARGET, rule="peft", method="xlora", config=config)], train=[],
             counts={"peft": 1}, skipped={}, unmatched={}, shadowed={})
    module: XLoraModule = adapted.build_modules(p)[TARGET]
    weights = directory / PEFT_WEIGHTS
    raw = read_tensors(weights) if weights.exists() else {}
    state = module.classifier.state_dict()
    saved = {k[len(PEFT_CLASSIFIER):]: v for k, v in raw.items() if k.startswith(PEFT_CLASSIFIER)}
    unexpected = sorted(set(saved) - set(state)) + sorted(k for k in raw if not k.startswith(PEFT_CLASSIFIER))
    bad = [k for k in saved if k in state and saved[k].shape != state[k].shape]
    if unexpected or bad:
        raise CheckpointError(f"X-LoRA classifier weights do not fit: unexpected {unexpected[:4]}, shape mismatch "
                              f"{bad[:4]}", where=str(weights), fix="load it onto the model it was trained for")
    missing = sorted(set(state) - set(saved))
    if missing:
        warnings.warn(f"{weights}: X-LoRA classifier keys {missing} are missing and keep fresh random values, as "
                      "in PEFT (PEFT 0.21.2's save drops keys containing '.<expert name>.', e.g. layers.0): outputs "
                      "will differ from the model that was saved", stacklevel=4)
    with torch.no_grad():
        for k, v in saved.items():
            state[k].copy_(v)
        for experts, modules in zip(module.experts, renamed.values()):
            for site, expert in modules.items():
                experts[adapted.sites[site].key].load_state_dict(expert.state_dict())

    def install():
        adapted.install(name, p, None, {TARGET: module}, activate=activate, method="xlora")
    return name, install


def _expert_path(directory, key: str, path: str, where: str) -> str:
    from pathlib import Path
    for candidate in (Path(path), directory / path, directory / key):
        if candidate.is_dir():
            return str(candidate)
    raise CheckpointError(f"X-LoRA expert '{key}': no directory at '{path}' (nor at {directory / key})", where=where,
                          fix="copy the expert LoRA checkpoints there; PEFT 0.21.2's own copies in the sub-directories "
                              "are incomplete, so use the original expert directories")


class WholeModel:
    """The graph scope: one target, the whole model; the rewrite adds the scaling pass and the mixture."""
    find_targets = staticmethod(find_targets)
    rewrite = staticmethod(rewrite)

    @staticmethod
    def select(chosen):
        return [target for target, _ in chosen]


SPEC = register(MethodSpec(
    name="xlora",
    config_cls=XLoraConfig,
    module_cls=XLoraModule,
    peft_type="XLORA",
    scope=WholeModel(),
    checkpoint_hooks=XLoraCheckpoint(),
    summary="mixture of LoRA experts, weighted per token and layer by a classifier (Buehler & Buehler 2024)",
    cannot_generate="X-LoRA's scaling pass runs the whole model a second time, which the static-KV-cache decoding "
                    "graph does not",
))
