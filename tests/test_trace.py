"""Tracing across architectures: sites found by weight, outputs identical to eager, HF output types kept."""
import sys

import pytest
import torch
from torch import fx

import rewriter
from rewriter.models import BUILTINS, TinyMLP, load_model
from rewriter.core.sites import find_sites
from rewriter.core.tracing import trace_model

EXPECTED_SITES = {"tiny-llama": 15, "tiny-mistral": 15, "tiny-qwen2": 15, "tiny-gemma": 15, "tiny-phi3": 9,
                  "tiny-gpt2": 9, "tiny-opt": 13, "tiny-bert": 14, "tiny-roberta": 14, "tiny-t5": 33}


@pytest.mark.parametrize("name", sorted(EXPECTED_SITES))
def test_hf_models_trace_with_dynamic_shapes_and_match_eager(name):
    model = load_model(f"builtin:{name}")
    traced = trace_model(model)
    sites = find_sites(traced.gm)
    assert len(sites) == EXPECTED_SITES[name]
    params = dict(model.named_parameters(remove_duplicate=False))
    for s in sites:  # a site is its weight: the name is the module that owns it
        assert s.weight.endswith(".weight") and s.name == s.weight[:-len(".weight")]
        assert traced.gm.get_parameter(s.weight) is params[s.weight]
    if name == "tiny-gpt2":
        assert {s.op for s in sites if s.name != "lm_head"} == {"conv1d"}
    gen = torch.Generator().manual_seed(0)
    inputs = {k: (torch.randint(0, 512, (3, 11), generator=gen) if v.dtype == torch.long and "mask" not in k
                  and "type" not in k else torch.ones(3, 11, dtype=v.dtype) if "mask" in k else
                  torch.zeros(3, 11, dtype=v.dtype))
              for k, v in traced.example_inputs.items() if isinstance(v, torch.Tensor)}
    adapted = rewriter.Adapted(traced)
    with torch.no_grad():
        expected = model(**inputs)
        got = adapted(**inputs)
    assert type(got) is type(expected)
    assert torch.equal(got.logits, expected.logits)


def test_plain_module_via_export_and_user_graph_module():
    model = TinyMLP().eval()
    x = torch.randn(3, 32)
    exported = rewriter.apply(model, '[[rule]]\nname = "up"\nsuffix = "up"\n', example_inputs=(x,))
    assert set(exported.sites) >= {"layers.0.up", "layers.1.up", "head"}
    gm = fx.symbolic_trace(TinyMLP().eval())
    adapted = rewriter.apply(gm, '[adapter]\ninit = false\n[[rule]]\nname = "up"\nsuffix = "up"\n')
    assert {n.op for n in gm.graph.nodes if n.target == torch.nn.functional.linear} == {"call_function"}
    assert set(adapted.sites) == {"layers.0.up", "layers.0.down", "layers.1.up", "layers.1.down", "head"}
    report = rewriter.check_merge(adapted, inputs=(x,))
    assert report.ok and len(report.sites) == 2


def test_multihead_attention_sites_are_identified_by_weight():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = torch.nn.MultiheadAttention(16, 2, batch_first=True)
            self.ff = torch.nn.Linear(16, 16)

        def forward(self, x):
            return self.ff(self.attn(x, x, x, need_weights=False)[0])

    traced = trace_model(Block().eval(), (torch.randn(2, 5, 16),))
    names = {s.name: s for s in find_sites(traced.gm)}
    assert set(names) == {"attn.in_proj_weight", "attn.out_proj", "ff"}
    assert (names["attn.in_proj_weight"].in_features, names["attn.in_proj_weight"].out_features) == (16, 48)


def test_bad_model_gives_a_trace_error():
    with pytest.raises(rewriter.TraceError, match="example_inputs"):
        trace_model(torch.nn.Linear(4, 4))  # a plain module that carries no example inputs
    with pytest.raises(rewriter.TraceError, match="expected an nn.Module"):
        trace_model("not a model")


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-bert"])
def test_attention_shares_one_float_mask_with_bitwise_equal_results(name, monkeypatch):
    """The boolean mask becomes one additive float mask for every attention call: sdpa then keeps one
    copy for the backward instead of one per layer, and the logits do not change by a bit."""
    trace_module = sys.modules["rewriter.core.tracing"]  # the package's `trace` attribute is the function
    model = load_model(f"builtin:{name}")
    shared = trace_model(model)
    monkeypatch.setattr(trace_module, "share_float_attention_masks", lambda gm: None)
    plain = trace_model(model)
    sdpa = torch.ops.aten.scaled_dot_product_attention.default
    calls = [n for n in shared.gm.graph.nodes if n.target is sdpa]
    masks = {n.args[3] for n in calls}
    assert len(calls) > 1 and len(masks) == 1 and next(iter(masks)).target is torch.ops.aten.where.ScalarSelf
    inputs = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in shared.example_inputs.items()}
    inputs["attention_mask"][0, :2] = 0  # real padding: the mask matters
    results = []
    for traced in (shared, plain):
        masks_saved = set()

        def pack(t, masks_saved=masks_saved):
            batch, seq = inputs["attention_mask"].shape
            if t.dim() == 4 and t.shape[0] == batch and t.shape[1] == 1 and t.shape[-1] == seq \
                    and t.is_floating_point():  # (batch, 1, queries, keys) masks, not RoPE's (1, 1, seq, dim)
                masks_saved.add(t.untyped_storage().data_ptr())
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = traced.gm(**inputs)
        logits = out[0] if isinstance(out, (tuple, list)) else out.logits
        assert logits.requires_grad  # the parameters train: attention saves what its backward needs
        results.append((logits, len(masks_saved)))
    assert torch.equal(results[0][0], results[1][0])
    assert results[0][1] == 1 and results[1][1] == len(calls)
