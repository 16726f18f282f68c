"""An example test file for your own repository: gate your rule files in your test suite.

Copy it into your tests, point MODEL and RULES at your model and rule files, and run
``rewriter lock RULES... --model MODEL`` once to create ``rules.lock.json`` (commit it).
Run it with ``pytest examples/test_my_rules.py`` (from the directory holding ``rules/``).
"""
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

import rewriter
from rewriter.check import perturb
from rewriter.models import load_model
from rewriter.testing import assert_lock_holds, assert_merge_equivalent, model_inputs

MODEL = "builtin:tiny-llama"   # a local Hugging Face directory, builtin:<preset> or package.module:factory
RULES = ["rules/lora-llama-attention.toml", "rules/lokr-llama.toml"]   # stacked, bottom first
LOCK = Path("rules.lock.json")


@pytest.fixture(scope="module")
def adapted():
    model = rewriter.apply(load_model(MODEL), RULES[0])
    model.add_adapter(RULES[1], "style", activate=True)
    perturb(model)  # fresh adapters compute nothing; move them so that the checks below mean something
    return model.eval()


def test_rules_still_resolve_to_the_locked_plan(adapted):
    """Fails, site by site, when a model update or a rule edit changed what gets adapted."""
    assert_lock_holds(LOCK, adapted)


def test_merged_model_computes_what_the_unmerged_one_does(adapted):
    assert_merge_equivalent(adapted)


@settings(max_examples=10, deadline=None)
@given(data=st.data())
def test_merge_is_exact_for_any_batch_and_length(adapted, data):
    assert_merge_equivalent(adapted, inputs=data.draw(model_inputs(adapted)))
