"""PEFT ``adapter_config.json`` <-> rule sets, with PEFT 0.21.2's exact matching semantics.

PEFT decides targets with: ``exclude_modules`` first, then modules inside ``modules_to_save``,
then ``target_modules`` (a str is a full-match regex; a list matches exact names or
'.'-suffixes, and only suffix matches go through the ``layers_to_transform`` filter), and
per-module values from pattern dicts (first key in dict order wins).  Ordered first-match
rules express all of it: pattern combinations become rules whose regexes are lookaheads.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..errors import CheckpointError, RewriterError
from ..methods import METHODS, MethodSpec, load_all
from .syntax import RuleSet, rules_from_dict

#: PEFT's per-architecture default targets (used when target_modules is None)
DEFAULT_TARGETS = {
    "llama": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"], "gemma2": ["q_proj", "v_proj"], "phi3": ["qkv_proj"], "gpt2": ["c_attn"],
    "opt": ["q_proj", "v_proj"], "bert": ["query", "value"], "roberta": ["query", "value"], "t5": ["q", "v"],
}
DEFAULT_TARGETS_IA3 = {"llama": ["k_proj", "v_proj", "down_proj"], "mistral": ["k_proj", "v_proj", "down_proj"],
                       "gpt2": ["c_attn", "mlp.c_proj"], "t5": ["k", "v", "wo"], "bert": ["key", "value", "output.dense"]}
DEFAULT_FEEDFORWARD_IA3 = {"llama": ["down_proj"], "mistral": ["down_proj"], "gpt2": ["mlp.c_proj"], "t5": ["wo"],
                           "bert": ["output.dense"]}
#: PEFT's attention module names for ADAPTION_PROMPT (used when target_modules is None); other
#: model types: every attention block the graph has
ADAPTION_PROMPT_TARGETS = {"llama": "self_attn", "mistral": "self_attn", "gpt2": "attn"}
_TARGET_FIELDS = {"target_modules", "exclude_modules", "layers_to_transform", "layers_pattern", "modules_to_save",
                  "feedforward_modules"}


def method_for_peft_type(peft_type: str) -> MethodSpec:
    load_all()
    for spec in METHODS.values():
        if spec.peft_type == peft_type:
            return spec
    raise CheckpointError(f"PEFT type '{peft_type}' is not supported",
                          fix=f"supported: {', '.join(sorted(s.peft_type for s in METHODS.values() if s.peft_type))}")


def _pattern_regex(field_dict: str, key: str) -> str:
    """Full-match regex equivalent to PEFT's lookup of ``key`` in the pattern dict ``field_dict``."""
    if field_dict == "n_frequency_pattern":  # re.match(rf".*\.{key}$"): a dot before the key is required
        return rf".*\.(?:{key})"
    return rf"(?:.*\.)?(?:{key})"  # get_pattern_key: re.match(rf"(.*\.)?({key})$")


def _lookahead(regex: str) -> str:
    return f"(?=(?:{regex})$)"


def _check_target_fields(cfg: Mapping[str, Any], source: str | None) -> None:
    """The target-selection fields must have PEFT's types before we build regexes from them."""
    def strings(value) -> bool:
        return isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)

    expect = {"target_modules": (lambda v: isinstance(v, str) or strings(v), "a string or a list of strings"),
              "exclude_modules": (lambda v: isinstance(v, str) or strings(v), "a string or a list of strings"),
              "feedforward_modules": (lambda v: isinstance(v, str) or strings(v), "a string or a list of strings"),
              "modules_to_save": (strings, "a list of strings"),
              "layers_pattern": (lambda v: isinstance(v, str) or strings(v), "a string or a list of strings"),
              "layers_to_transform": (lambda v: isinstance(v, int) or (isinstance(v, list) and all(
                  isinstance(i, int) for i in v)), "an integer or a list of integers")}
    expect.update({name: (lambda v: isinstance(v, Mapping), "a mapping of pattern -> value")
                   for name in ("rank_pattern", "alpha_pattern", "n_frequency_pattern")})
    for name, (ok, what) in expect.items():
        value = cfg.get(name)
        if value is not None and not ok(value):
            raise CheckpointError(f"'{name}' must be {what}, got {value!r}", where=source,
                                  fix="fix adapter_config.json (is it from another tool?)")


