"""FourierFT: site-level properties (Hypothesis) and layer-level parity with PEFT 0.21.2."""
from __future__ import annotations

import copy

import peft
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from transformers.pytorch_utils import Conv1D

import rewriter
from rewriter.errors import ConfigError
from rewriter.core.graph import fold_site, run_site
from rewriter.methods import get_method
from rewriter.adapted import Adapted
from rewriter.rules import load_rules
from rewriter.testing import make_site
from rewriter.core.tolerance import output_tolerance
from shared import (DTYPES, RULES_DIR, assert_config_fields_are_peft_fields, assert_gradients_reach_every_parameter,
                    assert_merged_like_peft, build_module, config_error, config_from_peft, load_peft_layer, max_error,
                    merge_tolerance, seeded_site_tensors, stack_of, targets)

SPEC = get_method("fourierft")
RULES = RULES_DIR / "fourierft-llama.toml"


# ---- site-level properties -----------------------------------------------------------------

@st.composite
def cases(draw):
    in_features, out_features = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    numel = in_features * out_features
    return dict(
        in_features=in_features, out_features=out_features, dtype=draw(st.sampled_from(DTYPES)),
        n_frequency=draw(st.integers(1, min(numel, 80))), second_n=draw(st.integers(1, min(numel, 80))),
        scaling=draw(st.sampled_from([1.0, 150.0, -37.5])), loc_seed=draw(st.integers(0, 2**63 - 1)),
        seed=draw(st.integers(0, 2**31 - 1)), batch=draw(st.sampled_from([(3,), (2, 5)])),
        bias=draw(st.booleans()), conv1d=draw(st.booleans()), lora_r=draw(st.integers(1, 6)),
        stack=draw(st.sampled_from(["single", "twice", "lora_below", "lora_above"])))


def setup(case):
    site, x, weight, bias = seeded_site_tensors(case, op="conv1d" if case["conv1d"] else "linear")
    fourier = build_module("fourierft", site, n_frequency=case["n_frequency"], scaling=case["scaling"],
                           random_loc_seed=case["loc_seed"])
    second = build_module("fourierft", site, n_frequency=case["second_n"], scaling=90.0,
                          random_loc_seed=case["seed"])
    lora = build_module("lora", site, r=case["lora_r"], init_lora_weights=False)
    return site, x, weight, bias, stack_of(case["stack"], fourier, second, lora)


def in_site_layout(site, weight):
    return weight.t().contiguous() if site.fan_in_fan_out else weight


@given(cases())
def test_forward_equals_fold(case):
    site, x, weight, bias, modules = setup(case)
    layout = in_site_layout(site, weight)
    with torch.no_grad():
        unmerged = run_site(x, layout, bias, modules, fan_in_fan_out=site.fan_in_fan_out)
        merged_w, merged_b = fold_site(layout, bias, modules, fan_in_fan_out=site.fan_in_fan_out)
        merged_w = merged_w.t() if site.fan_in_fan_out else merged_w
        merged = F.linear(x, merged_w, merged_b)
    assert unmerged.dtype == merged.dtype == x.dtype
    assert max_error(unmerged, merged) <= merge_tolerance(x, weight, bias, modules)


@given(cases())
def test_zero_spectrum_is_exact_identity(case):
    site, x, weight, bias, _ = setup(case)
    module = build_module("fourierft", site, n_frequency=case["n_frequency"], init_weights=True)
    assert not module.fourierft_spectrum.any()
    with torch.no_grad():
        assert torch.equal(run_site(x, weight, bias, [module]), F.linear(x, weight, bias))
        assert torch.equal(fold_site(weight, bias, [module])[0], weight)


@given(cases())
def test_gradients_reach_only_the_spectrum(case):
    site, x, weight, bias, modules = setup(case)
    fourier = modules[0] if case["stack"] != "lora_below" else modules[1]
    assert [name for name, _ in fourier.named_parameters()] == ["fourierft_spectrum"]
    assert not fourier.indices.is_floating_point() and not fourier.indices.requires_grad
    assert_gradients_reach_every_parameter(x, weight, bias, modules, fourier, "fourierft_spectrum")


@st.composite
def spectral_cases(draw):
    in_features, out_features = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    return dict(in_features=in_features, out_features=out_features, dtype=torch.float32,
                n_frequency=draw(st.integers(1, min(in_features * out_features, 80))),
                scaling=draw(st.sampled_from([1.0, 150.0, -37.5])), loc_seed=draw(st.integers(0, 2**63 - 1)),
                seed=draw(st.integers(0, 2**31 - 1)), batch=draw(st.sampled_from([(3,), (2, 5), (1, 1)])),
                bias=draw(st.booleans()), train_bias=draw(st.booleans()), train_weight=draw(st.booleans()))


def spectral_backward_of(y) -> bool:
    """y comes from _SpectralLinear (reshaped to the input's batch shape)."""
    fn = y.grad_fn
    while fn is not None and type(fn).__name__ == "ViewBackward0":
        fn = fn.next_functions[0][0]
    return fn is not None and type(fn).__name__ == "_SpectralLinearBackward"


