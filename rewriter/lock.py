"""Lock files: the resolved plan of one or more rule files on one model, for CI.

``rewriter lock RULES... --model M`` writes ``rules.lock.json``: per adapter, which rule
adapts which site with which method and parameters, plus a fingerprint of the traced graph.
``rewriter check --lock rules.lock.json`` re-plans the recorded rule files on the recorded
model and fails, site by site, when the plan drifted (a model update renamed modules, a rule
now matches more or fewer sites, a parameter changed).  A changed graph or rule file whose
plan is unchanged is only noted.

Paths in the lock (rule files, a model directory) are relative to the lock's directory, so
the lock works from any working directory and in any checkout of the repository.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import fx

from .core.files import atomic_write
from .version import __version__
from .errors import MergeError, RewriterError, RuleError
from .methods import get_method
from .rules import Plan, RuleSet, load_rules, plan

LOCK_VERSION = 1
#: keys whose entries are written one per line (lock diffs in review then read site by site)
_ONE_LINE_ENTRIES = ("rules", "sites", "train")


# ---- stacking rule files ------------------------------------------------------------------------

def as_identifier(text: str) -> str:
    """``text`` as an adapter name: ``lokr-llama`` -> ``lokr_llama``."""
    name = re.sub(r"\W", "_", text)
    return name if name[:1].isalpha() or name[:1] == "_" else f"_{name}"


def stack_names(rulesets: Sequence[RuleSet], taken: Sequence[str] = ()) -> list[str]:
    """Adapter names for rule files stacked bottom to top: each file's ``[adapter] name``, or,
    when an earlier adapter took it, the file's stem (``rules/lokr-llama.toml`` -> ``lokr_llama``)."""
    names = list(taken)
    for ruleset in rulesets:
        name = ruleset.adapter
        if name in names:
            stem = as_identifier(Path(ruleset.source).stem) if ruleset.source else name
            name, k = stem, 2
            while name in names:
                name, k = f"{stem}_{k}", k + 1
        names.append(name)
    return names[len(taken):]


def stack_rules(adapted, rulesets: Sequence[RuleSet]) -> list[str]:
    """Add every rule set as an active adapter, bottom to top; returns the adapter names."""
    names = stack_names(rulesets, taken=list(adapted.adapters))
    for ruleset, name in zip(rulesets, names):
        try:
            adapted.add_adapter(ruleset, name, activate=True)
        except MergeError as exc:  # an adapter that must sit lowest on its site (graph.chain)
            raise RewriterError(exc.what, where=ruleset.source,
                                fix="give this rule file first (lowest in the stack)") from None
    return names


# ---- fingerprints -------------------------------------------------------------------------------

def text_sha256(ruleset: RuleSet) -> str:
    return hashlib.sha256((ruleset.text or "").encode()).hexdigest()


def _callable_name(fn) -> str:
    return fn if isinstance(fn, str) else f"{getattr(fn, '__module__', '')}.{getattr(fn, '__name__', fn)}"


def graph_fingerprint(gm: fx.GraphModule, graph: fx.Graph | None = None) -> str:
    """sha256 of the graph's structure: every node's op, target and arguments (by position, not
    by name) and the shape and dtype of every tensor it reads.  Weight values are left out, so
    fine-tuning the model does not change it; a new layer, a renamed module or a resized weight does."""
    digest = hashlib.sha256()
    index: dict[fx.Node, int] = {}
    for i, node in enumerate((graph or gm.graph).nodes):
        index[node] = i
        args = fx.node.map_arg((node.args, node.kwargs), lambda n: f"%{index[n]}")
        line = f"{node.op} {_callable_name(node.target)} {args!r}"
        if node.op == "get_attr":
            value = _attr(gm, node.target)
            if isinstance(value, torch.Tensor):
                line += f" {tuple(value.shape)} {value.dtype}"
            elif isinstance(value, fx.GraphModule):  # higher-order op bodies
                line += " " + graph_fingerprint(value)
        digest.update(line.encode() + b"\n")
    return digest.hexdigest()


def _attr(gm: fx.GraphModule, target: str):
    value: Any = gm
    for part in target.split("."):
        value = getattr(value, part, None)
    return value


