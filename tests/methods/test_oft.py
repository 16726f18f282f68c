"""OFT at site level: forward == fold for stacks (order matters), no-op init, gradients,
config errors, block-size adjustment, and parity with PEFT 0.21.2's OFT layers."""
from __future__ import annotations

import peft
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from peft.tuners.oft.layer import OFTLayer

from rewriter.core.graph import fold_site, run_site
from rewriter.methods import get_method
from rewriter.methods.oft import OFTConfig, OFTModule, nearest_divisor
from rewriter.testing import make_site
from rewriter.core.tolerance import matmul_tolerance
from shared import (RULES_DIR, add_ready_adapter, assert_active_adapter_is_exact_noop, assert_forward_equals_fold,
                    assert_tiny_llama_peft_both_ways, clone_weights, config_error, draw_site_tensors,
                    load_peft_layer, peft_tiny, seeded_lora, stack_tolerance)

SPEC = get_method("oft")


def oft(site, seed, **params):
    torch.manual_seed(seed)
    params.setdefault("init_weights", False)
    return OFTModule(site, SPEC.make_config(params))


@st.composite
def site_inputs(draw):
    block, blocks = draw(st.integers(2, 6)), draw(st.integers(1, 5))
    site, x, weight, bias, seed = draw_site_tensors(draw, block * blocks, draw(st.integers(1, 16)))
    return site, block, x, weight, bias, seed


