"""Bad rule files, generated: each gives a one-paragraph RuleError naming the file, line, rule and field,
the CLI exits 2, and nothing is written.

Hypothesis writes a valid rule file (any method, one to three rules, comments and blank lines in
between), then breaks it in exactly one way: malformed TOML, a misspelt key, a value of the wrong type
or out of range, an invalid regex, a duplicate or empty rule, ...  The fault knows where it is, so the
message can be checked for the exact file, line, rule and field.  Two further properties take any
mutation of a file and any nested data: the result is a rule set or a RuleError, never another
exception.  Errors that need the model's sizes (mini_r, BOFT blocks, ...) are checked through plan()
and through every CLI verb that meets a model.
"""
from __future__ import annotations

import contextlib
import io
import json
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import assume, given, note, settings, strategies as st

from rewriter import RuleError, load_rules, parse_rules, plan, rules_from_dict
from rewriter.adapted import Adapted
from rewriter.cli import main
from rewriter.methods import get_method
from rewriter.rules import RULE_KEYS as _RULE_KEYS
from rewriter.core.tracing import trace_model
from tiny_graphs import mlp

MODEL = "tiny_graphs:mlp"  # a symbolic trace: the CLI loads it in milliseconds
INT, NUMBER, PROBABILITY, BOOL = "int", "number", "probability", "bool"
#: per method: parameters the generator uses, with their kind and a valid value (one spelling per field)
PARAMS = {
    "lora": {"r": (INT, 4), "alpha": (NUMBER, 8), "lora_dropout": (PROBABILITY, 0.1), "use_rslora": (BOOL, False)},
    "loha": {"r": (INT, 4), "alpha": (NUMBER, 8), "rank_dropout": (PROBABILITY, 0.0), "init_weights": (BOOL, True)},
    "lokr": {"r": (INT, 4), "alpha": (NUMBER, 8), "module_dropout": (PROBABILITY, 0.0),
             "decompose_both": (BOOL, False)},
    "miss": {"r": (INT, 4), "miss_dropout": (PROBABILITY, 0.0), "mini_r": (INT, 1)},
    "fourierft": {"n_frequency": (INT, 16), "scaling": (NUMBER, 10.0)},
    "adalora": {"init_r": (INT, 8), "deltaT": (INT, 1), "dropout": (PROBABILITY, 0.0)},
    "oft": {"module_dropout": (PROBABILITY, 0.0), "coft": (BOOL, False)},
    "boft": {"boft_dropout": (PROBABILITY, 0.0), "boft_n_butterfly_factor": (INT, 1)},
    "ia3": {"init_ia3_weights": (BOOL, True)},
}
REQUIRED = {"adalora": {"total_step": 100}, "oft": {"oft_block_size": 4}}
WRONG_TYPE_FRAGMENT = {INT: "must be an integer", NUMBER: "must be a number", PROBABILITY: "must be a number",
                       BOOL: "must be true or false"}
GOOD_MATCHES = [r"layers\.\d+\.up", r"layers\.\d+\.(up|down)", "head", r"layers\.0\..*"]
GOOD_SUFFIXES = [["up"], ["down"], ["up", "down"], ["head"], ["layers.1.down"]]
BAD_REGEXES = ["(", "(up", "[a-", "*up", "up)", "a{2,1}", "(?P<1>x)", "(?<=a+)b", "\\", "x(?", "(?i"]
#: broken TOML on one line; the parser reports that line
BROKEN_LITERALS = ["", '"unterminated', "'unterminated", "4x", "1.2.3", "tru", '"a" "b"', "= 1", "[1,,2]",
                   "{a = }", '"\\q"', "0x", "1__0", "+"]
UNCLOSED = ["[1, 2", "{a = 1", '"""open']  # the parser reads on: some later line


# ---- a rule file with line bookkeeping ------------------------------------------------------

def toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(toml(v) for v in value) + "]"
    return "{" + ", ".join(f"{k} = {toml(v)}" for k, v in value.items()) + "}"


def regex(text: str) -> str:
    return f"'{text}'"  # a literal string keeps backslashes


