"""IA3 at site level: forward == fold for stacks, no-op init, gradients, config errors,
weighted combination, and parity with PEFT 0.21.2's IA3 layers; then a tiny Llama end to end
(PEFT checkpoints both ways, merge, the ready rule file)."""
from __future__ import annotations

import peft
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from rewriter.errors import ConfigError
from rewriter.core.graph import fold_site, run_site
from rewriter.methods import get_method
from rewriter.methods.ia3 import IA3Config, IA3Module, combine_weighted
from rewriter.testing import make_site
from shared import (RULES_DIR, add_ready_adapter, assert_active_adapter_is_exact_noop, assert_forward_equals_fold,
                    assert_tiny_llama_peft_both_ways, clone_weights, config_error, draw_site_tensors,
                    largest_scale, load_peft_layer, peft_tiny, seeded_lora, stack_tolerance)

SPEC = get_method("ia3")
IA3_SCALE = largest_scale(IA3Module, "ia3_l")  # the scales amplify the rounding errors below


def ia3(site, feedforward, seed, init=False):
    torch.manual_seed(seed)
    return IA3Module(site, IA3Config(init_ia3_weights=init, is_feedforward=feedforward))


@st.composite
def site_inputs(draw):
    in_f, out_f = draw(st.integers(1, 24)), draw(st.integers(1, 24))
    return draw_site_tensors(draw, in_f, out_f)


@given(site_inputs(), st.sampled_from(["ia3+ia3", "ia3+lora", "lora+ia3"]), st.booleans(), st.booleans(),
       st.booleans())
def test_forward_equals_fold_for_stacks(inputs, stack, ff_first, ff_second, conv1d):
    site, x, weight, bias, seed = inputs
    flags = iter([ff_first, ff_second])
    modules = [ia3(site, next(flags), seed + k) if kind == "ia3" else seeded_lora(site, seed + k)
               for k, kind in enumerate(stack.split("+"))]
    forward, tol = assert_forward_equals_fold(x, weight, bias, modules, conv1d, IA3_SCALE)
    backward, tol_backward = assert_forward_equals_fold(x, weight, bias, modules[::-1], conv1d, IA3_SCALE)
    if stack == "ia3+ia3":  # row and column scalings commute
        assert (forward.float() - backward.float()).abs().max().item() <= tol + tol_backward


@pytest.mark.parametrize("feedforward", [False, True])
def test_order_with_lora_matters(feedforward):
    torch.manual_seed(0)
    site = make_site(16, 8)
    x, weight, bias = torch.randn(4, 16), torch.randn(8, 16), torch.randn(8)
    modules = [ia3(site, feedforward, 1), seeded_lora(site, 2)]
    forward, tol = assert_forward_equals_fold(x, weight, bias, modules, scale_of=IA3_SCALE)
    backward, tol_backward = assert_forward_equals_fold(x, weight, bias, modules[::-1], scale_of=IA3_SCALE)
    assert (forward - backward).abs().max().item() > 100 * (tol + tol_backward)


@given(site_inputs(), st.booleans())
def test_ones_init_is_exactly_the_base_layer(inputs, feedforward):
    site, x, weight, bias, seed = inputs
    module = ia3(site, feedforward, seed, init=True)
    assert torch.equal(module.ia3_l, torch.ones_like(module.ia3_l))
    assert torch.equal(run_site(x, weight, bias, [module]), F.linear(x, weight, bias))
    w, b = fold_site(weight, bias, [module])
    assert torch.equal(w, weight) and (b is None or torch.equal(b, bias))


@given(site_inputs(), st.booleans())
def test_only_ia3_parameters_get_gradients(inputs, feedforward):
    site, x, weight, bias, seed = inputs
    frozen = seeded_lora(site, seed)
    frozen.requires_grad_(False)
    module = ia3(site, feedforward, seed)
    run_site(x, weight, bias, [frozen, module]).float().sum().backward()
    grad = module.ia3_l.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert all(p.grad is None for p in frozen.parameters())
    assert weight.grad is None and x.grad is None


def test_parameter_shapes_and_init_rounding():
    site = make_site(6, 5, dtype=torch.bfloat16)
    assert ia3(site, False, 0).ia3_l.shape == (5, 1)
    module = ia3(site, True, 0)
    assert module.ia3_l.shape == (1, 6) and module.ia3_l.dtype == torch.float32
    assert torch.equal(module.ia3_l, module.ia3_l.bfloat16().float())  # random init rounded like PEFT
    assert (module.has_pre, module.has_post) == (True, False)
    assert (ia3(site, False, 0).has_pre, ia3(site, False, 0).has_post) == (False, True)
    values = ia3(make_site(1, 4096), False, 0).ia3_l  # init_ia3_weights=False: PEFT's randn
    assert abs(values.mean().item()) < 0.1 and 0.9 < values.std().item() < 1.1


