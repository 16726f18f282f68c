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

from typing import Any, Callable, ClassVar, Protocol, cast

import torch
from torch import nn

from . import recompute as recompute_module


class _Target(Protocol):
    """What a module is built for: a site, or a graph-scope method's target (read-only here)."""
    @property
    def name(self) -> str: ...
    @property
    def in_features(self) -> int: ...
    @property
    def out_features(self) -> int: ...


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

    def __init__(self, site: _Target, config: Any) -> None:
        super().__init__()
        self.site_name = site.name
        self.in_features = site.in_features
        self.out_features = site.out_features
        self.config = config

    def forward(self, x: torch.Tensor | None, y: torch.Tensor | None = None, bias: torch.Tensor | None = None, *,
                stage: str = "post", weight: torch.Tensor | None = None,
                recompute: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor | None:
        """``recompute``: the operands ``(a, b)`` of ``x = a * b``, when the graph knows them; the
        backward then multiplies again instead of keeping ``x`` (see :mod:`rewriter.recompute`)."""
        # x is None only at stage "bias" (it is then the bias, and the layer has none)
        if recompute is not None and stage != "bias" and recompute_module.applies(cast(torch.Tensor, x), recompute):
            with recompute_module.recomputed(cast(torch.Tensor, x), recompute):
                return self._stage(x, y, bias, stage, weight)
        return self._stage(x, y, bias, stage, weight)

    def _stage(self, x: torch.Tensor | None, y: torch.Tensor | None, bias: torch.Tensor | None, stage: str,
               weight: torch.Tensor | None) -> torch.Tensor | None:
        if stage == "pre":
            return self.pre(cast(torch.Tensor, x))
        if stage == "bias":
            return self.fold_bias(x)
        # needs_weight subclasses take ``weight=``; replaces_base ones get ``y=None``
        post: Callable[..., torch.Tensor] = self.post
        if self.needs_weight:
            return post(x, y, bias, weight=weight)
        return post(x, y, bias)

    def pre(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def post(self, x: torch.Tensor, y: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return y

    def fold_bias(self, bias: torch.Tensor | None) -> torch.Tensor | None:
        """The bias part of ``fold`` (identity unless the method changes the bias); used to hand
        ``reads_bias`` adapters above this one the bias as this level leaves it."""
        return bias

    def fold(self, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
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