@dataclass
class Table:
    header: str | None                      #: None: the top of the file
    entries: list = field(default_factory=list)  #: [key, value text]; key "#" is a comment line
    comment: str = ""                       #: trailing comment on the header line

    def keys(self) -> list[str]:
        return [k for k, _ in self.entries if k != "#"]

    def set(self, key: str, text: str) -> None:
        for entry in self.entries:
            if entry[0] == key:
                entry[1] = text
                return
        self.entries.append([key, text])

    def drop(self, key: str) -> None:
        self.entries = [e for e in self.entries if e[0] != key]


@dataclass
class Doc:
    method: str
    top: Table
    adapter: Table
    rules: list[Table]

    def tables(self):
        return [("top", self.top), ("adapter", self.adapter)] + list(enumerate(self.rules))

    def render(self) -> tuple[str, dict]:
        """The text, and the line of every (table, key) and of every header (table, None)."""
        lines: list[str] = []
        where = {}
        for label, table in self.tables():
            if table.header is not None:
                lines += ["", f"{table.header}{table.comment}"]
                where[(label, None)] = len(lines)
            for key, text in table.entries:
                lines.append(f"# {text}" if key == "#" else f"{key} = {text}")
                if key != "#":
                    where[(label, key)] = len(lines)  # the last one: a duplicate key is reported there
        return "\n".join(lines) + "\n", where


words = st.sampled_from(["attention", "mlp", "head", "keep", "up-proj", "x1", "late_layers"])
comments = st.sampled_from(["", "  # why", "\t# note [x]"])


@st.composite
def documents(draw) -> Doc:
    method = draw(st.sampled_from(sorted(PARAMS)))
    params = PARAMS[method]

    def some_params():
        keys = draw(st.lists(st.sampled_from(sorted(params)), unique=True, max_size=3)) if params else []
        return [[k, toml(params[k][1])] for k in keys]

    top = Table(None, [["schema", "1"]] if draw(st.booleans()) else [])
    adapter = Table("[adapter]", comment=draw(comments))
    if draw(st.booleans()):
        adapter.entries.append(["name", toml(draw(st.sampled_from(["default", "style", "a_1"])))])
    adapter.entries += [["method", toml(method)]] + [[k, toml(v)] for k, v in REQUIRED.get(method, {}).items()]
    adapter.entries += some_params()
    if draw(st.booleans()):
        adapter.entries.insert(draw(st.integers(0, len(adapter.entries))), ["#", "defaults for every rule"])
    rules = []
    for i in range(draw(st.integers(1, 3))):
        rule = Table("[[rule]]", [["name", toml(f"{draw(words)}-{i}")]], comment=draw(comments))
        selector = draw(st.sampled_from(["match", "suffix", "both"]))
        if selector in ("match", "both"):
            rule.entries.append(["match", regex(draw(st.sampled_from(GOOD_MATCHES)))])
        if selector in ("suffix", "both"):
            rule.entries.append(["suffix", toml(draw(st.sampled_from(GOOD_SUFFIXES)))])
        if draw(st.booleans()):
            rule.entries.append(["layers", toml(draw(st.sampled_from([[0], [0, 1], 1])))])
        if draw(st.booleans()):
            rule.entries.append(["optional", toml(draw(st.booleans()))])
        if draw(st.integers(0, 4)) == 0:
            rule.entries.append(["action", toml("skip")])
        else:
            rule.entries += some_params()
        rules.append(rule)
    return Doc(method, top, adapter, rules)


# ---- faults: each breaks a valid document in one way and says where ------------------------

@dataclass
class Expect:
    fragment: str              #: a regex the message must contain
    table: object              #: "top", "adapter", or a rule index
    key: str | None            #: the field named in the message (None: only the table's line)
    rule_label: str | None = None  #: the rule name the message shows, when not the rule's own name
    exact_line: bool = True    #: the message names this line (False: some line)
    toml_error: bool = False   #: the TOML parser found it: the line is in its text


def typo(draw, key: str) -> str:
    """A one-edit misspelling that difflib still matches to ``key`` (ratio >= 0.6)."""
    letters = st.sampled_from("abcdefghijklmnopqrstuvwxyz_")
    kinds = ["insert"] + (["delete", "replace"] if len(key) >= 3 else []) + (["swap"] if len(key) >= 4 else [])
    kind = draw(st.sampled_from(kinds))
    at = draw(st.integers(0, len(key) - (kind != "insert") - (kind == "swap")))
    if kind == "insert":
        return key[:at] + draw(letters) + key[at:]
    if kind == "delete":
        return key[:at] + key[at + 1:]
    if kind == "replace":
        return key[:at] + draw(letters.filter(lambda c: c != key[at])) + key[at + 1:]
    return key[:at] + key[at + 1] + key[at] + key[at + 2:]