def rules_from_peft_config(config: Mapping[str, Any], *, adapter_name: str = "default",
                           model_type: str | None = None, output_embedding: str | None = None,
                           source: str | None = None) -> RuleSet:
    """A rule set that selects exactly the modules PEFT 0.21.2 would, with the same per-module values."""
    cfg = dict(config)
    _check_target_fields(cfg, source)
    spec = method_for_peft_type(cfg.get("peft_type", "LORA"))
    if spec.peft_type == "ADAPTION_PROMPT":
        return _adaption_prompt_rules(cfg, spec, adapter_name, model_type, source)
    fields = set(spec.field_names())
    params = {k: v for k, v in cfg.items() if k in fields and v is not None}
    targets = cfg.get("target_modules")
    is_ia3 = spec.peft_type == "IA3"
    if targets is None:
        table = DEFAULT_TARGETS_IA3 if is_ia3 else DEFAULT_TARGETS
        if model_type not in table:
            raise RewriterError(f"target_modules is not set and there is no default for model type {model_type!r}",
                                where=source, fix="set target_modules in the adapter config")
        targets = table[model_type]
    rules: list[dict] = []
    exclude = cfg.get("exclude_modules")
    if exclude:
        rules.append({"name": "peft-exclude", "action": "skip", "optional": True,
                      **({"match": exclude} if isinstance(exclude, str) else {"suffix": list(exclude)})})
    for i, module in enumerate(cfg.get("modules_to_save") or []):
        esc = re.escape(module)
        rules.append({"name": f"peft-save-{i}", "action": "skip", "optional": True,
                      "match": rf"(?:.*\.)?{esc}(?:\..*)?"})
        rules.append({"name": f"peft-save-{i}-train", "action": "train", "optional": True, "match": rf".*{esc}"})
    if isinstance(targets, str) and targets.lower() == "all-linear":
        if output_embedding:
            rules.append({"name": "peft-output-embedding", "action": "skip", "optional": True,
                          "match": re.escape(output_embedding)})
        targets = ".*"
    layers = cfg.get("layers_to_transform")
    layers = [layers] if isinstance(layers, int) else layers
    pattern = cfg.get("layers_pattern")
    if isinstance(pattern, list):
        pattern = "(?:" + "|".join(pattern) + ")" if pattern else None
    if not pattern:  # PEFT's default: the first index after at least two name components
        pattern = r".*?\.[^.]*"
    base_criteria: list[dict] = []
    if isinstance(targets, str):
        base_criteria.append({"match": targets})
    else:
        targets = list(targets)
        if layers:  # exact names skip PEFT's layer filter; suffix matches go through it
            base_criteria.append({"match": "|".join(f"(?:{re.escape(t)})" for t in targets)})
            base_criteria.append({"suffix": targets, "layers": list(layers), "layers_pattern": pattern})
        else:
            base_criteria.append({"suffix": targets})
    # per-site values: each axis is (field, [(regex, value), ...]) in PEFT's dict order
    axes: list[tuple[str, list[tuple[str, Any]]]] = []
    for field_name, dict_name in spec.peft_site_fields.items():
        entries = cfg.get(dict_name) or {}
        if entries:
            axes.append((field_name, [(_pattern_regex(dict_name, k), v) for k, v in entries.items()]))
    if is_ia3:
        ff = cfg.get("feedforward_modules")
        if ff is None:
            ff = DEFAULT_FEEDFORWARD_IA3.get(model_type or "", [])
        if not isinstance(ff, str) and not isinstance(targets, str):
            stray = sorted(set(ff) - set(targets))
            if stray:
                raise RewriterError(f"feedforward_modules {stray} are not among target_modules {sorted(targets)}",
                                    where=source, fix="every feedforward module must also be a target")
        regex = ff if isinstance(ff, str) else "|".join(f".*{re.escape(e)}" for e in ff)  # plain endswith
        if regex:
            axes.append(("is_feedforward", [(regex, True)]))
    choices = [list(range(len(entries))) + [None] for _, entries in axes]
    for combo in itertools.product(*choices):
        overrides, lookaheads = {}, ""
        for (field_name, entries), pick in zip(axes, combo):
            if pick is not None:
                lookaheads += _lookahead(entries[pick][0])
                overrides[field_name] = entries[pick][1]
        for j, criteria in enumerate(base_criteria):
            rule = {"name": "peft-targets" + (f"-{j}" if len(base_criteria) > 1 else "")
                    + "".join(f"-{field_name}{pick}" for (field_name, _), pick in zip(axes, combo) if pick is not None),
                    "optional": True, **criteria, **overrides}
            if lookaheads:
                rule["match"] = lookaheads + rule.get("match", ".*")
            rules.append(rule)
    data = {"schema": 1, "adapter": {"name": adapter_name, "method": spec.name, **params}, "rule": rules}
    try:
        return rules_from_dict(data, source=source)
    except RewriterError as exc:
        raise RewriterError(f"cannot convert the PEFT config: {exc.what}", where=source, fix=exc.fix) from None


