"""PEFT configs convert to rules that select exactly what PEFT 0.21.2 selects (PEFT is the oracle)."""
import re

import pytest
import torch
from hypothesis import given, strategies as st

from peft import LoraConfig
from peft.tuners.tuners_utils import check_target_module_exists
from peft.utils.other import get_pattern_key
from rewriter import plan
from rewriter.errors import RuleError
from rewriter.rules.peft import rules_from_peft_config, to_toml
from rewriter.rules import layer_of, parse_rules
from rewriter.core.sites import Site

PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "proj", "fc1"]
names = st.builds(
    lambda root, container, index, block, proj: ".".join(p for p in (root, container, str(index), block, proj) if p),
    st.sampled_from(["model", "encoder", "vision", ""]), st.sampled_from(["layers", "blocks", "h"]),
    st.integers(0, 5), st.sampled_from(["self_attn", "mlp", "attn", ""]), st.sampled_from(PROJ))
targets = st.one_of(
    st.lists(st.sampled_from(PROJ + ["mlp.up_proj", "self_attn.q_proj", "attn.proj", "model.layers.0.mlp.fc1"]),
             min_size=1, max_size=4, unique=True),
    st.sampled_from([r".*\.(q|v)_proj", r"model\.layers\.\d+\.mlp\..*", r".*proj"]))


def _sites(module_names):
    return [Site(name=n, weight=n + ".weight", bias=None, op="linear", in_features=8, out_features=8,
                 layer=layer_of(n), dtype=torch.float32, nodes=(n,)) for n in module_names]


def _ours(cfg_kwargs, module_names):
    rs = rules_from_peft_config({"peft_type": "LORA", **cfg_kwargs})
    try:
        p = plan(rs, _sites(module_names))
    except RuleError:
        return {}
    return {d.site: (d.config.r, d.config.lora_alpha) for d in p.decisions}


def _peft(cfg_kwargs, module_names):
    cfg = LoraConfig(**cfg_kwargs)
    chosen = {}
    for n in module_names:
        if check_target_module_exists(cfg, n):
            r_key = get_pattern_key(cfg.rank_pattern.keys(), n) if cfg.rank_pattern else None
            a_key = get_pattern_key(cfg.alpha_pattern.keys(), n) if cfg.alpha_pattern else None
            chosen[n] = (cfg.rank_pattern.get(r_key, cfg.r), cfg.alpha_pattern.get(a_key, cfg.lora_alpha))
    return chosen


@given(st.lists(names, min_size=1, max_size=12, unique=True), targets,
       st.one_of(st.none(), st.lists(st.integers(0, 5), min_size=1, max_size=3, unique=True)),
       st.sampled_from([None, "layers", "blocks"]),
       st.one_of(st.none(), st.lists(st.sampled_from(["proj", "mlp.up_proj", "k_proj"]), max_size=2, unique=True)))
def test_target_selection_matches_peft(module_names, target, layers, pattern, exclude):
    kwargs = {"target_modules": target, "exclude_modules": exclude}
    if layers is not None and not isinstance(target, str):
        kwargs["layers_to_transform"] = layers
        if pattern:
            kwargs["layers_pattern"] = pattern
    assert _ours(kwargs, module_names) == _peft(kwargs, module_names)


@given(st.lists(names, min_size=1, max_size=12, unique=True),
       st.dictionaries(st.sampled_from(["q_proj", "proj", r"layers\.1\.self_attn\.v_proj", "mlp.up_proj", "1.mlp.*"]),
                       st.integers(1, 16), max_size=3),
       st.dictionaries(st.sampled_from(["k_proj", "proj", "layers.2.self_attn.q_proj", r".*\.0\..*"]),
                       st.integers(1, 64), max_size=2))
def test_rank_and_alpha_patterns_match_peft(module_names, rank_pattern, alpha_pattern):
    kwargs = {"target_modules": PROJ, "r": 4, "lora_alpha": 8, "rank_pattern": rank_pattern,
              "alpha_pattern": alpha_pattern}
    assert _ours(kwargs, module_names) == _peft(kwargs, module_names)


def test_converted_rules_round_trip_through_toml():
    rs = rules_from_peft_config({"peft_type": "LORA", "target_modules": ["q_proj", "v_proj"], "r": 4,
                                 "rank_pattern": {"q_proj": 2}, "exclude_modules": ["vision.proj"],
                                 "layers_to_transform": [0, 1], "layers_pattern": "layers"})
    again = parse_rules(to_toml(rs))
    assert again.rules == tuple(r for r in again.rules) and [r.name for r in again.rules] == [r.name for r in rs.rules]
    for a, b in zip(again.rules, rs.rules):
        assert (a.match, a.suffix, a.layers, a.layers_pattern, a.action, dict(a.params)) == \
               (b.match, b.suffix, b.layers, b.layers_pattern, b.action, dict(b.params))


def test_default_targets_need_a_known_model_type():
    assert rules_from_peft_config({"peft_type": "LORA"}, model_type="llama").rules
    with pytest.raises(Exception, match="no default for model type"):
        rules_from_peft_config({"peft_type": "LORA"}, model_type="mamba-x")


def test_ia3_feedforward_modules_must_be_targets():
    ok = rules_from_peft_config({"peft_type": "IA3", "target_modules": ["k_proj", "down_proj"],
                                 "feedforward_modules": ["down_proj"]})
    assert any(r.params.get("is_feedforward") for r in ok.rules)
    with pytest.raises(Exception, match=r"feedforward_modules \['up_proj'\] are not among target_modules"):
        rules_from_peft_config({"peft_type": "IA3", "target_modules": ["k_proj"], "feedforward_modules": ["up_proj"]})
