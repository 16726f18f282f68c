"""Adapter lifecycle: mixed batches, weighted combinations (PEFT as oracle), mixed methods."""
import copy

import pytest
import torch
from hypothesis import given, settings, strategies as st
from peft import PeftModel

import rewriter
from rewriter import RewriterError

LORA_QV = '[adapter]\nr = 4\ninit = false\n[[rule]]\nname = "qv"\nsuffix = ["q_proj", "v_proj"]\n'
LORA_B = '[adapter]\nname = "b"\nr = 4\nalpha = 16\ninit = false\n[[rule]]\nname = "qk"\nsuffix = ["q_proj", "k_proj"]\n'
IA3 = ('[adapter]\nname = "ia"\nmethod = "ia3"\ninit_ia3_weights = false\n'
       '[[rule]]\nname = "kv"\nsuffix = ["k_proj", "v_proj"]\n'
       '[[rule]]\nname = "down"\nsuffix = "down_proj"\nis_feedforward = true\n')
OFT = '[adapter]\nname = "oft"\nmethod = "oft"\noft_block_size = 8\ninit_weights = false\n[[rule]]\nname = "q"\nsuffix = "q_proj"\n'


@pytest.fixture(scope="module")
def multi():
    from rewriter.models import load_model
    torch.manual_seed(0)
    a = rewriter.apply(load_model("builtin:tiny-llama"), LORA_QV)
    for rules in (LORA_B, IA3, OFT):
        a.add_adapter(rules)
    return a


def _alone(a, ids, name):
    with torch.no_grad():
        if name == "__base__":
            with a.disable_adapters():
                return a(input_ids=ids).logits
        a.set_adapter(name)
        return a(input_ids=ids).logits


@settings(max_examples=12)
@given(st.lists(st.sampled_from(["default", "b", "ia", "oft", "__base__"]), min_size=1, max_size=4),
       st.integers(2, 9))
def test_mixed_batch_equals_each_sample_alone(multi, names, seq):
    ids = torch.randint(0, 512, (len(names), seq), generator=torch.Generator().manual_seed(seq))
    with torch.no_grad():
        mixed = multi(input_ids=ids, adapter_names=names).logits
    for i, name in enumerate(names):
        alone = _alone(multi, ids[i:i + 1], name)
        assert (mixed[i] - alone[0]).abs().max() <= 1e-5, name


def test_mixed_batch_rejects_unknown_names_and_merged_state(multi):
    ids = torch.randint(0, 512, (2, 5))
    with pytest.raises(RewriterError, match="no adapter named 'defualt'"):
        multi(input_ids=ids, adapter_names=["defualt", "b"])
    multi.set_adapter("default")
    multi.merge()
    with pytest.raises(RewriterError, match="unmerge"):
        multi(input_ids=ids, adapter_names=["default", "b"])
    multi.unmerge()


def test_adapters_of_different_methods_stack_on_one_model(multi):
    ids = torch.randint(0, 512, (2, 6))
    multi.set_adapter(["default", "ia", "oft"])
    with torch.no_grad():
        stacked = multi(input_ids=ids).logits
    report = rewriter.check_merge(multi)
    assert report.ok and {len(s.adapters) for s in report.sites} == {1, 2}
    multi.merge()
    with torch.no_grad():
        assert (multi(input_ids=ids).logits - stacked).abs().max() <= report.output_tolerance
    multi.unmerge()


@pytest.mark.parametrize("combination, options", [("linear", {}), ("cat", {}), ("svd", {"svd_rank": 6})])
def test_weighted_lora_combination_matches_peft(multi, tmp_path, combination, options):
    from rewriter.models import load_model
    multi.save_adapter(tmp_path, adapter_names=["default", "b"], format="peft")
    base = load_model("builtin:tiny-llama")
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "default")
    peft_model.load_adapter(tmp_path / "b", adapter_name="b")
    weights = [0.6, -1.4]
    peft_model.add_weighted_adapter(["default", "b"], weights, "mix", combination_type=combination, **options)
    name = f"mix_{combination}"
    multi.add_weighted_adapter(["default", "b"], weights, name, combination_type=combination, **options)
    peft_model.set_adapter("mix")
    multi.set_adapter(name)
    ids = torch.randint(0, 512, (2, 8))
    with torch.no_grad():
        ours, theirs = multi(input_ids=ids).logits, peft_model(input_ids=ids).logits
    assert (ours - theirs).abs().max() <= 1e-4
    if combination == "cat":  # exact: the combined delta is the weighted sum of deltas
        site = "model.layers.0.self_attn.q_proj"
        expected = sum(w * multi.adapters[n].modules[site].delta_weight() for n, w in zip(["default", "b"], weights))
        assert torch.allclose(multi.adapters[name].modules[site].delta_weight(), expected, atol=1e-6)


def test_weighted_ia3_combination_and_refusals(multi):
    multi.add_adapter(IA3.replace('name = "ia"', 'name = "ia2"'))
    multi.add_weighted_adapter(["ia", "ia2"], [0.25, 0.75], "ia_mix", combination_type="linear")
    site = "model.layers.1.mlp.down_proj"
    got = multi.adapters["ia_mix"].modules[site].ia3_l
    expected = 0.25 * multi.adapters["ia"].modules[site].ia3_l + 0.75 * multi.adapters["ia2"].modules[site].ia3_l
    assert torch.allclose(got, expected)
    with pytest.raises(RewriterError, match="not defined for oft"):
        multi.add_weighted_adapter(["oft"], [1.0], "nope")
    with pytest.raises(RewriterError, match="different methods"):
        multi.add_weighted_adapter(["default", "ia"], [1.0, 1.0], "nope")
    with pytest.raises(RewriterError, match="equal ranks"):
        multi.add_adapter(LORA_B.replace('name = "b"', 'name = "b8"').replace("r = 4", "r = 8"))
        multi.add_weighted_adapter(["default", "b8"], [1.0, 1.0], "nope", combination_type="linear")
