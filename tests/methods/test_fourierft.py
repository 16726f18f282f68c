"""FourierFT: site-level properties (Hypothesis) and layer-level parity with PEFT 0.21.2."""
from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path

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
from rewriter.graph import fold_site, run_site
from rewriter.methods import get_method
from rewriter.adapted import Adapted
from rewriter.testing import make_site, site_merge_error
from rewriter.tolerance import matmul_tolerance, output_tolerance

SPEC = get_method("fourierft")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
RULES = Path(__file__).resolve().parents[2] / "rules" / "fourierft-llama.toml"


def build(method, site, **params):
    spec = get_method(method)
    return spec.module_cls(site, spec.make_config(params))


def tolerance(x, weight, bias, modules):
    """The house tolerance for one site (``weight [out, in]``): matmul_tolerance over the
    magnitudes of every term the two computations add up."""
    return site_merge_error(x, weight, bias, modules)[1]


def max_err(a, b):
    return (a.float() - b.float()).abs().max().item()


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
    torch.manual_seed(case["seed"])
    in_f, out_f, dtype = case["in_features"], case["out_features"], case["dtype"]
    site = make_site(in_f, out_f, dtype=dtype, op="conv1d" if case["conv1d"] else "linear")
    weight = (torch.randn(out_f, in_f) / math.sqrt(in_f)).to(dtype)  # [out, in]
    bias = (torch.randn(out_f) * 0.1).to(dtype) if case["bias"] else None
    x = torch.randn(*case["batch"], in_f).to(dtype)
    fourier = build("fourierft", site, n_frequency=case["n_frequency"], scaling=case["scaling"],
                    random_loc_seed=case["loc_seed"])
    second = build("fourierft", site, n_frequency=case["second_n"], scaling=90.0, random_loc_seed=case["seed"])
    lora = build("lora", site, r=case["lora_r"], init_lora_weights=False)
    modules = {"single": [fourier], "twice": [fourier, second], "lora_below": [lora, fourier],
               "lora_above": [fourier, lora]}[case["stack"]]
    return site, x, weight, bias, modules


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
    assert max_err(unmerged, merged) <= tolerance(x, weight, bias, modules)


@given(cases())
def test_zero_spectrum_is_exact_identity(case):
    site, x, weight, bias, _ = setup(case)
    module = build("fourierft", site, n_frequency=case["n_frequency"], init_weights=True)
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
    run_site(x, weight, bias, modules).float().square().sum().backward()
    for module in modules:
        for name, param in module.named_parameters():
            assert param.grad is not None, name
            assert torch.isfinite(param.grad).all(), name
    assert fourier.fourierft_spectrum.grad.abs().sum() > 0
    fourier.fourierft_spectrum.grad = None
    fourier.fold(weight.float(), None)[0].sum().backward()  # the fold is differentiable too
    assert fourier.fourierft_spectrum.grad is not None


def test_adapter_parameters_are_float32_and_rounded_like_the_base():
    torch.manual_seed(0)
    module = build("fourierft", make_site(16, 8, dtype=torch.bfloat16), n_frequency=40)
    spectrum = module.fourierft_spectrum
    assert spectrum.dtype == torch.float32
    assert torch.equal(spectrum, spectrum.to(torch.bfloat16).float())
    assert spectrum.std() > 0.5  # init_weights=False (PEFT's default): standard normal


def test_locations_are_shared_by_layers_of_one_shape_and_follow_the_seed():
    site = make_site(12, 10, dtype=torch.float32)
    a, b = build("fourierft", site, n_frequency=30), build("fourierft", site, n_frequency=30)
    c = build("fourierft", site, n_frequency=30, random_loc_seed=1)
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
    with pytest.raises(ConfigError) as info:
        SPEC.make_config(params)
    assert info.value.field == field
    assert field in str(info.value)


def test_aliases_and_unknown_keys():
    assert SPEC.make_config({"n": 10, "seed": 3, "init": True}) == SPEC.config_cls(
        n_frequency=10, random_loc_seed=3, init_weights=True)
    with pytest.raises(ConfigError, match="n_frequncy"):
        SPEC.make_config({"n_frequncy": 10})