def accepted_keys(method: str) -> set[str]:
    spec = get_method(method)
    return set(spec.field_names()) | set(spec.aliases) | set(spec.ignored_peft_fields)


def adapt_tables(draw, doc: Doc):
    """The [adapter] table or an adapt rule."""
    choices = ["adapter"] + [i for i, r in enumerate(doc.rules) if "action" not in r.keys()]
    label = draw(st.sampled_from(choices))
    return label, doc.adapter if label == "adapter" else doc.rules[label]


def misspelt(draw, key: str, taken) -> str:
    bad = typo(draw, key)
    assume(bad not in taken and re.fullmatch(r"[A-Za-z0-9_-]+", bad))
    return bad


TOP_KEYS = {"schema", "adapter", "rule"}


def fault_misspelt_parameter(draw, doc: Doc) -> Expect:
    label, table = adapt_tables(draw, doc)
    source = draw(st.sampled_from(sorted(PARAMS[doc.method])))
    bad = misspelt(draw, source, accepted_keys(doc.method) | _RULE_KEYS | {"name", "method"})
    table.entries.append([bad, toml(1)])
    return Expect("did you mean '", label, bad)


def fault_misspelt_rule_key(draw, doc: Doc) -> Expect:
    label = draw(st.sampled_from([i for i, r in enumerate(doc.rules) if "action" not in r.keys()] or [None]))
    if label is None:  # every rule is a skip rule: misspell a top-level key instead
        bad = misspelt(draw, draw(st.sampled_from(sorted(TOP_KEYS))), TOP_KEYS)
        doc.top.entries.append([bad, toml(1)])
        return Expect("did you mean '", "top", bad)
    bad = misspelt(draw, draw(st.sampled_from(sorted(_RULE_KEYS))), accepted_keys(doc.method) | _RULE_KEYS)
    doc.rules[label].entries.append([bad, toml(["up"])])
    return Expect("did you mean '", label, bad)


def fault_misspelt_table(draw, doc: Doc) -> Expect:
    doc.adapter.header = f"[{misspelt(draw, 'adapter', TOP_KEYS)}]"
    return Expect("did you mean 'adapter'", "adapter", None)


other_values = st.one_of(st.text(st.characters(codec="utf-8", exclude_categories=["Cs", "Cc"]), max_size=8),
                         st.lists(st.integers(-3, 3), max_size=2), st.fixed_dictionaries({"a": st.integers(0, 3)}))


def bad_value(draw, kind: str) -> tuple[object, str]:
    if kind == INT:
        return draw(st.one_of(st.integers(-2 ** 63, 0).map(lambda v: (v, "must be >= 1")),
                              st.one_of(st.floats(), st.booleans(), other_values).map(
                                  lambda v: (v, WRONG_TYPE_FRAGMENT[INT]))))
    if kind == PROBABILITY:
        out_of_range = st.one_of(st.floats(min_value=1.0), st.floats(max_value=-1e-12), st.just(float("nan")))
        return draw(st.one_of(out_of_range.map(lambda v: (v, re.escape("must be in [0, 1)"))),
                              st.one_of(st.booleans(), other_values).map(lambda v: (v, WRONG_TYPE_FRAGMENT[kind]))))
    if kind == NUMBER:
        return draw(st.one_of(st.booleans(), other_values).map(lambda v: (v, WRONG_TYPE_FRAGMENT[kind])))
    return draw(st.one_of(st.integers(-2 ** 63, 2 ** 63 - 1), st.floats(), other_values).map(
        lambda v: (v, WRONG_TYPE_FRAGMENT[kind])))


def fault_bad_parameter_value(draw, doc: Doc) -> Expect:
    label, table = adapt_tables(draw, doc)
    key = draw(st.sampled_from(sorted(PARAMS[doc.method])))
    value, fragment = bad_value(draw, PARAMS[doc.method][key][0])
    table.set(key, toml(value))
    return Expect(fragment, label, key)


