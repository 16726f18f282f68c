"""LoRA at one site: properties over random shapes, ranks, dtypes, seeds and stacks."""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st

from rewriter import ConfigError, get_method
from rewriter.core.graph import fold_site, run_site
from rewriter.testing import make_site, site_merge_error

LORA = get_method("lora")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def lora(site, **params):
    params.setdefault("init", False)  # non-trivial: both factors random
    return LORA.module_cls(site, LORA.make_config(params))


@st.composite
def setups(draw, stacked=st.integers(1, 3)):
    in_f, out_f = draw(st.integers(1, 48)), draw(st.integers(1, 48))
    dtype = draw(st.sampled_from(DTYPES))
    torch.manual_seed(draw(st.integers(0, 2**16)))
    site = make_site(in_f, out_f, dtype=dtype, bias=draw(st.booleans()))
    modules = [lora(site, r=draw(st.integers(1, 8)), alpha=draw(st.sampled_from([1, 8, 16, 32])),
                    rslora=draw(st.booleans()), lora_bias=draw(st.booleans()) and site.bias is not None)
               for _ in range(draw(stacked))]
    weight = torch.randn(out_f, in_f).to(dtype)
    bias = torch.randn(out_f).to(dtype) if site.bias else None
    x = torch.randn(draw(st.integers(1, 3)), draw(st.integers(1, 5)), in_f).to(dtype)
    return site, modules, weight, bias, x


@given(setups())
def test_merged_equals_unmerged_within_derived_tolerance(setup):
    site, modules, weight, bias, x = setup
    err, tol = site_merge_error(x, weight, bias, modules)
    assert err <= tol


@given(setups(stacked=st.just(1)))
def test_unmerged_output_is_the_lora_formula(setup):
    site, (m,), weight, bias, x = setup
    y = run_site(x, weight, bias, [m])
    xf = x.float()
    delta = (xf @ m.lora_A.t() @ m.lora_B.t() + (m.lora_B_bias if m.lora_B_bias is not None else 0)) * m.scaling
    expected = (F.linear(x, weight, bias).float() + delta).to(x.dtype)  # fp32 sum, one rounding (as PEFT)
    assert torch.equal(y, expected) or (y.float() - expected.float()).abs().max() <= \
        2 * torch.finfo(x.dtype).eps * expected.float().abs().max()
    scale = m.config.lora_alpha / (math.sqrt(m.config.r) if m.config.use_rslora else m.config.r)
    assert m.scaling == scale


@given(st.integers(1, 32), st.integers(1, 32), st.integers(1, 8), st.sampled_from(DTYPES), st.sampled_from([True, "gaussian"]))
def test_default_init_is_an_exact_no_op(in_f, out_f, r, dtype, init):
    site = make_site(in_f, out_f, dtype=dtype)
    m = lora(site, r=r, init=init)
    weight, bias, x = torch.randn(out_f, in_f).to(dtype), torch.randn(out_f).to(dtype), torch.randn(4, in_f).to(dtype)
    assert torch.equal(run_site(x, weight, bias, [m]), F.linear(x, weight, bias))
    w, b = fold_site(weight, bias, [m])
    assert torch.equal(w, weight) and torch.equal(b, bias)


@given(setups(stacked=st.integers(1, 2)))
def test_only_adapter_parameters_get_gradients(setup):
    site, modules, weight, bias, x = setup
    weight.requires_grad_(False)
    run_site(x, weight, bias, modules).float().sum().backward()
    for m in modules:
        assert m.lora_A.grad is not None and m.lora_B.grad is not None
    assert weight.grad is None


def test_stacked_adapters_sum_their_deltas():
    site = make_site(16, 12)
    a, b = lora(site, r=2), lora(site, r=3)
    weight, x = torch.randn(12, 16), torch.randn(5, 16)
    both = run_site(x, weight, None, [a, b])
    assert torch.allclose(both, run_site(x, weight, None, [a]) + run_site(x, weight, None, [b]) - F.linear(x, weight),
                          atol=1e-5)


def test_dropout_follows_train_and_eval():
    site = make_site(64, 64)
    m = lora(site, r=4, dropout=0.5)
    weight, x = torch.randn(64, 64), torch.randn(8, 64)
    m.eval()
    assert torch.equal(run_site(x, weight, None, [m]), run_site(x, weight, None, [m]))
    m.train()
    assert not torch.equal(run_site(x, weight, None, [m]), run_site(x, weight, None, [m]))


@pytest.mark.parametrize("params, field", [({"r": 0}, "r"), ({"r": 2.5}, "r"), ({"lora_dropout": 1.0}, "lora_dropout"),
                                           ({"bias": "some"}, "bias"), ({"init_lora_weights": "pissa"},
                                                                        "init_lora_weights")])
def test_bad_config_names_the_field(params, field):
    with pytest.raises(ConfigError) as info:
        LORA.make_config(params)
    assert info.value.field == field
