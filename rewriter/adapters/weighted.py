"""``add_weighted_adapter``: a new adapter combining existing ones (PEFT's semantics), written on
the engine's public API; each method says how its adapters combine (``MethodSpec.combine``)."""
from __future__ import annotations

from typing import Sequence

import torch

from ..errors import ConfigError, RewriterError
from ..methods import get_method
from ..rules import Decision, Plan
from .state import AdapterRecord


def add_weighted_adapter(model, adapters: Sequence[str], weights: Sequence[float], adapter_name: str,
                         combination_type: str = "svd", **options) -> AdapterRecord:
    """A new adapter on ``model`` (an AdaptedModel) combining ``adapters`` with ``weights``, added
    inactive like PEFT's (LoRA: linear, cat, svd with ``svd_rank``/``svd_clamp``; IA3: linear)."""
    if len(adapters) != len(weights) or not adapters:
        raise RewriterError(f"need one weight per adapter, got {len(adapters)} adapters, {len(weights)} weights")
    records = [model.require(a) for a in adapters]
    methods = {d.method for r in records for d in r.plan.decisions}
    if len(methods) != 1:
        raise RewriterError(f"cannot combine adapters of different methods {sorted(methods)}")
    spec = get_method(methods.pop())
    if spec.combine is None:
        raise RewriterError(f"weighted combination is not defined for {spec.name}",
                            fix="it exists for LoRA (linear, cat, svd) and IA3 (linear)")
    model.check_new_name(adapter_name)
    try:
        combined = spec.combine([r.modules for r in records], list(weights), combination_type=combination_type,
                                **options)
    except ConfigError as exc:
        raise RewriterError(exc.what, fix=exc.fix) from None
    rule = f"weighted({', '.join(adapters)})"
    p = Plan(adapter=adapter_name, decisions=[Decision(site=s, rule=rule, method=spec.name, config=c)
                                              for s, (c, _) in combined.items()],
             train=[], counts={rule: len(combined)}, skipped={}, unmatched={}, shadowed={})
    modules = model.build_modules(p)
    with torch.no_grad():
        for site, (_, tensors) in combined.items():
            for name, value in tensors.items():
                getattr(modules[site], name).copy_(value)
    return model.install(adapter_name, p, None, modules, activate=False, method=spec.name)
