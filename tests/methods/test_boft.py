"""BOFT at site level: forward == fold for stacks (order matters), the butterfly rotation
against a dense reference built from the definition, dropout, no-op init, gradients, config
and geometry errors, and parity with PEFT 0.21.2's BOFT layers (one butterfly factor as on
CPU, and several with a pure-torch stand-in for PEFT's CUDA block-diagonal kernel)."""
from __future__ import annotations

import itertools

import peft
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from peft.tuners.boft import layer as peft_boft
from torch import nn

from rewriter.errors import ConfigError
from rewriter.core.graph import fold_site, run_site
from rewriter.methods import get_method
from rewriter.methods.boft import BOFTConfig, BOFTModule
from rewriter.testing import make_site
from rewriter.core.tolerance import matmul_tolerance
from shared import (RULES_DIR, add_ready_adapter, assert_active_adapter_is_exact_noop, assert_forward_equals_fold,
                    assert_tiny_llama_peft_both_ways, boft_geometries, boft_geometry_params, clone_weights,
                    config_error, draw_site_tensors, largest_scale, load_peft_layer, peft_tiny, seeded_lora,
                    stack_tolerance)

SPEC = get_method("boft")
BOFT_SCALE = largest_scale(BOFTModule, "boft_s")  # the scales amplify the rounding errors below


def boft(site, seed, **params):
    torch.manual_seed(seed)
    params.setdefault("init_weights", False)
    return BOFTModule(site, SPEC.make_config(params))


# ---- the definition, written out densely -----------------------------------------------------

