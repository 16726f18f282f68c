"""What a method is: a :class:`MethodSpec` (config dataclass, module class, PEFT names) and the
typed hooks a method may add.

A method is one file (or one package) under ``rewriter/methods/`` that registers a
:class:`MethodSpec`; the per-site math lives in :class:`rewriter.core.adapter.AdapterModule`.
The engine and the features above it only use what is declared here, so a new method never
touches them.  Every hook is a :class:`typing.Protocol`: a method passes any object with those
members, and the defaults in :class:`SavedStateHooks` cover the optional ones.
"""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, Sequence, runtime_checkable

import torch
from torch import fx, nn

from ..core.adapter import AdapterModule
from ..core.sites import Site
from ..errors import ConfigError


# ---- what graph-scope methods see of the model ---------------------------------------------------

class Target(Protocol):
    """What a rule matches and an adapter module is built for: a :class:`Site`, or a graph-scope
    method's own target (an attention block, the whole model)."""
    name: str                  #: what rules match
    key: str                   #: attribute-safe name for inserted submodules
    weight: str                #: path of a parameter whose device and dtype the adapter follows
    bias: str | None
    in_features: int
    out_features: int
    dtype: torch.dtype


class AdapterView(Protocol):
    """One installed adapter, as methods see it."""
    name: str
    method: str
    modules: dict[str, AdapterModule]


class ModelView(Protocol):
    """The adapted model as graph-scope methods and their checkpoint layouts see it (the engine,
    :class:`rewriter.adapters.AdaptedModel`, satisfies it)."""
    gm: fx.GraphModule
    sites: dict[str, Site]

    @property
    def base_graph(self) -> fx.Graph: ...
    @property
    def source_model(self) -> nn.Module | None: ...
    @property
    def adapters(self) -> Mapping[str, Any]: ...
    @property
    def active_adapters(self) -> list[str]: ...
    @property
    def merged(self) -> list[str]: ...
    def refresh(self) -> None: ...
    def build_modules(self, p: Any, *, device: Any = None) -> dict[str, AdapterModule]: ...
    def install(self, name: str, p: Any, ruleset: Any, modules: dict[str, AdapterModule], *,
                activate: bool | None = None, method: str | None = None) -> Any: ...
    def read_adapter_modules(self, directory: str | Path, remap: Any = None) -> dict[str, AdapterModule]: ...


# ---- hooks ------------------------------------------------------------------------------------

@runtime_checkable
class Controller(Protocol):
    """A per-adapter training controller (AdaLoRA's rank allocator)."""

    def update_and_allocate(self, step: int) -> Any:
        """Run after every optimizer step, before the gradients are zeroed."""

    def regularization(self) -> torch.Tensor:
        """A term added to the model's loss (0-d tensor)."""


class ControllerFactory(Protocol):
    def __call__(self, modules: Mapping[str, AdapterModule], config: Any) -> Controller: ...


class CheckpointHooks(Protocol):
    """How a method's sites are saved when their tensors are not simply the module's state.
    ``extra`` is JSON data kept per site: in rewriter's manifest, and in PEFT's config under
    ``peft_field`` with key ``peft_key(site)``."""
    peft_field: str | None

    def save(self, module: AdapterModule, controller: Controller | None, site: str) \
        -> tuple[dict[str, torch.Tensor], Any]: ...
    def load(self, module: AdapterModule, tensors: Mapping[str, torch.Tensor], extra: Any) -> None: ...
    def peft_key(self, site: str) -> str: ...
    def remap(self, extra: Any, tensors: dict[str, torch.Tensor], remap: Any) -> tuple[Any, dict[str, torch.Tensor]]:
        """``extra`` and ``tensors`` with the module names kept inside them renamed."""
    def config_with_extra(self, config: Any, extra: Any) -> Any:
        """The config a module is built from, once the saved ``extra`` is known."""


class SavedStateHooks:
    """Defaults for :class:`CheckpointHooks`: subclass and override what differs."""
    peft_field: str | None = None

    def save(self, module: AdapterModule, controller: Controller | None, site: str) \
            -> tuple[dict[str, torch.Tensor], Any]:
        return dict(module.state_dict()), None

    def load(self, module: AdapterModule, tensors: Mapping[str, torch.Tensor], extra: Any) -> None:
        module.load_state_dict(dict(tensors))

    def peft_key(self, site: str) -> str:
        return site

    def remap(self, extra: Any, tensors: dict[str, torch.Tensor], remap: Any) -> tuple[Any, dict[str, torch.Tensor]]:
        return extra, tensors

    def config_with_extra(self, config: Any, extra: Any) -> Any:
        return config


#: ``(model, method, {site: module}, directory)``: writes modules of one method as a PEFT checkpoint
SaveModules = Callable[[ModelView, str, Mapping[str, AdapterModule], Path], None]
#: fills a freshly built module with a checkpoint's values
Fill = Callable[[AdapterModule], None]


