"""The site cache is untrusted data (restored in CI, shared between users): no module of rewriter can
unpickle, entries are JSON read field by field, and anything planted in the cache (an old or malicious
pickle, garbled or hostile JSON, a FIFO, a directory, an endless device) is a miss: ``explain`` still
answers, by tracing, and nothing in the entry runs."""
from __future__ import annotations

import ast
import copy
import dataclasses
import json
import os
import pickle  # the tests plant pickles; rewriter itself must not import it (checked below)
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rewriter import cli, sitecache
from rewriter.adapted import Adapted
from rewriter.core.sites import Site
from rewriter.methods.adaption_prompt.find import Attention, Projection, SiteResult

ROOT = Path(__file__).resolve().parents[1]
RULES = str(ROOT / "rules" / "lora-llama-attention.toml")
PROMPT_RULES = str(ROOT / "rules" / "adaption-prompt-llama.toml")
#: modules that turn bytes into running code (pickle and its relatives)
UNSAFE_MODULES = {"pickle", "_pickle", "cPickle", "pickletools", "marshal", "shelve", "dill", "cloudpickle", "joblib",
                  "jsonpickle", "copyreg"}
#: calls that unpickle: torch.load, numpy.load (allow_pickle), pandas.read_pickle
UNSAFE_CALLS = {("torch", "load"), ("numpy", "load"), ("np", "load"), ("pandas", "read_pickle"), ("pd", "read_pickle")}


def unsafe_uses(source: str) -> list[str]:
    """Imports of UNSAFE_MODULES (also through __import__ / import_module) and UNSAFE_CALLS in ``source``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[0] in UNSAFE_MODULES]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in UNSAFE_MODULES:
            found.append(node.module)
        elif isinstance(node, ast.Call):
            fn = node.func
            name = fn.attr if isinstance(fn, ast.Attribute) else fn.id if isinstance(fn, ast.Name) else ""
            first = node.args[0] if node.args else None
            if name in ("__import__", "import_module") and isinstance(first, ast.Constant) \
                    and str(first.value).split(".")[0] in UNSAFE_MODULES:
                found.append(f"{name}({first.value!r})")
            owner = fn.value.id if isinstance(fn, ast.Attribute) and isinstance(fn.value, ast.Name) else ""
            if (owner, name) in UNSAFE_CALLS:
                found.append(f"{owner}.{name}()")
    return found


def test_no_module_of_rewriter_can_unpickle():
    offenders = {str(p.relative_to(ROOT)): unsafe_uses(p.read_text(encoding="utf-8"))
                 for p in sorted((ROOT / "rewriter").rglob("*.py"))}
    assert {p: uses for p, uses in offenders.items() if uses} == {}
    assert len(offenders) > 50                              # the scan saw the whole package


@pytest.mark.parametrize("source", [
    "import pickle", "import _pickle as p", "from marshal import loads", "import shelve", "import dill.detect",
    "from cloudpickle import loads", "__import__('pickle')", "importlib.import_module('marshal')",
    "torch.load(path)", "pd.read_pickle(path)", "def f():\n    import joblib",
])
def test_the_scan_finds_every_way_in(source):
    assert unsafe_uses(source), source


# ---- the format: every field stored, round trips exactly --------------------------------------------------

def test_every_field_of_the_stored_classes_is_stored():
    """A field added to Site or Attention must be taught to the cache (until then nothing is cached)."""
    for cls, names in ((Site, sitecache.SITE_FIELDS), (Attention, sitecache.ATTENTION_FIELDS),
                       (Projection, sitecache.PROJECTION_FIELDS), (SiteResult, sitecache.SITE_RESULT_FIELDS)):
        assert tuple(f.name for f in dataclasses.fields(cls)) == names, cls.__name__


@pytest.fixture(scope="module")
def tables(traced_models):
    """Real tables: Llama (linear sites) and GPT-2 (Conv1D sites), each with its Llama-Adapter blocks."""
    out = {}
    for name in ("tiny-llama", "tiny-gpt2"):
        adapted = Adapted(traced_models(name))
        table = sitecache.SiteTable(dict(adapted.sites), adapted.module_names())
        table.add(adapted, "adaption_prompt")
        out[name] = table
    return out


def test_real_tables_round_trip_exactly(tables):
    for name, table in tables.items():
        text = json.dumps(sitecache.table_to_json(table, "k"), allow_nan=False)
        back = sitecache.table_from_json(json.loads(text), "k")
        assert back == table and back.graph_targets["adaption_prompt"], name   # dataclass equality: every field
        assert all(type(s) is Site for s in back.sites.values())
    gpt2 = tables["tiny-gpt2"]
    assert {s.op for s in gpt2.sites.values()} == {"conv1d", "linear"}       # Conv1D blocks, a linear head
    assert any(t.keys is not None and t.output is not None for t in gpt2.graph_targets["adaption_prompt"].values())


def test_x_lora_targets_are_never_cached(traced_models):
    adapted = Adapted(traced_models("tiny-llama"))
    table = sitecache.SiteTable(dict(adapted.sites), adapted.module_names())
    table.add(adapted, "xlora")
    assert "xlora" not in table.graph_targets and not table.has("xlora")


def test_unstorable_values_leave_no_entry(tables, monkeypatch, tmp_path):
    monkeypatch.setenv("REWRITER_CACHE_DIR", str(tmp_path))
    table = copy.deepcopy(tables["tiny-llama"])
    first = next(iter(table.sites))
    table.sites[first] = dataclasses.replace(table.sites[first], dtype=torch.complex64)   # not on the allow-list
    sitecache.store("k", table)
    assert not sitecache.entry_path("k").exists() and sitecache.load("k") is None


# ---- planted entries are misses -----------------------------------------------------------------------------

class _Payload:
    """A pickle that creates ``marker`` when unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


