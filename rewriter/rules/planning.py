"""Planning: resolve a rule set against a model's sites (first matching rule wins per site)."""
from __future__ import annotations

import difflib
import warnings
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from ..core.sites import Site
from ..errors import ConfigError, RuleError
from ..methods import get_method
from .syntax import Rule, RuleSet


@dataclass(frozen=True)
class Decision:
    site: str
    rule: str
    method: str
    config: Any  #: the method's frozen config for this site


@dataclass
class Plan:
    adapter: str
    decisions: list[Decision]                   #: sites to adapt, graph order
    train: list[tuple[str, str]]                #: (module name, rule) made trainable and saved
    counts: dict[str, int]                      #: sites decided by each rule
    skipped: dict[str, str]                     #: site -> skip rule
    unmatched: dict[str, list[str]]             #: optional rules that matched nothing -> closest names
    shadowed: dict[str, list[str]]              #: rule -> earlier rules that took all its matches
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "adapter": self.adapter,
            "sites": [{"site": d.site, "rule": d.rule, "method": d.method,
                       "params": get_method(d.method).config_dict(d.config)} for d in self.decisions],
            "train": [{"module": m, "rule": r} for m, r in self.train],
        }


def _closest(rule: Rule, names: Sequence[str], n: int = 3) -> list[str]:
    probe = rule.match or (rule.suffix[0] if rule.suffix else rule.name)
    if rule.suffix:  # compare suffixes with the same number of components
        depth = rule.suffix[0].count(".") + 1
        tails = {".".join(x.split(".")[-depth:]): x for x in names}
        hits = difflib.get_close_matches(rule.suffix[0], list(tails), n=n, cutoff=0.3)
        return [tails[h] for h in hits]
    return difflib.get_close_matches(probe.replace("\\", ""), list(names), n=n, cutoff=0.3)


def plan(ruleset: RuleSet, sites: Sequence[Site], module_names: Sequence[str] = ()) -> Plan:
    """Resolve rules against sites: first matching rule wins per site."""
    site_names = [s.name for s in sites]
    decided: dict[str, str] = {}
    decisions, train, skipped = [], [], {}
    counts = {r.name: 0 for r in ruleset.rules}
    unmatched, shadowed, warnings = {}, {}, []
    configs: dict[tuple, Any] = {}
    fitted: set[tuple] = set()  # (rule, method, site shape): size checks depend on nothing else
    for rule in ruleset.rules:
        universe = module_names if rule.action == "train" else site_names
        hits = [n for n in universe if rule.matches(n)]
        if rule.action == "train":
            train.extend((n, rule.name) for n in hits)
            counts[rule.name] = len(hits)
        else:
            fresh = [n for n in hits if n not in decided]
            counts[rule.name] = len(fresh)
            if hits and not fresh:
                shadowed[rule.name] = sorted({decided[n] for n in hits})
            for n in fresh:
                decided[n] = rule.name
                if rule.action == "skip":
                    skipped[n] = rule.name
        if not hits:
            close = _closest(rule, universe)
            if not rule.optional:
                hint = f"closest names: {', '.join(close)}" if close else "the model has no such module"
                raise RuleError("rule matched no module", where=ruleset.where(rule),
                                fix=f"{hint}; fix the pattern or mark the rule optional = true")
            unmatched[rule.name] = close
    for name, rules in shadowed.items():
        warnings.append(f"rule '{name}' is shadowed: every module it matches was already taken by {', '.join(rules)}")
    by_rule = {r.name: r for r in ruleset.rules}
    chosen = []  # (site, rule, method, config)
    for site in sites:
        rule = by_rule.get(decided.get(site.name, ""))
        if rule is None or rule.action != "adapt":
            continue
        method = rule.method or ruleset.method
        base = ruleset.params if rule.method in (None, ruleset.method) else {}
        key = (rule.name, method)
        if key not in configs:
            try:
                configs[key] = get_method(method).make_config({**base, **rule.params})
            except ConfigError as exc:
                raise RuleError(exc.what, where=ruleset.where(rule, exc.field), fix=exc.fix) from None
        chosen.append((site, rule, method, configs[key]))
    for site, rule, method, config in _selected(ruleset, chosen, counts):
        shape = (rule.name, method, site.in_features, site.out_features, site.bias is not None, site.dtype)
        if shape not in fitted:
            _check_fits(ruleset, rule, method, config, site)
            fitted.add(shape)
        decisions.append(Decision(site=site.name, rule=rule.name, method=method, config=config))
    if not decisions:
        raise RuleError("the rules select no site to adapt", where=ruleset.source or "<rules>",
                        fix="check that at least one adapt rule matches the model (rewriter explain shows names)")
    return Plan(adapter=ruleset.adapter, decisions=decisions, train=train, counts=counts, skipped=skipped,
                unmatched=unmatched, shadowed=shadowed, warnings=warnings)


def _selected(ruleset: RuleSet, chosen: list[tuple], counts: dict[str, int]) -> list[tuple]:
    """``chosen`` less what graph-scope methods' configs leave out of what their rules matched
    (``MethodSpec.select``); ``counts`` follow."""
    kept = set()
    for method in dict.fromkeys(m for _, _, m, _ in chosen):
        mine = [(site, config) for site, _, m, config in chosen if m == method]
        scope = get_method(method).graph_scope
        try:
            kept.update(s.name for s in (scope.select(mine) if scope is not None else [s for s, _ in mine]))
        except ConfigError as exc:
            rule = next(r for _, r, m, _ in chosen if m == method)
            raise RuleError(exc.what, where=ruleset.where(rule, exc.field), fix=exc.fix) from None
    for site, rule, _, _ in chosen:
        if site.name not in kept:
            counts[rule.name] -= 1
    return [c for c in chosen if c[0].name in kept]


def _check_fits(ruleset: RuleSet, rule: Rule, method: str, config, site: Site) -> None:
    """Build the site's adapter on the meta device (no memory, no random draws) so that size
    checks (mini_r, BOFT blocks, n_frequency, ...) fail while planning, naming the rule."""
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # size adjustments warn again when the adapter is built
            get_method(method).module_cls(site, config)
    except ConfigError as exc:
        what = exc.what if site.name in exc.what else f"{site.name}: {exc.what}"
        raise RuleError(what, where=ruleset.where(rule, exc.field), fix=exc.fix) from None