@given(spectral_cases())
def test_the_spectral_backward_gives_autograds_gradients(case):
    """Training's FFT-based spectrum gradient (_SpectralLinear) equals autograd's through the dense ΔW,
    for every input, bias and weight gradient, on any shape (odd sizes fold their mirrors differently)."""
    site, x, weight, bias = seeded_site_tensors(case)
    module = build_module("fourierft", site, n_frequency=case["n_frequency"], scaling=case["scaling"],
                          random_loc_seed=case["loc_seed"])
    module.spectral_backward = True
    grad_out = torch.randn(*case["batch"], site.out_features)
    runs = []
    for spectral in (True, False):
        leaves = [x.clone().requires_grad_(), weight.clone().requires_grad_(case["train_weight"]),
                  None if bias is None else bias.clone().requires_grad_(case["train_bias"])]
        module.zero_grad()
        if spectral:
            y = module.post(leaves[0], None, leaves[2], weight=leaves[1])
            assert spectral_backward_of(y)
        else:
            y = F.linear(leaves[0], leaves[1] + module.delta_weight(), leaves[2])
        y.backward(grad_out)
        runs.append((y.detach(), module.fourierft_spectrum.grad.clone(),
                     *[None if t is None or t.grad is None else t.grad for t in leaves]))
    # rounding is at most a few ulps of the sum of |terms|: |s| / (out in) sum_t |g_t|_1 |x_t|_1 per entry
    g2, x2 = grad_out.reshape(-1, site.out_features), x.reshape(-1, site.in_features)
    terms = abs(case["scaling"]) / (site.out_features * site.in_features) * (g2.abs().sum(1) * x2.abs().sum(1)).sum()
    eps = torch.finfo(torch.float32).eps
    assert torch.equal(runs[0][0], runs[1][0])
    assert max_error(runs[0][1], runs[1][1]) <= 64 * eps * terms
    for ours, dense in zip(runs[0][2:], runs[1][2:]):
        assert (ours is None) == (dense is None)
        if ours is not None:
            assert torch.allclose(ours, dense, rtol=16 * eps, atol=16 * eps * float(dense.abs().max()))


def test_training_uses_the_spectral_backward_only_where_it_pays():
    large = build_module("fourierft", make_site(512, 1376), n_frequency=1000)
    small = build_module("fourierft", make_site(512, 512), n_frequency=1000)
    assert large.spectral_backward and not small.spectral_backward
    x, weight = torch.randn(2, 4, 512, requires_grad=True), torch.randn(1376, 512)
    assert spectral_backward_of(large.post(x, None, None, weight=weight))
    with torch.no_grad():  # inference: the plain matmul, nothing saved for a backward
        assert large.post(x, None, None, weight=weight).grad_fn is None
    large.fourierft_spectrum.requires_grad_(False)
    assert not spectral_backward_of(large.post(x, None, None, weight=weight))
    assert not spectral_backward_of(small.post(x[..., :512], None, None, weight=torch.randn(512, 512)))


def test_adapter_parameters_are_float32_and_rounded_like_the_base():
    torch.manual_seed(0)
    module = build_module("fourierft", make_site(16, 8, dtype=torch.bfloat16), n_frequency=40)
    spectrum = module.fourierft_spectrum
    assert spectrum.dtype == torch.float32
    assert torch.equal(spectrum, spectrum.to(torch.bfloat16).float())
    assert spectrum.std() > 0.5  # init_weights=False (PEFT's default): standard normal


def test_locations_are_shared_by_layers_of_one_shape_and_follow_the_seed():
    site = make_site(12, 10, dtype=torch.float32)
    a, b = build_module("fourierft", site, n_frequency=30), build_module("fourierft", site, n_frequency=30)
    c = build_module("fourierft", site, n_frequency=30, random_loc_seed=1)
    assert torch.equal(a.indices, b.indices) and not torch.equal(a.indices, c.indices)
    assert a.indices.unique().numel() == 30 and 0 <= a.indices.min() and a.indices.max() < 120
    assert set(a.state_dict()) == {"fourierft_spectrum"}  # locations are regenerated, never saved


# ---- config validation ---------------------------------------------------------------------

@pytest.mark.parametrize("params, field", [
    ({"n_frequency": 0}, "n_frequency"),
    ({"n_frequency": 2.5}, "n_frequency"),
    ({"n_frequency": True}, "n_frequency"),
    ({"scaling": "high"}, "scaling"),
    ({"random_loc_seed": None}, "random_loc_seed"),
    ({"random_loc_seed": 2**64}, "random_loc_seed"),
    ({"init_weights": "zeros"}, "init_weights"),
    ({"bias": "lora_only"}, "bias"),
    ({"fan_in_fan_out": 1}, "fan_in_fan_out"),
])
def test_config_rejects_bad_values(params, field):
    error = config_error(lambda: SPEC.make_config(params))
    assert error.field == field
    assert field in str(error)