def reference_perm(features, block_size, factor, n_factors):
    """perm_i: in chunks of ``b * 2^i`` features, sub-chunks of ``b / 2`` go evens first, then odds."""
    if n_factors == 1:
        return list(range(features))
    chunk, half = block_size * 2 ** factor, block_size // 2
    perm = []
    for start in range(0, features, chunk):
        subs = [list(range(start + k * half, start + (k + 1) * half)) for k in range(chunk // half)]
        for sub in subs[0::2] + subs[1::2]:
            perm += sub
    return perm


def reference_rotation(blocks):
    """``R_tot = M_{N-1} ... M_0`` with ``M_i = P_i blockdiag(blocks[i]) P_i^T``, ``P_i[j, perm_i[j]] = 1``."""
    n_factors, _, block_size, _ = blocks.shape
    features = blocks.shape[1] * block_size
    rotation = torch.eye(features)
    for i in range(n_factors):
        perm = torch.zeros(features, features)
        perm[torch.arange(features), torch.tensor(reference_perm(features, block_size, i, n_factors))] = 1
        rotation = perm @ torch.block_diag(*blocks[i]) @ perm.t() @ rotation
    return rotation


@st.composite
def site_inputs(draw):
    geometry = draw(boft_geometries())
    site, x, weight, bias, seed = draw_site_tensors(draw, geometry[0] * geometry[1], draw(st.integers(1, 16)))
    return site, geometry, x, weight, bias, seed


@given(st.data(), site_inputs(), st.sampled_from(["boft+boft", "boft+lora", "lora+boft"]), st.booleans())
def test_forward_equals_fold_for_stacks(data, inputs, stack, conv1d):
    site, geometry, x, weight, bias, seed = inputs
    modules = [boft(site, seed + k, **boft_geometry_params(data.draw, geometry)).eval() if kind == "boft"
               else seeded_lora(site, seed + k) for k, kind in enumerate(stack.split("+"))]
    assert_forward_equals_fold(x, weight, bias, modules, conv1d, BOFT_SCALE)
    assert_forward_equals_fold(x, weight, bias, modules[::-1], conv1d, BOFT_SCALE)


@pytest.mark.parametrize("second", ["boft", "lora"])
def test_stack_order_matters(second):
    torch.manual_seed(0)
    site = make_site(16, 8)
    x, weight, bias = torch.randn(4, 16), torch.randn(8, 16), torch.randn(8)
    modules = [boft(site, 1, boft_block_size=2, boft_n_butterfly_factor=3),
               boft(site, 2, boft_block_size=4) if second == "boft" else seeded_lora(site, 2)]
    forward, tol = assert_forward_equals_fold(x, weight, bias, modules, scale_of=BOFT_SCALE)
    backward, tol_backward = assert_forward_equals_fold(x, weight, bias, modules[::-1], scale_of=BOFT_SCALE)
    assert (forward - backward).abs().max().item() > 100 * (tol + tol_backward)


@given(st.data(), site_inputs())
def test_rotation_matches_the_dense_definition_and_is_orthogonal(data, inputs):
    site, geometry, x, weight, bias, seed = inputs
    module = boft(site, seed, **boft_geometry_params(data.draw, geometry))
    with torch.no_grad():
        blocks = module.blocks()
        dense = reference_rotation(blocks)
        eye = torch.eye(site.in_features)
        tol = matmul_tolerance(eye, dense) * module.n_factors  # one product per butterfly factor
        assert (module.rotate(eye, blocks) - dense).abs().max().item() <= tol  # rows of I R_tot
        assert (dense @ dense.t() - eye).abs().max().item() <= tol
        w_eff = fold_site(weight.float(), None, [module])[0]
        expected = module.boft_s * weight.float() @ dense.t()
        assert (w_eff - expected).abs().max().item() <= matmul_tolerance(module.boft_s * weight.float(), dense) * (
            module.n_factors)


@pytest.mark.parametrize("features, block_size, n_factors", [(16, 2, 2), (16, 2, 3), (16, 2, 4), (32, 4, 2),
                                                              (32, 4, 3), (24, 6, 2), (48, 4, 3)])
def test_reference_perms_are_peft_perms(features, block_size, n_factors):
    for i in range(n_factors):
        expected = peft_boft.BOFTLayer.block_butterfly_perm(None, features, features // block_size // 2 ** i,
                                                            block_size // 2, n_factors - 1)
        assert reference_perm(features, block_size, i, n_factors) == expected.tolist()


@given(st.data(), site_inputs())
def test_zero_init_is_exactly_the_base_layer(data, inputs):
    site, geometry, x, weight, bias, seed = inputs
    module = boft(site, seed, init_weights=True, **boft_geometry_params(data.draw, geometry))
    assert not module.boft_R.any() and torch.equal(module.boft_s, torch.ones_like(module.boft_s))
    assert torch.equal(run_site(x, weight, bias, [module]), F.linear(x, weight, bias))
    assert torch.equal(fold_site(weight, bias, [module])[0], weight)


@given(st.data(), site_inputs())
def test_only_boft_parameters_get_gradients(data, inputs):
    site, geometry, x, weight, bias, seed = inputs
    frozen = seeded_lora(site, seed)
    frozen.requires_grad_(False)
    module = boft(site, seed, **boft_geometry_params(data.draw, geometry))
    run_site(x, weight, bias, [frozen, module]).float().sum().backward()
    for p in (module.boft_R, module.boft_s):
        assert p.grad is not None and torch.isfinite(p.grad).all()
    assert module.boft_s.grad.abs().sum() > 0
    assert module.block_size == 1 or module.boft_R.grad.abs().sum() > 0  # 1x1 blocks are always I
    assert all(p.grad is None for p in frozen.parameters())


def test_dropout_replaces_blocks_of_one_factor_in_training_only():
    torch.manual_seed(0)
    site = make_site(32, 5)
    module = boft(site, 0, boft_block_size=2, boft_n_butterfly_factor=3, boft_dropout=0.3)
    clean = module.blocks()
    eye = torch.eye(2)
    for _ in range(10):
        dropped = module.blocks(dropout=True)
        changed = (dropped != clean).flatten(2).any(-1)  # (factor, block)
        assert changed.any(-1).sum() == 1 and changed.sum() == int(0.3 * 16)
        assert torch.equal(dropped[changed], eye.expand(int(0.3 * 16), 2, 2))
    x, weight = torch.randn(3, 32), torch.randn(5, 32)
    assert not torch.equal(run_site(x, weight, None, [module.train()]), run_site(x, weight, None, [module.eval()]))
    assert torch.equal(run_site(x, weight, None, [module.eval()]), run_site(x, weight, None, [module]))


def test_random_init_is_peft_normal():
    module = boft(make_site(1024, 4096), 0, boft_block_size=8)  # init_weights=False: R ~ N(0, 0.1), s ~ N(1, 0.1)
    for values, mean in ((module.boft_R, 0.0), (module.boft_s, 1.0)):
        assert abs(values.mean().item() - mean) < 0.01 and 0.09 < values.std().item() < 0.11


@pytest.mark.parametrize("params, field", [
    ({"boft_block_size": 0, "boft_block_num": 0}, "boft_block_size"),
    ({"boft_block_size": 4, "boft_block_num": 2}, "boft_block_size"),
    ({"boft_block_size": -2}, "boft_block_size"),
    ({"boft_block_size": 0, "boft_block_num": 1.5}, "boft_block_num"),
    ({"boft_n_butterfly_factor": 0}, "boft_n_butterfly_factor"),
    ({"boft_dropout": -0.1}, "boft_dropout"),
    ({"bias": "lora_only"}, "bias"),
    ({"init_weights": 0}, "init_weights"),
    ({"fan_in_fan_out": "no"}, "fan_in_fan_out"),
    ({"block_sise": 4}, "block_sise"),
])
def test_config_errors_name_the_field(params, field):
    assert config_error(lambda: SPEC.make_config(params)).field == field


def test_defaults_and_aliases_follow_peft():
    defaults = peft.BOFTConfig()
    for name in SPEC.field_names():
        assert getattr(BOFTConfig(), name) == getattr(defaults, name), name
    assert SPEC.make_config({"block_num": 8, "block_size": 0, "n_butterfly_factor": 2}) == BOFTConfig(
        boft_block_size=0, boft_block_num=8, boft_n_butterfly_factor=2)


class BlockDiagKernel:
    """Pure-torch stand-in for PEFT's CUDA extension ``fbd_cuda`` (it assembles the
    block-diagonal matrices), so that PEFT's own BOFT layer keeps several butterfly factors on CPU."""

    @staticmethod
    def forward(blocks):
        return [torch.stack([torch.block_diag(*factor) for factor in blocks])]


@pytest.fixture
def butterfly_peft(monkeypatch):
    monkeypatch.setattr(peft_boft, "_FBD_CUDA", BlockDiagKernel())


def test_geometry_is_accepted_exactly_when_peft_accepts_it(butterfly_peft):
    for features, size, n_factors, by_num in itertools.product([4, 6, 8, 12, 16, 24], [1, 2, 3, 4, 6, 8], [1, 2, 3, 4],
                                                               [False, True]):
        params = {"boft_block_size": 0, "boft_block_num": size} if by_num else {"boft_block_size": size}
        params["boft_n_butterfly_factor"] = n_factors
        try:
            layer = peft_boft.Linear(nn.Linear(features, 3), "default", peft.BOFTConfig(**params))
        except ValueError:
            with pytest.raises(ConfigError, match=r"model\.layers\.0\.mlp\.up_proj"):
                boft(make_site(features, 3, name="model.layers.0.mlp.up_proj"), 0, **params)
            continue
        module = boft(make_site(features, 3), 0, **params)
        assert module.boft_R.shape == layer.boft_R["default"].shape, params


# ---- parity with PEFT 0.21.2 ---------------------------------------------------------------

def peft_model(dtype, features, params, adapters=("default",)):
    config = peft.BOFTConfig(target_modules=["q_proj", "v_proj"], init_weights=False, **params)
    return peft_tiny(config, dtype, adapters, features)


def our_module(model, name, adapter, dtype, params):
    """Our module for layer ``name``, loaded from PEFT's saved tensors through ``peft_keys``."""
    layer = getattr(model.base_model.model, name)
    module = BOFTModule(make_site(layer.in_features, layer.out_features, dtype=dtype, name=name),
                        SPEC.make_config(params))
    load_peft_layer(module, SPEC, peft.get_peft_model_state_dict(model, adapter_name=adapter), name)
    return layer, module.eval()


def assert_layer_parity(model, dtype, params, adapters=("default",)):
    features = model.base_model.model.q_proj.in_features
    x = torch.randn(2, 5, features).to(dtype)
    for name in ("q_proj", "v_proj"):
        modules = [our_module(model, name, adapter, dtype, params)[1] for adapter in adapters]
        layer = getattr(model.base_model.model, name)
        weight, bias = clone_weights(layer.base_layer)
        with torch.no_grad():
            expected = layer(x)
        tol = stack_tolerance(x, weight, bias, modules, dtype, BOFT_SCALE)
        assert (run_site(x, weight, bias, modules).float() - expected.float()).abs().max().item() <= tol
        layer.merge()
        rotation, scale = torch.eye(features), torch.ones(layer.out_features, 1)
        for adapter in adapters:  # R_b R_a and s_b s_a, as PEFT accumulates them
            r, s = layer.get_delta_weight(adapter)
            rotation, scale = r.float() @ rotation, s.float() * scale
        merged = fold_site(weight, bias, modules)[0]
        assert (merged.float() - layer.base_layer.weight.float()).abs().max().item() <= matmul_tolerance(
            scale * weight.float(), rotation, dtype)


PEFT_CASES = [  # (in_features, params): one butterfly factor, what PEFT uses on CPU
    (12, {"boft_block_size": 4}),
    (12, {"boft_block_size": 0, "boft_block_num": 4}),
    (12, {"boft_block_size": 2}),
    (15, {"boft_block_size": 5}),
]


@pytest.mark.filterwarnings("ignore:.*(CUDA extension|butterfly).*:UserWarning")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("features, params", PEFT_CASES, ids=lambda v: str(v))
def test_peft_parity(dtype, features, params):
    model = peft_model(dtype, features, params)
    assert_layer_parity(model, dtype, params)


BUTTERFLY_CASES = [  # several factors: PEFT needs its CUDA kernel, replaced by BlockDiagKernel
    (16, {"boft_block_size": 2, "boft_n_butterfly_factor": 3}),
    (16, {"boft_block_size": 4, "boft_n_butterfly_factor": 2}),
    (24, {"boft_block_size": 0, "boft_block_num": 4, "boft_n_butterfly_factor": 3}),
    (32, {"boft_block_size": 2, "boft_n_butterfly_factor": 5}),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("features, params", BUTTERFLY_CASES, ids=lambda v: str(v))
def test_peft_parity_with_several_butterfly_factors(butterfly_peft, dtype, features, params):
    model = peft_model(dtype, features, params)
    assert model.base_model.model.q_proj.boft_R["default"].shape[0] == params["boft_n_butterfly_factor"]
    assert_layer_parity(model, dtype, params)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_peft_parity_two_active_adapters(butterfly_peft, dtype):
    params = {"boft_block_size": 2, "boft_n_butterfly_factor": 2}
    model = peft_model(dtype, 8, params, adapters=("one", "two"))
    model.base_model.set_adapter(["one", "two"])
    assert_layer_parity(model, dtype, params, adapters=("one", "two"))


# ---- whole model: a tiny Llama ----------------------------------------------------------------

RULES = RULES_DIR / "boft-llama.toml"
SITES = [f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qv"]  # PEFT's Llama targets


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_tiny_llama_peft_checkpoint_both_ways_merge_and_rule_file(tmp_path):
    config = peft.BOFTConfig(boft_block_size=4, init_weights=False)
    adapted, ids = assert_tiny_llama_peft_both_ways(tmp_path, config)
    assert sorted(adapted.adapters["default"].modules) == SITES
    modules = add_ready_adapter(adapted, RULES, "ready")  # the ready rule file: an exact no-op at init
    assert {s: (m.block_size, m.n_factors) for s, m in modules.items()} == dict.fromkeys(SITES, (4, 2))
    assert_active_adapter_is_exact_noop(adapted, ids)
