"""Rule files: which sites get which adapter.

A rule file is TOML, parsed into frozen dataclasses.  Rules are ordered and the first
rule that matches a site decides for it (``skip`` rules exclude).  A rule that matches
nothing is an error unless ``optional``; a rule whose every match was already taken by
earlier rules is reported as shadowed.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from ..errors import ConfigError, RewriterError, RuleError
from ..methods import get_method
from .remap import Remap, parse_remap

SCHEMA = 1
ACTIONS = ("adapt", "skip", "train")
_TOP_KEYS = {"schema", "adapter", "rule", "remap"}
_ADAPTER_KEYS = {"name", "method"}
RULE_KEYS = {"name", "match", "suffix", "layers", "layers_pattern", "action", "method", "optional"}
_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True)
class Rule:
    name: str
    match: str | None = None          #: regex, always a FULL match on the module name
    suffix: tuple[str, ...] = ()      #: exact module names or '.'-bounded suffixes
    layers: tuple[int, ...] | None = None
    layers_pattern: str | None = None  #: PEFT-style regex fragment naming the layer container
    action: str = "adapt"
    method: str | None = None          #: overrides the adapter's method
    params: Mapping[str, Any] = field(default_factory=dict)  #: method parameter overrides
    optional: bool = False
    line: int | None = None

    def matches(self, name: str) -> bool:
        if self.match is not None and not re.fullmatch(self.match, name):
            return False
        if self.suffix and not any(name == s or name.endswith("." + s) for s in self.suffix):
            return False
        if self.layers is not None:
            index = layer_of(name, self.layers_pattern)
            if index is None or index not in self.layers:
                return False
        return True


@dataclass(frozen=True)
class RuleSet:
    adapter: str = "default"
    method: str = "lora"
    params: Mapping[str, Any] = field(default_factory=dict)  #: defaults for every rule
    rules: tuple[Rule, ...] = ()
    source: str | None = None   #: file path, for messages
    text: str | None = None     #: the file's text, saved beside checkpoints
    remap: "Remap" = field(default_factory=lambda: Remap())  #: renames for checkpoints loaded with this file

    def where(self, rule: Rule | None = None, key: str | None = None) -> str:
        place = self.source or "<rules>"
        if rule is None and key is not None:  # a key of the [adapter] table
            header = (_header_lines(self.text, "[adapter]") or [None])[0] if self.text else None
            line = _field_line(self.text, header, key) if header else None
            return place + (f":{line}" if line else "") + f", [adapter], field '{key}'"
        if rule is not None and key in self.params and key not in rule.params:  # inherited from [adapter]
            return f"{self.where(None, key)} (used by rule '{rule.name}')"
        if rule is not None:
            line = _field_line(self.text, rule.line, key) if key else rule.line
            place += f":{line}" if line else ""
            place += f", rule '{rule.name}'"
        if key:
            place += f", field '{key}'"
        return place


def layer_of(name: str, pattern: str | None = None) -> int | None:
    """Layer index of a module name: the first all-digit component, or with ``pattern``
    (PEFT's ``layers_pattern``) the index right after a component matching it."""
    if pattern is None:
        m = re.search(r"(?:^|\.)(\d+)(?:\.|$)", name)
    else:
        m = re.match(_layers_regex(pattern), name)
    return int(m.group(1)) if m else None


def _layers_regex(pattern: str) -> str:
    return rf"(?:^|.*?\.){pattern}\.(\d+)\."


# ---- parsing --------------------------------------------------------------------------------

def _field_line(text: str | None, start: int | None, key: str) -> int | None:
    """Line of ``key = ...`` inside the table whose header is on line ``start`` (1-based)."""
    if not text or not start:
        return start
    for number, line in enumerate(text.splitlines()[start:], start=start + 1):
        if line.lstrip().startswith("["):
            break
        if re.match(rf"\s*{re.escape(key)}\s*=", line):
            return number
    return start


def _header_lines(text: str, header: str) -> list[int]:
    """Lines (1-based) of a table header such as ``[[rule]]``, spaces and a trailing comment allowed."""
    return [i + 1 for i, line in enumerate(text.splitlines())
            if line.split("#", 1)[0].replace(" ", "").replace("\t", "") == header]


def _did_you_mean(key: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    return f"did you mean '{close[0]}'?" if close else f"known keys: {', '.join(sorted(known))}"


def _str_tuple(value, where: str, key: str) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise RuleError(f"'{key}' must be a string or a list of strings, got {value!r}", where=where)


def _layers(value, where: str) -> tuple[int, ...]:
    values = [value] if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(values, list) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                               for v in values):
        raise RuleError(f"'layers' must be a non-negative integer or a list of them, got {value!r}", where=where,
                        fix="e.g. layers = [0, 1, 2]")
    return tuple(values)


def _regex(value, where: str, key: str) -> str:
    if not isinstance(value, str):
        raise RuleError(f"'{key}' must be a string (a regular expression), got {value!r}", where=where)
    try:
        re.compile(value)
        if key == "layers_pattern":
            re.compile(_layers_regex(value))  # as layer_of uses it (e.g. global flags must come first)
    except re.error as exc:
        raise RuleError(f"'{key}' is not a valid regular expression: {exc}", where=where,
                        fix="write the regex in single quotes ('...') so backslashes stay literal") from exc
    return value


def _check_params(ruleset: RuleSet, method: str, params: Mapping[str, Any], rule: Rule | None) -> None:
    try:
        spec = get_method(method)
    except Exception as exc:
        raise RuleError(str(exc).split("\n")[0], where=ruleset.where(rule, "method"),
                        fix=getattr(exc, "fix", None)) from None
    try:
        spec.make_config({**ruleset.params, **params} if rule is not None else params)
    except ConfigError as exc:
        raise RuleError(exc.what, where=ruleset.where(rule, exc.field), fix=exc.fix) from None


def parse_rules(text: str, source: str | None = None) -> RuleSet:
    where = source or "<rules>"
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RuleError(f"invalid TOML: {exc}", where=where, fix="check the quoting and brackets on that line") from None
    return rules_from_dict(data, source=source, text=text)


def load_rules(path: str | Path) -> RuleSet:
    """Read and validate a rule file; errors name the file, line, rule and field."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise RuleError(f"cannot read rule file: {exc.strerror}", where=str(path)) from None
    return parse_rules(text, source=str(path))


def _top_where(source: str | None, text: str | None, key: str) -> str:
    """``file:line`` of a top-level ``key = ...`` or of a ``[key]`` / ``[[key]]`` / ``[key.x]`` header."""
    pattern = re.compile(rf"\s*(\[\[?\s*{re.escape(key)}\s*[\].]|{re.escape(key)}\s*=)")
    line = next((i + 1 for i, text_line in enumerate((text or "").splitlines()) if pattern.match(text_line)), None)
    return (source or "<rules>") + (f":{line}" if line else "")


def rules_from_dict(data: Mapping[str, Any], *, source: str | None = None, text: str | None = None) -> RuleSet:
    where = source or "<rules>"
    if not isinstance(data, Mapping):
        raise RuleError("a rule set must be a table", where=where)
    for key in data:
        if key not in _TOP_KEYS:
            raise RuleError(f"unknown top-level key '{key}'", where=_top_where(source, text, key),
                            fix=_did_you_mean(key, _TOP_KEYS))
    schema = data.get("schema", SCHEMA)
    if schema != SCHEMA:
        raise RuleError(f"unsupported schema {schema!r}", where=_top_where(source, text, "schema"),
                        fix=f"this rewriter reads schema = {SCHEMA}")
    if not isinstance(data.get("adapter", {}), Mapping):
        raise RuleError("[adapter] must be a table", where=_top_where(source, text, "adapter"))
    adapter = dict(data.get("adapter", {}))
    name = adapter.pop("name", "default")
    method = adapter.pop("method", "lora")
    located = RuleSet(source=source, text=text)  # locates [adapter] fields before the rule set exists
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise RuleError(f"adapter name {name!r} must be an identifier (letters, digits, _)",
                        where=located.where(None, "name"))
    if not isinstance(method, str):
        raise RuleError(f"method must be a string, got {method!r}", where=located.where(None, "method"))
    remap = parse_remap(data["remap"], _top_where(source, text, "remap")) if "remap" in data else Remap()
    ruleset = RuleSet(adapter=name, method=method, params=adapter, source=source, text=text, remap=remap)
    _check_params(ruleset, method, adapter, None)
    raw_rules = data.get("rule", [])
    if not isinstance(raw_rules, list):
        raise RuleError("'rule' must be an array of tables: write each rule as [[rule]]",
                        where=_top_where(source, text, "rule"))
    if not raw_rules and get_method(method).graph_scope is not None:  # the method finds its own targets
        return dataclasses.replace(ruleset, rules=(Rule(name="all", match=".*"),))
    if not raw_rules:
        raise RuleError("the rule set has no rules", where=where, fix="add at least one [[rule]] with a match or suffix")
    lines = _header_lines(text, "[[rule]]") if text else []
    rules, seen = [], set()
    for i, raw in enumerate(raw_rules):
        line = lines[i] if i < len(lines) else None
        rule = _parse_rule(ruleset, raw, i, line)
        if rule.name in seen:
            raise RuleError(f"two rules are named '{rule.name}'", where=ruleset.where(rule, "name"),
                            fix="give every rule its own name")
        seen.add(rule.name)
        rules.append(rule)
    return dataclasses.replace(ruleset, rules=tuple(rules))


def _parse_rule(ruleset: RuleSet, raw, index: int, line: int | None) -> Rule:
    if not isinstance(raw, Mapping):
        raise RuleError("each rule must be a table", where=ruleset.where(Rule(name=f"rule-{index + 1}", line=line)))
    name = raw.get("name", f"rule-{index + 1}")
    params = {k: v for k, v in raw.items() if k not in RULE_KEYS}
    stub = Rule(name=str(name), line=line, params=params)  # for messages (a rule's own params are located there)
    if not isinstance(name, str) or not name:
        raise RuleError(f"rule name must be a non-empty string, got {name!r}", where=ruleset.where(stub, "name"))
    action = raw.get("action", "adapt")
    if action not in ACTIONS:
        raise RuleError(f"action must be one of {list(ACTIONS)}, got {action!r}", where=ruleset.where(stub, "action"),
                        fix=_did_you_mean(str(action), ACTIONS))
    method = raw.get("method", ruleset.method)
    if action != "adapt":
        for key in list(params) + (["method"] if "method" in raw else []):
            raise RuleError(f"'{key}' has no meaning in a '{action}' rule", where=ruleset.where(stub, key),
                            fix=_did_you_mean(key, RULE_KEYS) if key not in RULE_KEYS else "remove it")
    match = _regex(raw["match"], ruleset.where(stub, "match"), "match") if "match" in raw else None
    suffix = _str_tuple(raw["suffix"], ruleset.where(stub, "suffix"), "suffix") if "suffix" in raw else ()
    if match is None and not suffix:
        raise RuleError("a rule needs 'match' (a regex) or 'suffix' (names)", where=ruleset.where(stub),
                        fix="e.g. match = 'model\\.layers\\.\\d+\\.self_attn\\.q_proj' or suffix = [\"q_proj\"]")
    layers = _layers(raw["layers"], ruleset.where(stub, "layers")) if "layers" in raw else None
    layers_pattern = (_regex(raw["layers_pattern"], ruleset.where(stub, "layers_pattern"), "layers_pattern")
                      if "layers_pattern" in raw else None)
    optional = raw.get("optional", False)
    if not isinstance(optional, bool):
        raise RuleError(f"'optional' must be true or false, got {optional!r}", where=ruleset.where(stub, "optional"))
    if not isinstance(method, str):
        raise RuleError(f"'method' must be a string, got {method!r}", where=ruleset.where(stub, "method"))
    rule = Rule(name=name, match=match, suffix=suffix, layers=layers, layers_pattern=layers_pattern, action=action,
                method=method if "method" in raw else None, params=params, optional=optional, line=line)
    if action == "adapt":
        _check_misspelt_rule_keys(ruleset, rule, method)
        # rule params override [adapter] params; a method change drops [adapter] params it does not know
        base = ruleset.params if rule.method in (None, ruleset.method) else {}
        _check_params(dataclasses.replace(ruleset, params=base), method, params, rule)
    return rule


def _check_misspelt_rule_keys(ruleset: RuleSet, rule: Rule, method: str) -> None:
    """'sufix' is a misspelt rule key, not an unknown parameter of the method: suggest the rule key."""
    try:
        spec = get_method(method)
    except RewriterError:
        return  # _check_params reports the method
    accepted = set(spec.field_names()) | set(spec.aliases) | set(spec.ignored_peft_fields)
    for key in rule.params:
        close = difflib.get_close_matches(key, sorted(accepted | RULE_KEYS), n=1)
        if key not in accepted and close and close[0] in RULE_KEYS:
            raise RuleError(f"unknown key '{key}' in a rule", where=ruleset.where(rule, key),
                            fix=f"did you mean '{close[0]}'?")


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
