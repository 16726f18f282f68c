"""LoKr: site-level properties, PEFT's factorization and shapes, layer- and model-level parity with
PEFT 0.21.2, the rule file."""
from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import peft
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file
from peft.tuners.lokr.layer import factorization as peft_factorization
from torch import nn

import rewriter
from rewriter.errors import ConfigError
from rewriter.graph import fold_site, run_site
from rewriter.methods import get_method
from rewriter.methods.lokr import LoKrConfig, LoKrModule, factorization
from rewriter.methods.lora import LoraConfig, LoraModule
from rewriter.sites import Site
from rewriter.tolerance import ROUNDINGS, matmul_tolerance, output_tolerance, unit_roundoff

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
STACKS = ["single", "two", "lora_below", "lora_above"]  # adapters bottom to top
SPEC = get_method("lokr")


def make_site(in_features: int, out_features: int, dtype: torch.dtype, name: str = "q_proj") -> Site:
    return Site(name=name, weight=f"{name}.weight", bias=f"{name}.bias", op="linear", in_features=in_features,
                out_features=out_features, layer=None, dtype=dtype, nodes=())


def folded_fp32(weight, bias, modules):
    """The stack's effective (W, b) in float32, before the final rounding to the base dtype."""
    w, b = weight.float(), (bias.float() if bias is not None else None)
    for m in modules:
        w, b = m.fold(w, b)
    return w.detach(), (b.detach() if b is not None else None)


def site_tolerance(x, weight, bias, modules, dtype):
    """matmul_tolerance for y = x W_effᵀ + b_eff, sized by the magnitude of the terms the two forms
    sum: the fold of |W| by copies of the (additive) modules with |parameters|, i.e. |W| + Σ|ΔW_k|
    with every product inside ΔW_k taken in absolute value.  The bias is one more input column."""
    magnitudes = [copy.deepcopy(m) for m in modules]
    with torch.no_grad():
        for m in magnitudes:
            for p in m.parameters():
                p.abs_()
    w, b = folded_fp32(weight.abs(), None if bias is None else bias.abs(), magnitudes)
    if b is not None:
        x = torch.cat([x.float(), torch.ones(*x.shape[:-1], 1)], -1)
        w = torch.cat([w, b[:, None]], 1)
    return matmul_tolerance(x, w, dtype)


def base_layer(in_f, out_f, with_bias, dtype):
    weight = (torch.randn(out_f, in_f) / in_f ** 0.5).to(dtype)
    bias = (torch.randn(out_f) / in_f ** 0.5).to(dtype) if with_bias else None
    return weight, bias


@st.composite
def cases(draw):
    return dict(
        in_f=draw(st.integers(1, 64)), out_f=draw(st.integers(1, 64)), r=draw(st.integers(1, 8)),
        alpha=draw(st.sampled_from([1, 4, 8.0, 16, 0.5])), decompose_both=draw(st.booleans()),
        decompose_factor=draw(st.sampled_from([-1, 1, 2, 3, 4, 8])), dtype=draw(st.sampled_from(DTYPES)),
        bias=draw(st.booleans()), seed=draw(st.integers(0, 2**31 - 1)), batch=draw(st.integers(1, 5)),
        stack=draw(st.sampled_from(STACKS)))


def config_of(case, **overrides) -> LoKrConfig:
    return LoKrConfig(r=case["r"], alpha=case["alpha"], decompose_both=case["decompose_both"],
                      decompose_factor=case["decompose_factor"], **{"init_weights": False, **overrides})


