"""``AdaptedModel``: the engine.  It owns the traced GraphModule, the pristine base graph, the
sites and the adapter state, performs the state changes, and regenerates the live graph after
each one (:func:`rewriter.adapters.builder.live_graph`).  Features (checkpoints, generation,
export, checks, training) use its public API; users hold the :class:`rewriter.Adapted` facade."""
from __future__ import annotations

import contextlib
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import fx, nn

from ..core.activation_checkpointing import ActivationCheckpointing, checkpoint_layers
from ..core.adapter import AdapterModule
from ..core.graph import ADAPTERS_ATTR, MERGED_ATTR, copy_graph
from ..core.sites import Site, find_sites, normalize
from ..core.tracing import Traced
from ..errors import ConfigError, RewriterError, RuleError
from ..methods import get_method
from ..rules import Plan, RuleSet, coerce_rules, plan
from . import builder, merging
from . import trained as trained_modules
from .calling import bind_inputs
from .mixed import MixedBatches
from .state import AdapterRecord, AdapterState
from .trainable import Trainable

#: ``(model, directory, remap) -> {site: module}``: reads an adapter checkpoint without installing it
AdapterReader = Callable[[Any, "str | Path", Any], dict]
_OWN = (ADAPTERS_ATTR, MERGED_ATTR, trained_modules.TRAINED_ATTR)


def adapter_dtype_for(base: torch.dtype) -> torch.dtype:
    """Adapters live in float32 on half-precision bases (as PEFT's autocast_adapter_dtype)."""
    return torch.float32 if base in (torch.float16, torch.bfloat16) or not base.is_floating_point else base