def test_n_frequency_larger_than_the_layer_names_site_and_sizes():
    site = make_site(6, 4, dtype=torch.float32, name="model.layers.3.mlp.down_proj")
    build("fourierft", site, n_frequency=24)  # exactly in*out is allowed
    with pytest.raises(ConfigError) as info:
        build("fourierft", site, n_frequency=25)
    message = str(info.value)
    assert "model.layers.3.mlp.down_proj" in message and "25" in message and "24" in message
    assert info.value.field == "n_frequency"


def test_config_fields_are_peft_fields():
    base = {f.name for f in dataclasses.fields(peft.PeftConfig)}
    targeting = {"target_modules", "exclude_modules", "layers_to_transform", "layers_pattern", "modules_to_save",
                 "n_frequency_pattern"}
    peft_fields = {f.name for f in dataclasses.fields(peft.FourierFTConfig)} - base - targeting
    assert set(SPEC.field_names()) == peft_fields
    ours, theirs = SPEC.config_cls(), peft.FourierFTConfig()
    assert all(getattr(ours, f) == getattr(theirs, f) for f in SPEC.field_names())  # same defaults


def test_rule_file_loads():
    from rewriter.rules import load_rules

    ruleset = load_rules(RULES)
    assert ruleset.method == "fourierft"
    assert any(rule.matches("model.layers.7.self_attn.v_proj") for rule in ruleset.rules)
    assert not any(rule.matches("model.layers.7.self_attn.k_proj") for rule in ruleset.rules)


# ---- parity with PEFT 0.21.2 ---------------------------------------------------------------

class TinyAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(24, 16)
        self.v_proj = nn.Linear(24, 20, bias=False)
        self.c_proj = Conv1D(12, 24)  # GPT-2 layout: weight [in=24, out=12]

    def forward(self, x):
        return self.q_proj(x), self.v_proj(x), self.c_proj(x)


def our_config(peft_config):
    return SPEC.make_config({name: getattr(peft_config, name) for name in SPEC.field_names()})


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
        module = SPEC.module_cls(site, our_config(config))

        saved = {key.removeprefix(f"base_model.model.{name}."): value for key, value in state.items()
                 if key.startswith(f"base_model.model.{name}.")}
        assert {SPEC.peft_keys[key] for key in saved} == set(module.state_dict())
        assert len(saved) == len(module.state_dict())
        module.load_state_dict({SPEC.peft_keys[key]: value for key, value in saved.items()}, strict=True)
        assert module.fourierft_spectrum.dtype == torch.float32

        rows, cols = layer.indices["default"]
        assert torch.equal(module.indices, rows * site.in_features + cols)
        with torch.no_grad():
            ours = run_site(x, layout, bias, [module], fan_in_fan_out=conv1d)
            theirs = layer(x)
        assert ours.dtype == theirs.dtype == dtype
        assert max_err(ours, theirs) <= tolerance(x, weight, bias, [module])
        expected[name] = fold_site(layout, bias, [module], fan_in_fan_out=conv1d)

    peft_model.merge_adapter()
    for name, (merged_w, merged_b) in expected.items():
        base = getattr(peft_model.base_model.model, name).base_layer
        conv1d = isinstance(base, Conv1D)
        as_out_in = (lambda w: w.t()) if conv1d else (lambda w: w)
        identity = torch.eye(as_out_in(merged_w).shape[1])
        assert base.weight.dtype == merged_w.dtype == dtype
        assert max_err(base.weight, merged_w) <= matmul_tolerance(identity, as_out_in(merged_w).float(), dtype)
        assert (base.bias is None) == (merged_b is None)


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
    assert max_err(expected, base(input_ids=ids).logits) > 0.1  # a random spectrum changes the model
    tol = output_tolerance(expected, torch.float32, depth=base.config.num_hidden_layers)
    peft_model.save_pretrained(tmp_path / "peft")

    adapted = rewriter.load_adapter(Adapted(traced), tmp_path / "peft", low_cpu_mem_usage=True)
    unmerged = adapted(input_ids=ids).logits
    assert max_err(unmerged, expected) <= tol
    adapted.merge()
    assert max_err(adapted(input_ids=ids).logits, expected) <= tol
    adapted.unmerge()
    assert torch.equal(adapted(input_ids=ids).logits, unmerged)

    adapted.save_adapter(tmp_path / "ours", format="peft")
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    assert max_err(reloaded(input_ids=ids).logits, expected) <= tol