def test_aliases_and_unknown_keys():
    assert SPEC.make_config({"n": 10, "seed": 3, "init": True}) == SPEC.config_cls(
        n_frequency=10, random_loc_seed=3, init_weights=True)
    with pytest.raises(ConfigError, match="n_frequncy"):
        SPEC.make_config({"n_frequncy": 10})


def test_n_frequency_larger_than_the_layer_names_site_and_sizes():
    site = make_site(6, 4, dtype=torch.float32, name="model.layers.3.mlp.down_proj")
    build_module("fourierft", site, n_frequency=24)  # exactly in*out is allowed
    error = config_error(lambda: build_module("fourierft", site, n_frequency=25))
    message = str(error)
    assert "model.layers.3.mlp.down_proj" in message and "25" in message and "24" in message
    assert error.field == "n_frequency"


def test_config_fields_are_peft_fields():
    assert_config_fields_are_peft_fields(SPEC, peft.FourierFTConfig, {
        "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern", "modules_to_save",
        "n_frequency_pattern"})


def test_rule_file_loads():
    ruleset = load_rules(RULES)
    assert ruleset.method == "fourierft"
    assert targets(ruleset, "model.layers.7.self_attn.v_proj")
    assert not targets(ruleset, "model.layers.7.self_attn.k_proj")


# ---- parity with PEFT 0.21.2 ---------------------------------------------------------------

class TinyAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(24, 16)
        self.v_proj = nn.Linear(24, 20, bias=False)
        self.c_proj = Conv1D(12, 24)  # GPT-2 layout: weight [in=24, out=12]

    def forward(self, x):
        return self.q_proj(x), self.v_proj(x), self.c_proj(x)


@pytest.mark.parametrize("dtype", DTYPES)
def test_parity_with_peft(dtype):
    torch.manual_seed(0)
    model = TinyAttention().to(dtype)
    config = peft.FourierFTConfig(target_modules=["q_proj", "v_proj", "c_proj"], n_frequency=60, scaling=150.0,
                                  random_loc_seed=4321)
    peft_model = peft.get_peft_model(model, config)
    state = peft.get_peft_model_state_dict(peft_model)
    x = torch.randn(3, 5, 24).to(dtype)

    expected = {}
    for name in ("q_proj", "v_proj", "c_proj"):
        layer = getattr(peft_model.base_model.model, name)
        conv1d = isinstance(layer.base_layer, Conv1D)
        layout = layer.base_layer.weight.detach().clone()
        weight = layout.t() if conv1d else layout  # [out, in]
        bias = layer.base_layer.bias.detach().clone() if layer.base_layer.bias is not None else None
        site = make_site(weight.shape[1], weight.shape[0], dtype=dtype, name=name,
                         op="conv1d" if conv1d else "linear")
        module = SPEC.module_cls(site, config_from_peft(SPEC, config))
        saved = load_peft_layer(module, SPEC, state, name)
        assert len(saved) == len(module.state_dict())
        assert module.fourierft_spectrum.dtype == torch.float32

        rows, cols = layer.indices["default"]
        assert torch.equal(module.indices, rows * site.in_features + cols)
        with torch.no_grad():
            ours = run_site(x, layout, bias, [module], fan_in_fan_out=conv1d)
            theirs = layer(x)
        assert ours.dtype == theirs.dtype == dtype
        assert max_error(ours, theirs) <= merge_tolerance(x, weight, bias, [module])
        expected[name] = fold_site(layout, bias, [module], fan_in_fan_out=conv1d)

    peft_model.merge_adapter()
    assert_merged_like_peft(peft_model, expected, dtype)


# ---- whole model ---------------------------------------------------------------------------

@torch.no_grad()
def test_model_peft_checkpoint_round_trip(tmp_path, traced_models):
    """A PEFT checkpoint (spectra only) loads onto meta-built modules, merges, and saves back
    in PEFT's format with the same outputs."""
    traced = traced_models("tiny-llama")
    base = copy.deepcopy(traced.source)
    ids = torch.randint(0, 512, (2, 7), generator=torch.Generator().manual_seed(0))
    config = peft.FourierFTConfig(target_modules=["q_proj", "v_proj"], n_frequency=200, scaling=300.0,
                                  random_loc_seed=99)
    peft_model = peft.get_peft_model(copy.deepcopy(base), config).eval()
    expected = peft_model(input_ids=ids).logits
    assert max_error(expected, base(input_ids=ids).logits) > 0.1  # a random spectrum changes the model
    tol = output_tolerance(expected, torch.float32, depth=base.config.num_hidden_layers)
    peft_model.save_pretrained(tmp_path / "peft")

    adapted = rewriter.load_adapter(Adapted(traced), tmp_path / "peft", low_cpu_mem_usage=True)
    unmerged = adapted(input_ids=ids).logits
    assert max_error(unmerged, expected) <= tol
    adapted.merge()
    assert max_error(adapted(input_ids=ids).logits, expected) <= tol
    adapted.unmerge()
    assert torch.equal(adapted(input_ids=ids).logits, unmerged)

    adapted.save_adapter(tmp_path / "ours", format="peft")
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    assert max_error(reloaded(input_ids=ids).logits, expected) <= tol
