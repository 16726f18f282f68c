"""The method contract and the registry.

A method is one file under ``rewriter/methods/`` that registers a :class:`MethodSpec`:
a frozen config dataclass and an :class:`AdapterModule` subclass.  The graph rewriter
only knows the contract below, so a new method never touches the core.

An adapter at a site is a function on the site's effective weight, ``(W, b) -> (W', b')``
(``fold``).  Stacked adapters compose bottom to top, so the stacked layer computes
``W_eff = f_n(...f_1(W))``.  The unmerged forward computes the same thing without
materialising ``W_eff`` through two optional hooks:

* ``pre(x)``: the layer input transform of this level (rotation, input scaling);
* ``post(x, y, bias)``: turns the output of the levels below into this level's output
  (``y + delta(x)`` for additive methods, ``l * y`` for output scaling).

Merging folds a prefix of the stack into the weight; that is exact because the forward
and the fold describe the same function.
"""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

import torch
from torch import nn

from .. import recompute as recompute_module
from ..errors import ConfigError, RewriterError


class AdapterModule(nn.Module):
    """One adapter at one site.  Weights are always in ``[out, in]`` layout here."""

    #: ``post`` is ``y + delta(x)`` with a delta that does not depend on W: such
    #: adapters commute with each other, so any subset of them can be merged.
    additive: ClassVar[bool] = True
    has_pre: ClassVar[bool] = False
    has_post: ClassVar[bool] = True
    #: ``post`` also needs the site's current weight (``[out, in]`` layout), passed as
    #: ``weight=``; such an adapter must be the lowest unmerged adapter on its site
    needs_weight: ClassVar[bool] = False
    #: ``post`` ignores ``y`` (it recomputes the layer itself, e.g. MiSS-bat): when such an adapter is
    #: the lowest unmerged one, the base matmul is not computed at all (``post`` gets ``y=None``)
    replaces_base: ClassVar[bool] = False
    #: ``post`` uses ``bias``: it then gets the bias as the levels below left it (see ``fold_bias``)
    reads_bias: ClassVar[bool] = False
    #: why this method cannot be folded into the weight (None: it can)
    not_mergeable: ClassVar[str | None] = None

    def __init__(self, site, config):
        super().__init__()
        self.site_name = site.name
        self.in_features = site.in_features
        self.out_features = site.out_features
        self.config = config

    def forward(self, x, y=None, bias=None, *, stage: str = "post", weight=None, recompute=None):
        """``recompute``: the operands ``(a, b)`` of ``x = a * b``, when the graph knows them; the
        backward then multiplies again instead of keeping ``x`` (see :mod:`rewriter.recompute`)."""
        if recompute is not None and stage != "bias" and recompute_module.applies(x, recompute):
            with recompute_module.recomputed(x, recompute):
                return self._stage(x, y, bias, stage, weight)
        return self._stage(x, y, bias, stage, weight)

    def _stage(self, x, y, bias, stage: str, weight):
        if stage == "pre":
            return self.pre(x)
        if stage == "bias":
            return self.fold_bias(x)
        if self.needs_weight:
            return self.post(x, y, bias, weight=weight)
        return self.post(x, y, bias)

    def pre(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def post(self, x: torch.Tensor, y: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return y

    def fold_bias(self, bias: torch.Tensor | None) -> torch.Tensor | None:
        """The bias part of ``fold`` (identity unless the method changes the bias); used to hand
        ``reads_bias`` adapters above this one the bias as this level leaves it."""
        return bias

    def fold(self, weight: torch.Tensor, bias: torch.Tensor | None):
        """Return ``(W', b')`` in float32 for float32 ``weight [out, in]`` and ``bias [out]``."""
        raise NotImplementedError

    def init_buffers(self) -> None:
        """Recompute non-persistent buffers (index tables and the like).  Called after the module
        was materialised from the meta device (``low_cpu_mem_usage`` loads)."""

    @property
    def adapter_dtype(self) -> torch.dtype:
        for p in self.parameters():
            return p.dtype
        return torch.float32

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}"


@dataclass(frozen=True)
class MethodSpec:
    name: str                      #: the name used in rule files (``method = "lora"``)
    config_cls: type               #: frozen dataclass of the method's parameters
    module_cls: type               #: AdapterModule subclass, built as ``module_cls(site, config)``
    peft_type: str | None = None   #: PEFT's ``peft_type`` for checkpoint interop
    #: PEFT state-dict key suffix -> our parameter name inside the module
    peft_keys: Mapping[str, str] = field(default_factory=dict)
    #: rule-file spellings -> config field names
    aliases: Mapping[str, str] = field(default_factory=dict)
    #: PEFT config fields that mean nothing here (accepted from PEFT configs and rule files, dropped)
    ignored_peft_fields: frozenset = frozenset()
    #: per-site config fields and the PEFT pattern dict that carries them,
    #: e.g. {"r": "rank_pattern", "lora_alpha": "alpha_pattern"}
    peft_site_fields: Mapping[str, str] = field(default_factory=dict)
    summary: str = ""
    #: optional per-adapter training controller, built as ``controller(modules, config)``
    #: with ``modules`` = {site name: AdapterModule}; it may define ``update_and_allocate(step)``
    #: (called by ``Adapted.update_and_allocate``) and ``regularization() -> Tensor``
    #: (added by ``Adapted.regularization_loss``), e.g. AdaLoRA's rank allocator
    controller: Any = None
    #: optional checkpoint hooks for methods whose saved tensors differ from the module's state:
    #: ``save(module, controller, site) -> (tensors, extra | None)`` and ``load(module, tensors, extra)``;
    #: ``extra`` is stored per site in the manifest, and in PEFT configs under ``peft_field`` with
    #: key ``peft_key(site)`` (AdaLoRA's pruned ranks)
    checkpoint_hooks: Any = None
    #: optional weighted combination (``add_weighted_adapter``):
    #: ``combine(adapters: [{site: module}], weights, **options) -> {site: (config, {param: tensor})}``
    combine: Any = None
    #: optional ``(peft_config, tensors) -> peft_config`` run before a PEFT checkpoint is planned,
    #: for configs that do not say what PEFT really trained (BOFT's CUDA fallback)
    peft_config_fixup: Any = None
    #: "site": the method adapts the linear sites that rules select.  "graph": the method finds its
    #: own targets in the graph and rewrites the live graph itself (Llama-Adapter: attention blocks;
    #: X-LoRA: the whole model).  Rules then match target names instead of site names.
    scope: str = "site"
    #: scope "graph": ``find_targets(adapted) -> list[target]``, candidate targets in graph order.  A
    #: target is Site-like: ``name`` (what rules match), ``key`` (attribute-safe), ``weight`` (path of a
    #: parameter whose device and dtype the adapter follows), ``in_features``, ``out_features``,
    #: ``bias``, ``dtype``.  Raise ConfigError naming the layer when the graph has no such pattern.
    find_targets: Any = None
    #: scope "graph": ``rewrite(graph, entries, adapted) -> fx.Graph`` applied to the live graph after
    #: the site adapters were inserted; ``entries`` = [(target, StackEntry)] of one active adapter
    rewrite: Any = None
    #: scope "graph", optional: ``select([(target, config), ...]) -> [target, ...]``, the targets the
    #: method keeps of those its rules matched, when its config chooses among them (Llama-Adapter: the
    #: top ``adapter_layers`` blocks).  Raise ConfigError (with ``field``) when the config cannot be met.
    select: Any = None
    #: why ``Adapted.generate`` cannot decode with this method (None: it can).  Site methods and
    #: graph methods whose rewrite applies to the decoding graph as found there (Llama-Adapter) can.
    cannot_generate: str | None = None

    def field_names(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self.config_cls)]

    def make_config(self, params: Mapping[str, Any]):
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

    def config_dict(self, config) -> dict[str, Any]:
        return dataclasses.asdict(config)