def _adaption_prompt_rules(cfg: Mapping[str, Any], spec: MethodSpec, adapter_name: str, model_type: str | None,
                           source: str | None) -> RuleSet:
    """Llama-Adapter selects attention blocks by its own config (adapter_layers, target_modules), so
    the rule set is its [adapter] table alone: the implicit rule matches every attention block."""
    params = {k: cfg.get(k) for k in ("adapter_len", "adapter_layers", "target_modules")}
    if params["target_modules"] is None:
        params["target_modules"] = ADAPTION_PROMPT_TARGETS.get(model_type or "")
    adapter = {"name": adapter_name, "method": spec.name, **{k: v for k, v in params.items() if v is not None}}
    try:
        return rules_from_dict({"schema": 1, "adapter": adapter}, source=source)
    except RewriterError as exc:
        raise RewriterError(f"cannot convert the PEFT config: {exc.what}", where=source, fix=exc.fix) from None


def peft_task_type(model) -> str | None:
    """PEFT's task type for a transformers model: CAUSAL_LM for causal language models, else None."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    names = {n for v in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values() for n in ((v,) if isinstance(v, str) else v)}
    return "CAUSAL_LM" if type(model).__name__ in names else None


def _adaption_prompt_config(configs: Sequence[tuple[str, Any]], train_modules: Sequence[str],
                            base_model: str | None, task_type: str | None) -> dict:
    """PEFT's ADAPTION_PROMPT config: it adapts the last ``adapter_layers`` modules named ``*.<target_modules>``,
    so the blocks saved must share one config and one module name."""
    settings = {c for _, c in configs}
    leaves = sorted({site.rsplit(".", 1)[-1] for site, _ in configs})
    config = next(iter(settings))
    problem = ("its attention blocks use different settings" if len(settings) > 1 else
               "project_output is set, and PEFT always projects on Llama/Mistral and never on GPT-2"
               if config.project_output is not None else
               f"its attention blocks have different names {leaves}" if config.target_modules is None and
               len(leaves) > 1 else "it trains whole modules, which PEFT's ADAPTION_PROMPT cannot save"
               if train_modules else None)
    if problem:
        raise CheckpointError(f"this Llama-Adapter cannot be written as a PEFT config: {problem}",
                              fix="save with format='rewriter'")
    return {"peft_type": "ADAPTION_PROMPT", "task_type": task_type, "inference_mode": True,
            "adapter_len": config.adapter_len, "adapter_layers": len(configs),
            "target_modules": config.target_modules or leaves[0], "base_model_name_or_path": base_model,
            "revision": None, "auto_mapping": None, "peft_version": "0.21.2"}


def to_toml(ruleset: RuleSet) -> str:
    """Render a rule set as a rule file."""
    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return "'" + v + "'" if "'" not in v and "\n" not in v else json.dumps(v)
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, Mapping):
            return "{" + ", ".join(f"{json.dumps(str(k))} = {value(x)}" for k, x in v.items()) + "}"
        return json.dumps(v)

    lines = ["schema = 1", "", "[adapter]", f"name = {value(ruleset.adapter)}", f"method = {value(ruleset.method)}"]
    lines += [f"{k} = {value(v)}" for k, v in ruleset.params.items()]
    for rule in ruleset.rules:
        lines += ["", "[[rule]]", f"name = {value(rule.name)}"]
        if rule.action != "adapt":
            lines.append(f"action = {value(rule.action)}")
        if rule.match is not None:
            lines.append(f"match = {value(rule.match)}")
        if rule.suffix:
            lines.append(f"suffix = {value(list(rule.suffix))}")
        if rule.layers is not None:
            lines.append(f"layers = {value(list(rule.layers))}")
        if rule.layers_pattern is not None:
            lines.append(f"layers_pattern = {value(rule.layers_pattern)}")
        if rule.method is not None:
            lines.append(f"method = {value(rule.method)}")
        lines += [f"{k} = {value(v)}" for k, v in rule.params.items()]
        if rule.optional:
            lines.append("optional = true")
    return "\n".join(lines) + "\n"


def read_peft_config(path: Path) -> dict:
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # ValueError covers bad JSON and bad UTF-8
        raise CheckpointError(f"cannot read PEFT config: {exc}", where=str(path)) from None
    if not isinstance(cfg, dict) or "peft_type" not in cfg:
        raise CheckpointError("not a PEFT adapter config (no peft_type)", where=str(path))
    return cfg


def peft_config_for(spec: MethodSpec, configs: Sequence[tuple[str, Any]], *, train_modules: Sequence[str] = (),
                    base_model: str | None = None, task_type: str | None = None) -> dict:
    """PEFT config for sites ``[(site, config), ...]`` of one method.  Fields that vary across
    sites go into PEFT's pattern dicts (exact-name keys); anything else that varies is refused.
    ``task_type`` (:func:`peft_task_type`) is recorded where PEFT's model needs it (ADAPTION_PROMPT)."""
    if spec.peft_type is None:
        raise CheckpointError(f"method '{spec.name}' has no PEFT equivalent", fix="save with format='rewriter'")
    if spec.peft_type == "ADAPTION_PROMPT":
        return _adaption_prompt_config(configs, train_modules, base_model, task_type)
    dicts = [dataclasses.asdict(c) for _, c in configs]
    first = dicts[0]
    out: dict[str, Any] = {}
    for key in first:
        values = [d[key] for d in dicts]
        if key == "is_feedforward":
            out["feedforward_modules"] = sorted(s for (s, _), v in zip(configs, values) if v)
            continue
        if all(v == values[0] for v in values):
            out[key] = values[0]
            continue
        dict_name = spec.peft_site_fields.get(key)
        if dict_name is None:
            raise CheckpointError(f"'{key}' differs between sites, which PEFT's {spec.peft_type} config cannot express",
                                  fix="save with format='rewriter', or use one value for all sites")
        common = max(set(values), key=values.count)
        out[key] = common
        out[dict_name] = {re.escape(s): v for (s, _), v in zip(configs, values) if v != common}
    out.update({
        "peft_type": spec.peft_type, "task_type": None, "inference_mode": True,
        "target_modules": sorted(s for s, _ in configs), "base_model_name_or_path": base_model,
        "modules_to_save": list(train_modules) or None, "revision": None,
        "auto_mapping": None, "peft_version": "0.21.2",
    })
    for key in ("rank_pattern", "alpha_pattern"):
        if key in spec.peft_site_fields.values():
            out.setdefault(key, {})
    return dict(sorted(out.items()))
