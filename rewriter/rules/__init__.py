"""Rule files and plans: parse a rule set (:mod:`.syntax`, with ``[remap]`` tables in :mod:`.remap`),
resolve it against a model's sites (:mod:`.planning`) and show the result (:mod:`.explain`).
PEFT ``adapter_config.json`` conversion lives in :mod:`.peft` and is not re-exported here."""
from __future__ import annotations

from .explain import format_plan
from .planning import Decision, Plan, plan
from .remap import Remap, parse_remap, read_remap
from .syntax import (ACTIONS, RULE_KEYS, SCHEMA, Rule, RuleSet, coerce_rules, layer_of, load_rules, parse_rules,
                     rules_from_dict)

__all__ = ["ACTIONS", "RULE_KEYS", "SCHEMA", "Decision", "Plan", "Remap", "Rule", "RuleSet", "coerce_rules",
           "format_plan", "layer_of", "load_rules", "parse_remap", "parse_rules", "plan", "read_remap",
           "rules_from_dict"]