RULE_FIELD_FAULTS = {
    "match": (st.one_of(st.integers(), st.booleans(), st.lists(st.just("up"), min_size=1, max_size=2)),
              "'match' must be a string"),
    "suffix": (st.one_of(st.integers(), st.booleans(), st.lists(st.integers(), min_size=1, max_size=2),
                         st.fixed_dictionaries({"a": st.just("up")})), "must be a string or a list of strings"),
    "layers": (st.one_of(st.text(max_size=3), st.booleans(), st.integers(max_value=-1), st.floats(),
                         st.lists(st.integers(max_value=-1), min_size=1, max_size=2),
                         st.lists(st.booleans(), min_size=1, max_size=2)), "non-negative integer"),
    "optional": (st.one_of(st.integers(), st.text(max_size=3), st.lists(st.booleans(), max_size=1)),
                 "'optional' must be true or false"),
    "action": (st.one_of(st.text(max_size=6).filter(lambda a: a not in ("adapt", "skip", "train")), st.integers()),
               "action must be one of"),
    "layers_pattern": (st.one_of(st.integers(), st.booleans()), "'layers_pattern' must be a string"),
}


def fault_rule_field(draw, doc: Doc) -> Expect:
    label = draw(st.integers(0, len(doc.rules) - 1))
    key = draw(st.sampled_from(sorted(RULE_FIELD_FAULTS)))
    values, fragment = RULE_FIELD_FAULTS[key]
    doc.rules[label].set(key, toml(draw(values)))
    return Expect(fragment, label, key)


def fault_rule_method(draw, doc: Doc) -> Expect:
    label, table = adapt_tables(draw, doc)
    if draw(st.booleans()):
        table.set("method", toml(draw(st.one_of(st.integers(), st.booleans(), st.lists(st.just("lora"), max_size=1)))))
        return Expect("method'? must be a string", label, "method")
    name = draw(st.sampled_from(sorted(PARAMS)))
    table.set("method", toml(misspelt(draw, name, set(PARAMS))))
    return Expect("unknown method", label, "method")


def fault_rule_name(draw, doc: Doc) -> Expect:
    label = draw(st.integers(0, len(doc.rules) - 1))
    value = draw(st.one_of(st.just(""), st.integers(), st.booleans(), st.lists(st.integers(0, 3), max_size=1)))
    doc.rules[label].set("name", toml(value))
    return Expect("rule name must be a non-empty string", label, "name", rule_label=str(value))


def fault_invalid_regex(draw, doc: Doc) -> Expect:
    label = draw(st.integers(0, len(doc.rules) - 1))
    key = draw(st.sampled_from(["match", "layers_pattern"]))
    bad = BAD_REGEXES + (["(?i)layers", "x(?s)"] if key == "layers_pattern" else [])
    doc.rules[label].set(key, regex(draw(st.sampled_from(bad))))
    return Expect("not a valid regular expression", label, key)


def fault_structure(draw, doc: Doc) -> Expect:
    kind = draw(st.sampled_from(["no selector", "skip with a parameter", "schema", "no rules", "adapter name"]
                                + (["duplicate name"] if len(doc.rules) > 1 else [])))
    label = draw(st.integers(0, len(doc.rules) - 1))
    rule = doc.rules[label]
    if kind == "no selector":
        rule.drop("match")
        rule.drop("suffix")
        return Expect("a rule needs 'match'", label, None)
    if kind == "duplicate name":
        label = max(label, 1)
        doc.rules[label].set("name", dict(doc.rules[0].entries)["name"])
        return Expect("two rules are named", label, "name")
    if kind == "skip with a parameter":
        rule.entries = [e for e in rule.entries if e[0] in ("#", "name", "match", "suffix", "layers", "optional")]
        rule.set("action", toml("skip"))
        key = draw(st.sampled_from(sorted(PARAMS[doc.method]) + ["method"]))
        rule.entries.append([key, toml(PARAMS[doc.method][key][1]) if key != "method" else toml(doc.method)])
        return Expect("has no meaning in a 'skip' rule", label, key)
    if kind == "schema":
        doc.top.set("schema", toml(draw(st.one_of(st.integers().filter(lambda s: s != 1), st.text(max_size=3)))))
        return Expect("unsupported schema", "top", "schema")
    if kind == "no rules":
        doc.rules = []
        return Expect("has no rules", "top", None, exact_line=False)
    doc.adapter.set("name", toml(draw(st.sampled_from(["", "1st", "my adapter", "a-b", "x.y"]))))
    return Expect("must be an identifier", "adapter", "name")


