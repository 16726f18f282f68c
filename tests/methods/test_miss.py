"""MiSS (balance, mini, bat): site-level properties (Hypothesis) and layer-level parity with PEFT 0.21.2."""
from __future__ import annotations

import copy
import math

import peft
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import rewriter
from rewriter.errors import MergeError
from rewriter.core.graph import fold_site, run_site
from rewriter.methods import get_method
from rewriter.methods.miss import MissBalanceModule, MissBatModule, MissMiniModule, MissModule
from rewriter.adapted import Adapted
from rewriter.rules import load_rules
from rewriter.testing import make_site
from rewriter.core.tolerance import matmul_tolerance, output_tolerance
from shared import (DTYPES, RULES_DIR, assert_config_fields_are_peft_fields, assert_gradients_reach_every_parameter,
                    assert_merged_like_peft, build_module, config_error, config_from_peft, load_peft_layer, max_error,
                    merge_tolerance, seeded_site_tensors, stack_of, targets)

SPEC = get_method("miss")
VARIANTS = [True, False, "mini", "bat"]
RULES = RULES_DIR / "miss-llama.toml"


@torch.no_grad()
def randomize(module, scale=0.3):
    """Zero-initialised blocks give a trivial adapter: draw them instead."""
    for param in module.parameters():
        param.copy_(torch.randn_like(param) * scale)
    return module


# ---- site-level properties -----------------------------------------------------------------

@st.composite
def cases(draw):
    variant = draw(st.sampled_from(VARIANTS))
    r = draw(st.integers(1, 8))
    mini_r = draw(st.integers(1, 6))
    if variant == "bat":  # r divides both dimensions
        in_features, out_features = r * draw(st.integers(1, 5)), r * draw(st.integers(1, 5))
    else:
        in_features = draw(st.integers(r, 40))
        out_features = mini_r * draw(st.integers(1, 8)) if variant == "mini" else draw(st.integers(1, 40))
    # the upper adapter of "twice" is any variant but bat, whose update reads the weight
    second = draw(st.sampled_from([True, False, "mini"]))
    stacks = ["single", "twice", "lora_above"] + ([] if variant == "bat" else ["lora_below"])
    return dict(
        variant=variant, r=r, mini_r=mini_r, in_features=in_features, out_features=out_features, second=second,
        second_r=draw(st.integers(1, in_features)), dtype=draw(st.sampled_from(DTYPES)),
        seed=draw(st.integers(0, 2**31 - 1)), batch=draw(st.sampled_from([(3,), (2, 5)])), bias=draw(st.booleans()),
        lora_r=draw(st.integers(1, 6)), stack=draw(st.sampled_from(stacks)))


def setup(case):
    site, x, weight, bias = seeded_site_tensors(case)
    miss = randomize(build_module("miss", site, r=case["r"], mini_r=case["mini_r"], init_weights=case["variant"]))
    # mini_r = 1 divides every out_features
    second = randomize(build_module("miss", site, r=case["second_r"], mini_r=1, init_weights=case["second"]))
    lora = build_module("lora", site, r=case["lora_r"], init_lora_weights=False)
    return site, x, weight, bias, stack_of(case["stack"], miss, second, lora)


@given(cases())
def test_forward_equals_fold(case):
    _, x, weight, bias, modules = setup(case)
    with torch.no_grad():
        unmerged = run_site(x, weight, bias, modules)
        merged = F.linear(x, *fold_site(weight, bias, modules))
    assert unmerged.dtype == merged.dtype == x.dtype
    assert max_error(unmerged, merged) <= merge_tolerance(x, weight, bias, modules)


def test_bat_must_be_the_lowest_unmerged_adapter():
    site = make_site(8, 8, dtype=torch.float32)
    lora, bat = build_module("lora", site, r=2), build_module("miss", site, r=4, init_weights="bat")
    with pytest.raises(MergeError, match="lowest unmerged"):
        run_site(torch.randn(2, 8), torch.randn(8, 8), None, [lora, bat])