@st.composite
def oft_params(draw, block, in_features, min_terms=1):
    params = {"r": in_features // block, "oft_block_size": 0} if draw(st.booleans()) else {"oft_block_size": block}
    params["use_cayley_neumann"] = draw(st.booleans())
    params["num_cayley_neumann_terms"] = draw(st.integers(min_terms, 6))
    params["block_share"] = draw(st.booleans())
    params["coft"] = draw(st.booleans())
    params["eps"] = draw(st.floats(0.01, 1.0))
    return params


@given(st.data(), site_inputs(), st.sampled_from(["oft+oft", "oft+lora", "lora+oft"]), st.booleans())
def test_forward_equals_fold_for_stacks(data, inputs, stack, conv1d):
    site, block, x, weight, bias, seed = inputs
    modules = [oft(site, seed + k, **data.draw(oft_params(block, site.in_features))) if kind == "oft"
               else seeded_lora(site, seed + k) for k, kind in enumerate(stack.split("+"))]
    assert_forward_equals_fold(x, weight, bias, modules, conv1d)
    assert_forward_equals_fold(x, weight, bias, modules[::-1], conv1d)


@pytest.mark.parametrize("second", ["oft", "lora"])
def test_stack_order_matters(second):
    torch.manual_seed(0)
    site = make_site(16, 8)
    x, weight, bias = torch.randn(4, 16), torch.randn(8, 16), torch.randn(8)
    upper = oft(site, 2, r=2, oft_block_size=0) if second == "oft" else seeded_lora(site, 2)
    modules = [oft(site, 1, oft_block_size=4), upper]
    forward, tol = assert_forward_equals_fold(x, weight, bias, modules)
    backward, tol_backward = assert_forward_equals_fold(x, weight, bias, modules[::-1])
    assert (forward - backward).abs().max().item() > 100 * (tol + tol_backward)


@given(site_inputs(), st.data())
def test_zero_init_is_exactly_the_base_layer(inputs, data):
    site, block, x, weight, bias, seed = inputs
    module = oft(site, seed, init_weights=True, **data.draw(oft_params(block, site.in_features)))
    assert not module.oft_R.any()
    assert torch.equal(run_site(x, weight, bias, [module]), F.linear(x, weight, bias))
    assert torch.equal(fold_site(weight, bias, [module])[0], weight)


@given(site_inputs(), st.data())
def test_only_oft_parameters_get_gradients(inputs, data):
    site, block, x, weight, bias, seed = inputs
    frozen = seeded_lora(site, seed)
    frozen.requires_grad_(False)
    module = oft(site, seed, **data.draw(oft_params(block, site.in_features, min_terms=2)))
    run_site(x, weight, bias, [frozen, module]).float().sum().backward()
    grad = module.oft_R.grad
    assert grad is not None and grad.shape == module.oft_R.shape and torch.isfinite(grad).all()
    assert grad.abs().sum() > 0
    assert all(p.grad is None for p in frozen.parameters())


@given(site_inputs())
def test_rotation_is_orthogonal_and_neumann_is_the_transposed_cayley(inputs):
    site, block, x, weight, bias, seed = inputs
    exact = oft(site, seed, oft_block_size=block, use_cayley_neumann=False)
    neumann = oft(site, seed, oft_block_size=block, num_cayley_neumann_terms=40)
    with torch.no_grad():
        neumann.oft_R.copy_(exact.oft_R * 0.2)  # inside the series' radius of convergence
        exact.oft_R.mul_(0.2)
        rotation = torch.block_diag(*exact.blocks())
        eye = torch.eye(site.in_features)
        tol = matmul_tolerance(eye, rotation)
        assert (rotation @ rotation.t() - eye).abs().max().item() <= tol
        assert (torch.block_diag(*neumann.blocks()) - rotation.t()).abs().max().item() <= tol


def test_neumann_three_and_four_terms_agree():
    site = make_site(12, 5)
    three, four = oft(site, 0, oft_block_size=4, num_cayley_neumann_terms=3), oft(site, 0, oft_block_size=4,
                                                                                  num_cayley_neumann_terms=4)
    assert torch.equal(three.blocks(), four.blocks())
    assert not torch.equal(three.blocks(), oft(site, 0, oft_block_size=4, num_cayley_neumann_terms=5).blocks())


def test_coft_projects_the_parameter_in_place():
    site = make_site(16, 4)
    module = oft(site, 0, oft_block_size=4, coft=True, eps=0.7)
    radius = 0.7 / 2  # eps / sqrt(4 blocks)
    norms = 2 ** 0.5 * module.oft_R.detach().norm(dim=1)
    assert (norms > radius).any() and (norms < radius).any()
    run_site(torch.randn(2, 16), torch.randn(4, 16), None, [module])
    projected = 2 ** 0.5 * module.oft_R.detach().norm(dim=1)
    assert torch.allclose(projected, norms.clamp(max=radius))


def test_random_init_is_peft_normal():
    values = oft(make_site(1024, 1), 0, oft_block_size=32).oft_R  # init_weights=False: N(0, 0.1)
    assert values.shape == (32, 496)
    assert abs(values.mean().item()) < 0.01 and 0.09 < values.std().item() < 0.11


def test_block_share_has_one_parameter_row():
    module = oft(make_site(12, 5), 0, r=4, oft_block_size=0, block_share=True)
    assert module.oft_R.shape == (1, 3) and module.blocks().shape == (1, 3, 3)


@pytest.mark.parametrize("params, field", [
    ({"r": 0, "oft_block_size": 0}, "oft_block_size"),
    ({"r": 4, "oft_block_size": 8}, "oft_block_size"),
    ({"r": -1, "oft_block_size": 0}, "r"),
    ({"oft_block_size": 2.5}, "oft_block_size"),
    ({"module_dropout": 1.0}, "module_dropout"),
    ({"bias": "lora_only"}, "bias"),
    ({"init_weights": "gaussian"}, "init_weights"),
    ({"coft": 1}, "coft"),
    ({"eps": 0.0}, "eps"),
    ({"eps": "small"}, "eps"),
    ({"block_share": None}, "block_share"),
    ({"use_cayley_neumann": "yes"}, "use_cayley_neumann"),
    ({"num_cayley_neumann_terms": 0}, "num_cayley_neumann_terms"),
    ({"fan_in_fan_out": 0}, "fan_in_fan_out"),
    ({"rank": 4}, "rank"),
])
def test_config_errors_name_the_field(params, field):
    assert config_error(lambda: SPEC.make_config(params)).field == field


def test_defaults_and_aliases_follow_peft():
    assert OFTConfig() == SPEC.make_config({})
    defaults = peft.OFTConfig()
    for name in SPEC.field_names():
        assert getattr(OFTConfig(), name) == getattr(defaults, name), name
    assert SPEC.make_config({"block_size": 8, "init": False}) == OFTConfig(oft_block_size=8, init_weights=False)


def test_nearest_divisor_matches_peft():
    for features in range(1, 41):
        for value in range(1, 46):
            assert nearest_divisor(features, value) == OFTLayer.adjust_oft_parameters(None, features, value)


@pytest.mark.parametrize("params, block_size, r", [
    ({"oft_block_size": 32}, 25, 4),     # 100 features: 25 and 50 divide, 25 is nearer
    ({"oft_block_size": 120}, 100, 1),   # larger than the layer
    ({"r": 3, "oft_block_size": 0}, 50, 2),  # 2 and 4 blocks are equally near 3: the lower wins
])
def test_invalid_block_size_is_adjusted_with_a_warning(params, block_size, r):
    site = make_site(100, 3, name="model.layers.3.mlp.up_proj")
    with pytest.warns(UserWarning, match=r"model\.layers\.3\.mlp\.up_proj"):
        module = oft(site, 0, **params)
    assert (module.block_size, module.r) == (block_size, r)
    assert module.oft_R.shape == (r, block_size * (block_size - 1) // 2)


# ---- parity with PEFT 0.21.2 ---------------------------------------------------------------

def peft_model(dtype, params, adapters=("default",)):
    params = {"oft_block_size": 0, **params} if "r" in params else params
    config = peft.OFTConfig(target_modules=["q_proj", "v_proj"], init_weights=False, **params)
    return peft_tiny(config, dtype, adapters)


def our_module(model, name, adapter, dtype, params):
    """Our module for layer ``name``, loaded from PEFT's saved tensors through ``peft_keys``."""
    layer = getattr(model.base_model.model, name)
    params = {"oft_block_size": 0, **params} if "r" in params else params
    module = OFTModule(make_site(layer.in_features, layer.out_features, dtype=dtype, name=name),
                       SPEC.make_config(params))
    load_peft_layer(module, SPEC, peft.get_peft_model_state_dict(model, adapter_name=adapter), name)
    return layer, module


PEFT_CASES = [
    {"oft_block_size": 4},
    {"r": 3},
    {"oft_block_size": 4, "use_cayley_neumann": False},
    {"oft_block_size": 6, "num_cayley_neumann_terms": 1},
    {"oft_block_size": 6, "num_cayley_neumann_terms": 2},
    {"oft_block_size": 6, "num_cayley_neumann_terms": 3},
    {"oft_block_size": 3, "num_cayley_neumann_terms": 7},
    {"oft_block_size": 4, "block_share": True},
    {"oft_block_size": 4, "coft": True, "eps": 0.6},
    {"oft_block_size": 5},  # adjusted to 4 (4 and 6 are equally near 5: the lower wins)
    {"r": 5},               # adjusted to 4 blocks
]


@pytest.mark.filterwarnings("ignore:.*(Invalid|does not divide).*:UserWarning")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("params", PEFT_CASES, ids=lambda p: ",".join(f"{k}={v}" for k, v in p.items()))
def test_peft_parity(dtype, params):
    model = peft_model(dtype, params)
    x = torch.randn(2, 5, 12).to(dtype)
    for name in ("q_proj", "v_proj"):
        layer, module = our_module(model, name, "default", dtype, params)
        assert (module.r, module.block_size) == (layer.r["default"], layer.oft_block_size["default"])
        weight, bias = clone_weights(layer.base_layer)
        with torch.no_grad():
            expected = layer(x)
        tol = stack_tolerance(x, weight, bias, [module], dtype)
        assert (run_site(x, weight, bias, [module]).float() - expected.float()).abs().max().item() <= tol
        torch.testing.assert_close(module.oft_R, layer.oft_R["default"].weight)  # COFT projected both alike
        layer.merge()
        rotation = layer.get_delta_weight("default").float()  # PEFT's dense R_bd
        merged = fold_site(weight, bias, [module])[0]
        assert (merged.float() - layer.base_layer.weight.float()).abs().max().item() <= matmul_tolerance(
            weight.float(), rotation, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_two_adapters_fold_like_peft_merge(dtype):
    """PEFT merges adapters a then b as ``W R_a^T R_b^T``: our stack [a, b] folds the same way."""
    params = {"oft_block_size": 4, "use_cayley_neumann": False}
    model = peft_model(dtype, params, adapters=("one", "two"))
    x = torch.randn(3, 12).to(dtype)
    layer, first = our_module(model, "q_proj", "one", dtype, params)
    _, second = our_module(model, "q_proj", "two", dtype, params)
    weight, bias = clone_weights(layer.base_layer)
    layer.merge(adapter_names=["one", "two"])
    merged = fold_site(weight, bias, [first, second])[0]
    rotation = layer.get_delta_weight("two").float() @ layer.get_delta_weight("one").float()
    assert (merged.float() - layer.base_layer.weight.float()).abs().max().item() <= matmul_tolerance(
        weight.float(), rotation, dtype)
    with torch.no_grad():
        expected = layer.base_layer(x)
    tol = stack_tolerance(x, weight, bias, [first, second], dtype)
    assert (run_site(x, weight, bias, [first, second]) - expected).abs().max() <= tol


# ---- whole model: a tiny Llama ----------------------------------------------------------------

RULES = RULES_DIR / "oft-llama.toml"
SITES = [f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qv"]  # PEFT's Llama targets


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_tiny_llama_peft_checkpoint_both_ways_merge_and_rule_file(tmp_path):
    config = peft.OFTConfig(oft_block_size=8, init_weights=False, coft=True, eps=0.5)
    adapted, ids = assert_tiny_llama_peft_both_ways(tmp_path, config)
    assert sorted(adapted.adapters["default"].modules) == SITES
    modules = add_ready_adapter(adapted, RULES, "ready")  # the ready rule file: an exact no-op at init
    assert {s: m.block_size for s, m in modules.items()} == dict.fromkeys(SITES, 32)
    assert_active_adapter_is_exact_noop(adapted, ids)