@pytest.fixture
def traces(monkeypatch, tmp_path, traced_models):
    monkeypatch.setenv("REWRITER_CACHE_DIR", str(tmp_path / "cache"))
    calls = []

    def traced(spec, dtype=None, attn=None, *, dynamic=True):
        calls.append(spec)
        return traced_models(spec.split(":", 1)[1])
    monkeypatch.setattr(cli, "_traced", traced)
    return calls


def explain(capsys, rules=RULES):
    code = cli.main(["explain", rules, "--model", "builtin:tiny-llama"])
    out = capsys.readouterr()
    return code, out.out, out.err


def _valid_entry(tables) -> dict:
    return sitecache.table_to_json(tables["tiny-llama"], sitecache.model_key("builtin:tiny-llama", dynamic=False))


def hostile_entries(valid: dict) -> dict[str, bytes]:
    """Entry files no version of rewriter writes, each a miss."""
    def edited(edit) -> bytes:
        entry = copy.deepcopy(valid)
        edit(entry)
        return json.dumps(entry).encode()

    text = json.dumps(valid).encode()
    site = lambda e: e["sites"][0]  # noqa: E731
    return {
        "empty": b"", "garbled": b"\x80\x81\xfe\xff" * 64, "truncated": text[: len(text) // 2],
        "a pickle": pickle.dumps({"sites": {}}), "not an object": b"[1, 2, 3]", "null": b"null",
        "jsonpickle-style object": b'{"py/object": "os.system", "py/reduce": [{"py/function": "os.system"}]}',
        "nested without end": b"[" * 200_000,
        "another format": edited(lambda e: e.update(format=1)),
        "format as a string": edited(lambda e: e.update(format="2")),
        "another kind": edited(lambda e: e.update(kind="pickle")),
        "another key": edited(lambda e: e.update(key="0" * 32)),
        "an extra key": edited(lambda e: e.update(__reduce__="os.system")),
        "a key twice": text.replace(b'"modules":', b'"modules":[],"modules":', 1),
        "dtype by module path": edited(lambda e: site(e).update(dtype="torch.float32")),
        "dtype not on the allow-list": edited(lambda e: site(e).update(dtype="complex128")),
        "dtype naming a function": edited(lambda e: site(e).update(dtype="manual_seed")),
        "negative size": edited(lambda e: site(e).update(in_features=-1)),
        "huge size": edited(lambda e: site(e).update(out_features=10 ** 30)),
        "boolean size": edited(lambda e: site(e).update(in_features=True)),
        "float size": edited(lambda e: site(e).update(in_features=64.0)),
        "unknown op": edited(lambda e: site(e).update(op="eval")),
        "site names twice": edited(lambda e: e["sites"].append(e["sites"][0])),
        "node not a string": edited(lambda e: site(e).update(nodes=[{"__class__": "x"}])),
        "NaN scale": edited(lambda e: e["graph_targets"]["adaption_prompt"][0].update(scale=float("nan"))),
        "channels backwards": edited(lambda e: e["graph_targets"]["adaption_prompt"][-1]["keys"].update(
            channels=[8, 4])),
        "a site method's targets": edited(lambda e: e["graph_targets"].update(lora=[])),
        "an unknown method": edited(lambda e: e["graph_targets"].update(no_such_method=[])),
    }


def test_every_hostile_entry_is_a_miss(tables, monkeypatch, tmp_path):
    monkeypatch.setenv("REWRITER_CACHE_DIR", str(tmp_path))
    valid = _valid_entry(tables)
    key = valid["key"]
    path = sitecache.entry_path(key)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(valid))
    assert sitecache.load(key) == tables["tiny-llama"]            # the untouched entry is a hit
    cases = hostile_entries(valid)
    for name, data in cases.items():
        path.write_bytes(data)
        assert sitecache.load(key) is None, name
    assert len(cases) == 28                                       # no case name given twice