class PeftLayout(Protocol):
    """A method whose PEFT checkpoint is laid out unlike one weights file plus one config
    (X-LoRA: a config, the classifier, and one sub-directory per expert).  The method has one
    target; the checkpoint feature plans it, builds the module and stages the install."""
    #: the method's adapter directory holds sub-directories that are parts of it, not adapters
    owns_subdirectories: bool

    def save(self, model: ModelView, name: str, directory: Path, save_modules: SaveModules) -> None: ...
    def load(self, model: ModelView, directory: Path, config: Mapping[str, Any], remap: Any) -> tuple[Any, Fill]:
        """The method's config from PEFT's ``config``, and how to fill the module built from it."""


@dataclass(frozen=True)
class SiteScope:
    """The method adapts the linear sites its rules select."""


class GraphScope(Protocol):
    """The method finds its own targets in the graph and rewrites the live graph itself
    (Llama-Adapter: attention blocks; X-LoRA: the whole model).  Rules match target names."""

    def find_targets(self, model: ModelView) -> Sequence[Target]:
        """Candidate targets in graph order; ConfigError naming the layer when there are none."""
    def select(self, chosen: Sequence[tuple[Target, Any]]) -> list[Target]:
        """The targets the method keeps of ``[(target, config)]`` its rules matched."""
    def rewrite(self, graph: fx.Graph, entries: Sequence[tuple[Target, Any]], model: ModelView) -> fx.Graph:
        """The live graph with one active adapter applied; ``entries`` = [(target, StackEntry)]."""


SITE = SiteScope()

#: ``combine(adapters: [{site: module}], weights, **options) -> {site: (config, {param: tensor})}``
Combine = Callable[..., Mapping[str, tuple[Any, Mapping[str, torch.Tensor]]]]
#: ``(peft_config, tensors) -> peft_config``, run before a PEFT checkpoint is planned
PeftConfigFixup = Callable[[dict[str, Any], Mapping[str, torch.Tensor]], dict[str, Any]]


@dataclass(frozen=True)
class MethodSpec:
    name: str                      #: the name used in rule files (``method = "lora"``)
    config_cls: type               #: frozen dataclass of the method's parameters
    module_cls: type               #: AdapterModule subclass, built as ``module_cls(target, config)``
    peft_type: str | None = None   #: PEFT's ``peft_type`` for checkpoint interop
    #: PEFT state-dict key suffix -> our parameter name inside the module
    peft_keys: Mapping[str, str] = field(default_factory=dict)
    #: rule-file spellings -> config field names
    aliases: Mapping[str, str] = field(default_factory=dict)
    #: PEFT config fields that mean nothing here (accepted from PEFT configs and rule files, dropped)
    ignored_peft_fields: frozenset[str] = frozenset()
    #: per-site config fields and the PEFT pattern dict that carries them,
    #: e.g. {"r": "rank_pattern", "lora_alpha": "alpha_pattern"}
    peft_site_fields: Mapping[str, str] = field(default_factory=dict)
    summary: str = ""
    #: per-adapter training controller (AdaLoRA's rank allocator), run by ``update_and_allocate``
    #: and ``regularization_loss``
    controller: ControllerFactory | None = None
    #: saved tensors that differ from the module's state (AdaLoRA's pruned ranks)
    checkpoint_hooks: CheckpointHooks | None = None
    #: a PEFT checkpoint layout of the method's own (X-LoRA)
    peft_layout: PeftLayout | None = None
    #: weighted combination (``add_weighted_adapter``)
    combine: Combine | None = None
    #: for PEFT configs that do not say what PEFT really trained (BOFT's CUDA fallback)
    peft_config_fixup: PeftConfigFixup | None = None
    #: :data:`SITE`, or the method's :class:`GraphScope`
    scope: SiteScope | GraphScope = SITE
    #: why ``Adapted.generate`` cannot decode with this method (None: it can)
    cannot_generate: str | None = None

    @property
    def graph_scope(self) -> GraphScope | None:
        """The method's graph rewrite, or None for a per-site method."""
        return None if isinstance(self.scope, SiteScope) else self.scope

    def field_names(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self.config_cls)]

    def make_config(self, params: Mapping[str, Any]) -> Any:
        """Build the config from rule-file parameters, resolving aliases; unknown keys raise."""
        fields = set(self.field_names())
        values: dict[str, Any] = {}
        spelled: dict[str, str] = {}
        for key, value in params.items():
            if key in self.ignored_peft_fields:
                continue
            name = self.aliases.get(key, key)
            if name not in fields:
                known = sorted(fields | set(self.aliases))
                close = difflib.get_close_matches(key, known, n=1)
                hint = f"did you mean '{close[0]}'?" if close else f"known: {', '.join(known)}"
                raise ConfigError(f"unknown parameter '{key}' for method '{self.name}'", field=key, fix=hint)
            values[name] = value
            spelled[name] = key
        try:
            return self.config_cls(**values)
        except ConfigError as exc:
            if exc.field in spelled:  # report the spelling the user wrote
                exc.field = spelled[exc.field]
            raise
        except TypeError as exc:  # wrong type caught by dataclass machinery
            raise ConfigError(str(exc)) from exc

    def config_dict(self, config: Any) -> dict[str, Any]:
        return dataclasses.asdict(config)
