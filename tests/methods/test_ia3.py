"""IA3 at site level: forward == fold for stacks, no-op init, gradients, config errors,
weighted combination, and parity with PEFT 0.21.2's IA3 layers; then a tiny Llama end to end
(PEFT checkpoints both ways, merge, the ready rule file)."""
from __future__ import annotations

import copy
from pathlib import Path

import peft
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import rewriter
from rewriter.errors import ConfigError
from rewriter.graph import fold_site, run_site
from rewriter.methods import get_method
from rewriter.methods.ia3 import IA3Config, IA3Module, combine_weighted
from rewriter.models import BUILTINS
from rewriter.sites import Site
from rewriter.tolerance import matmul_tolerance, output_tolerance

SPEC = get_method("ia3")
DTYPES = st.sampled_from([torch.float32, torch.bfloat16, torch.float16])


def make_site(in_features, out_features, dtype=torch.float32, name="layers.0.self_attn.q_proj"):
    return Site(name=name, weight=f"{name}.weight", bias=f"{name}.bias", op="linear", in_features=in_features,
                out_features=out_features, layer=0, dtype=dtype, nodes=("linear",))


def affine_tolerance(x, weight, bias, dtype):
    """matmul_tolerance of ``x W^T + b``, with the bias as one more input column."""
    x = torch.cat([x.float(), torch.ones(*x.shape[:-1], 1)], -1)
    bias = bias if bias is not None else torch.zeros(weight.shape[0])
    return matmul_tolerance(x, torch.cat([weight.float(), bias.float()[:, None]], 1), dtype)


def stack_tolerance(x, weight, bias, modules, dtype=None):
    """Allowed |unmerged - merged|: the unmerged forward computes every partial fold
    ``x W_k^T + b_k`` (``W_k = f_k(...f_1(W))``) on the way, rounded in the dtype, and the
    output or input scales above level k amplify its error by at most their largest factor."""
    dtype = dtype or x.dtype
    w, b = weight.float(), (bias.float() if bias is not None else None)
    total, gain = affine_tolerance(x, w, b, dtype), 1.0
    with torch.no_grad():
        for module in modules:
            w, b = module.fold(w, b)
            total += affine_tolerance(x, w, b, dtype)
            gain *= max(1.0, module.ia3_l.abs().max().item()) if isinstance(module, IA3Module) else 1.0
    return gain * total


def lora(site, seed):
    torch.manual_seed(seed)
    return get_method("lora").module_cls(site, get_method("lora").make_config({"r": 2, "init_lora_weights": False}))


def ia3(site, feedforward, seed, init=False):
    torch.manual_seed(seed)
    return IA3Module(site, IA3Config(init_ia3_weights=init, is_feedforward=feedforward))


@st.composite
def site_inputs(draw):
    in_f, out_f = draw(st.integers(1, 24)), draw(st.integers(1, 24))
    dtype = draw(DTYPES)
    seed = draw(st.integers(0, 2**16))
    torch.manual_seed(seed)
    weight = torch.randn(out_f, in_f).to(dtype)
    bias = torch.randn(out_f).to(dtype) if draw(st.booleans()) else None
    x = torch.randn(draw(st.integers(1, 3)), 3, in_f).to(dtype)
    return make_site(in_f, out_f, dtype), x, weight, bias, seed


def assert_forward_equals_fold(x, weight, bias, modules, conv1d=False):
    """Unmerged == merged for a ``[out, in]`` weight, also stored as GPT-2 Conv1D ``[in, out]``."""
    tol = stack_tolerance(x, weight, bias, modules)
    stored = weight.t().contiguous() if conv1d else weight
    unmerged = run_site(x, stored, bias, modules, fan_in_fan_out=conv1d)
    merged_w, merged_b = fold_site(stored, bias, modules, fan_in_fan_out=conv1d)
    merged = F.linear(x, merged_w.t() if conv1d else merged_w, merged_b)
    assert unmerged.dtype == x.dtype
    assert (unmerged.float() - merged.float()).abs().max().item() <= tol
    return unmerged, tol


@given(site_inputs(), st.sampled_from(["ia3+ia3", "ia3+lora", "lora+ia3"]), st.booleans(), st.booleans(),
       st.booleans())
def test_forward_equals_fold_for_stacks(inputs, stack, ff_first, ff_second, conv1d):
    site, x, weight, bias, seed = inputs
    flags = iter([ff_first, ff_second])
    modules = [ia3(site, next(flags), seed + k) if kind == "ia3" else lora(site, seed + k)
               for k, kind in enumerate(stack.split("+"))]
    forward, tol = assert_forward_equals_fold(x, weight, bias, modules, conv1d)
    backward, tol_backward = assert_forward_equals_fold(x, weight, bias, modules[::-1], conv1d)
    if stack == "ia3+ia3":  # row and column scalings commute
        assert (forward.float() - backward.float()).abs().max().item() <= tol + tol_backward


@pytest.mark.parametrize("feedforward", [False, True])
def test_order_with_lora_matters(feedforward):
    torch.manual_seed(0)
    site = make_site(16, 8)
    x, weight, bias = torch.randn(4, 16), torch.randn(8, 16), torch.randn(8)
    modules = [ia3(site, feedforward, 1), lora(site, 2)]
    forward, tol = assert_forward_equals_fold(x, weight, bias, modules)
    backward, tol_backward = assert_forward_equals_fold(x, weight, bias, modules[::-1])
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
    frozen = lora(site, seed)
    frozen.requires_grad_(False)
    module = ia3(site, feedforward, seed)
    run_site(x, weight, bias, [frozen, module]).float().sum().backward()
    grad = module.ia3_l.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert all(p.grad is None for p in frozen.parameters())
    assert weight.grad is None and x.grad is None


