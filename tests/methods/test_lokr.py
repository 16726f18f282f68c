"""LoKr: site-level properties, PEFT's factorization and shapes, layer- and model-level parity with
PEFT 0.21.2, the rule file."""
from __future__ import annotations

import peft
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from peft.tuners.lokr.layer import factorization as peft_factorization
from torch import nn

from rewriter.core.graph import run_site
from rewriter.methods import get_method
from rewriter.methods.lokr import LoKrConfig, LoKrModule, factorization
from rewriter.testing import make_site
from shared import (LLAMA_NAMES, assert_additive_forward_equals_fold, assert_dropout_draws_match_peft,
                    assert_dropouts_are_no_ops_in_eval, assert_exact_noop, assert_layers_match_peft,
                    assert_only_adapter_gets_gradients, assert_peft_round_trip_on_decoder, base_layer,
                    build_lycoris_stack, config_error, lycoris_cases, peft_twins, ready_llama_rules, site_tolerance)

SPEC = get_method("lokr")


def cases():
    return lycoris_cases(max_features=64, decompose_both=st.booleans(),
                         decompose_factor=st.sampled_from([-1, 1, 2, 3, 4, 8]))


def config_of(case, **overrides) -> LoKrConfig:
    return LoKrConfig(r=case["r"], alpha=case["alpha"], decompose_both=case["decompose_both"],
                      decompose_factor=case["decompose_factor"], **{"init_weights": False, **overrides})


def build(case, stack: str):
    """Base weights and a stack of non-trivial adapters, bottom to top."""
    return build_lycoris_stack(case, stack, lambda site: LoKrModule(site, config_of(case)))


# ---- factorization and shapes -------------------------------------------------------------------

def test_factorization_matches_peft_and_reference_examples():
    for dim in range(1, 400):
        for factor in (-1, 1, 2, 3, 4, 5, 7, 8, 16, 50, 1000):
            assert factorization(dim, factor) == peft_factorization(dim, factor), (dim, factor)
    examples = {(16, -1): (4, 4), (24, -1): (4, 6), (768, -1): (24, 32), (4096, -1): (64, 64),
                (11008, -1): (86, 128), (127, -1): (1, 127), (30, 4): (3, 10), (64, 16): (16, 4), (8, 4): (4, 2)}
    for args, expected in examples.items():
        assert factorization(*args) == expected


# (in, out, r, decompose_both, decompose_factor): every factor form, unsorted factors, prime sizes
SHAPE_CASES = [
    (16, 24, 4, False, -1),   # w1 full, w2 full (reference §4.4 example)
    (48, 40, 2, False, -1),   # w1 full, w2 = w2_a @ w2_b
    (48, 40, 1, True, -1),    # both low rank
    (64, 64, 2, True, 16),    # w1 low rank, w2 full; factorization (16, 4) unsorted
    (64, 7, 4, False, -1),    # prime out: W1 is [1, 8], contracted first
    (30, 13, 8, False, 4),    # factor not dividing: 30 -> (3, 10), 13 -> (1, 13)
]


def test_shape_cases_cover_every_form_and_both_contraction_orders():
    modules = [LoKrModule(make_site(i, o), LoKrConfig(r=r, decompose_both=both, decompose_factor=f))
               for i, o, r, both, f in SHAPE_CASES]
    forms = {(m.lokr_w1 is not None, m.lokr_w2 is not None) for m in modules}
    assert forms == {(True, True), (True, False), (False, False), (False, True)}
    assert {m.w2_first for m in modules} == {True, False}
    assert dict(modules[0].named_parameters())["lokr_w1"].shape == (4, 4)
    assert dict(modules[0].named_parameters())["lokr_w2"].shape == (6, 4)


# ---- site-level properties --------------------------------------------------------------------

@given(case=cases())
def test_forward_equals_fold(case):
    x, weight, bias, modules = build(case, case["stack"])
    assert_additive_forward_equals_fold(x, weight, bias, modules, case["dtype"])


@given(case=cases(), init_weights=st.sampled_from([True, "lycoris"]))
def test_default_inits_are_exactly_the_base(case, init_weights):
    x, weight, bias, (lora, _) = build(case, "lora_below")
    noop = LoKrModule(make_site(case["in_f"], case["out_f"], dtype=case["dtype"]),
                      config_of(case, init_weights=init_weights))
    assert_exact_noop(x, weight, bias, lora, noop)


@given(case=cases())
def test_only_adapter_parameters_get_gradients(case):
    x, weight, bias, (frozen_lora, lokr) = build(case, "lora_below")
    assert_only_adapter_gets_gradients(x, weight, bias, frozen_lora, lokr)


@given(case=cases())
def test_dropouts_are_no_ops_in_eval(case):
    assert_dropouts_are_no_ops_in_eval(case, build, rank_dropout=0.5, module_dropout=0.5, rank_dropout_scale=True)


