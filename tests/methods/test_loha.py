"""LoHa: site-level properties, layer- and model-level parity with PEFT 0.21.2, the rule file."""
from __future__ import annotations

import peft
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from torch import nn

from rewriter.errors import ConfigError
from rewriter.core.graph import run_site
from rewriter.methods import get_method
from rewriter.methods.loha import LoHaConfig, LoHaModule
from rewriter.testing import make_site
from shared import (LLAMA_NAMES, assert_additive_forward_equals_fold, assert_dropout_draws_match_peft,
                    assert_dropouts_are_no_ops_in_eval, assert_exact_noop, assert_layers_match_peft,
                    assert_only_adapter_gets_gradients, assert_peft_round_trip_on_decoder, base_layer,
                    build_lycoris_stack, config_error, lycoris_cases, peft_twins, ready_llama_rules)

SPEC = get_method("loha")


def cases():
    return lycoris_cases(max_features=40)


def build(case, stack: str):
    """Base weights and a stack of non-trivial adapters, bottom to top."""
    cfg = LoHaConfig(r=case["r"], alpha=case["alpha"], init_weights=False)
    return build_lycoris_stack(case, stack, lambda site: LoHaModule(site, cfg))


# ---- site-level properties --------------------------------------------------------------------

@given(case=cases())
def test_forward_equals_fold(case):
    x, weight, bias, modules = build(case, case["stack"])
    assert_additive_forward_equals_fold(x, weight, bias, modules, case["dtype"])


@given(case=cases())
def test_default_init_is_exactly_the_base(case):
    x, weight, bias, (lora, _) = build(case, "lora_below")
    noop = LoHaModule(make_site(case["in_f"], case["out_f"], dtype=case["dtype"]), LoHaConfig(r=case["r"]))
    assert_exact_noop(x, weight, bias, lora, noop)


@given(case=cases())
def test_only_adapter_parameters_get_gradients(case):
    x, weight, bias, (frozen_lora, loha) = build(case, "lora_below")
    assert_only_adapter_gets_gradients(x, weight, bias, frozen_lora, loha)


def test_factored_and_dense_forms_both_used():
    assert LoHaModule(make_site(48, 40), LoHaConfig(r=4)).factored
    assert not LoHaModule(make_site(48, 40), LoHaConfig(r=6)).factored


@given(case=cases())
def test_dropouts_are_no_ops_in_eval(case):
    assert_dropouts_are_no_ops_in_eval(case, build, rank_dropout=0.5, module_dropout=0.5)


def test_module_dropout_in_training_skips_the_whole_adapter():
    site = make_site(12, 10)
    module = LoHaModule(site, LoHaConfig(r=2, module_dropout=0.5, init_weights=False)).train()
    weight, bias = base_layer(12, 10, True, torch.float32)
    x = torch.randn(3, 12)
    base, full = F.linear(x, weight, bias), run_site(x, weight, bias, [module.eval()])
    outcomes = set()
    for seed in range(20):
        torch.manual_seed(seed)
        y = run_site(x, weight, bias, [module.train()])
        outcomes.add("base" if torch.equal(y, base) else "full" if torch.equal(y, full) else "other")
    assert outcomes == {"base", "full"}


def test_rank_dropout_dropping_every_row_gives_zero_update_not_nan():
    site = make_site(6, 4)
    module = LoHaModule(site, LoHaConfig(r=2, rank_dropout=0.999999, init_weights=False)).train()
    weight, bias = base_layer(6, 4, False, torch.float32)
    x = torch.randn(2, 6)
    torch.manual_seed(0)
    assert torch.equal(run_site(x, weight, bias, [module]), F.linear(x, weight, bias))


@pytest.mark.parametrize("field, value", [
    ("r", 0), ("r", 2.5), ("r", True), ("alpha", "8"), ("alpha", None), ("rank_dropout", 1.0),
    ("rank_dropout", -0.1), ("module_dropout", 1.5), ("use_effective_conv2d", "yes"), ("init_weights", "gaussian"),
    ("init_weights", 1),
])
def test_config_validation(field, value):
    error = config_error(lambda: LoHaConfig(**{field: value}))
    assert error.field == field and field in str(error)


def test_rule_parameters_and_aliases():
    cfg = SPEC.make_config({"r": 4, "alpha": 2, "init": False})
    assert cfg == LoHaConfig(r=4, alpha=2, init_weights=False) and cfg.scaling == 0.5
    with pytest.raises(ConfigError, match="did you mean 'rank_dropout'"):
        SPEC.make_config({"rank_dropuot": 0.1})


# ---- parity with PEFT 0.21.2 --------------------------------------------------------------------

class TinyAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(48, 40, bias=True)
        self.v_proj = nn.Linear(48, 36, bias=False)


def peft_pair(dtype, r, **options):
    """A PEFT-adapted TinyAttention and our modules loaded from PEFT's saved tensors."""
    config = peft.LoHaConfig(target_modules=["q_proj", "v_proj"], r=r, alpha=6, init_weights=False, **options)
    return peft_twins(TinyAttention().to(dtype), config, SPEC, LoHaConfig(r=r, alpha=6, **options))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("r", [2, 6])  # factored and dense forward
def test_matches_peft_forward_and_merge(dtype, r):
    torch.manual_seed(r)
    peft_model, base, ours = peft_pair(dtype, r)
    assert_layers_match_peft(peft_model, base, ours, torch.randn(3, 5, 48).to(dtype), dtype)


def test_matches_peft_training_dropouts_draw_for_draw():
    torch.manual_seed(0)
    peft_model, base, ours = peft_pair(torch.float32, 3, rank_dropout=0.5, module_dropout=0.3)
    assert_dropout_draws_match_peft(peft_model, base, ours)


@pytest.mark.parametrize("init_weights", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_seeded_init_matches_peft(init_weights, dtype):
    model = nn.Sequential()
    model.q_proj = nn.Linear(20, 12).to(dtype)
    torch.manual_seed(7)
    peft_model = peft.get_peft_model(model, peft.LoHaConfig(target_modules=["q_proj"], r=3, init_weights=init_weights))
    torch.manual_seed(7)
    module = LoHaModule(make_site(20, 12, dtype=dtype), LoHaConfig(r=3, init_weights=init_weights))
    saved = peft.get_peft_model_state_dict(peft_model)
    for key, name in SPEC.peft_keys.items():
        assert torch.equal(saved[f"base_model.model.q_proj.{key}"], getattr(module, name)), key


# ---- whole model: rule file, PEFT checkpoint round trip, merge ----------------------------------

def test_rule_file_targets_llama_projections():
    ruleset, targeted = ready_llama_rules("loha")
    assert ruleset.method == "loha"
    assert SPEC.make_config(ruleset.params) == LoHaConfig(r=8, alpha=8)
    assert targeted == [n for n in LLAMA_NAMES if "self_attn" in n]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_peft_checkpoint_round_trip_on_a_model(tmp_path, dtype):
    assert_peft_round_trip_on_decoder(tmp_path, dtype, peft.LoHaConfig)
