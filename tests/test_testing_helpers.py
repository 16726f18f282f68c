"""``rewriter.testing`` for users' test suites: merge equivalence, lock drift, Hypothesis inputs
of a traced model, and the documented example test file."""
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import find, given, settings, strategies as st
from torch import nn

from rewriter.adapted import Adapted
from rewriter.check import perturb
from rewriter.lock import make_lock, stack_rules, write_lock
from rewriter.rules import load_rules
from rewriter.testing import assert_lock_holds, assert_merge_equivalent, model_inputs
from rewriter.core.tracing import trace_model

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "rules" / "lora-llama-attention.toml"


@pytest.fixture(scope="module")
def llama(traced_models):
    adapted = Adapted(traced_models("tiny-llama"))
    adapted.add_adapter(RULES)
    perturb(adapted)
    return adapted


def test_model_inputs_vary_the_dynamic_dims_and_stay_valid(llama):
    vocab = llama.source_model.config.vocab_size

    @settings(max_examples=8, deadline=None)
    @given(data=st.data())
    def merge_is_exact(data):
        inputs = data.draw(model_inputs(llama, max_size=12))
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        assert ids.shape == mask.shape and 2 <= ids.shape[0] <= 12 and 2 <= ids.shape[1] <= 12
        assert 0 <= ids.min() and ids.max() < vocab and bool((mask == 1).all())
        assert_merge_equivalent(llama, inputs=inputs)

    merge_is_exact()
    wide = find(model_inputs(llama, max_size=12), lambda d: d["input_ids"].shape[0] > 2 and d["input_ids"].shape[1] > 8)
    assert wide["input_ids"].shape == (3, 9)   # shrunk to the smallest such draw


class _TwoSequences(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 8)
        self.proj = nn.Linear(8, 8)

    def forward(self, a, b):
        return self.proj(torch.cat([self.embed(a), self.embed(b)], dim=1)).mean(1)


def test_model_inputs_keep_independent_dims_apart_and_shared_ones_together():
    traced = trace_model(_TwoSequences(), (torch.randint(0, 50, (2, 5)), torch.randint(0, 50, (2, 3))))
    strategy = model_inputs(traced, max_size=6)
    a, b = find(strategy, lambda x: x[0].shape[1] != x[1].shape[1])   # positional model: a tuple
    assert a.shape[0] == b.shape[0] and a.shape[1] != b.shape[1]
    a, b = find(strategy, lambda x: x[0].shape[0] > 2)
    assert a.shape[0] == b.shape[0] == 3 and 0 <= min(a.min(), b.min()) and max(a.max(), b.max()) < 50


def test_assert_merge_equivalent_fails_with_the_site_table(llama):
    with pytest.raises(AssertionError, match="MISMATCH"):
        assert_merge_equivalent(llama, atol=0.0)


def test_assert_lock_holds_and_fails_with_the_drift(llama, tmp_path):
    rules = tmp_path / "attention.toml"
    rules.write_text(RULES.read_text())
    ruleset = load_rules(rules)
    fresh = Adapted(llama._traced.clone())
    lock = tmp_path / "rules.lock.json"
    write_lock(lock, make_lock(fresh, [ruleset], stack_rules(fresh, [ruleset]), model="builtin:tiny-llama",
                               dtype=None, lock_path=lock))
    assert assert_lock_holds(lock, llama).ok
    rules.write_text(RULES.read_text().replace(r"\d+", "0"))
    with pytest.raises(AssertionError, match=r"- model\.layers\.1\.self_attn\.q_proj +no longer adapted"):
        assert_lock_holds(lock, llama)


def test_the_example_test_file_passes(pytester, llama, monkeypatch, traced_models):
    """examples/test_my_rules.py, run as a user would: from a directory with rules/ and a lock
    (on the session's cached trace: tracing is tested elsewhere)."""
    monkeypatch.setattr("rewriter.adapted.trace_model", lambda *args, **kwargs: traced_models("tiny-llama"))
    shutil.copytree(ROOT / "rules", pytester.path / "rules")
    shutil.copy(ROOT / "examples" / "test_my_rules.py", pytester.path / "test_my_rules.py")
    rulesets = [load_rules(pytester.path / "rules" / n) for n in ("lora-llama-attention.toml", "lokr-llama.toml")]
    fresh = Adapted(llama._traced.clone())
    lock = pytester.path / "rules.lock.json"
    write_lock(lock, make_lock(fresh, rulesets, stack_rules(fresh, rulesets), model="builtin:tiny-llama", dtype=None,
                               lock_path=lock))
    result = pytester.runpytest_inprocess("-q", "-p", "no:cacheprovider", "test_my_rules.py")
    result.assert_outcomes(passed=3)
