"""Rule files: parsing, errors with locations, matching semantics, planning."""
import pytest
from hypothesis import given, strategies as st

from rewriter import RuleError, parse_rules, plan
from rewriter.rules import Rule, layer_of
from rewriter.core.sites import Site

import torch

GOOD = '''schema = 1
[adapter]
name = "default"
method = "lora"
r = 8
alpha = 16

[[rule]]
name = "keep-vision"
match = 'vision\\..*'
action = "skip"
optional = true

[[rule]]
name = "attention"
match = 'model\\.layers\\.\\d+\\.self_attn\\.(q|v)_proj'
layers = [0, 1]
r = 16
'''

NAMES = [f"model.layers.{i}.self_attn.{p}_proj" for i in range(3) for p in "qkvo"] + \
        [f"model.layers.{i}.mlp.{p}_proj" for i in range(3) for p in ("up", "down", "gate")] + ["lm_head"]


def sites(names=NAMES):
    return [Site(name=n, weight=n + ".weight", bias=None, op="linear", in_features=8, out_features=8,
                 layer=layer_of(n), dtype=torch.float32, nodes=(n,)) for n in names]


def test_good_file_parses_into_frozen_rules():
    rs = parse_rules(GOOD, "r.toml")
    assert [r.name for r in rs.rules] == ["keep-vision", "attention"]
    assert rs.rules[1].layers == (0, 1) and rs.rules[1].params == {"r": 16}
    with pytest.raises(AttributeError):
        rs.rules[0].name = "x"


@pytest.mark.parametrize("edit, where, what", [
    (("r = 16", "r = -1"), "r.toml:18, rule 'attention', field 'r'", "must be >= 1"),
    (("r = 16", "rr = 3"), "r.toml:18, rule 'attention', field 'rr'", "did you mean 'r'"),
    (("alpha = 16", "alpha = 'x'"), "r.toml:6, [adapter], field 'alpha'", "must be a number"),
    (('method = "lora"', 'method = "lorra"'), "r.toml:4, [adapter], field 'method'", "did you mean 'lora'"),
    (("layers = [0, 1]", "layers = 'a'"), "r.toml:17, rule 'attention', field 'layers'", "integer"),
    (('action = "skip"', 'action = "skipp"'), "r.toml:11, rule 'keep-vision', field 'action'", "did you mean 'skip'"),
    (("match = 'vision", "match = '(vision"), "rule 'keep-vision', field 'match'", "not a valid regular expression"),
    (("schema = 1", "schema = 2"), "r.toml", "unsupported schema"),
    (("[adapter]", "[adaptor]"), "r.toml", "did you mean 'adapter'"),
    (("r = 16", "r = 16\nlora_dropout = 1.5"), "field 'lora_dropout'", "[0, 1)"),
    (("r = 16", "r = 16\nr ="), "r.toml", "invalid TOML"),
])
def test_bad_files_name_file_line_rule_and_field(edit, where, what):
    text = GOOD.replace(*edit)
    assert text != GOOD
    with pytest.raises(RuleError) as info:
        parse_rules(text, "r.toml")
    message = str(info.value)
    assert where in message and what in message


def test_skip_rule_cannot_carry_method_params():
    with pytest.raises(RuleError, match="no meaning in a 'skip' rule"):
        parse_rules(GOOD.replace('action = "skip"', 'action = "skip"\nr = 4'), "r.toml")


def test_first_match_wins_and_skip_excludes():
    rs = parse_rules('''[adapter]
r = 4
[[rule]]
name = "no-layer-2"
match = 'model\\.layers\\.2\\..*'
action = "skip"
[[rule]]
name = "q-big"
suffix = "q_proj"
r = 32
[[rule]]
name = "attn"
suffix = ["q_proj", "v_proj"]
''')
    p = plan(rs, sites())
    chosen = {d.site: (d.rule, d.config.r) for d in p.decisions}
    assert chosen["model.layers.0.self_attn.q_proj"] == ("q-big", 32)
    assert chosen["model.layers.1.self_attn.v_proj"] == ("attn", 4)
    assert not any(".layers.2." in s for s in chosen)
    assert set(p.skipped) == {n for n in NAMES if ".layers.2." in n}


def test_rule_matching_nothing_is_an_error_with_closest_names():
    rs = parse_rules('[[rule]]\nname = "typo"\nsuffix = "q_prj"\n', "t.toml")
    with pytest.raises(RuleError) as info:
        plan(rs, sites())
    assert "t.toml:1, rule 'typo'" in str(info.value) and "q_proj" in str(info.value)


def test_optional_rule_and_shadowed_rule_are_reported():
    rs = parse_rules('''[[rule]]
name = "all-attn"
match = '.*self_attn.*'
[[rule]]
name = "q"
suffix = "q_proj"
[[rule]]
name = "vision"
match = 'vision.*'
optional = true
''')
    p = plan(rs, sites())
    assert p.shadowed == {"q": ["all-attn"]}
    assert any("'q' is shadowed" in w for w in p.warnings)
    assert "vision" in p.unmatched


def test_regex_is_a_full_match_and_suffix_is_dot_bounded():
    assert Rule(name="r", match="q_proj").matches("q_proj")
    assert not Rule(name="r", match="q_proj").matches("model.q_proj")
    assert Rule(name="r", suffix=("proj",)).matches("a.proj")
    assert not Rule(name="r", suffix=("proj",)).matches("a.q_proj")
    assert Rule(name="r", suffix=("self_attn.q_proj",)).matches("model.layers.0.self_attn.q_proj")


@given(st.lists(st.sampled_from(["model", "layers", "blocks", "h", "attn", "x"]), min_size=0, max_size=3),
       st.integers(0, 40), st.lists(st.sampled_from(["q", "mlp", "fc"]), min_size=1, max_size=2))
def test_layer_index_is_first_all_digit_component(prefix, index, tail):
    name = ".".join(prefix + [str(index)] + tail)
    assert layer_of(name) == index
    assert layer_of(".".join(prefix + tail)) is None