@given(cases())
def test_zero_blocks_are_exact_identity(case):
    site, x, weight, bias, _ = setup(case)
    variant = case["variant"] if case["variant"] is not False else True  # False draws a random block
    module = build_module("miss", site, r=case["r"], mini_r=case["mini_r"], init_weights=variant)
    assert not module.miss_block.any()
    with torch.no_grad():
        out = run_site(x, weight, bias, [module])
        if variant == "bat":  # bat runs the whole layer in the adapter dtype (float32), as PEFT does
            f32_bias = bias.float() if bias is not None else None
            expected = F.linear(x.float(), weight.float(), f32_bias).to(x.dtype)
        else:
            expected = F.linear(x, weight, bias)
        assert torch.equal(out, expected)
        assert torch.equal(fold_site(weight, bias, [module])[0], weight)


@given(cases())
def test_gradients_reach_only_the_block(case):
    _, x, weight, bias, modules = setup(case)
    miss = modules[1] if case["stack"] == "lora_below" else modules[0]
    assert [name for name, _ in miss.named_parameters()] == ["miss_block"]
    assert_gradients_reach_every_parameter(x, weight, bias, modules, miss, "miss_block")


@pytest.mark.parametrize("init, cls, shape", [
    (True, MissBalanceModule, (4, 12)), (False, MissBalanceModule, (4, 12)),
    ("mini", MissMiniModule, (4, 3)), ("bat", MissBatModule, (3, 4, 4)),
])
def test_variants_shapes_and_flags(init, cls, shape):
    torch.manual_seed(0)
    config = SPEC.make_config({"r": 4, "mini_r": 3, "init_weights": init})
    module = SPEC.module_cls(make_site(8, 12, dtype=torch.bfloat16), config)
    assert type(module) is cls and isinstance(module, MissModule)
    assert module.miss_block.shape == shape and module.miss_block.dtype == torch.float32
    assert set(module.state_dict()) == {"miss_block"}
    assert module.additive == (init != "bat") and module.needs_weight == (init == "bat")
    block = module.miss_block
    if init is False:  # kaiming(a=sqrt(5)) on [r, out]: U(±1/sqrt(out)), rounded through the base dtype
        assert 0 < block.abs().max() <= 1 / math.sqrt(12)
        assert torch.equal(block, block.to(torch.bfloat16).float())
    else:
        assert not block.any()
    assert type(copy.deepcopy(module)) is cls


def test_dropout_applies_in_training_only():
    torch.manual_seed(0)
    site = make_site(16, 8, dtype=torch.float32)
    module = randomize(build_module("miss", site, r=4, miss_dropout=0.5))
    x, weight = torch.randn(64, 16), torch.randn(8, 16)
    with torch.no_grad():
        module.train()
        assert not torch.allclose(run_site(x, weight, None, [module]), run_site(x, weight, None, [module]))
        module.eval()
        assert torch.equal(run_site(x, weight, None, [module]), run_site(x, weight, None, [module]))


# ---- config validation ---------------------------------------------------------------------

@pytest.mark.parametrize("params, field", [
    ({"r": 0}, "r"),
    ({"r": 4.0}, "r"),
    ({"mini_r": 0}, "mini_r"),
    ({"miss_dropout": 1.0}, "miss_dropout"),
    ({"miss_dropout": -0.1}, "miss_dropout"),
    ({"init_weights": "gaussian"}, "init_weights"),
    ({"init_weights": 1}, "init_weights"),
    ({"bias": "lora_only"}, "bias"),
])
def test_config_rejects_bad_values(params, field):
    error = config_error(lambda: SPEC.make_config(params))
    assert error.field == field
    assert field in str(error)


