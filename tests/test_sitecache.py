"""`rewriter explain`'s site cache: a warm run plans without tracing and prints what a cold one does;
any change to the model, or --no-cache, traces again; a broken or unwritable cache is only a miss."""
import sys
import textwrap

import pytest

from rewriter import cli, sitecache
from rewriter.cli import main

RULES = "rules/lora-llama-attention.toml"


@pytest.fixture
def traces(monkeypatch, tmp_path, traced_models):
    """A fresh cache; every trace is counted and served from the session's traces of the builtins."""
    monkeypatch.setenv("REWRITER_CACHE_DIR", str(tmp_path / "cache"))
    calls = []

    def traced(spec, dtype=None, attn=None, *, dynamic=True):
        calls.append(spec)
        name = spec.split(":", 1)[1] if spec.startswith("builtin:") else _factory_builtin(spec)
        return traced_models(name)
    monkeypatch.setattr(cli, "_traced", traced)
    return calls


def _factory_builtin(spec):
    """A factory module of these tests names the builtin it stands for in its MODEL constant."""
    module = __import__(spec.partition(":")[0])
    return module.MODEL


def explain(capsys, *argv):
    code = main(["explain", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_a_warm_explain_plans_from_the_cache_with_the_same_output(capsys, traces):
    cold = explain(capsys, RULES, "--model", "builtin:tiny-llama")
    warm = explain(capsys, RULES, "--model", "builtin:tiny-llama")
    assert traces == ["builtin:tiny-llama"]
    assert cold[0] == warm[0] == 0 and cold[1] == warm[1] and "rule counts: attention=8" in warm[1]
    assert "from the cache" in warm[2] and "from the cache" not in cold[2]
    assert explain(capsys, RULES, "--model", "builtin:tiny-llama", "--json")[1].count('"site"') == 8
    assert len(traces) == 1


def test_no_cache_traces_and_another_model_is_another_entry(capsys, traces):
    explain(capsys, RULES, "--model", "builtin:tiny-llama")
    explain(capsys, RULES, "--model", "builtin:tiny-llama", "--no-cache")
    explain(capsys, RULES, "--model", "builtin:tiny-mistral")
    assert traces == ["builtin:tiny-llama", "builtin:tiny-llama", "builtin:tiny-mistral"]


def test_a_changed_factory_module_is_traced_again(capsys, traces, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    source = tmp_path / "sitecache_factory.py"
    source.write_text('MODEL = "tiny-llama"\ndef build():\n    raise AssertionError("the tests trace the builtin")\n')
    spec = "sitecache_factory:build"
    explain(capsys, RULES, "--model", spec)
    explain(capsys, RULES, "--model", spec)
    assert len(traces) == 1
    source.write_text(source.read_text() + "# edited\n")
    explain(capsys, RULES, "--model", spec)
    assert len(traces) == 2


def test_a_changed_config_in_a_model_directory_is_traced_again(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"num_hidden_layers": 2}')
    first = sitecache.model_key(str(model), dynamic=False)
    assert first == sitecache.model_key(str(model), dynamic=False)
    assert first != sitecache.model_key(str(model), dynamic=True)
    (model / "config.json").write_text('{"num_hidden_layers": 3}')
    assert sitecache.model_key(str(model), dynamic=False) != first


def test_unfingerprintable_models_are_not_cached():
    assert sitecache.model_key("no_such_module_anywhere:build") is None
    assert sitecache.model_key("not-a-model") is None


def test_llama_adapter_targets_are_cached_too(capsys, traces):
    rules = "rules/adaption-prompt-llama.toml"
    cold = explain(capsys, rules, "--model", "builtin:tiny-llama")
    warm = explain(capsys, rules, "--model", "builtin:tiny-llama")
    lora = explain(capsys, RULES, "--model", "builtin:tiny-llama")  # the same entry serves site methods
    assert len(traces) == 1 and cold[1] == warm[1] and "model.layers.1.self_attn" in warm[1]
    assert lora[0] == 0 and "rule counts: attention=8" in lora[1]


def test_a_corrupt_entry_is_a_miss_and_is_rewritten(capsys, traces, tmp_path):
    explain(capsys, RULES, "--model", "builtin:tiny-llama")
    (entry,) = (tmp_path / "cache" / "sites").iterdir()
    entry.write_bytes(entry.read_bytes()[:20])
    code, out, _ = explain(capsys, RULES, "--model", "builtin:tiny-llama")
    assert code == 0 and "rule counts: attention=8" in out and len(traces) == 2
    assert sitecache.load(entry.stem) is not None
    explain(capsys, RULES, "--model", "builtin:tiny-llama")
    assert len(traces) == 2


def test_an_unwritable_cache_still_explains(capsys, traces, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("REWRITER_CACHE_DIR", str(blocker))
    for _ in range(2):
        code, out, _ = explain(capsys, RULES, "--model", "builtin:tiny-llama")
        assert code == 0 and "rule counts: attention=8" in out
    assert len(traces) == 2


def test_bad_rules_fail_before_any_trace(capsys, traces, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('method = "lora"\n[[rule]]\nname = "x"\nmatch = "q_proj"\nrank = 0\n')
    code, _, err = explain(capsys, str(bad), "--model", "builtin:tiny-llama")
    assert code == 2 and "bad.toml" in err and traces == []