def fault_broken_toml(draw, doc: Doc) -> Expect:
    label, table = draw(st.sampled_from([(lab, t) for lab, t in doc.tables() if t.keys()]))
    key = draw(st.sampled_from(table.keys()))
    how = draw(st.sampled_from(["literal", "duplicate key", "duplicate table"]))
    if how == "duplicate table" and label != "top":
        doc.rules.append(Table(doc.adapter.header))
        return Expect("invalid TOML", len(doc.rules) - 1, None, toml_error=True)
    if how == "duplicate key":
        table.entries.append([key, dict(e for e in table.entries if e[0] != "#")[key]])
        return Expect("invalid TOML", label, key, toml_error=True)  # reported on the second one
    if draw(st.integers(0, 4)) == 0:
        table.set(key, draw(st.sampled_from(UNCLOSED)))
        return Expect("invalid TOML", label, key, toml_error=True, exact_line=False)
    table.set(key, draw(st.sampled_from(BROKEN_LITERALS)))
    return Expect("invalid TOML", label, key, toml_error=True)


FAULTS = [fault_misspelt_parameter, fault_misspelt_rule_key, fault_misspelt_table, fault_bad_parameter_value,
          fault_rule_field, fault_rule_method, fault_rule_name, fault_invalid_regex, fault_structure,
          fault_broken_toml]


@st.composite
def broken_files(draw):
    doc = draw(documents())
    valid, _ = doc.render()
    fault = draw(st.sampled_from(FAULTS))
    expect = fault(draw, doc)
    text, lines = doc.render()
    note(f"fault: {fault.__name__}\n{text}")
    return valid, text, lines, doc, expect


# ---- checks ---------------------------------------------------------------------------------

def check_message(message: str, path: Path, lines: dict, doc: Doc, expect: Expect) -> None:
    paragraph = message.splitlines()
    assert 1 <= len(paragraph) <= 2 and all(line.strip() for line in paragraph), message  # one paragraph
    assert len(paragraph) == 1 or paragraph[1].startswith("  fix: "), message
    head = paragraph[0]
    assert head.startswith(str(path)), message
    assert re.search(expect.fragment, message), (expect.fragment, message)
    line = lines.get((expect.table, expect.key))
    if expect.toml_error:
        assert re.search(rf"line {line if expect.exact_line else '[0-9]+'}, |end of document", head), (line, message)
        return
    if expect.exact_line and line is not None:
        assert head.startswith(f"{path}:{line}"), (line, message)
    if isinstance(expect.table, int):
        name = expect.rule_label if expect.rule_label is not None else json.loads(dict(
            doc.rules[expect.table].entries)["name"])
        assert f"rule '{name}'" in head, message
    if expect.table == "adapter" and expect.key is not None:
        assert "[adapter]" in head, message
    if expect.key is not None and expect.table != "top":
        assert f"field '{expect.key}'" in head, message


def run_cli(*argv) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(list(argv))
    return code, err.getvalue()


# ---- the properties -------------------------------------------------------------------------

@settings(max_examples=max(150, settings.default.max_examples))
@given(broken_files())
def test_each_broken_rule_file_names_file_line_rule_and_field(case):
    valid, text, lines, doc, expect = case
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "rules.toml"
        path.write_text(valid)
        load_rules(path)  # the document was valid before the fault
        path.write_text(text)
        with pytest.raises(RuleError) as info:
            load_rules(path)
        check_message(str(info.value), path, lines, doc, expect)