# ---- the plan as data -----------------------------------------------------------------------------

def _jsonable(value):
    return json.loads(json.dumps(value, default=str))


def plan_entry(adapted, name: str, ruleset: RuleSet, p: Plan, rules_path: str) -> dict:
    """One adapter of a lock: its rule file and, per site, the deciding rule and the weight shape;
    each rule's method and full parameters once."""
    rules: dict[str, Any] = {}
    for d in p.decisions:
        rules.setdefault(d.rule, {"method": d.method, "params": get_method(d.method).config_dict(d.config)})
    shapes = {d.site: adapted.target(d.site, d.method) for d in p.decisions}
    sites = {d.site: {"rule": d.rule, "shape": [shapes[d.site].out_features, shapes[d.site].in_features]}
             for d in p.decisions}
    return _jsonable({"name": name, "rules_file": rules_path,
                      "rules_sha256": text_sha256(ruleset),
                      "rules": rules, "sites": sites, "train": dict(p.train)})


def _relative(path: Path, base: Path) -> str:
    return Path(os.path.relpath(Path(path).resolve(), base.resolve())).as_posix()


def make_lock(adapted, rulesets: Sequence[RuleSet], names: Sequence[str], *, model: str,
              dtype: str | None, lock_path: Path) -> dict:
    """The lock for ``rulesets`` stacked on ``adapted`` under ``names`` (see :func:`stack_rules`)."""
    base = Path(lock_path).parent
    missing = [r for r in rulesets if not r.source]
    if missing:
        raise RewriterError("a lock records rule files by path, and these rules came from text",
                            fix="write the rules to a .toml file and lock that")
    is_dir = Path(model).is_dir()
    return {
        "lock_version": LOCK_VERSION,
        "rewriter_version": __version__,
        "model": _relative(Path(model), base) if is_dir else model,
        "model_is_path": is_dir,
        "dtype": dtype,
        "graph": {"fingerprint": graph_fingerprint(adapted.gm, adapted.base_graph), "sites": len(adapted.sites)},
        "adapters": [plan_entry(adapted, name, r, adapted.adapters[name].plan, _relative(Path(r.source), base))
                     for r, name in zip(rulesets, names)],
    }


def dumps(lock: dict) -> str:
    """JSON with the entries of ``rules``, ``sites`` and ``train`` one per line."""
    def render(value, depth: int = 0, flat: bool = False, flat_children: bool = False) -> str:
        if flat or not isinstance(value, (dict, list)) or not value:
            return json.dumps(value)
        pad, end = "  " * (depth + 1), "\n" + "  " * depth
        if isinstance(value, list):
            return "[\n" + ",\n".join(pad + render(v, depth + 1, flat_children) for v in value) + end + "]"
        body = [f"{pad}{json.dumps(k)}: " + render(v, depth + 1, flat_children, k in _ONE_LINE_ENTRIES)
                for k, v in value.items()]
        return "{\n" + ",\n".join(body) + end + "}"
    return render(lock) + "\n"


def write_lock(path: Path, lock: dict) -> Path:
    atomic_write(Path(path), dumps(lock).encode())
    return Path(path)


# ---- reading a lock -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Lock:
    path: Path
    data: dict

    @property
    def model(self) -> str:
        spec = self.data["model"]
        return str(self.path.parent / spec) if self.data.get("model_is_path") else spec

    @property
    def dtype(self) -> str | None:
        return self.data.get("dtype")

    @property
    def adapters(self) -> list[dict]:
        return self.data["adapters"]

    def rules_path(self, entry: dict) -> Path:
        return self.path.parent / entry["rules_file"]

    def load_rules(self) -> list[RuleSet]:
        return [load_rules(self.rules_path(entry)) for entry in self.adapters]

    def update_command(self) -> str:
        """The command that rewrites this lock from the current rule files (paths from the cwd)."""
        def here(p: Path) -> str:
            return _relative(p, Path.cwd())
        model = here(Path(self.model)) if self.data.get("model_is_path") else self.model
        rules = " ".join(here(self.rules_path(e)) for e in self.adapters)
        dtype = f" --dtype {self.dtype}" if self.dtype else ""
        return f"rewriter lock {rules} --model {model}{dtype} --out {here(self.path)}"


