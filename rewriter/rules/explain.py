"""The explain table: what a plan adapts, skips and trains, and with which parameters."""
from __future__ import annotations

import dataclasses
from typing import Sequence

from ..core.sites import Site
from ..methods import get_method
from .planning import Plan


def format_plan(p: Plan, sites: Sequence[Site] | None = None) -> str:
    """The explain table: site -> rule -> method -> parameters, then per-rule counts."""
    rows = []
    for d in p.decisions:
        spec = get_method(d.method)
        defaults = spec.config_cls()  if _has_defaults(spec.config_cls) else None
        shown = {k: v for k, v in dataclasses.asdict(d.config).items()
                 if defaults is None or getattr(defaults, k) != v}
        params = ", ".join(f"{k}={v}" for k, v in shown.items()) or "defaults"
        rows.append((d.site, d.rule, d.method, params))
    for site, rule in p.skipped.items():
        rows.append((site, rule, "skip", ""))
    for module, rule in p.train:
        rows.append((module, rule, "train", "whole module trainable, saved with the adapter"))
    head = ("site", "rule", "method", "parameters")
    widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(4)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths[:3]) + "  {}"
    out = [f"adapter '{p.adapter}': {len(p.decisions)} site(s) adapted", fmt.format(*head),
           fmt.format(*("-" * w for w in widths[:3]), "-" * 10)]
    out += [fmt.format(*r) for r in rows]
    out.append("")
    out.append("rule counts: " + ", ".join(f"{k}={v}" for k, v in p.counts.items()))
    for rule, close in p.unmatched.items():
        out.append(f"optional rule '{rule}' matched nothing" + (f"; closest: {', '.join(close)}" if close else ""))
    out += [f"warning: {w}" for w in p.warnings]
    return "\n".join(out)


def _has_defaults(cls) -> bool:
    return all(f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
               for f in dataclasses.fields(cls))