@pytest.mark.parametrize("init, in_f, out_f, r, mini_r, field, sizes", [
    (True, 6, 8, 7, 1, "r", ["in_features=6"]),  # r > in_features, for every variant
    ("mini", 6, 8, 7, 1, "r", ["in_features=6"]),
    ("mini", 12, 10, 4, 4, "mini_r", ["out_features=10"]),  # mini_r must divide out_features
    ("bat", 12, 10, 4, 1, "r", ["in_features=12", "out_features=10"]),  # r must divide both
    ("bat", 10, 12, 4, 1, "r", ["in_features=10", "out_features=12"]),
])
def test_layer_size_errors_name_the_site_and_sizes(init, in_f, out_f, r, mini_r, field, sizes):
    site = make_site(in_f, out_f, dtype=torch.float32, name="model.layers.5.self_attn.v_proj")
    error = config_error(lambda: build_module("miss", site, r=r, mini_r=mini_r, init_weights=init))
    message = str(error)
    assert "model.layers.5.self_attn.v_proj" in message and error.field == field
    assert all(size in message for size in sizes)


def test_layer_sizes_peft_accepts_are_accepted():
    site = make_site(10, 9, dtype=torch.float32)
    build_module("miss", site, r=4)                                # in % r != 0 is fine for balance
    build_module("miss", site, r=10, mini_r=3, init_weights="mini")
    build_module("miss", make_site(12, 8, dtype=torch.float32), r=4, init_weights="bat")


def test_config_fields_are_peft_fields():
    assert_config_fields_are_peft_fields(SPEC, peft.MissConfig, {
        "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern", "modules_to_save"})


def test_rule_file_loads():
    ruleset = load_rules(RULES)
    assert ruleset.method == "miss"
    assert targets(ruleset, "model.layers.7.self_attn.q_proj")
    assert not targets(ruleset, "model.layers.7.mlp.up_proj")


# ---- parity with PEFT 0.21.2 ---------------------------------------------------------------

class TinyAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(24, 16)
        self.v_proj = nn.Linear(24, 32, bias=False)

    def forward(self, x):
        return self.q_proj(x), self.v_proj(x)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("init, r, mini_r", [
    (True, 8, 1),
    (True, 5, 1),       # in_features % r != 0: the last shard is zero-padded
    (False, 7, 1),
    ("mini", 5, 4),
    ("bat", 8, 1),
])
def test_parity_with_peft(dtype, init, r, mini_r):
    torch.manual_seed(0)
    model = TinyAttention().to(dtype)
    config = peft.MissConfig(target_modules=["q_proj", "v_proj"], r=r, mini_r=mini_r, init_weights=init)
    peft_model = peft.get_peft_model(model, config)
    for name, param in peft_model.named_parameters():
        if "miss_block" in name:  # zero-initialised variants: make the adapter non-trivial
            with torch.no_grad():
                param.copy_(torch.randn_like(param) * 0.3)
    state = peft.get_peft_model_state_dict(peft_model)
    x = torch.randn(3, 5, 24).to(dtype)

    expected = {}
    for name in ("q_proj", "v_proj"):
        layer = getattr(peft_model.base_model.model, name)
        weight = layer.base_layer.weight.detach().clone()
        bias = layer.base_layer.bias.detach().clone() if layer.base_layer.bias is not None else None
        site = make_site(weight.shape[1], weight.shape[0], dtype=dtype, name=name)
        module = SPEC.module_cls(site, config_from_peft(SPEC, config))
        saved = load_peft_layer(module, SPEC, state, name)
        assert len(saved) == len(module.state_dict())
        assert module.miss_block.dtype == torch.float32 and module.miss_block.any()

        with torch.no_grad():
            ours, theirs = run_site(x, weight, bias, [module]), layer(x)
        assert ours.dtype == theirs.dtype == dtype
        assert max_error(ours, theirs) <= merge_tolerance(x, weight, bias, [module])
        expected[name] = fold_site(weight, bias, [module])

    peft_model.merge_adapter()
    assert_merged_like_peft(peft_model, expected, dtype)