def build(case, stack: str):
    """Base weights and a stack of non-trivial adapters, bottom to top."""
    torch.manual_seed(case["seed"])
    site = make_site(case["in_f"], case["out_f"], case["dtype"])
    weight, bias = base_layer(case["in_f"], case["out_f"], case["bias"], case["dtype"])
    lokr = lambda: LoKrModule(site, config_of(case))  # noqa: E731
    lora = lambda: LoraModule(site, LoraConfig(r=3, lora_alpha=6, init_lora_weights=False))  # noqa: E731
    modules = {"single": lambda: [lokr()], "two": lambda: [lokr(), lokr()],
               "lora_below": lambda: [lora(), lokr()], "lora_above": lambda: [lokr(), lora()]}[stack]()
    x = torch.randn(case["batch"], 2, case["in_f"]).to(case["dtype"])
    return x, weight, bias, modules


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
    modules = [LoKrModule(make_site(i, o, torch.float32), LoKrConfig(r=r, decompose_both=both, decompose_factor=f))
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
    unmerged = run_site(x, weight, bias, modules)
    merged = F.linear(x, *fold_site(weight, bias, modules))
    assert unmerged.dtype == merged.dtype == case["dtype"]
    tol = site_tolerance(x, weight, bias, modules, case["dtype"])
    assert (unmerged.float() - merged.float()).abs().max().item() <= tol


@given(case=cases(), init_weights=st.sampled_from([True, "lycoris"]))
def test_default_inits_are_exactly_the_base(case, init_weights):
    x, weight, bias, (lora, _) = build(case, "lora_below")
    noop = LoKrModule(make_site(case["in_f"], case["out_f"], case["dtype"]), config_of(case, init_weights=init_weights))
    assert torch.equal(run_site(x, weight, bias, [noop]), F.linear(x, weight, bias))
    assert torch.equal(run_site(x, weight, bias, [lora, noop]), run_site(x, weight, bias, [lora]))
    folded_w, folded_b = fold_site(weight, bias, [noop])
    assert torch.equal(folded_w, weight)
    assert folded_b is None or torch.equal(folded_b, bias)


@given(case=cases())
def test_only_adapter_parameters_get_gradients(case):
    x, weight, bias, (frozen_lora, lokr) = build(case, "lora_below")
    frozen_lora.requires_grad_(False)
    loss = run_site(x, weight, bias, [frozen_lora, lokr]).float().square().sum()
    loss.backward()
    assert all(p.grad is None for p in frozen_lora.parameters())
    assert weight.grad is None and (bias is None or bias.grad is None)
    for name, p in lokr.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    # fold is differentiable too (it is the same function on the weight)
    lokr.zero_grad(set_to_none=True)
    folded_w, _ = lokr.fold(weight.float(), None)
    folded_w.square().sum().backward()
    assert all(p.grad is not None for p in lokr.parameters())


@given(case=cases())
def test_dropouts_are_no_ops_in_eval(case):
    x, weight, bias, (plain,) = build(case, "single")
    cfg = dataclasses.replace(plain.config, rank_dropout=0.5, module_dropout=0.5, rank_dropout_scale=True)
    dropped = LoKrModule(make_site(case["in_f"], case["out_f"], case["dtype"]), cfg)
    dropped.load_state_dict(plain.state_dict())
    dropped.eval()
    assert torch.equal(run_site(x, weight, bias, [dropped]), run_site(x, weight, bias, [plain]))


def test_rank_dropout_without_scale_keeps_rows_unscaled():
    site = make_site(12, 8, torch.float32)
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
    with pytest.raises(ConfigError) as err:
        LoKrConfig(**{field: value})
    assert err.value.field == field and field in str(err.value)


def test_rule_parameters_and_aliases():
    cfg = SPEC.make_config({"r": 4, "alpha": 2, "init": "lycoris", "factor": 8})
    assert cfg == LoKrConfig(r=4, alpha=2, init_weights="lycoris", decompose_factor=8) and cfg.scaling == 0.5


# ---- parity with PEFT 0.21.2 --------------------------------------------------------------------

def peft_pair(dtype, in_f, out_f, r, **options):
    """A PEFT-adapted pair of layers and our modules loaded from PEFT's saved tensors."""
    model = nn.Module()
    model.q_proj, model.v_proj = nn.Linear(in_f, out_f, bias=True), nn.Linear(in_f, out_f, bias=False)
    model.to(dtype)
    base = {n: (m.weight.detach().clone(), None if m.bias is None else m.bias.detach().clone())
            for n, m in model.named_children()}
    options = {"init_weights": False, "alpha": 6, **options}
    peft_model = peft.get_peft_model(model, peft.LoKrConfig(target_modules=["q_proj", "v_proj"], r=r, **options))
    saved = peft.get_peft_model_state_dict(peft_model)
    ours = {}
    for name in base:
        module = LoKrModule(make_site(in_f, out_f, dtype, name), LoKrConfig(r=r, **options))
        prefix = f"base_model.model.{name}."
        layer_keys = {k[len(prefix):] for k in saved if k.startswith(prefix)}
        # one to one: every key PEFT saves is one of our parameters and vice versa
        assert {SPEC.peft_keys[k] for k in layer_keys} == set(module.state_dict())
        module.load_state_dict({SPEC.peft_keys[k]: saved[prefix + k] for k in layer_keys}, strict=True)
        ours[name] = module
    return peft_model, base, ours


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("in_f, out_f, r, decompose_both, decompose_factor", SHAPE_CASES)
def test_matches_peft_forward_and_merge(dtype, in_f, out_f, r, decompose_both, decompose_factor):
    torch.manual_seed(in_f * out_f + r)
    peft_model, base, ours = peft_pair(dtype, in_f, out_f, r, decompose_both=decompose_both,
                                       decompose_factor=decompose_factor)
    layers = peft_model.base_model.model
    x = torch.randn(3, 5, in_f).to(dtype)
    for name, (weight, bias) in base.items():
        expected = getattr(layers, name)(x)
        got = run_site(x, weight, bias, [ours[name]])
        assert got.dtype == expected.dtype == dtype
        tol = site_tolerance(x, weight, bias, [ours[name]], dtype)
        assert (got.float() - expected.float()).abs().max().item() <= tol
    peft_model.merge_adapter()
    for name, (weight, bias) in base.items():
        merged = getattr(layers, name).base_layer.weight
        folded, _ = fold_site(weight, bias, [ours[name]])
        assert folded.dtype == merged.dtype == dtype
        rounding_bound = ROUNDINGS * unit_roundoff(dtype) * merged.float().abs()
        assert ((folded.float() - merged.float()).abs() <= rounding_bound).all()


@pytest.mark.parametrize("rank_dropout_scale", [False, True])
def test_matches_peft_training_dropouts_draw_for_draw(rank_dropout_scale):
    torch.manual_seed(0)
    peft_model, base, ours = peft_pair(torch.float32, 48, 40, 2, rank_dropout=0.5, module_dropout=0.3,
                                       rank_dropout_scale=rank_dropout_scale)
    layer = peft_model.base_model.model.q_proj.train()
    module = ours["q_proj"].train()
    weight, bias = base["q_proj"]
    x = torch.randn(4, 48)
    tol = site_tolerance(x, weight, bias, [module], torch.float32)
    outputs = set()
    for seed in range(8):
        torch.manual_seed(seed)
        expected = layer(x)
        torch.manual_seed(seed)
        got = run_site(x, weight, bias, [module])
        assert (got - expected).abs().max().item() <= tol
        outputs.add(round(got.sum().item(), 3))
    assert len(outputs) > 2  # the draws really changed the output


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
    module = LoKrModule(make_site(48, 40, dtype), LoKrConfig(**config))
    saved = peft.get_peft_model_state_dict(peft_model)
    ours = module.state_dict()
    assert {SPEC.peft_keys[k.rpartition("q_proj.")[2]] for k in saved} == set(ours)
    for key, name in SPEC.peft_keys.items():
        if name in ours:
            assert torch.equal(saved[f"base_model.model.q_proj.{key}"], ours[name]), key


# ---- whole model: rule file, PEFT checkpoint round trip, merge ----------------------------------

RULES = Path(__file__).resolve().parents[2] / "rules" / "lokr-llama.toml"
LLAMA_NAMES = [f"model.layers.{i}.{p}" for i in range(2) for p in (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")] + ["lm_head"]


def test_rule_file_targets_llama_projections():
    ruleset = rewriter.load_rules(RULES)
    assert ruleset.method == "lokr"
    assert SPEC.make_config(ruleset.params) == LoKrConfig(r=8, alpha=8)
    targeted = [n for n in LLAMA_NAMES if any(rule.matches(n) for rule in ruleset.rules)]
    assert targeted == [n for n in LLAMA_NAMES if n != "lm_head"]


class Decoder(nn.Module):
    """Llama-like names (``model.layers.<i>.self_attn.q_proj``), a plain tensor output."""

    def __init__(self, layers=2, hidden=16):
        super().__init__()
        self.model = nn.Module()
        self.model.layers = nn.ModuleList(nn.Module() for _ in range(layers))
        for layer in self.model.layers:
            layer.self_attn = nn.Module()
            layer.self_attn.q_proj = nn.Linear(hidden, hidden)
            layer.self_attn.v_proj = nn.Linear(hidden, hidden, bias=False)

    def forward(self, x):
        for layer in self.model.layers:
            x = x + layer.self_attn.v_proj(torch.tanh(layer.self_attn.q_proj(x)))
        return x


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_peft_checkpoint_round_trip_on_a_model(tmp_path, dtype):
    """PEFT checkpoint (with rank and alpha patterns) -> rewriter: same outputs, unmerged and
    merged; rewriter -> PEFT format: the same tensors, and PEFT reproduces our outputs."""
    torch.manual_seed(11)
    model = Decoder().to(dtype)
    twin, fresh = copy.deepcopy(model), copy.deepcopy(model)
    x = torch.randn(3, 16).to(dtype)
    config = peft.LoKrConfig(target_modules=["q_proj", "v_proj"], r=2, alpha=4, init_weights=False,
                                rank_pattern={r"layers\.0\.self_attn\.q_proj": 3}, alpha_pattern={"v_proj": 6})
    peft_model = peft.get_peft_model(twin, config)
    peft_model.save_pretrained(tmp_path / "peft")
    adapted = rewriter.load_adapter(model, tmp_path / "peft", example_inputs=(x,))
    modules = adapted.adapters["default"].modules
    assert {site: (m.config.r, m.config.alpha) for site, m in modules.items()} == {
        "model.layers.0.self_attn.q_proj": (3, 4), "model.layers.0.self_attn.v_proj": (2, 6),
        "model.layers.1.self_attn.q_proj": (2, 4), "model.layers.1.self_attn.v_proj": (2, 6)}
    with torch.no_grad():
        theirs, ours = peft_model(x), adapted(x)
        tol = output_tolerance(theirs, dtype, depth=4)
        assert (ours.float() - theirs.float()).abs().max().item() <= tol
        adapted.merge()
        assert (adapted(x).float() - theirs.float()).abs().max().item() <= tol
        adapted.unmerge()
    adapted.save_adapter(tmp_path / "ours", format="peft")
    original = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    saved = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert saved.keys() == original.keys()
    assert all(torch.equal(saved[k], original[k]) for k in saved)
    reloaded = peft.PeftModel.from_pretrained(fresh, tmp_path / "ours")
    with torch.no_grad():
        assert (reloaded(x).float() - ours.float()).abs().max().item() <= tol