def test_files_that_are_not_entries_are_misses_and_never_block(tables, monkeypatch, tmp_path):
    monkeypatch.setenv("REWRITER_CACHE_DIR", str(tmp_path))
    key = _valid_entry(tables)["key"]
    path = sitecache.entry_path(key)
    path.parent.mkdir(parents=True)
    os.mkfifo(path)                                               # open() for reading would wait for a writer
    assert sitecache.load(key) is None
    path.unlink()
    path.symlink_to("/dev/zero")                                  # would never end
    assert sitecache.load(key) is None
    path.unlink()
    path.mkdir()
    assert sitecache.load(key) is None
    path.rmdir()
    monkeypatch.setattr(sitecache, "MAX_ENTRY_BYTES", 1000)       # a valid entry, but too large to be plausible
    sitecache.store(key, tables["tiny-llama"])
    assert path.stat().st_size > 1000 and sitecache.load(key) is None


def test_a_planted_pickle_never_runs_and_explain_works(capsys, traces, tmp_path, tables):
    key = sitecache.model_key("builtin:tiny-llama", dynamic=False)
    marker = tmp_path / "pickle-ran"
    sites = tmp_path / "cache" / "sites"
    sites.mkdir(parents=True)
    for name in (f"{key}.pkl", f"{key}.json"):                   # the old name and the new one
        (sites / name).write_bytes(pickle.dumps(_Payload(marker)))
    code, out, err = explain(capsys)
    assert code == 0 and "rule counts: attention=8" in out and "Traceback" not in err
    assert not marker.exists() and traces == ["builtin:tiny-llama"]
    repaired = sitecache.load(key)                               # the planted entry was replaced by a valid one
    assert repaired.sites == tables["tiny-llama"].sites and repaired.modules == tables["tiny-llama"].modules
    code, out, err = explain(capsys)
    assert code == 0 and len(traces) == 1 and "from the cache" in err


@pytest.mark.parametrize("case", ["garbled", "jsonpickle-style object", "dtype naming a function", "NaN scale"])
def test_explain_traces_past_a_hostile_entry(capsys, traces, tables, case):
    key = sitecache.model_key("builtin:tiny-llama", dynamic=False)
    path = sitecache.entry_path(key)
    path.parent.mkdir(parents=True)
    path.write_bytes(hostile_entries(_valid_entry(tables))[case])
    for rules, expected in ((PROMPT_RULES, "model.layers.1.self_attn"), (RULES, "rule counts: attention=8")):
        code, out, err = explain(capsys, rules)
        assert code == 0 and expected in out and "Traceback" not in err
    assert len(traces) == 1                                       # one trace repaired the entry for both methods