@torch.no_grad()
def test_two_bat_adapters_compose_like_peft():
    """PEFT runs several active bat adapters one after the other, each on the weight the one
    below updated; here the lower one is merged (float32) and the upper one runs unmerged."""
    torch.manual_seed(0)
    configs = {"default": peft.MissConfig(target_modules=["q_proj", "v_proj"], r=8, init_weights="bat"),
               "upper": peft.MissConfig(target_modules=["q_proj", "v_proj"], r=4, init_weights="bat")}
    peft_model = peft.get_peft_model(TinyAttention(), configs["default"])
    peft_model.add_adapter("upper", configs["upper"])
    for name, param in peft_model.named_parameters():
        if "miss_block" in name:
            param.copy_(torch.randn_like(param) * 0.3)
    peft_model.base_model.set_adapter(["default", "upper"])
    states = {adapter: peft.get_peft_model_state_dict(peft_model, adapter_name=adapter) for adapter in configs}
    x = torch.randn(3, 5, 24)

    expected = {}
    for name in ("q_proj", "v_proj"):
        layer = getattr(peft_model.base_model.model, name)
        weight, bias = layer.base_layer.weight.clone(), layer.base_layer.bias
        site = make_site(24, weight.shape[0], dtype=torch.float32, name=name)
        modules = []
        for adapter, config in configs.items():
            module = SPEC.module_cls(site, config_from_peft(SPEC, config))
            module.load_state_dict({"miss_block": states[adapter][f"base_model.model.{name}.miss_block"]})
            modules.append(module)
        lower_merged, _ = fold_site(weight, None, modules[:1])
        ours = run_site(x, lower_merged, bias, modules[1:])
        assert max_error(ours, layer(x)) <= merge_tolerance(x, lower_merged, bias, modules[1:])
        expected[name] = fold_site(weight, bias, modules)[0]

    peft_model.base_model.merge_adapter(["default", "upper"])
    for name, merged in expected.items():
        base = getattr(peft_model.base_model.model, name).base_layer
        assert max_error(base.weight, merged) <= matmul_tolerance(torch.eye(24), merged, torch.float32)

# ---- whole model ---------------------------------------------------------------------------

@torch.no_grad()
def test_model_bat_checkpoint_round_trip_and_stack(tmp_path, traced_models):
    """A PEFT "bat" checkpoint loads, merges and saves back in PEFT's format; a "mini" adapter
    from the ready rule file stacks above it, unmerged or merged bottom-up."""
    traced = traced_models("tiny-llama")
    base = copy.deepcopy(traced.source)
    ids = torch.randint(0, 512, (2, 7), generator=torch.Generator().manual_seed(0))
    peft_model = peft.get_peft_model(copy.deepcopy(base), peft.MissConfig(target_modules=["q_proj", "v_proj"], r=16,
                                                                          init_weights="bat")).eval()
    for name, param in peft_model.named_parameters():
        if "miss_block" in name:
            param.copy_(torch.randn_like(param) * 0.2)
    expected = peft_model(input_ids=ids).logits
    tol = output_tolerance(expected, torch.float32, depth=base.config.num_hidden_layers)
    peft_model.save_pretrained(tmp_path / "peft")

    adapted = rewriter.load_adapter(Adapted(traced), tmp_path / "peft", low_cpu_mem_usage=True)
    assert max_error(adapted(input_ids=ids).logits, expected) <= tol
    adapted.save_adapter(tmp_path / "ours", format="peft")
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    assert max_error(reloaded(input_ids=ids).logits, expected) <= tol

    rules = RULES.read_text().replace("init_weights = true", 'init_weights = "mini"\nmini_r = 8')
    adapted.add_adapter(rules, "mini", activate=True)
    for module in adapted.adapters["mini"].modules.values():
        randomize(module, 0.05)
    assert adapted.active_adapters == ["default", "mini"]
    stacked = adapted(input_ids=ids).logits
    assert max_error(stacked, expected) > 0.01
    with pytest.raises(MergeError, match="does not commute"):
        adapted.merge(["mini"])  # would move mini below the unmerged bat
    adapted.merge(["default"])  # bat is the lowest: merging it first keeps the order
    assert max_error(adapted(input_ids=ids).logits, stacked) <= tol
    adapted.merge()
    assert max_error(adapted(input_ids=ids).logits, stacked) <= tol
