"""``Adapted``: the model users hold after rewriting.

It owns a traced GraphModule, the pristine base graph, and named adapters.  Any state
change (active set, merge, disable, delete) regenerates the live graph from the base
graph, so the forward is straight-line code for the current configuration.

Merging never writes into the model's own parameters: folded weights are computed in
float32 from the untouched originals, cast once, and stored beside them, so unmerge is
exact by construction and repeated cycles cannot drift.  ``merge_and_unload`` is the one
operation that writes folded weights back into the model.
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import fx, nn

from .errors import ConfigError, MergeError, RewriterError, RuleError
from .core.graph import ADAPTERS_ATTR, MERGED_ATTR, MIX_ATTR, StackEntry, build_graph, copy_graph, fold_site, gate_rows
from .methods import AdapterModule, get_method
from .rules import Plan, RuleSet, load_rules, parse_rules, plan, rules_from_dict
from .core.sites import Site, find_sites, normalize
from .core.tracing import Traced, trace_model

#: submodule holding each adapter's own copies of the modules its ``train`` rules name (PEFT's
#: modules_to_save): ``rewriter_trained.<adapter>.<module key>__<param>``
TRAINED_ATTR = "rewriter_trained"


@dataclass
class AdapterRecord:
    name: str
    method: str                          #: the adapter's main method ([adapter] method)
    plan: Plan
    ruleset: RuleSet | None
    modules: dict[str, AdapterModule]     #: site name -> module
    train_modules: list[str] = field(default_factory=list)
    controller: Any = None

    def decision(self, site: str):
        return next(d for d in self.plan.decisions if d.site == site)

    @property
    def graph_scope(self):
        """The method's graph rewrite (None: adapters at linear sites)."""
        return get_method(self.method).graph_scope


def coerce_rules(rules) -> RuleSet:
    """A RuleSet from a RuleSet, a path, TOML text, or a dict."""
    if isinstance(rules, RuleSet):
        return rules
    if isinstance(rules, Mapping):
        return rules_from_dict(rules)
    if isinstance(rules, Path) or (isinstance(rules, str) and "\n" not in rules and rules.endswith(".toml")):
        return load_rules(rules)
    if isinstance(rules, str):
        return parse_rules(rules)
    raise RewriterError(f"cannot read rules from {type(rules).__name__}",
                        fix="pass a path to a .toml file, TOML text, a dict, or a RuleSet")


def adapter_dtype_for(base: torch.dtype) -> torch.dtype:
    """Adapters live in float32 on half-precision bases (as PEFT's autocast_adapter_dtype)."""
    return torch.float32 if base in (torch.float16, torch.bfloat16) or not base.is_floating_point else base


