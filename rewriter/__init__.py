"""rewriter: declarative model surgery for parameter-efficient fine-tuning."""
from __future__ import annotations

__version__ = "0.1.0"

from .adapted import Adapted, apply
from .errors import (CheckpointError, ConfigError, MergeError, RewriterError, RuleError, TraceError)
from .methods import METHODS, get_method, load_all as _load_methods
from .rules import Rule, RuleSet, load_rules, parse_rules, plan, rules_from_dict
from .core.sites import Site, find_sites
from .core.tracing import trace

_load_methods()


def __getattr__(name):  # heavier pieces load on first use
    if name in ("load_adapter", "save_adapter"):
        from . import checkpoint
        return getattr(checkpoint, name)
    if name == "export":
        from .exporter import export
        return export
    if name == "check_merge":
        from .check import check_merge
        return check_merge
    if name in ("convert_peft_config", "rules_from_peft_config"):
        from . import peft_config
        return peft_config.rules_from_peft_config
    raise AttributeError(name)


__all__ = ["Adapted", "apply", "trace", "load_rules", "parse_rules", "rules_from_dict", "plan", "Rule", "RuleSet",
           "Site", "find_sites", "METHODS", "get_method", "RewriterError", "RuleError", "ConfigError", "TraceError",
           "CheckpointError", "MergeError", "load_adapter", "save_adapter", "export", "check_merge",
           "rules_from_peft_config", "__version__"]