class AdaptedModel(Trainable, nn.Module):
    def __init__(self, traced: Traced, reader: AdapterReader | None = None):
        super().__init__()
        self.gm = normalize(traced.gm)
        self._traced = traced
        self._source = [traced.source]  # a list keeps the user's model out of our submodules
        self._base_graph = copy_graph(self.gm.graph)
        self._reader = reader
        self.sites: dict[str, Site] = {s.name: s for s in find_sites(self.gm)}
        keys: dict[str, str] = {}
        for s in self.sites.values():
            if s.key in keys:
                raise RewriterError(f"sites '{keys[s.key]}' and '{s.name}' map to the same attribute name '{s.key}'")
            keys[s.key] = s.name
        for p in self.gm.parameters():
            p.requires_grad_(False)
        for attr in _OWN:
            self.gm.add_submodule(attr, nn.Module())
        self.state = AdapterState()
        self.activation_checkpointing: ActivationCheckpointing | None = None
        #: decoding graphs of ``generate``, by (batch, cache length), most recently used last
        self.generation_graphs: OrderedDict = OrderedDict()
        self._mixed = MixedBatches()
        self._graph_targets: dict[str, dict[str, Any]] = {}  # graph-scope method -> its targets, by name
        self.training = False

    # ---- what the model is -------------------------------------------------------------------------

    adapters = property(lambda self: self.state.records, doc="Adapters by name.")
    active_adapters = property(lambda self: list(self.state.active))
    disabled = property(lambda self: self.state.disabled, doc="True inside ``disable_adapters()``.")
    merged = property(lambda self: list(self.state.merged), doc="Adapters folded into the weights, bottom first.")
    source_model = property(lambda self: self._source[0], doc="The nn.Module that was traced, if any.")
    traced = property(lambda self: self._traced, doc="How the graph was traced (inputs, calling convention).")
    base_graph = property(lambda self: self._base_graph, doc="The pristine traced graph (do not modify).")
    merged_holder = property(lambda self: self.gm.get_submodule(MERGED_ATTR), doc="Folded weights' buffers.")
    trained_holder = property(lambda self: self.gm.get_submodule(trained_modules.TRAINED_ATTR),
                              doc="Each adapter's copies of the modules it trains whole.")

    def module_names(self) -> list[str]:
        """Names of the model's modules that hold parameters (what ``train`` rules match)."""
        return [n for n, m in self.gm.named_modules()
                if n and not n.startswith(_OWN) and any(True for _ in m.parameters(recurse=False))]

    def targets(self, method: str) -> dict[str, Any]:
        """What rules of ``method`` match, by name in graph order: the linear sites, or a graph-scope
        method's own targets (e.g. Llama-Adapter's attention blocks)."""
        scope = get_method(method).graph_scope
        if scope is None:
            return self.sites
        if method not in self._graph_targets:
            self._graph_targets[method] = {t.name: t for t in scope.find_targets(self)}
        return self._graph_targets[method]

    def target(self, name: str, method: str):
        return self.targets(method)[name]

    def require(self, name: str) -> AdapterRecord:
        return self.state.require(name)

    def check_new_name(self, name: str) -> None:
        self.state.check_new_name(name)

    def read_adapter_modules(self, directory: str | Path, remap: Any = None) -> dict[str, AdapterModule]:
        """The ``{site: module}`` of the adapter checkpoint in ``directory``, validated, not installed."""
        if self._reader is None:
            raise RewriterError("this model was built without a checkpoint reader",
                                fix="use rewriter.apply / rewriter.Adapted, which can read adapter checkpoints")
        return self._reader(self, directory, remap)

    # ---- adding and removing adapters ------------------------------------------------------------

    def add_adapter(self, rules, adapter_name: str | None = None, *, activate: bool | None = None) -> AdapterRecord:
        """Plan ``rules`` against this model and insert the adapter.  The first adapter becomes
        active; later ones only with ``activate=True`` or ``set_adapter``."""
        ruleset = coerce_rules(rules)
        name = adapter_name or ruleset.adapter
        self.check_new_name(name)
        try:
            candidates = self.targets(ruleset.method)
        except ConfigError as exc:  # the rule set cannot apply to this graph: say which rule file
            raise RuleError(exc.what, where=ruleset.where(None, exc.field) if exc.field else ruleset.source,
                            fix=exc.fix) from None
        p = plan(ruleset, list(candidates.values()), self.module_names())
        p.adapter = name
        for w in p.warnings:
            warnings.warn(w, stacklevel=2)
        return self.install(name, p, ruleset, self.build_modules(p), activate=activate)

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
        ``controller=False`` skips the method's training controller and ``trained`` shares
        existing copies of trained modules (by path): for a second graph of the same adapter
        (generation) that never trains on its own."""
        self.check_new_name(name)
        missing = [d.site for d in p.decisions if d.site not in self.targets(d.method)]
        if missing:
            raise RewriterError(f"adapter '{name}' targets modules this model does not have: {missing[:5]}")
        main = method or (ruleset.method if ruleset is not None else p.decisions[0].method)
        if len({get_method(m).graph_scope is None for m in {d.method for d in p.decisions} | {main}}) > 1:
            raise ConfigError(f"adapter '{name}' mixes a graph-level method ({main}) with per-layer methods "
                              f"{sorted({d.method for d in p.decisions} - {main})}",
                              fix="put them in separate adapters (one rule file each) and activate both")
        for module in modules.values():
            module.train(self.training)  # new modules follow the model's mode (dropout off in eval)
        keys = {d.site: self.target(d.site, d.method).key for d in p.decisions}
        self.gm.get_submodule(ADAPTERS_ATTR).add_module(name, nn.ModuleDict({keys[s]: m for s, m in modules.items()}))
        record = AdapterRecord(name=name, method=main, plan=p, ruleset=ruleset, modules=modules,
                               train_modules=[m for m, _ in p.train])
        spec = get_method(main)
        if spec.controller is not None and controller:
            own = {d.site: modules[d.site] for d in p.decisions if d.method == spec.name}
            default = ruleset.params if ruleset is not None else {}
            record.controller = spec.controller(own, spec.make_config(default) if default else p.decisions[0].config)
        self.trained_holder.add_module(name, trained_modules.copy_trained_modules(
            self.gm, self._base_graph, name, record.train_modules, trained))
        self.state.records[name] = record
        self._unfreeze_biases(record)
        if activate or (activate is None and not self.state.active):
            self.state.active.append(name)
        self.refresh()
        return record

    def _unfreeze_biases(self, record: AdapterRecord) -> None:
        for d in record.plan.decisions:
            mode = getattr(d.config, "bias", "none")
            if mode == "all":
                for n, p in self.gm.named_parameters():
                    if n.endswith("bias") and not n.startswith(_OWN):
                        p.requires_grad_(True)
            elif mode != "none" and d.site in self.sites and self.sites[d.site].bias:
                self.gm.get_parameter(self.sites[d.site].bias).requires_grad_(True)

    def trained_parameters(self, name: str) -> dict[str, nn.Parameter]:
        """Adapter ``name``'s own copies of its trained modules' parameters, by original path."""
        return trained_modules.trained_parameters(self.gm, name, self.require(name).train_modules)

    def trained_map(self) -> dict[str, str]:
        """Original parameter path -> the copy the live graph reads: the topmost active adapter's."""
        out: dict[str, str] = {}
        for name in [] if self.state.disabled else self.state.active:
            out.update(trained_modules.copy_paths(name, self.trained_parameters(name)))
        return out

    def delete_adapter(self, name: str) -> None:
        self.require(name)
        if name in self.state.merged:
            raise RewriterError(f"adapter '{name}' is merged", fix="unmerge() before deleting it")
        del self.state.records[name]
        for holder in (self.gm.get_submodule(ADAPTERS_ATTR), self.trained_holder):
            if hasattr(holder, name):
                delattr(holder, name)
        self.state.active = [a for a in self.state.active if a != name]
        self.refresh()

    # ---- activating, disabling, merging ----------------------------------------------------------

    def set_adapter(self, names: str | Sequence[str]) -> None:
        """Make ``names`` the active adapters; several stack in the given order (bottom first)."""
        names = [names] if isinstance(names, str) else list(names)
        for n in names:
            self.require(n)
        if self.state.merged:
            warnings.warn("set_adapter: unmerging the merged adapters first", stacklevel=2)
            self.state.merged = []
            merging.clear(self.merged_holder)
        self.state.active = names
        self.refresh()

    @contextlib.contextmanager
    def disable_adapters(self):
        """Inside the block the model computes exactly the base model (merged weights ignored)."""
        previous = self.state.disabled
        self.state.disabled = True
        self.refresh()
        try:
            yield self
        finally:
            self.state.disabled = previous
            self.refresh()

    @torch.no_grad()
    def merge(self, adapter_names: Sequence[str] | None = None, safe: bool = False) -> None:
        """Fold adapters into the weights (float32 math, one cast).  ``adapter_names`` defaults to the
        active adapters; already merged ones are skipped.  ``safe=True`` checks every folded weight and
        bias for non-finite values first and leaves the model untouched if any is found."""
        names = list(adapter_names) if adapter_names is not None else list(self.state.active)
        for n in names:
            self.require(n)
        names = [n for n in names if n not in self.state.merged]
        if not names:
            return
        self.state.check_mergeable(names, list(self.sites))
        order = self.state.merged + names
        stacks = {s: [self.adapters[a].modules[s] for a in order if s in self.adapters[a].modules] for s in self.sites}
        merging.store(self.merged_holder, merging.fold_sites(self.gm, self.sites, stacks, safe=safe, names=names))
        self.state.merged = order
        self.refresh()

    def unmerge(self) -> None:
        """Restore the original weights exactly (they were never modified)."""
        self.state.merged = []
        merging.clear(self.merged_holder)
        self.refresh()

    @torch.no_grad()
    def merge_and_unload(self, adapter_names: Sequence[str] | None = None, safe: bool = False) -> nn.Module:
        """Fold adapters into the model's own weights and return the plain model (the original
        ``nn.Module`` when one was traced, else the GraphModule).  Tied weights are untied first."""
        self.merge(adapter_names, safe=safe)
        values = {path: self.gm.get_parameter(copy).detach() for path, copy in self.trained_map().items()}
        values.update(merging.folded_tensors(self.merged_holder, self.sites))
        for path, value in values.items():  # the live trained copies and folded weights become the model's own
            self._base_graph = merging.write_back(self.gm, self.source_model, self._base_graph, path, value)
        return self.unload()

    def unload(self) -> nn.Module:
        """Remove every adapter (nothing merged) and return the plain model."""
        merging.clear(self.merged_holder)
        self.state.records.clear()
        self.state.active, self.state.merged = [], []
        for holder in (self.gm.get_submodule(ADAPTERS_ATTR), self.trained_holder):
            for name in list(holder._modules):
                delattr(holder, name)
        self.refresh()
        return self.source_model if self.source_model is not None else self.gm

    # ---- the live graph --------------------------------------------------------------------------

    def refresh(self) -> None:
        """Regenerate the live graph and the trainable flags from the adapter state."""
        live = set(self.state.live())
        for name, record in self.adapters.items():
            for module in record.modules.values():
                module.requires_grad_(name in live)
            for copy in self.trained_parameters(name).values():
                copy.requires_grad_(name in live)
        previous = builder.code_key(self.gm)
        self.gm.graph = builder.live_graph(self._base_graph, self.sites, self.state,
                                           merging.merged_attrs(self.merged_holder, self.sites), self.trained_map(),
                                           lambda method, name: self.target(name, method), self)  # recompiles
        builder.forget_code(previous)
        self._mixed.clear()
        if self.activation_checkpointing is not None:  # kept across regenerations
            checkpoint_layers(self.gm, self.activation_checkpointing)

    def forward(self, *args, adapter_names: Sequence[str] | None = None, **kwargs):
        """Call the model like the original.  ``adapter_names`` (one per sample; ``"__base__"`` for
        none) runs a mixed batch in one pass: each adapter acts only on its own samples."""
        gm = self.gm if adapter_names is None else self._mixed.graph(self, adapter_names)
        if self._traced.positional:
            return self.state.with_regularization(gm(*args, **kwargs))
        # AdaLoRA's orthogonality term joins the loss, as in PEFT
        return self.state.with_regularization(gm(**bind_inputs(self._traced, args, kwargs)))

    def train(self, mode: bool = True):
        """Switch the adapters' own dropout; the traced base graph stays as traced (eval)."""
        self.training = mode
        for module in self.gm.get_submodule(ADAPTERS_ATTR).modules():
            module.training = mode
        return self

    def extra_repr(self) -> str:
        return (f"sites={len(self.sites)}, adapters={list(self.adapters)}, active={self.state.active}, "
                f"merged={self.state.merged}")