class Adapted(nn.Module):
    def __init__(self, traced: Traced):
        super().__init__()
        self.gm = normalize(traced.gm)
        self._traced = traced
        self._source = [traced.source]  # a list keeps the user's model out of our submodules
        self._base_graph = copy_graph(self.gm.graph)
        self.sites: dict[str, Site] = {s.name: s for s in find_sites(self.gm)}
        keys: dict[str, str] = {}
        for s in self.sites.values():
            if s.key in keys:
                raise RewriterError(f"sites '{keys[s.key]}' and '{s.name}' map to the same attribute name '{s.key}'")
            keys[s.key] = s.name
        for p in self.gm.parameters():
            p.requires_grad_(False)
        self.gm.add_submodule(ADAPTERS_ATTR, nn.Module())
        self.gm.add_submodule(MERGED_ATTR, nn.Module())
        self.gm.add_submodule(TRAINED_ATTR, nn.Module())
        self._mixed: dict[tuple[str, ...], fx.GraphModule] = {}  # mixed-batch graphs, by adapter set
        self._graph_targets: dict[str, dict[str, Any]] = {}  # graph-scope method -> its targets, by name
        self.adapters: dict[str, AdapterRecord] = {}
        self._active: list[str] = []
        self._merged: list[str] = []
        self._disabled = False
        self.training = False

    # ---- adapters ---------------------------------------------------------------------------

    @property
    def _container(self) -> nn.Module:
        return self.gm.get_submodule(ADAPTERS_ATTR)

    @property
    def _merged_holder(self) -> nn.Module:
        return self.gm.get_submodule(MERGED_ATTR)

    @property
    def active_adapters(self) -> list[str]:
        return list(self._active)

    @property
    def disabled(self) -> bool:
        """True inside ``disable_adapters()``."""
        return self._disabled

    @property
    def merged(self) -> list[str]:
        """Adapters folded into the weights, bottom to top."""
        return list(self._merged)

    @property
    def source_model(self) -> nn.Module | None:
        return self._source[0]

    @property
    def traced(self) -> Traced:
        """How the graph was traced: example inputs, static keyword arguments, calling convention."""
        return self._traced

    @property
    def base_graph(self) -> fx.Graph:
        """The pristine traced graph every live graph is generated from (do not modify)."""
        return self._base_graph

    def module_names(self) -> list[str]:
        """Names of the model's modules that hold parameters (what ``train`` rules match)."""
        return self._module_names()

    def _module_names(self) -> list[str]:
        return [n for n, m in self.gm.named_modules()
                if n and not n.startswith((ADAPTERS_ATTR, MERGED_ATTR, TRAINED_ATTR))
                and any(True for _ in m.parameters(recurse=False))]

    def targets(self, method: str) -> dict[str, Any]:
        """What rules of ``method`` match: the linear sites, or a graph-scope method's own targets
        (e.g. Llama-Adapter's attention blocks), by name in graph order."""
        spec = get_method(method)
        if spec.graph_scope is None:
            return self.sites
        if method not in self._graph_targets:
            self._graph_targets[method] = {t.name: t for t in spec.graph_scope.find_targets(self)}
        return self._graph_targets[method]

    def target(self, name: str, method: str):
        return self.targets(method)[name]

    def add_adapter(self, rules, adapter_name: str | None = None, *, activate: bool | None = None) -> AdapterRecord:
        """Plan ``rules`` against this model's sites and insert the adapter.
        The first adapter becomes active; later ones only with ``activate=True`` or ``set_adapter``."""
        ruleset = coerce_rules(rules)
        name = adapter_name or ruleset.adapter
        self._check_new_name(name)
        try:
            candidates = self.targets(ruleset.method)
        except ConfigError as exc:  # the rule set cannot apply to this graph: say which rule file
            raise RuleError(exc.what, where=ruleset.where(None, exc.field) if exc.field else ruleset.source,
                            fix=exc.fix) from None
        p = plan(ruleset, list(candidates.values()), self._module_names())
        p.adapter = name
        for w in p.warnings:
            warnings.warn(w, stacklevel=2)
        return self.install(name, p, ruleset, self.build_modules(p), activate=activate)

    def _check_new_name(self, name: str) -> None:
        if not isinstance(name, str) or not name.isidentifier():
            raise RewriterError(f"adapter name {name!r} must be an identifier (letters, digits, _)")
        if name in self.adapters:
            raise RewriterError(f"adapter '{name}' already exists on this model",
                                fix="pick another adapter name, or delete_adapter() it first")

    def build_modules(self, p: Plan, *, device: torch.device | str | None = None) -> dict[str, AdapterModule]:
        """Fresh adapter modules for a plan, on the weights' device (or ``device``, e.g. "meta")."""
        modules = {}
        for d in p.decisions:
            site = self.target(d.site, d.method)
            weight = self.gm.get_parameter(site.weight)
            with torch.device(device or "cpu"):
                module = get_method(d.method).module_cls(site, d.config)
            modules[d.site] = module.to(device=device or weight.device, dtype=adapter_dtype_for(weight.dtype))
        return modules

    def install(self, name: str, p: Plan, ruleset: RuleSet | None, modules: dict[str, AdapterModule], *,
                activate: bool | None = None, method: str | None = None, controller: bool = True,
                trained: Mapping[str, nn.Parameter] | None = None) -> AdapterRecord:
        """Register ready adapter modules (built by :meth:`build_modules`) under ``name``.
        ``controller=False`` skips the method's training controller and ``trained`` shares existing
        copies of trained modules (by path) instead of making new ones: for a second graph of the same
        adapter (generation) that never trains on its own."""
        self._check_new_name(name)
        missing = [d.site for d in p.decisions if d.site not in self.targets(d.method)]
        if missing:
            raise RewriterError(f"adapter '{name}' targets modules this model does not have: {missing[:5]}")
        main = method or (ruleset.method if ruleset is not None else p.decisions[0].method)
        scopes = {get_method(d.method).graph_scope is None for d in p.decisions} | {get_method(main).graph_scope is None}
        if len(scopes) > 1:
            raise ConfigError(f"adapter '{name}' mixes a graph-level method ({main}) with per-layer methods "
                              f"{sorted({d.method for d in p.decisions} - {main})}",
                              fix="put them in separate adapters (one rule file each) and activate both")
        for module in modules.values():
            module.train(self.training)  # new modules follow the model's mode (dropout off in eval)
        keys = {d.site: self.target(d.site, d.method).key for d in p.decisions}
        self._container.add_module(name, nn.ModuleDict({keys[s]: m for s, m in modules.items()}))
        record = AdapterRecord(name=name, method=main, plan=p, ruleset=ruleset, modules=modules,
                               train_modules=[m for m, _ in p.train])
        spec = get_method(main)
        if spec.controller is not None and controller:
            own = {d.site: modules[d.site] for d in p.decisions if d.method == spec.name}
            default = ruleset.params if ruleset is not None else {}
            record.controller = spec.controller(own, spec.make_config(default) if default else p.decisions[0].config)
        self._copy_trained_modules(record, trained)
        self.adapters[name] = record
        self._unfreeze_biases(record)
        if activate or (activate is None and not self._active):
            self._active.append(name)
        self._refresh()
        return record

    def _unfreeze_biases(self, record: AdapterRecord) -> None:
        for d in record.plan.decisions:
            mode = getattr(d.config, "bias", "none")
            if mode == "all":
                for n, p in self.gm.named_parameters():
                    if n.endswith("bias") and not n.startswith((ADAPTERS_ATTR, MERGED_ATTR, TRAINED_ATTR)):
                        p.requires_grad_(True)
            elif mode != "none" and d.site in self.sites and self.sites[d.site].bias:
                self.gm.get_parameter(self.sites[d.site].bias).requires_grad_(True)

    # ---- modules trained whole (train rules; PEFT's modules_to_save) ----------------------------

    @property
    def _trained_holder(self) -> nn.Module:
        return self.gm.get_submodule(TRAINED_ATTR)

    def _copy_trained_modules(self, record: AdapterRecord, shared: Mapping[str, nn.Parameter] | None = None) -> None:
        """Give the adapter its own copy of every module its train rules name: adapters never
        share trained weights, and the model's own module stays as it was (used when disabled)."""
        read = {n.target for n in self._base_graph.nodes if n.op == "get_attr"}
        holder = nn.Module()
        for module in record.train_modules:
            for pname, param in self.gm.get_submodule(module).named_parameters(recurse=False):
                if f"{module}.{pname}" not in read:
                    raise RewriterError(f"module '{module}' is called as a whole in the graph, so adapter "
                                        f"'{record.name}' cannot give it its own trained copy",
                                        fix="trace the model with torch.export (rewriter.trace), which reads "
                                            "parameters one by one, or drop the train rule for it")
                copy = shared[f"{module}.{pname}"] if shared is not None else \
                    nn.Parameter(param.detach().clone(), requires_grad=False)
                holder.register_parameter(_trained_key(module, pname), copy)
        self._trained_holder.add_module(record.name, holder)

    def trained_parameters(self, name: str) -> dict[str, nn.Parameter]:
        """Adapter ``name``'s own copies of its trained modules' parameters, by original path."""
        record = self._require(name)
        holder = getattr(self._trained_holder, name, None)
        if holder is None:
            return {}
        return {f"{m}.{p}": getattr(holder, _trained_key(m, p))
                for m in record.train_modules for p, _ in self.gm.get_submodule(m).named_parameters(recurse=False)}

    def _trained_map(self) -> dict[str, str]:
        """Original parameter path -> the copy the live graph reads: the topmost active adapter's."""
        if self._disabled:
            return {}
        out = {}
        for name in self._active:
            if hasattr(self._trained_holder, name):
                for path in self.trained_parameters(name):
                    module, _, pname = path.rpartition(".")
                    out[path] = f"{TRAINED_ATTR}.{name}.{_trained_key(module, pname)}"
        return out

    def set_adapter(self, names: str | Sequence[str]) -> None:
        """Make ``names`` the active adapters; several stack in the given order (bottom first)."""
        names = [names] if isinstance(names, str) else list(names)
        for n in names:
            self._require(n)
        if self._merged:
            warnings.warn("set_adapter: unmerging the merged adapters first", stacklevel=2)
            self._merged = []
            self._clear_merged()
        self._active = names
        self._refresh()

    def _require(self, name: str) -> AdapterRecord:
        if name not in self.adapters:
            import difflib
            close = difflib.get_close_matches(name, list(self.adapters), n=1)
            raise RewriterError(f"no adapter named '{name}'",
                                fix=(f"did you mean '{close[0]}'? " if close else "") +
                                f"adapters: {', '.join(self.adapters) or 'none'}")
        return self.adapters[name]

    @contextlib.contextmanager
    def disable_adapters(self):
        """Inside the block the model computes exactly the base model (merged weights ignored)."""
        previous = self._disabled
        self._disabled = True
        self._refresh()
        try:
            yield self
        finally:
            self._disabled = previous
            self._refresh()

    def delete_adapter(self, name: str) -> None:
        self._require(name)
        if name in self._merged:
            raise RewriterError(f"adapter '{name}' is merged", fix="unmerge() before deleting it")
        del self.adapters[name]
        delattr(self._container, name)
        if hasattr(self._trained_holder, name):
            delattr(self._trained_holder, name)
        self._active = [a for a in self._active if a != name]
        self._refresh()

    def add_weighted_adapter(self, adapters: Sequence[str], weights: Sequence[float], adapter_name: str,
                             combination_type: str = "svd", **options) -> AdapterRecord:
        """A new adapter combining ``adapters`` with ``weights`` (PEFT's semantics; LoRA: linear, cat,
        svd with ``svd_rank``/``svd_clamp``; IA3: linear).  It is added inactive, like PEFT's."""
        from .rules import Decision
        if len(adapters) != len(weights) or not adapters:
            raise RewriterError(f"need one weight per adapter, got {len(adapters)} adapters, {len(weights)} weights")
        records = [self._require(a) for a in adapters]
        methods = {d.method for r in records for d in r.plan.decisions}
        if len(methods) != 1:
            raise RewriterError(f"cannot combine adapters of different methods {sorted(methods)}")
        spec = get_method(methods.pop())
        if spec.combine is None:
            raise RewriterError(f"weighted combination is not defined for {spec.name}",
                                fix="it exists for LoRA (linear, cat, svd) and IA3 (linear)")
        self._check_new_name(adapter_name)
        try:
            combined = spec.combine([r.modules for r in records], list(weights), combination_type=combination_type,
                                    **options)
        except ConfigError as exc:
            raise RewriterError(exc.what, fix=exc.fix) from None
        rule = f"weighted({', '.join(adapters)})"
        p = Plan(adapter=adapter_name, decisions=[Decision(site=s, rule=rule, method=spec.name, config=c)
                                                  for s, (c, _) in combined.items()],
                 train=[], counts={rule: len(combined)}, skipped={}, unmatched={}, shadowed={})
        modules = self.build_modules(p)
        with torch.no_grad():
            for site, (_, tensors) in combined.items():
                for name, value in tensors.items():
                    getattr(modules[site], name).copy_(value)
        return self.install(adapter_name, p, None, modules, activate=False, method=spec.name)

    # ---- the live graph -----------------------------------------------------------------------

    def _stacks(self) -> dict[str, list[StackEntry]]:
        stacks: dict[str, list[StackEntry]] = {}
        if self._disabled:
            return stacks
        for name in self._active:
            if name in self._merged:
                continue
            record = self.adapters[name]
            if record.graph_scope is not None:
                continue  # applied by _rewrite_graph
            for d in record.plan.decisions:
                key = self.sites[d.site].key
                stacks.setdefault(d.site, []).append(StackEntry(
                    f"{ADAPTERS_ATTR}.{name}.{key}", record.modules[d.site],
                    {"adapter": name, "rule": d.rule, "method": d.method}))
        return stacks

    def _merged_attrs(self) -> dict[str, tuple[str, str | None]]:
        if self._disabled:
            return {}
        holder = self._merged_holder
        out = {}
        for site in self.sites.values():
            w = f"{site.key}__weight"
            if hasattr(holder, w):
                b = f"{site.key}__bias"
                out[site.name] = (f"{MERGED_ATTR}.{w}", f"{MERGED_ATTR}.{b}" if hasattr(holder, b) else None)
        return out

    def _refresh(self) -> None:
        """Regenerate the live graph and the trainable flags from the adapter state."""
        live = set(self._active) - set(self._merged)
        for name, record in self.adapters.items():
            for module in record.modules.values():
                module.requires_grad_(name in live and not self._disabled)
            for copy in self.trained_parameters(name).values():
                copy.requires_grad_(name in live and not self._disabled)
        previous = _code_key(self.gm)
        graph = build_graph(self._base_graph, self.sites, self._stacks(), self._merged_attrs())
        self.gm.graph = self._rewrite_graph(self._read_trained_copies(graph))  # recompiles
        _forget_code(previous)
        for mixed in self._mixed.values():
            _forget_code(_code_key(mixed))
        self._mixed.clear()
        from .training import apply_activation_checkpointing
        apply_activation_checkpointing(self)  # keeps gradient checkpointing across regenerations

    def _read_trained_copies(self, graph: fx.Graph) -> fx.Graph:
        """Point the graph's reads of modules trained whole at the live adapter's copies."""
        trained = self._trained_map()
        for node in graph.nodes:
            if node.op == "get_attr" and node.target in trained:
                node.target = trained[node.target]
        return graph

    def _rewrite_graph(self, graph: fx.Graph) -> fx.Graph:
        """Apply the active graph-scope adapters (bottom first) to the graph with site adapters."""
        if self._disabled:
            return graph
        for name in self._active:
            record = self.adapters[name]
            if record.graph_scope is None or name in self._merged:
                continue
            entries = [(self.target(d.site, d.method),
                        StackEntry(f"{ADAPTERS_ATTR}.{name}.{self.target(d.site, d.method).key}",
                                   record.modules[d.site], {"adapter": name, "rule": d.rule, "method": d.method}))
                       for d in record.plan.decisions]
            graph = record.graph_scope.rewrite(graph, entries, self)
            graph.lint()
        return graph

    # ---- calling ----------------------------------------------------------------------------

    def forward(self, *args, adapter_names: Sequence[str] | None = None, **kwargs):
        """Call the model like the original.  ``adapter_names`` (one per sample; ``"__base__"`` for
        none) runs a mixed batch in one pass: each adapter acts only on its own samples."""
        gm = self.gm if adapter_names is None else self._mixed_graph(adapter_names)
        from .training import with_regularization
        traced = self._traced
        if traced.positional:
            return with_regularization(self, gm(*args, **kwargs))
        names = list(traced.example_inputs)
        for name, value in zip(names, args):
            if name in kwargs:
                raise TypeError(f"input '{name}' given twice")
            kwargs[name] = value
        call = {}
        for name, example in traced.example_inputs.items():
            if name in kwargs:
                value = kwargs.pop(name)
                if not isinstance(example, torch.Tensor) and value != example:
                    raise RewriterError(f"'{name}={value!r}' differs from the traced value {example!r}",
                                        fix=f"re-trace with {name}={value!r} in example_inputs")
                call[name] = value
            elif not isinstance(example, torch.Tensor):
                call[name] = example
            elif name in ("attention_mask", "token_type_ids") and "input_ids" in call:
                ids = call["input_ids"]
                call[name] = torch.ones_like(ids) if name == "attention_mask" else torch.zeros_like(ids)
            elif name == "labels":
                raise RewriterError("this graph computes the loss, so it needs 'labels'",
                                    fix="pass labels, or trace without them for inference (with_labels=False)")
            else:
                raise RewriterError(f"missing input '{name}'", fix=f"the graph was traced with inputs {names}")
        extra = [k for k, v in kwargs.items() if v is not None]
        if extra:
            fix = ("re-trace with the loss in the graph: rewriter.apply(model, rules, with_labels=True)"
                   if extra == ["labels"] else
                   "re-trace with them: rewriter.apply(model, rules, example_inputs={...all inputs...})")
            raise RewriterError(f"the graph was traced without input(s) {extra}; it takes {names}", fix=fix)
        # AdaLoRA's orthogonality term joins the loss, as in PEFT
        return with_regularization(self, gm(**call))

    def _mixed_graph(self, adapter_names: Sequence[str]) -> fx.GraphModule:
        """The graph for a mixed batch, with every sample's adapter gated by a per-sample mask."""
        names = list(adapter_names)
        used = tuple(sorted({n for n in names if n != "__base__"}))
        for n in used:
            if self._require(n).graph_scope is not None:
                raise RewriterError(f"adapter '{n}' ({self.adapters[n].method}) rewrites the graph as a whole, so it "
                                    "cannot be chosen per sample", fix="run its samples in a batch of their own")
        if self._merged:
            raise RewriterError("mixed-batch inference needs unmerged adapters", fix="call unmerge() first")
        if self._disabled:
            raise RewriterError("adapter_names cannot be used inside disable_adapters()")
        gm = self._mixed.get(used)
        if gm is None:
            stacks: dict[str, list[StackEntry]] = {}
            for name in used:
                record = self.adapters[name]
                for d in record.plan.decisions:
                    stacks.setdefault(d.site, []).append(StackEntry(
                        f"{ADAPTERS_ATTR}.{name}.{self.sites[d.site].key}", record.modules[d.site],
                        {"adapter": name, "rule": d.rule, "method": d.method}, gate=f"{MIX_ATTR}.{name}"))
            holder = nn.Module()
            for name in used:
                holder.register_buffer(name, torch.zeros(0, dtype=torch.bool), persistent=False)
            self.gm.add_submodule(MIX_ATTR, holder)
            graph = build_graph(self._base_graph, self.sites, stacks, {})
            self._gate_trained_modules(graph, used)
            gm = fx.GraphModule(self.gm, graph)
            for attr in ("_in_spec", "_out_spec"):
                if hasattr(self.gm, attr):
                    setattr(gm, attr, getattr(self.gm, attr))
            self._mixed[used] = gm
        holder = gm.get_submodule(MIX_ATTR) if used else None
        device = next(iter(self.gm.parameters())).device
        for name in used:
            holder.register_buffer(name, torch.tensor([n == name for n in names], device=device), persistent=False)
        return gm

    def _gate_trained_modules(self, graph: fx.Graph, used: Sequence[str]) -> None:
        """Mixed batches: an op that reads a module trained whole runs once per adapter with that
        adapter's copy, and every sample takes the result of its own adapter (the original for others)."""
        copies = {name: {path: f"{TRAINED_ATTR}.{name}.{_trained_key(*path.rsplit('.', 1))}"
                         for path in self.trained_parameters(name)} for name in used}
        trained = {path for table in copies.values() for path in table}
        readers = {user for node in graph.nodes if node.op == "get_attr" and node.target in trained
                   for user in node.users}
        for op in [n for n in graph.nodes if n in readers]:  # graph order
            last = out = op
            made = []
            for name in used:
                swap = {a: copies[name][a.target] for a in op.all_input_nodes
                        if a.op == "get_attr" and a.target in copies[name]}
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

    def train(self, mode: bool = True):
        """Switch the adapters' own dropout; the traced base graph stays as traced (eval)."""
        self.training = mode
        for module in self._container.modules():
            module.training = mode
        return self

    # ---- merge ------------------------------------------------------------------------------

    def _site_order(self, site: str, merged: Sequence[str]) -> list[str]:
        """Adapters on ``site`` bottom to top: merged ones, then the active unmerged ones."""
        unmerged = [a for a in self._active if a not in merged]
        return [a for a in list(merged) + unmerged if site in self.adapters[a].modules]

    def _check_mergeable(self, names: Sequence[str]) -> None:
        for name in names:
            for module in self.adapters[name].modules.values():
                if module.not_mergeable:
                    raise MergeError(f"adapter '{name}' cannot be merged: {module.not_mergeable}",
                                     fix="keep it unmerged, or unload() it")
        for site in self.sites:
            before = self._site_order(site, self._merged)
            after = self._site_order(site, self._merged + list(names))
            moved = [a for a in before if before.index(a) != after.index(a)] if set(before) == set(after) else []
            for a in moved:
                module = self.adapters[a].modules[site]
                if not module.additive:
                    raise MergeError(
                        f"merging {list(names)} would reorder adapters on '{site}' ({before} -> {after}) and "
                        f"'{a}' ({type(module).__name__}) does not commute with the others",
                        fix="merge adapters bottom-up: merge the adapters below them first, or all at once")

    @torch.no_grad()
    def merge(self, adapter_names: Sequence[str] | None = None, safe: bool = False) -> None:
        """Fold adapters into the weights (float32 math, one cast).  ``adapter_names`` defaults to the
        active adapters; already merged ones are skipped.  ``safe=True`` checks every folded weight and
        bias for non-finite values first and leaves the model untouched if any is found."""
        names = list(adapter_names) if adapter_names is not None else list(self._active)
        for n in names:
            self._require(n)
        names = [n for n in names if n not in self._merged]
        if not names:
            return
        self._check_mergeable(names)
        order = self._merged + names
        from .progress import bar
        folded = {}
        for site in bar(self.sites.values(), desc="merging", unit="site"):
            stack = [self.adapters[a].modules[site.name] for a in order if site.name in self.adapters[a].modules]
            if not stack:
                continue
            weight = self.gm.get_parameter(site.weight)
            bias = self.gm.get_parameter(site.bias) if site.bias else None
            w, b = fold_site(weight, bias, stack, fan_in_fan_out=site.fan_in_fan_out)
            if safe:
                for what, t in (("weight", w), ("bias", b)):
                    if t is not None and not torch.isfinite(t).all():
                        raise MergeError(f"merging {names} gives non-finite values in the {what} of '{site.name}'",
                                         fix="the model was left unchanged; inspect that site's adapter weights")
            folded[site] = (w, b)
        self._clear_merged()
        holder = self._merged_holder
        for site, (w, b) in folded.items():
            holder.register_buffer(f"{site.key}__weight", w, persistent=False)
            if b is not None:
                holder.register_buffer(f"{site.key}__bias", b, persistent=False)
        self._merged = order
        self._refresh()

    def _clear_merged(self) -> None:
        holder = self._merged_holder
        for key in list(holder._buffers):
            delattr(holder, key)

    def unmerge(self) -> None:
        """Restore the original weights exactly (they were never modified)."""
        self._merged = []
        self._clear_merged()
        self._refresh()

    @torch.no_grad()
    def merge_and_unload(self, adapter_names: Sequence[str] | None = None, safe: bool = False) -> nn.Module:
        """Fold adapters into the model's own weights and return the plain model (the original
        ``nn.Module`` when one was traced, else the GraphModule).  Tied weights are untied first."""
        self.merge(adapter_names, safe=safe)
        for path, copy in self._trained_map().items():  # the live trained copies become the model's own
            self._write_back(path, self.gm.get_parameter(copy).detach())
        holder = self._merged_holder
        for site in self.sites.values():
            if not hasattr(holder, f"{site.key}__weight"):
                continue
            self._write_back(site.weight, getattr(holder, f"{site.key}__weight"))
            if site.bias and hasattr(holder, f"{site.key}__bias"):
                self._write_back(site.bias, getattr(holder, f"{site.key}__bias"))
        self._merged = []
        self._clear_merged()
        return self.unload()

    def _write_back(self, path: str, value: torch.Tensor) -> None:
        param = self.gm.get_parameter(path)
        aliases = [n for n, p in self.gm.named_parameters(remove_duplicate=False) if p is param]
        source = self.source_model
        if len(aliases) == 1:
            param.copy_(value)
            return
        # tied: give the merged module its own parameter so the other users keep the original
        untied = nn.Parameter(value.clone(), requires_grad=param.requires_grad)
        owner, _, attr = path.rpartition(".")
        targets = [self.gm] + ([source] if source is not None else [])
        for root in targets:
            try:
                setattr(root.get_submodule(owner), attr, untied)
            except AttributeError:
                pass
        if source is not None and getattr(getattr(source, "config", None), "tie_word_embeddings", False):
            source.config.tie_word_embeddings = False
        warnings.warn(f"'{path}' was tied to {[a for a in aliases if a != path]}; it was untied so the merge "
                      "does not change them", stacklevel=3)
        # graph nodes that read the alias through this path (e.g. an embedding) must keep the original
        self._base_graph = _retarget(self._base_graph, path, aliases, self.gm)

    def unload(self) -> nn.Module:
        """Remove every adapter (nothing merged) and return the plain model."""
        self._merged = []
        self._clear_merged()
        self.adapters.clear()
        self._active = []
        for holder in (self._container, self._trained_holder):
            for name in list(holder._modules):
                delattr(holder, name)
        self._refresh()
        return self.source_model if self.source_model is not None else self.gm

    # ---- training helpers -------------------------------------------------------------------

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def print_trainable_parameters(self) -> str:
        trainable = sum(p.numel() for p in self.trainable_parameters())
        total = sum(p.numel() for p in self.parameters())
        line = (f"trainable params: {trainable:,d} || all params: {total:,d} || "
                f"trainable%: {100 * trainable / max(total, 1):.4f}")
        print(line)
        return line

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None, *, every_n_layers: int = 1,
                                      offload: bool = False) -> None:
        """Recompute each layer's activations in backward (same gradients, less memory); HF's name."""
        from .training import enable_gradient_checkpointing
        enable_gradient_checkpointing(self, every_n_layers=every_n_layers, offload=offload,
                                      **(gradient_checkpointing_kwargs or {}))

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None, every_n_layers: int = 1,
                                        offload: bool = False) -> None:
        """What ``transformers.Trainer`` calls with ``activation_checkpointing=True``."""
        self.gradient_checkpointing_enable(activation_checkpointing_kwargs, every_n_layers=every_n_layers,
                                           offload=offload)

    def gradient_checkpointing_disable(self) -> None:
        from .training import disable_gradient_checkpointing
        disable_gradient_checkpointing(self)

    activation_checkpointing_disable = gradient_checkpointing_disable

    def update_and_allocate(self, step: int) -> None:
        """Run the per-step controllers of the active adapters (e.g. AdaLoRA's rank allocator)."""
        for name in self._active:
            controller = self.adapters[name].controller
            if controller is not None and hasattr(controller, "update_and_allocate"):
                controller.update_and_allocate(step)

    def regularization_loss(self) -> torch.Tensor:
        """Sum of the active adapters' training regularisers (0 when none has one)."""
        total = torch.zeros(())
        for name in self._active:
            controller = self.adapters[name].controller
            if controller is not None and hasattr(controller, "regularization"):
                total = total + controller.regularization()
        return total

    # ---- reporting, saving ------------------------------------------------------------------

    def explain(self) -> str:
        from .rules import format_plan
        return "\n\n".join(format_plan(r.plan) for r in self.adapters.values())

    def save_adapter(self, directory, adapter_names: Sequence[str] | None = None, format: str = "rewriter") -> Path:
        from .checkpoint import save_adapter
        return save_adapter(self, directory, adapter_names=adapter_names, format=format)

    def load_adapter(self, directory, adapter_name: str | None = None, *, activate: bool | None = None,
                     low_cpu_mem_usage: bool = False, remap=None):
        """Load an adapter directory (rewriter's or PEFT's format).  ``remap``: a dict or a TOML file with a
        ``[remap]`` table renaming the checkpoint's modules (``"transformer.h" = "model.layers"``)."""
        from .checkpoint import load_adapter_into
        return load_adapter_into(self, directory, adapter_name=adapter_name, activate=activate,
                                 low_cpu_mem_usage=low_cpu_mem_usage, remap=remap)

    def generate(self, input_ids, max_new_tokens: int = 20, **kwargs):
        """Token generation for causal LMs with a static-KV-cache graph rewritten like this one
        (see :func:`rewriter.generate.generate`)."""
        from .generate import generate
        return generate(self, input_ids, max_new_tokens=max_new_tokens, **kwargs)

    # ---- X-LoRA runtime API (PEFT's names; the active X-LoRA adapter, see methods/xlora.py) ------

    def _xlora(self):
        from .methods.xlora import xlora_adapter
        return xlora_adapter(self)[1]

    def get_latest_scalings(self) -> torch.Tensor | None:
        """The last forward's classifier scalings, (batch, seq, n_layers, n_experts), detached."""
        return self._xlora().latest_scalings

    def enable_scalings_logging(self) -> None:
        self._xlora().logging = True

    def disable_scalings_logging(self) -> None:
        """Stop logging (the log is kept); a disabled log costs nothing."""
        self._xlora().logging = False

    def clear_scalings_log(self) -> None:
        self._xlora().scalings_log.clear()

    def get_scalings_log(self) -> list[torch.Tensor]:
        return list(self._xlora().scalings_log)

    def get_bucketed_scalings_log(self) -> dict[int, tuple[list[int], list[torch.Tensor]]]:
        """The log by sequence length: ``{seq_len: (positions in the log, scalings)}``."""
        from .methods.xlora import bucketed
        return bucketed(self._xlora().scalings_log)

    def get_global_scaling_weight(self) -> float:
        return self._xlora().config.global_scaling_weight

    def set_global_scaling_weight(self, weight: float) -> None:
        from .methods.xlora import update_config
        update_config(self, global_scaling_weight=weight)

    def set_scaling_pass_value(self, value: float | None) -> None:
        """The experts' constant scaling in the scaling pass; None: 1 / n_experts."""
        from .methods.xlora import update_config
        update_config(self, scaling_pass_value=1 / len(self._xlora().experts) if value is None else value)

    def set_topk_lora(self, value: int | None) -> None:
        from .methods.xlora import update_config
        update_config(self, top_k_lora=value)

    # ---- end of the X-LoRA runtime API -----------------------------------------------------------

    def code(self) -> str:
        from .exporter import graph_code
        return graph_code(self)

    def extra_repr(self) -> str:
        return (f"sites={len(self.sites)}, adapters={list(self.adapters)}, active={self._active}, "
                f"merged={self._merged}")