@settings(max_examples=max(20, settings.default.max_examples // 2))
@given(broken_files())
def test_the_cli_exits_2_with_the_same_message_and_writes_nothing(case):
    _, text, lines, doc, expect = case
    with tempfile.TemporaryDirectory() as tmp:
        path, out = Path(tmp) / "rules.toml", Path(tmp) / "out"
        path.write_text(text)
        for argv in (["explain", str(path)], ["apply", str(path), "--out", str(out)]):
            code, err = run_cli(*argv, "--model", MODEL, "--quiet")
            assert code == 2 and err.startswith("error: "), (argv, code, err)
            check_message(err[len("error: "):].rstrip("\n"), path, lines, doc, expect)
        assert sorted(p.name for p in Path(tmp).iterdir()) == ["rules.toml"]


def _mutations():
    edit = st.tuples(st.sampled_from(["delete", "insert", "replace"]), st.integers(0, 10 ** 6),
                     st.sampled_from(list("=[]{}\"'#\n ,.0x-_") + ["true", "[[rule]]", "\\"]))
    return st.lists(edit, min_size=1, max_size=4)


@given(documents(), _mutations())
def test_any_mutation_of_a_file_gives_a_rule_set_or_a_rule_error(doc, edits):
    text, _ = doc.render()
    for kind, at, piece in edits:
        at %= len(text) + 1
        text = text[:at] + (piece if kind != "delete" else "") + text[at + (kind != "insert"):]
    note(text)
    try:
        parse_rules(text, "m.toml")
    except RuleError as exc:
        assert str(exc).startswith("m.toml") and len(str(exc).splitlines()) <= 2, str(exc)


toml_values = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=5)),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                                        max_size=3), max_leaves=8)
rule_keys = st.sampled_from(sorted(_RULE_KEYS) + ["r", "alpha", "lora_dropout", "x"])


@given(st.fixed_dictionaries({}, optional={
    "schema": toml_values, "adapter": st.dictionaries(st.sampled_from(["name", "method", "r", "alpha", "x"]),
                                                      toml_values, max_size=3) | toml_values,
    "rule": st.lists(st.dictionaries(rule_keys, toml_values, max_size=4) | toml_values, max_size=3) | toml_values}))
def test_any_nested_data_gives_a_rule_set_or_a_rule_error(data):
    """What a PEFT config conversion or a program hands to rules_from_dict (any JSON-like data)."""
    try:
        rules_from_dict(data, source="d.json")
    except RuleError as exc:
        assert str(exc).startswith("d.json"), str(exc)


# ---- errors that need the model's sizes -----------------------------------------------------

SIZED = [  # rule-file body (on tiny_graphs.mlp: up 32 -> 64, down 64 -> 32, head 32 -> 4), field, line, site
    ('[adapter]\nmethod = "miss"\nr = 4\ninit_weights = "mini"\nmini_r = 3\n', "mini_r", 5, "layers.0.up"),
    ('[adapter]\nmethod = "miss"\nr = 40\n', "r", 3, "layers.0.up"),
    ('[adapter]\nmethod = "miss"\ninit_weights = "bat"\nr = 3\n', "r", 4, "layers.0.up"),
    ('[adapter]\nmethod = "fourierft"\nn_frequency = 200\n', "n_frequency", 3, "head"),
    ('[adapter]\nmethod = "boft"\nboft_block_size = 5\n', "boft_block_size", 3, "layers.0.up"),
    ('[adapter]\nmethod = "boft"\nboft_block_size = 4\nboft_n_butterfly_factor = 5\n', "boft_n_butterfly_factor", 4,
     "layers.0.up"),
]
RULE = '\n[[rule]]\nname = "the-rule"\nsuffix = ["up", "head"]\n'


@pytest.mark.parametrize("adapter, key, line, site", SIZED)
def test_size_errors_name_the_rule_the_field_and_the_site_in_plan_and_every_cli_verb(tmp_path, adapter, key, line,
                                                                                      site):
    path, out = tmp_path / "sized.toml", tmp_path / "out"
    path.write_text(adapter + RULE)
    rules = load_rules(path)  # valid on its own: only the model's sizes make it impossible
    adapted = Adapted(trace_model(mlp()))
    with pytest.raises(RuleError) as info:
        plan(rules, list(adapted.sites.values()))
    head = str(info.value).splitlines()[0]
    assert head.startswith(f"{path}:{line}, [adapter], field '{key}' (used by rule 'the-rule')") and site in head
    for argv in (["explain", str(path)], ["apply", str(path), "--out", str(out)], ["check", "--rules", str(path)],
                 ["export", "--rules", str(path), "--out", str(out / "m.pt2")]):
        code, err = run_cli(*argv, "--model", MODEL, "--quiet")
        assert (code, err) == (2, f"error: {info.value}\n"), argv
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sized.toml"]