def test_rank_dropout_without_scale_keeps_rows_unscaled():
    site = make_site(12, 8)
    module = LoKrModule(site, LoKrConfig(r=2, rank_dropout=0.5, init_weights=False)).train()
    weight, bias = base_layer(12, 8, False, torch.float32)
    x = torch.randn(3, 12)
    full_delta = run_site(x, weight, bias, [module.eval()]) - F.linear(x, weight, bias)
    torch.manual_seed(3)
    delta = run_site(x, weight, bias, [module.train()]) - F.linear(x, weight, bias)
    kept = delta.abs().sum(0) > 0
    assert 0 < kept.sum() < 8  # some rows dropped, some kept
    tol = site_tolerance(x, weight, bias, [module], torch.float32)
    assert (delta[:, kept] - full_delta[:, kept]).abs().max().item() <= tol


@pytest.mark.parametrize("field, value", [
    ("r", 0), ("r", 2.5), ("alpha", "8"), ("rank_dropout", 1.0), ("module_dropout", -0.5),
    ("use_effective_conv2d", 1), ("decompose_both", "no"), ("decompose_factor", 0), ("decompose_factor", -2),
    ("decompose_factor", 2.0), ("rank_dropout_scale", None), ("init_weights", "gaussian"), ("init_weights", 1),
])
def test_config_validation(field, value):
    error = config_error(lambda: LoKrConfig(**{field: value}))
    assert error.field == field and field in str(error)


def test_rule_parameters_and_aliases():
    cfg = SPEC.make_config({"r": 4, "alpha": 2, "init": "lycoris", "factor": 8})
    assert cfg == LoKrConfig(r=4, alpha=2, init_weights="lycoris", decompose_factor=8) and cfg.scaling == 0.5


# ---- parity with PEFT 0.21.2 --------------------------------------------------------------------

def peft_pair(dtype, in_f, out_f, r, **options):
    """A PEFT-adapted pair of layers and our modules loaded from PEFT's saved tensors."""
    model = nn.Module()
    model.q_proj, model.v_proj = nn.Linear(in_f, out_f, bias=True), nn.Linear(in_f, out_f, bias=False)
    options = {"init_weights": False, "alpha": 6, **options}
    config = peft.LoKrConfig(target_modules=["q_proj", "v_proj"], r=r, **options)
    return peft_twins(model.to(dtype), config, SPEC, LoKrConfig(r=r, **options))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("in_f, out_f, r, decompose_both, decompose_factor", SHAPE_CASES)
def test_matches_peft_forward_and_merge(dtype, in_f, out_f, r, decompose_both, decompose_factor):
    torch.manual_seed(in_f * out_f + r)
    peft_model, base, ours = peft_pair(dtype, in_f, out_f, r, decompose_both=decompose_both,
                                       decompose_factor=decompose_factor)
    assert_layers_match_peft(peft_model, base, ours, torch.randn(3, 5, in_f).to(dtype), dtype)


@pytest.mark.parametrize("rank_dropout_scale", [False, True])
def test_matches_peft_training_dropouts_draw_for_draw(rank_dropout_scale):
    torch.manual_seed(0)
    peft_model, base, ours = peft_pair(torch.float32, 48, 40, 2, rank_dropout=0.5, module_dropout=0.3,
                                       rank_dropout_scale=rank_dropout_scale)
    assert_dropout_draws_match_peft(peft_model, base, ours)


@pytest.mark.parametrize("init_weights", [True, False, "lycoris"])
@pytest.mark.parametrize("decompose_both", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_seeded_init_matches_peft(init_weights, decompose_both, dtype):
    model = nn.Sequential()
    model.q_proj = nn.Linear(48, 40).to(dtype)
    config = dict(r=1, decompose_both=decompose_both, init_weights=init_weights)
    torch.manual_seed(7)
    peft_model = peft.get_peft_model(model, peft.LoKrConfig(target_modules=["q_proj"], **config))
    torch.manual_seed(7)
    module = LoKrModule(make_site(48, 40, dtype=dtype), LoKrConfig(**config))
    saved = peft.get_peft_model_state_dict(peft_model)
    ours = module.state_dict()
    assert {SPEC.peft_keys[k.rpartition("q_proj.")[2]] for k in saved} == set(ours)
    for key, name in SPEC.peft_keys.items():
        if name in ours:
            assert torch.equal(saved[f"base_model.model.q_proj.{key}"], ours[name]), key


# ---- whole model: rule file, PEFT checkpoint round trip, merge ----------------------------------

def test_rule_file_targets_llama_projections():
    ruleset, targeted = ready_llama_rules("lokr")
    assert ruleset.method == "lokr"
    assert SPEC.make_config(ruleset.params) == LoKrConfig(r=8, alpha=8)
    assert targeted == [n for n in LLAMA_NAMES if n != "lm_head"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_peft_checkpoint_round_trip_on_a_model(tmp_path, dtype):
    assert_peft_round_trip_on_decoder(tmp_path, dtype, peft.LoKrConfig)