def _trained_key(module: str, pname: str) -> str:
    return f"{module.replace('.', '__')}__{pname}"


def _code_key(gm: fx.GraphModule) -> str | None:
    """The cache key under which torch.fx stored the generated source of ``gm.forward``."""
    code = getattr(getattr(type(gm), "forward", None), "__code__", None)
    return code.co_filename if code is not None and code.co_filename.startswith("<eval_with_key>") else None


def _forget_code(key: str | None) -> None:
    """torch.fx keeps every generated source forever (for tracebacks); the live graph is regenerated
    on every adapter state change, so drop the sources of graphs that are gone."""
    if key is None:
        return
    import linecache
    from torch.fx import graph_module
    graph_module._loader.eval_cache.pop(key, None)
    linecache.cache.pop(key, None)


def _retarget(graph: fx.Graph, path: str, aliases: list[str], gm: fx.GraphModule) -> fx.Graph:
    """Point non-matmul readers of a tied weight at another alias of the original tensor."""
    from .core.sites import site_operands
    others = [a for a in aliases if a != path]
    for node in graph.nodes:
        if node.op == "get_attr" and node.target == path:
            for user in list(node.users):
                ops = site_operands(user)
                if ops is None or ops[1] is not node:
                    with graph.inserting_before(user):
                        user.replace_input_with(node, graph.get_attr(others[0]))
    return graph


def apply(model_or_graph, rules, *, example_inputs=None, adapter_name: str | None = None,
          dynamic: bool = True, with_labels: bool = False) -> Adapted:
    """Trace (when needed) and insert the adapter described by ``rules``.  ``with_labels=True``
    traces the model's loss into the graph (the forward then takes ``labels``)."""
    if isinstance(model_or_graph, Adapted):
        model_or_graph.add_adapter(rules, adapter_name)
        return model_or_graph
    traced = model_or_graph if isinstance(model_or_graph, Traced) else \
        trace_model(model_or_graph, example_inputs, dynamic=dynamic, with_labels=with_labels)
    adapted = Adapted(traced)
    adapted.add_adapter(rules, adapter_name)
    return adapted
