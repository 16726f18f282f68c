"""Adapter inputs that are a product of two saved tensors are recomputed in the backward, not kept:
the same gradients, less memory between forward and backward, and a clear error if the operands change."""
import gc
import weakref

import pytest
import torch

import rewriter
from rewriter.core import recompute
from rewriter.methods import get_method
from rewriter.testing import make_site

LORA_DOWN = '[adapter]\nr = 4\nalpha = 8\ninit = false\n[[rule]]\nname = "mlp"\nsuffix = ["down_proj", "q_proj"]\n'


def lora(in_features=24, out_features=16):
    spec = get_method("lora")
    torch.manual_seed(0)
    return spec.module_cls(make_site(in_features, out_features), spec.make_config({"r": 4, "init_lora_weights": False}))


def operands(shape=(3, 5, 24)):
    torch.manual_seed(1)
    return torch.randn(shape, requires_grad=True), torch.randn(shape, requires_grad=True)


@pytest.mark.parametrize("use_recipe", [True, False])
def test_the_input_is_kept_only_without_the_recipe(use_recipe):
    module, (a, b) = lora(), operands()
    x = a * b
    y = module(x, torch.zeros(3, 5, 16), None, stage="post", recompute=(a, b) if use_recipe else None)
    alive = weakref.ref(x)
    del x
    gc.collect()
    assert (alive() is None) == use_recipe
    y.square().sum().backward()
    assert module.lora_A.grad is not None and a.grad is not None


def test_gradients_are_those_of_the_saved_input():
    grads = []
    for use_recipe in (True, False):
        module, (a, b) = lora(), operands()
        module(a * b, torch.zeros(3, 5, 16), None, stage="post",
               recompute=(a, b) if use_recipe else None).square().sum().backward()
        grads.append([t.grad for t in (module.lora_A, module.lora_B, a, b)])
    assert all(torch.equal(g1, g2) for g1, g2 in zip(*grads))


def test_operands_changed_in_place_fail_the_backward():
    module, (a, b) = lora(), operands()
    a2, b2 = a * 1, b * 1  # non-leaves, modifiable in place
    y = module(a2 * b2, torch.zeros(3, 5, 16), None, stage="post", recompute=(a2, b2))
    with torch.no_grad():
        a2.add_(1)
    with pytest.raises(RuntimeError, match="modified in place"):
        y.square().sum().backward()


def test_it_does_not_apply_where_it_would_not_save_memory():
    a, b = operands()
    assert recompute.applies(a * b, (a, b))
    frozen = b.detach()
    assert not recompute.applies(a * frozen, (a, frozen))  # frozen is not kept by autograd: holding it costs
    with torch.no_grad():
        assert not recompute.applies(a * b, (a, b))


def test_a_llama_mlp_down_projection_trains_the_same_with_and_without(traced_models, monkeypatch):
    adapted = rewriter.apply(traced_models("tiny-llama"), LORA_DOWN)
    calls = [n for n in adapted.gm.graph.nodes if n.op == "call_module" and "recompute" in n.kwargs]
    assert {n.target.rsplit("__", 1)[-1] for n in calls} == {"down_proj", "q_proj"}  # both inputs are products
    ids = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(0))
    adapted.train()
    grads, decided, applies = [], set(), recompute.applies

    def recorded(x, ops):
        decided.add((x.shape[-1], applies(x, ops)))
        return applies(x, ops)
    for enabled in (True, False):
        monkeypatch.setattr(recompute, "applies", recorded if enabled else lambda x, ops: False)
        adapted.zero_grad()
        adapted(input_ids=ids).logits.square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in adapted.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and all(torch.equal(grads[0][k], grads[1][k]) for k in grads[0])
    # down_proj reads silu(gate) * up (both kept by autograd); q_proj reads norm weight * x (the frozen
    # weight is not a saved operand): only the first is recomputed
    assert decided == {(128, True), (64, False)}