# ---- fuzzing: nothing read from the cache raises ---------------------------------------------------------------

def _positions(value, path=()):
    """(path, container, key) of every value inside ``value``, at every depth."""
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        yield path + (key,), value, key
        yield from _positions(item, path + (key,))


def _at(value, path):
    for key in path:
        value = value[key]
    return value


@pytest.fixture(scope="module")
def small_entry(tables):
    """A valid entry with a few of each kind of object (every field still present)."""
    table = tables["tiny-gpt2"]
    small = sitecache.SiteTable(dict(list(table.sites.items())[:2]), table.modules[:3],
                                {"adaption_prompt": dict(list(table.graph_targets["adaption_prompt"].items())[-1:])})
    return sitecache.table_to_json(small, "k"), small


REPLACEMENTS = [-1, True, "\0", [], {}, None, 2.5, "float32"]
#: fields where null is a value (no bias, no layer index, no problem, no projection found)
OPTIONAL = {"bias", "layer", "problem", "keys", "values", "output"}


def test_every_field_deleted_renamed_or_retyped_is_a_miss(small_entry):
    entry, table = small_entry
    assert sitecache.table_from_json(copy.deepcopy(entry), "k") == table
    tried = missed = 0
    for path, container, key in list(_positions(entry)):
        mutants = []
        if isinstance(container, dict) and _at(entry, path[:-1]) is not entry["graph_targets"]:
            mutants += ["delete", "rename"]
        original = container[key]
        mutants += [r for r in REPLACEMENTS if (type(r) is not type(original) or r == "\0")
                    and not (r is None and key in OPTIONAL)
                    and not (type(r) is str and r != "\0" and key in ("bias", "problem"))]  # text or null
        for mutant in mutants:
            data = copy.deepcopy(entry)
            parent = _at(data, path[:-1])
            if mutant == "delete":
                del parent[key]
            elif mutant == "rename":
                parent[key + "_"] = parent.pop(key)
            else:
                parent[key] = mutant
            tried += 1
            try:
                result = sitecache.table_from_json(json.loads(json.dumps(data)), "k")
            except sitecache.Malformed:
                missed += 1
                continue
            pytest.fail(f"{path} {mutant!r}: read as {result!r}")
    assert tried == missed and tried > 300


def json_values():
    leaves = (st.none() | st.booleans() | st.integers(-2 ** 40, 2 ** 40) | st.floats(allow_nan=False)
              | st.text(max_size=8))
    return st.recursive(leaves, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                          max_size=4), max_leaves=20)


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_load_of_any_bytes_or_edit_never_raises(data, small_entry, tmp_path_factory):
    entry, _ = small_entry
    kind = data.draw(st.sampled_from(["bytes", "json", "edits"]))
    if kind == "bytes":
        blob = data.draw(st.binary(max_size=256))
    elif kind == "json":
        blob = json.dumps(data.draw(json_values())).encode()
    else:
        edited = copy.deepcopy(entry)
        for _ in range(data.draw(st.integers(1, 4))):
            spots = [(c, k) for _, c, k in _positions(edited)]
            if not spots:
                break
            container, key = data.draw(st.sampled_from(spots))
            container[key] = data.draw(json_values())
        blob = json.dumps(edited).encode()
    key, before = "fuzz", os.environ.get("REWRITER_CACHE_DIR")
    os.environ["REWRITER_CACHE_DIR"] = str(tmp_path_factory.getbasetemp() / "fuzz-cache")
    try:
        path = sitecache.entry_path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(blob)
        table = sitecache.load(key)                                 # must not raise
    finally:
        if before is None:
            del os.environ["REWRITER_CACHE_DIR"]
        else:
            os.environ["REWRITER_CACHE_DIR"] = before
    if table is not None:                                           # whatever is read is well formed
        assert all(type(s) is Site and s.dtype in sitecache.DTYPES.values() and s.name == n
                   for n, s in table.sites.items())
        assert all(type(t) is Attention for ts in table.graph_targets.values() for t in ts.values())
        assert all(type(m) is str for m in table.modules)
