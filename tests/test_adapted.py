"""Whole-model behaviour of Adapted on traced tiny models (traces shared per session)."""
import warnings

import pytest
import torch

import rewriter
from rewriter import MergeError, RewriterError
from rewriter.core.graph import ADAPTERS_ATTR

QV = '[adapter]\nr = 4\nalpha = 8\ninit = false\n[[rule]]\nname = "qv"\nsuffix = ["q_proj", "v_proj"]\n'
MLP = '[adapter]\nname = "mlp"\nr = 2\ninit = false\n[[rule]]\nname = "mlp"\nsuffix = ["up_proj", "q_proj"]\n'
IDS = torch.randint(0, 512, (3, 9), generator=torch.Generator().manual_seed(1))


def logits(adapted, ids=IDS):
    with torch.no_grad():
        return adapted(input_ids=ids).logits


@pytest.fixture
def llama(traced_models):
    return traced_models("tiny-llama")


def test_adapter_changes_outputs_and_inserted_nodes_carry_provenance(llama):
    base = logits(rewriter.Adapted(llama.clone()))
    a = rewriter.apply(llama, QV)
    assert (logits(a) - base).abs().max() > 1e-3
    stamped = [n.meta["rewrite"] for n in a.gm.graph.nodes if "rewrite" in n.meta]
    assert len(stamped) == 4 and all(s == {"adapter": "default", "rule": "qv", "method": "lora"} for s in stamped)


def test_no_op_init_gives_base_outputs_exactly(llama):
    base = logits(rewriter.Adapted(llama.clone()))
    a = rewriter.apply(llama, QV.replace("init = false", "init = true"))
    assert torch.equal(logits(a), base)


def test_merge_unmerge_cycles_are_exact_and_idempotent(llama):
    a = rewriter.apply(llama, QV)
    unmerged = logits(a)
    originals = {n: p.detach().clone() for n, p in a.gm.named_parameters() if ADAPTERS_ATTR not in n}
    a.merge()
    merged = logits(a)
    a.merge()  # idempotent
    assert torch.equal(logits(a), merged) and a.merged == ["default"]
    assert (merged - unmerged).abs().max() <= 1e-4
    for _ in range(100):
        a.unmerge()
        a.merge()
    a.unmerge()
    assert torch.equal(logits(a), unmerged)
    for n, p in a.gm.named_parameters():
        if n in originals:
            assert torch.equal(p, originals[n]), n


def test_disable_and_unload_give_base_outputs(llama):
    base = logits(rewriter.Adapted(llama.clone()))
    a = rewriter.apply(llama, QV)
    a.merge()
    with a.disable_adapters():
        assert torch.equal(logits(a), base)
    assert a.merged == ["default"] and not torch.equal(logits(a), base)
    plain = a.unload()
    assert plain is a.source_model
    assert torch.equal(logits(a), base) and not a.adapters


def test_only_adapter_parameters_are_trainable_and_get_gradients(llama):
    a = rewriter.apply(llama, QV)
    a.train()
    out = a(input_ids=IDS).logits.sum()
    out.backward()
    trainable = {n for n, p in a.named_parameters() if p.requires_grad}
    assert trainable and all(ADAPTERS_ATTR in n for n in trainable)
    assert all(p.grad is not None for n, p in a.named_parameters() if n in trainable)
    assert all(p.grad is None for n, p in a.named_parameters() if n not in trainable)


def test_train_eval_switches_adapter_dropout(llama):
    a = rewriter.apply(llama, QV.replace("alpha = 8", "alpha = 8\ndropout = 0.5"))
    a.train()
    assert not torch.equal(logits(a), logits(a))
    a.eval()
    assert torch.equal(logits(a), logits(a))


def test_two_adapters_stack_and_switch(llama):
    base = logits(rewriter.Adapted(llama.clone()))
    a = rewriter.apply(llama, QV)
    a.add_adapter(MLP)
    only_default = logits(a)
    assert a.active_adapters == ["default"]
    a.set_adapter("mlp")
    only_mlp = logits(a)
    a.set_adapter(["default", "mlp"])
    both = logits(a)
    assert all((both - other).abs().max() > 1e-3 for other in (base, only_default, only_mlp))
    a.merge(["mlp"])  # additive adapters commute, so a non-prefix merge is allowed
    assert torch.allclose(logits(a), both, atol=1e-4)
    with pytest.raises(RewriterError, match="is merged"):
        a.delete_adapter("mlp")
    a.unmerge()
    a.delete_adapter("mlp")
    assert torch.equal(logits(a), only_default) and list(a.adapters) == ["default"]
    with pytest.raises(RewriterError, match="already exists"):
        a.add_adapter(QV)
    with pytest.raises(RewriterError, match="did you mean 'default'"):
        a.set_adapter("defualt")


def test_safe_merge_refuses_non_finite_and_leaves_model_untouched(llama):
    a = rewriter.apply(llama, QV)
    before = logits(a)
    module = a.adapters["default"].modules["model.layers.1.self_attn.v_proj"]
    with torch.no_grad():
        module.lora_B[0, 0] = float("inf")
    with pytest.raises(MergeError, match="model.layers.1.self_attn.v_proj"):
        a.merge(safe=True)
    assert a.merged == []
    with torch.no_grad():
        module.lora_B[0, 0] = 0.0
    assert (logits(a) - before).abs().max() < 1.0


def test_unknown_input_is_a_clear_error(llama):
    a = rewriter.apply(llama, QV)
    with pytest.raises(RewriterError, match="traced without input"):
        a(input_ids=IDS, labels=IDS)
    with pytest.raises(RewriterError, match="differs from the traced value"):
        a(input_ids=IDS, use_cache=True)


def test_merge_and_unload_writes_back_and_unties_tied_weights(traced_models):
    from rewriter.models import load_model
    model = load_model("builtin:tiny-gpt2")
    assert model.lm_head.weight is model.transformer.wte.weight
    embedding = model.transformer.wte.weight.detach().clone()
    a = rewriter.apply(model, '[adapter]\ninit = false\n[[rule]]\nname = "all"\nsuffix = ["c_attn", "lm_head"]\n')
    with torch.no_grad():
        expected = a(input_ids=IDS).logits
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plain = a.merge_and_unload()
    assert plain is model and any("untied" in str(w.message) for w in caught)
    assert torch.equal(model.transformer.wte.weight, embedding), "the tied embedding must keep the original weights"
    assert model.lm_head.weight is not model.transformer.wte.weight
    with torch.no_grad():
        got = model(input_ids=IDS).logits
    assert (got - expected).abs().max() <= 1e-4


def test_gpt2_conv1d_sites_are_fan_in_fan_out(traced_models):
    a = rewriter.apply(traced_models("tiny-gpt2"), '[adapter]\ninit = false\n[[rule]]\nname = "attn"\nsuffix = "c_attn"\n')
    site = a.sites["transformer.h.0.attn.c_attn"]
    assert site.op == "conv1d" and site.fan_in_fan_out and (site.in_features, site.out_features) == (64, 192)
    report = rewriter.check_merge(a)
    assert report.ok and len(report.sites) == 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_check_merge_per_dtype_on_all_linear_layers(traced_models, dtype):
    a = rewriter.apply(traced_models("tiny-llama", dtype), '[adapter]\nr = 4\n[[rule]]\nname = "all"\nmatch = ".*"\n')
    from rewriter.check import perturb
    perturb(a, scale=0.05)
    report = rewriter.check_merge(a)
    assert report.ok, report.format()
    assert len(report.sites) == 15
    assert report.output_error <= report.output_tolerance
