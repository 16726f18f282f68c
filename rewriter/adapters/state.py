"""The adapter state as plain data: which adapters exist, which are active, merged, disabled.

Nothing here holds a graph or a file: the live graph is a function of this state and the
base graph (:mod:`rewriter.adapters.builder`), and the engine only mutates the state and
asks for a new graph."""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch

from ..core.adapter import AdapterModule
from ..errors import MergeError, RewriterError
from ..methods import get_method
from ..methods.base import Controller, GraphScope
from ..rules import Decision, Plan, RuleSet


@dataclass
class AdapterRecord:
    name: str
    method: str                          #: the adapter's main method ([adapter] method)
    plan: Plan
    ruleset: RuleSet | None
    modules: dict[str, AdapterModule]     #: site name -> module
    train_modules: list[str] = field(default_factory=list)
    controller: Controller | None = None

    def decision(self, site: str) -> Decision:
        return next(d for d in self.plan.decisions if d.site == site)

    @property
    def graph_scope(self) -> GraphScope | None:
        """The method's graph rewrite (None: adapters at linear sites)."""
        return get_method(self.method).graph_scope


@dataclass
class AdapterState:
    records: dict[str, AdapterRecord] = field(default_factory=dict)
    active: list[str] = field(default_factory=list)
    merged: list[str] = field(default_factory=list)   #: folded into the weights, bottom to top
    disabled: bool = False                            #: inside ``disable_adapters()``

    def require(self, name: str) -> AdapterRecord:
        if name not in self.records:
            close = difflib.get_close_matches(name, list(self.records), n=1)
            raise RewriterError(f"no adapter named '{name}'",
                                fix=(f"did you mean '{close[0]}'? " if close else "") +
                                f"adapters: {', '.join(self.records) or 'none'}")
        return self.records[name]

    def check_new_name(self, name: str) -> None:
        if not isinstance(name, str) or not name.isidentifier():
            raise RewriterError(f"adapter name {name!r} must be an identifier (letters, digits, _)")
        if name in self.records:
            raise RewriterError(f"adapter '{name}' already exists on this model",
                                fix="pick another adapter name, or delete_adapter() it first")

    def live(self) -> list[str]:
        """Active adapters that act unmerged, bottom to top ([] when disabled)."""
        return [] if self.disabled else [a for a in self.active if a not in self.merged]

    def site_order(self, site: str, merged: Sequence[str]) -> list[str]:
        """Adapters on ``site`` bottom to top: merged ones, then the active unmerged ones."""
        unmerged = [a for a in self.active if a not in merged]
        return [a for a in list(merged) + unmerged if site in self.records[a].modules]

    def check_mergeable(self, names: Sequence[str], sites: Sequence[str]) -> None:
        for name in names:
            for module in self.records[name].modules.values():
                if module.not_mergeable:
                    raise MergeError(f"adapter '{name}' cannot be merged: {module.not_mergeable}",
                                     fix="keep it unmerged, or unload() it")
        for site in sites:
            before = self.site_order(site, self.merged)
            after = self.site_order(site, self.merged + list(names))
            moved = [a for a in before if before.index(a) != after.index(a)] if set(before) == set(after) else []
            for a in moved:
                module = self.records[a].modules[site]
                if not module.additive:
                    raise MergeError(
                        f"merging {list(names)} would reorder adapters on '{site}' ({before} -> {after}) and "
                        f"'{a}' ({type(module).__name__}) does not commute with the others",
                        fix="merge adapters bottom-up: merge the adapters below them first, or all at once")

    # ---- training controllers (AdaLoRA's rank allocator) ------------------------------------------

    def update_and_allocate(self, step: int) -> None:
        for name in self.active:
            controller = self.records[name].controller
            if controller is not None:
                controller.update_and_allocate(step)

    def regularization_loss(self) -> torch.Tensor:
        total = torch.zeros(())
        for name in self.active:
            controller = self.records[name].controller
            if controller is not None:
                total = total + controller.regularization()
        return total

    def with_regularization(self, outputs):
        """``outputs`` with the active adapters' regularisers (AdaLoRA's orthogonality term) added to
        its ``loss``, as PEFT's AdaLoRA forward does; outputs without a loss are returned as they are."""
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else None
        if isinstance(loss, torch.Tensor):
            outputs["loss"] = loss + self.regularization_loss().to(loss.device)
        return outputs