METHODS: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    if spec.name in METHODS and METHODS[spec.name] is not spec:
        raise RuntimeError(f"method '{spec.name}' registered twice")
    METHODS[spec.name] = spec
    return spec


def get_method(name: str) -> MethodSpec:
    from . import load_all

    load_all()
    if name not in METHODS:
        close = difflib.get_close_matches(name, list(METHODS), n=1)
        raise RewriterError(
            f"unknown method '{name}'",
            fix=(f"did you mean '{close[0]}'? " if close else "") + f"available: {', '.join(sorted(METHODS))}",
        )
    return METHODS[name]


# ---- small validation helpers shared by method configs -------------------------------------

def check_int(name: str, value, *, minimum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"'{name}' must be an integer, got {value!r}", field=name)
    if minimum is not None and value < minimum:
        raise ConfigError(f"'{name}' must be >= {minimum}, got {value}", field=name)


def check_number(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"'{name}' must be a number, got {value!r}", field=name)


def check_probability(name: str, value) -> None:
    check_number(name, value)
    if not 0.0 <= value < 1.0:
        raise ConfigError(f"'{name}' must be in [0, 1), got {value}", field=name)


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ConfigError(f"'{name}' must be one of {list(choices)}, got {value!r}", field=name)


def check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"'{name}' must be true or false, got {value!r}", field=name)


def round_like_base(t: torch.Tensor, base_dtype: torch.dtype) -> torch.Tensor:
    """PEFT creates adapter weights in the base dtype and then upcasts them to float32;
    doing the same rounding keeps initial values identical on low-precision bases."""
    if base_dtype.is_floating_point and base_dtype != t.dtype:
        return t.to(base_dtype).to(t.dtype)
    return t