def read_lock(path) -> Lock:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise RewriterError(f"cannot read the lock file: {exc.strerror}", where=str(path),
                            fix="create it with: rewriter lock RULES... --model M --out " + str(path)) from None
    except json.JSONDecodeError as exc:
        raise RewriterError(f"the lock file is not valid JSON: {exc.msg} (line {exc.lineno})", where=str(path),
                            fix="regenerate it with rewriter lock (a merge conflict in it?)") from None
    if not isinstance(data, dict) or data.get("lock_version") != LOCK_VERSION:
        version = data.get("lock_version") if isinstance(data, dict) else None
        raise RewriterError(f"unsupported lock_version {version!r}", where=str(path),
                            fix=f"this rewriter reads lock_version {LOCK_VERSION}; regenerate it with rewriter lock")
    needed = {"model": str, "graph": dict, "adapters": list}
    for key, kind in needed.items():
        if not isinstance(data.get(key), kind):
            raise RewriterError(f"the lock file has no valid '{key}'", where=str(path),
                                fix="regenerate it with rewriter lock")
    for i, entry in enumerate(data["adapters"]):
        if not isinstance(entry, dict) or not all(isinstance(entry.get(k), dict) for k in ("rules", "sites", "train")) \
                or not isinstance(entry.get("rules_file"), str) or not isinstance(entry.get("name"), str):
            raise RewriterError(f"adapter entry {i} of the lock is malformed", where=str(path),
                                fix="regenerate it with rewriter lock")
    return Lock(path=path, data=data)


# ---- drift --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Change:
    adapter: str
    kind: str     #: "+" newly adapted, "-" no longer adapted, "~" changed
    name: str     #: the site (or trained module)
    detail: str


@dataclass
class LockReport:
    lock: str
    changes: list[Change]
    notes: list[str] = field(default_factory=list)
    update_command: str = ""

    @property
    def ok(self) -> bool:
        return not self.changes

    def to_dict(self) -> dict:
        return {"ok": self.ok, "lock": self.lock, "changes": [dataclasses.asdict(c) for c in self.changes],
                "notes": self.notes, "update_command": self.update_command}

    def format(self) -> str:
        if self.ok:
            lines = [f"plan matches {self.lock}"]
        else:
            lines = [f"plan drifted from {self.lock}:"]
            width = max(len(c.name) for c in self.changes)
            for adapter in dict.fromkeys(c.adapter for c in self.changes):
                lines.append(f"  adapter '{adapter}':")
                lines += [f"    {c.kind} {c.name:<{width}}  {c.detail}" for c in self.changes if c.adapter == adapter]
        lines += [f"note: {n}" for n in self.notes]
        if not self.ok:
            lines.append(f"FAILED: {len(self.changes)} change(s); if they are intended, update the lock:\n"
                         f"  {self.update_command}")
        return "\n".join(lines)


def current_entry(adapted, ruleset: RuleSet, name: str, rules_path: str) -> tuple[dict, list[str]]:
    """The plan ``ruleset`` resolves to now, as a lock entry, planned leniently (a rule that now
    matches nothing is drift to report, not an error); plus notes on rules that match nothing."""
    lenient = dataclasses.replace(ruleset, rules=tuple(dataclasses.replace(r, optional=True) for r in ruleset.rules))
    try:
        p = plan(lenient, list(adapted.targets(ruleset.method).values()), adapted.module_names())
    except RuleError as exc:  # e.g. no site is selected any more
        empty = {"name": name, "rules_file": rules_path, "rules": {}, "sites": {}, "train": {}}
        return empty, [f"adapter '{name}': {exc.what}"]
    optional = {r.name for r in ruleset.rules if r.optional}
    notes = [f"adapter '{name}': rule '{rule}' now matches nothing"
             + (f" (closest: {', '.join(close)})" if close else "")
             for rule, close in p.unmatched.items() if rule not in optional]
    return plan_entry(adapted, name, ruleset, p, rules_path), notes


