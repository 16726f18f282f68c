"""Modules trained whole (``train`` rules; PEFT's modules_to_save): one copy per adapter."""
import copy

import pytest
import torch
from peft import PeftModel

from rewriter.check import perturb
from rewriter.adapted import Adapted
from rewriter.errors import RewriterError
from rewriter.models import load_model

RULES = """
[adapter]
name = "{name}"
method = "lora"
r = 4

[[rule]]
suffix = ["query", "value"]

[[rule]]
match = "classifier"
action = "train"
"""
HEAD = "classifier.weight"


@pytest.fixture()
def two(traced_models):
    adapted = Adapted(traced_models("tiny-bert"))
    for name in ("a", "b"):
        adapted.add_adapter(RULES.format(name=name), activate=False)
    perturb(adapted, seed=1, scale=0.1)
    with torch.no_grad():
        adapted.trained_parameters("a")[HEAD].add_(0.5)
        adapted.trained_parameters("b")[HEAD].sub_(0.5)
    return adapted


def _ids():
    return torch.randint(0, 512, (2, 7), generator=torch.Generator().manual_seed(0))


def _logits(model, **kwargs):
    with torch.no_grad():
        return model(input_ids=_ids(), **kwargs).logits


def test_each_adapter_has_its_own_copy_and_the_model_keeps_the_original(two):
    original = two.gm.get_parameter(HEAD).detach().clone()
    a, b = two.trained_parameters("a")[HEAD], two.trained_parameters("b")[HEAD]
    assert a is not b and not torch.equal(a, b)
    two.set_adapter("a")
    out_a = _logits(two)
    two.set_adapter("b")
    out_b = _logits(two)
    assert not torch.allclose(out_a, out_b)
    assert torch.equal(two.gm.get_parameter(HEAD), original)
    base = load_model("builtin:tiny-bert").eval()
    with two.disable_adapters():
        assert torch.equal(_logits(two), _logits(base))  # disabled: the original head


def test_only_the_active_copy_gets_gradients(two):
    two.set_adapter("a")
    two.train()
    two(input_ids=_ids()).logits.sum().backward()
    assert two.trained_parameters("a")[HEAD].grad is not None
    assert two.trained_parameters("b")[HEAD].grad is None
    assert two.gm.get_parameter(HEAD).grad is None and not two.gm.get_parameter(HEAD).requires_grad


def test_save_load_both_formats_restore_the_copy(two, tmp_path, traced_models):
    two.set_adapter("a")
    expected = _logits(two)
    two.save_adapter(tmp_path / "ours", adapter_names=["a"])
    two.save_adapter(tmp_path / "peft", adapter_names=["a"], format="peft")
    fresh = Adapted(traced_models("tiny-bert"))
    fresh.load_adapter(tmp_path / "ours", adapter_name="x")
    fresh.load_adapter(tmp_path / "peft", adapter_name="y")
    for name in ("x", "y"):
        fresh.set_adapter(name)
        assert torch.equal(_logits(fresh), expected)
    assert torch.equal(fresh.gm.get_parameter(HEAD), two.gm.get_parameter(HEAD))  # the model's own untouched
    peft_model = PeftModel.from_pretrained(load_model("builtin:tiny-bert"), tmp_path / "peft").eval()
    assert (_logits(peft_model) - expected).abs().max() <= 1e-5


def test_merge_and_unload_keeps_the_trained_copy(two):
    two.set_adapter("b")
    expected = _logits(two)
    model = two.merge_and_unload()
    assert (_logits(model) - expected).abs().max() <= 1e-5


def test_mixed_batch_takes_each_samples_own_copy(two):
    ids = torch.randint(0, 512, (3, 7), generator=torch.Generator().manual_seed(3))
    names = ["b", "__base__", "a"]
    with torch.no_grad():
        mixed = two(input_ids=ids, adapter_names=names).logits
        for row, name in enumerate(names):
            if name == "__base__":
                with two.disable_adapters():
                    alone = two(input_ids=ids[row:row + 1]).logits
            else:
                two.set_adapter(name)
                alone = two(input_ids=ids[row:row + 1]).logits
            assert (mixed[row:row + 1] - alone).abs().max() <= 1e-5, name


def test_delete_removes_the_copy(two):
    two.delete_adapter("a")
    assert not hasattr(two.gm.get_submodule("rewriter_trained"), "a")
    with pytest.raises(RewriterError):
        two.trained_parameters("a")


def test_merged_export_puts_the_trained_copy_under_the_original_name(two):
    from rewriter.exporter import export_program
    two.set_adapter("a")
    expected = _logits(two)
    program = export_program(two, merged=True)
    state = program.state_dict
    assert not any(k.startswith("rewriter_") for k in state)
    assert torch.equal(state[HEAD], two.trained_parameters("a")[HEAD].detach())
    with torch.no_grad():
        ids = _ids()
        out = program.module()(input_ids=ids, attention_mask=torch.ones_like(ids), token_type_ids=torch.zeros_like(ids))
    out = out.logits
    assert (out - expected).abs().max() <= 1e-5
    assert torch.equal(_logits(two), expected)  # the export left the adapter as it was
