"""rewriter: declarative model surgery for parameter-efficient fine-tuning."""
from __future__ import annotations

from .adapted import Adapted, apply, load_adapter
from .check import check_merge
from .checkpoint import save_adapter
from .core.sites import Site, find_sites
from .core.tracing import trace
from .errors import CheckpointError, ConfigError, MergeError, RewriterError, RuleError, TraceError
from .exporter import export
from .methods import METHODS, get_method, load_all
from .rules import Rule, RuleSet, load_rules, parse_rules, plan, rules_from_dict
from .rules.peft import rules_from_peft_config
from .version import __version__

load_all()
convert_peft_config = rules_from_peft_config

__all__ = ["Adapted", "apply", "trace", "load_rules", "parse_rules", "rules_from_dict", "plan", "Rule", "RuleSet",
           "Site", "find_sites", "METHODS", "get_method", "RewriterError", "RuleError", "ConfigError", "TraceError",
           "CheckpointError", "MergeError", "load_adapter", "save_adapter", "export", "check_merge",
           "rules_from_peft_config", "__version__"]