def _param_changes(old: dict | None, new: dict | None) -> list[str]:
    if old is None or new is None:
        return []
    out = [f"method {old['method']} -> {new['method']}"] if old["method"] != new["method"] else []
    keys = list(dict.fromkeys(list(old["params"]) + list(new["params"])))
    return out + [f"{k}: {old['params'].get(k)!r} -> {new['params'].get(k)!r}"
                  for k in keys if old["params"].get(k) != new["params"].get(k)]


def diff_entries(locked: dict, current: dict) -> list[Change]:
    """Site-by-site differences between a locked adapter entry and the current one."""
    adapter = current["name"]
    changes = []
    if locked["name"] != current["name"]:
        changes.append(Change(adapter, "~", "(adapter name)", f"'{locked['name']}' -> '{current['name']}'"))
    old, new = locked["sites"], current["sites"]
    gone, fresh = [s for s in old if s not in new], [s for s in new if s not in old]
    for site in dict.fromkeys(list(old) + list(new)):
        before, after = old.get(site), new.get(site)
        if after is None:
            close = difflib.get_close_matches(site, fresh, n=1, cutoff=0.6)
            hint = f"; renamed to '{close[0]}'?" if close else ""
            changes.append(Change(adapter, "-", site, f"no longer adapted (was rule '{before['rule']}', "
                                  f"{locked['rules'].get(before['rule'], {}).get('method', '?')}){hint}"))
        elif before is None:
            close = difflib.get_close_matches(site, gone, n=1, cutoff=0.6)
            hint = f"; renamed from '{close[0]}'?" if close else ""
            changes.append(Change(adapter, "+", site, f"newly adapted by rule '{after['rule']}', "
                                  f"{current['rules'][after['rule']]['method']}{hint}"))
        else:
            what = [f"rule '{before['rule']}' -> '{after['rule']}'"] if before["rule"] != after["rule"] else []
            what += [f"shape {before['shape']} -> {after['shape']}"] if before["shape"] != after["shape"] else []
            what += _param_changes(locked["rules"].get(before["rule"]), current["rules"].get(after["rule"]))
            if what:
                changes.append(Change(adapter, "~", site, ", ".join(what)))
    for module in dict.fromkeys(list(locked["train"]) + list(current["train"])):
        before, after = locked["train"].get(module), current["train"].get(module)
        if before != after:
            kind = "-" if after is None else "+" if before is None else "~"
            detail = "no longer trained" if after is None else f"trained whole (rule '{after}')" if before is None \
                else f"trained by rule '{before}' -> '{after}'"
            changes.append(Change(adapter, kind, module, detail))
    return changes


def check_lock(lock: Lock, adapted, rulesets: Sequence[RuleSet] | None = None) -> LockReport:
    """Re-plan the lock's rule files (or ``rulesets``, in the lock's order) on ``adapted``'s
    base graph and compare with the lock."""
    rulesets = list(rulesets) if rulesets is not None else lock.load_rules()
    if len(rulesets) != len(lock.adapters):
        raise RewriterError(f"the lock has {len(lock.adapters)} adapter(s), {len(rulesets)} rule set(s) were given",
                            where=str(lock.path))
    report = LockReport(lock=str(lock.path), changes=[], update_command=lock.update_command())
    for entry, ruleset, name in zip(lock.adapters, rulesets, stack_names(rulesets)):
        current, notes = current_entry(adapted, ruleset, name, entry["rules_file"])
        changes = diff_entries(entry, current)
        report.changes += changes
        report.notes += notes
        if text_sha256(ruleset) != entry.get("rules_sha256") and not changes:
            report.notes.append(f"{entry['rules_file']} changed since the lock, but its plan did not")
    fingerprint = graph_fingerprint(adapted.gm, adapted.base_graph)
    if fingerprint != lock.data["graph"].get("fingerprint"):
        report.notes.append(f"the traced graph changed since the lock (fingerprint "
                            f"{str(lock.data['graph'].get('fingerprint'))[:12]} -> {fingerprint[:12]})"
                            + ("" if report.changes else "; the plan did not"))
    return report