def test_parameter_shapes_and_init_rounding():
    site = make_site(6, 5, torch.bfloat16)
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
    with pytest.raises(ConfigError) as info:
        SPEC.make_config(params)
    assert info.value.field == field


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

class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(12, 10)
        self.v_proj = nn.Linear(12, 7, bias=False)

    def forward(self, x):
        return self.q_proj(x) + self.v_proj(x).sum(-1, keepdim=True)


def peft_model(dtype, adapters=("default",)):
    torch.manual_seed(0)
    config = peft.IA3Config(target_modules=["q_proj", "v_proj"], feedforward_modules=["v_proj"],
                            init_ia3_weights=False)
    model = peft.get_peft_model(Tiny().to(dtype), config, adapter_name=adapters[0])
    for name in adapters[1:]:
        model.add_adapter(name, config)
    return model


def our_modules(model, name, adapter, dtype):
    """Our module for layer ``name``, loaded from PEFT's saved tensors through ``peft_keys``."""
    layer = getattr(model.base_model.model, name)
    site = make_site(layer.in_features, layer.out_features, dtype, name)
    module = IA3Module(site, IA3Config(is_feedforward=layer.is_feedforward))
    saved = peft.get_peft_model_state_dict(model, adapter_name=adapter)
    prefix = f"base_model.model.{name}."
    ours = {SPEC.peft_keys[k[len(prefix):]]: v for k, v in saved.items() if k.startswith(prefix)}
    assert set(ours) == set(module.state_dict())  # a PEFT checkpoint loads with no missing or extra keys
    module.load_state_dict(ours, strict=True)
    return layer, module


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["q_proj", "v_proj"])
def test_peft_parity(dtype, name):
    model = peft_model(dtype)
    layer, module = our_modules(model, name, "default", dtype)
    assert module.is_feedforward == (name == "v_proj")
    x = torch.randn(2, 5, 12).to(dtype)
    weight, bias = layer.base_layer.weight.detach().clone(), layer.base_layer.bias
    bias = bias.detach().clone() if bias is not None else None
    with torch.no_grad():
        expected = layer(x)
    tol = stack_tolerance(x, weight, bias, [module], dtype)
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
        weight, bias = layer.base_layer.weight.detach().clone(), layer.base_layer.bias
        bias = bias.detach().clone() if bias is not None else None
        with torch.no_grad():
            expected = layer(x)
        tol = stack_tolerance(x, weight, bias, [first, second], dtype)
        assert (run_site(x, weight, bias, [first, second]) - expected).abs().max() <= tol


def test_combine_weighted_matches_peft():
    model = peft_model(torch.float32, adapters=("one", "two"))
    model.base_model.add_weighted_adapter(["one", "two"], [0.3, -1.5], "mix")
    for name in ("q_proj", "v_proj"):
        vectors = getattr(model.base_model.model, name).ia3_l
        combined = combine_weighted([vectors["one"].detach(), vectors["two"].detach()], [0.3, -1.5])
        assert torch.equal(combined, vectors["mix"].detach())


# ---- whole model: a tiny Llama ----------------------------------------------------------------

RULES = Path(__file__).resolve().parents[2] / "rules" / "ia3-llama.toml"
PAPER_SITES = {f"model.layers.{i}.{name}": name == "mlp.down_proj"
               for i in range(2) for name in ("self_attn.k_proj", "self_attn.v_proj", "mlp.down_proj")}


def logits_of(output):
    return output.logits if hasattr(output, "logits") else output[0]


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_tiny_llama_peft_checkpoint_both_ways_merge_and_rule_file(tmp_path):
    torch.manual_seed(0)
    model, ids = BUILTINS["tiny-llama"]().eval(), torch.randint(0, 512, (2, 7))
    theirs = peft.get_peft_model(copy.deepcopy(model), peft.IA3Config(init_ia3_weights=False)).eval()
    with torch.no_grad():
        expected = theirs(input_ids=ids).logits
    theirs.save_pretrained(tmp_path / "peft")
    adapted = rewriter.load_adapter(copy.deepcopy(model), tmp_path / "peft", example_inputs={"input_ids": ids})
    assert {s: m.is_feedforward for s, m in adapted.adapters["default"].modules.items()} == PAPER_SITES
    tol = output_tolerance(expected, torch.float32, depth=2)
    with torch.no_grad():
        unmerged = logits_of(adapted(input_ids=ids))
        assert (unmerged - expected).abs().max().item() <= tol
        adapted.merge()
        assert (logits_of(adapted(input_ids=ids)) - expected).abs().max().item() <= tol
        adapted.unmerge()
        assert torch.equal(logits_of(adapted(input_ids=ids)), unmerged)
    adapted.save_adapter(tmp_path / "ours", format="peft")  # and back into PEFT
    again = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "ours").eval()
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, expected)
    adapted.add_adapter(RULES, "paper")  # the ready rule file: the paper's sites, an exact no-op at init
    adapted.set_adapter("paper")
    assert {s: m.is_feedforward for s, m in adapted.adapters["paper"].modules.items()} == PAPER_SITES
    with torch.no_grad(), adapted.disable_adapters():
        base = logits_of(adapted(input_ids=ids))
    with torch.no_grad():
        assert torch.equal(logits_of(adapted(input_ids=ids)), base)