@pytest.mark.parametrize("params, field", [
    ({"init_ia3_weights": 1}, "init_ia3_weights"),
    ({"is_feedforward": "yes"}, "is_feedforward"),
    ({"fan_in_fan_out": None}, "fan_in_fan_out"),
    ({"feedforward_modules": ["down_proj"]}, "feedforward_modules"),
])
def test_config_errors_name_the_field(params, field):
    assert config_error(lambda: SPEC.make_config(params)).field == field


def test_defaults_and_aliases():
    defaults = peft.IA3Config()
    assert (IA3Config().init_ia3_weights, IA3Config().fan_in_fan_out) == (defaults.init_ia3_weights,
                                                                        defaults.fan_in_fan_out)
    assert IA3Config().is_feedforward is False
    assert SPEC.make_config({"feedforward": True, "init": False}) == IA3Config(False, True)


def test_combine_weighted():
    vectors = [torch.randn(4, 1) for _ in range(3)]
    combined = combine_weighted(vectors, [0.5, -1.0, 2.0])
    assert torch.allclose(combined, 0.5 * vectors[0] - vectors[1] + 2.0 * vectors[2])
    with pytest.raises(ConfigError):
        combine_weighted(vectors, [1.0])
    with pytest.raises(ConfigError):
        combine_weighted([torch.ones(4, 1), torch.ones(1, 4)], [1.0, 1.0])


# ---- parity with PEFT 0.21.2 ---------------------------------------------------------------

def peft_model(dtype, adapters=("default",)):
    config = peft.IA3Config(target_modules=["q_proj", "v_proj"], feedforward_modules=["v_proj"],
                            init_ia3_weights=False)
    return peft_tiny(config, dtype, adapters)


def our_modules(model, name, adapter, dtype):
    """Our module for layer ``name``, loaded from PEFT's saved tensors through ``peft_keys``."""
    layer = getattr(model.base_model.model, name)
    site = make_site(layer.in_features, layer.out_features, dtype=dtype, name=name)
    module = IA3Module(site, IA3Config(is_feedforward=layer.is_feedforward))
    load_peft_layer(module, SPEC, peft.get_peft_model_state_dict(model, adapter_name=adapter), name)
    return layer, module


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["q_proj", "v_proj"])
def test_peft_parity(dtype, name):
    model = peft_model(dtype)
    layer, module = our_modules(model, name, "default", dtype)
    assert module.is_feedforward == (name == "v_proj")
    x = torch.randn(2, 5, 12).to(dtype)
    weight, bias = clone_weights(layer.base_layer)
    with torch.no_grad():
        expected = layer(x)
    tol = stack_tolerance(x, weight, bias, [module], dtype, IA3_SCALE)
    assert (run_site(x, weight, bias, [module]) - expected).abs().max() <= tol
    layer.merge()
    merged_w, merged_b = fold_site(weight, bias, [module])
    assert torch.equal(merged_w, layer.base_layer.weight)  # one float32 product, rounded once, in both
    assert bias is None or torch.equal(merged_b, layer.base_layer.bias)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_peft_parity_two_active_adapters(dtype):
    model = peft_model(dtype, adapters=("one", "two"))
    model.base_model.set_adapter(["one", "two"])
    x = torch.randn(3, 12).to(dtype)
    for name in ("q_proj", "v_proj"):
        layer, first = our_modules(model, name, "one", dtype)
        _, second = our_modules(model, name, "two", dtype)
        weight, bias = clone_weights(layer.base_layer)
        with torch.no_grad():
            expected = layer(x)
        tol = stack_tolerance(x, weight, bias, [first, second], dtype, IA3_SCALE)
        assert (run_site(x, weight, bias, [first, second]) - expected).abs().max() <= tol


def test_combine_weighted_matches_peft():
    model = peft_model(torch.float32, adapters=("one", "two"))
    model.base_model.add_weighted_adapter(["one", "two"], [0.3, -1.5], "mix")
    for name in ("q_proj", "v_proj"):
        vectors = getattr(model.base_model.model, name).ia3_l
        combined = combine_weighted([vectors["one"].detach(), vectors["two"].detach()], [0.3, -1.5])
        assert torch.equal(combined, vectors["mix"].detach())


# ---- whole model: a tiny Llama ----------------------------------------------------------------

RULES = RULES_DIR / "ia3-llama.toml"
PAPER_SITES = {f"model.layers.{i}.{name}": name == "mlp.down_proj"
               for i in range(2) for name in ("self_attn.k_proj", "self_attn.v_proj", "mlp.down_proj")}


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_tiny_llama_peft_checkpoint_both_ways_merge_and_rule_file(tmp_path):
    config = peft.IA3Config(init_ia3_weights=False)
    adapted, ids = assert_tiny_llama_peft_both_ways(tmp_path, config, exact_reload=True)
    assert {s: m.is_feedforward for s, m in adapted.adapters["default"].modules.items()} == PAPER_SITES
    # the ready rule file: the paper's sites, an exact no-op at init
    modules = add_ready_adapter(adapted, RULES, "paper")
    assert {s: m.is_feedforward for s, m in modules.items()} == PAPER_SITES
    assert_active_adapter_is_exact_noop(adapted, ids)
