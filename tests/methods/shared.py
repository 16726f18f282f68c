"""Helpers shared by the method tests: random sites and adapter stacks, the tolerances each
family of tests derives, PEFT tensors loaded into our modules, and the small models and whole-model
round trips several methods run alike."""
from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path

import peft
import pytest
import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from safetensors.torch import load_file
from torch import nn
from transformers.pytorch_utils import Conv1D

import rewriter
from rewriter.errors import ConfigError
from rewriter.core.graph import fold_site, run_site
from rewriter.methods import get_method
from rewriter.models import BUILTINS
from rewriter.testing import make_site, site_merge_error
from rewriter.core.tolerance import ROUNDINGS, matmul_tolerance, output_tolerance, unit_roundoff

RULES_DIR = Path(__file__).resolve().parents[2] / "rules"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
LLAMA_NAMES = [f"model.layers.{i}.{p}" for i in range(2) for p in (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")] + ["lm_head"]


#: a LoRA rule file with non-trivial factors; ``.format(targets='["q_proj", "v_proj"]')`` (a TOML list of
#: suffixes or exact names).  X-LoRA's experts, and the LoRA stacked under other methods.
LORA_RULES = """schema = 1
[adapter]
method = "lora"
r = 4
lora_alpha = 8
init_lora_weights = false
[[rule]]
name = "experts"
suffix = {targets}
"""


def max_error(a, b) -> float:
    return (a.float() - b.float()).abs().max().item() if a.numel() else 0.0


def build_module(method: str, site, **params):
    spec = get_method(method)
    return spec.module_cls(site, spec.make_config(params))


def seeded_lora(site, seed):
    torch.manual_seed(seed)
    return build_module("lora", site, r=2, init_lora_weights=False)


def config_error(make_config) -> ConfigError:
    """The ConfigError that ``make_config()`` raises (the test fails when none is raised)."""
    with pytest.raises(ConfigError) as info:
        make_config()
    return info.value


def targets(ruleset, name: str) -> bool:
    return any(rule.matches(name) for rule in ruleset.rules)


def ready_llama_rules(method: str):
    """The ready rule file ``rules/<method>-llama.toml`` and the tiny-Llama linear layers it targets."""
    ruleset = rewriter.load_rules(RULES_DIR / f"{method}-llama.toml")
    return ruleset, [name for name in LLAMA_NAMES if targets(ruleset, name)]


def stack_of(kind: str, adapter, second, lora) -> list:
    """The modules of a named stack, bottom to top."""
    return {"single": [adapter], "twice": [adapter, second], "lora_below": [lora, adapter],
            "lora_above": [adapter, lora]}[kind]


def clone_weights(linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    bias = linear.bias
    return linear.weight.detach().clone(), (bias.detach().clone() if bias is not None else None)


# ---- PEFT's saved tensors in our modules ---------------------------------------------------

def peft_layer_state(state, name: str) -> dict:
    """What PEFT saved for layer ``name``, keyed without the model prefix."""
    prefix = f"base_model.model.{name}."
    return {key.removeprefix(prefix): value for key, value in state.items() if key.startswith(prefix)}


def load_peft_layer(module, spec, state, name: str) -> dict:
    """Load ``module`` with PEFT's saved tensors of layer ``name`` through ``spec.peft_keys``; a PEFT
    checkpoint loads with no missing or extra keys.  Returns PEFT's tensors of that layer."""
    saved = peft_layer_state(state, name)
    ours = {spec.peft_keys[key]: value for key, value in saved.items()}
    assert set(ours) == set(module.state_dict())
    module.load_state_dict(ours, strict=True)
    return saved


def config_from_peft(spec, peft_config):
    return spec.make_config({name: getattr(peft_config, name) for name in spec.field_names()})


def assert_config_fields_are_peft_fields(spec, peft_config_cls, targeting: set[str]) -> None:
    base = {f.name for f in dataclasses.fields(peft.PeftConfig)}
    peft_fields = {f.name for f in dataclasses.fields(peft_config_cls)} - base - targeting
    assert set(spec.field_names()) == peft_fields
    ours, theirs = spec.config_cls(), peft_config_cls()
    assert all(getattr(ours, f) == getattr(theirs, f) for f in spec.field_names())  # same defaults


# ---- additive LyCORIS stacks (LoHa, LoKr): magnitudes of the folded terms --------------------

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
def lycoris_cases(draw, max_features, **extra):
    """Sizes, rank and alpha, then the ``extra`` strategies' draws (method parameters), then dtype,
    bias, seed, batch and one of the stacks of :func:`build_lycoris_stack`."""
    return dict(
        in_f=draw(st.integers(1, max_features)), out_f=draw(st.integers(1, max_features)),
        r=draw(st.integers(1, 8)), alpha=draw(st.sampled_from([1, 4, 8.0, 16, 0.5])),
        **{name: draw(strategy) for name, strategy in extra.items()}, dtype=draw(st.sampled_from(DTYPES)),
        bias=draw(st.booleans()), seed=draw(st.integers(0, 2**31 - 1)), batch=draw(st.integers(1, 5)),
        stack=draw(st.sampled_from(["single", "two", "lora_below", "lora_above"])))  # adapters bottom to top


def build_lycoris_stack(case, stack: str, adapter):
    """Base weights and a stack of non-trivial adapters (``adapter(site)``), bottom to top."""
    torch.manual_seed(case["seed"])
    site = make_site(case["in_f"], case["out_f"], dtype=case["dtype"])
    weight, bias = base_layer(case["in_f"], case["out_f"], case["bias"], case["dtype"])
    lora = lambda: build_module("lora", site, r=3, lora_alpha=6, init_lora_weights=False)  # noqa: E731
    modules = {"single": lambda: [adapter(site)], "two": lambda: [adapter(site), adapter(site)],
               "lora_below": lambda: [lora(), adapter(site)], "lora_above": lambda: [adapter(site), lora()]}[stack]()
    x = torch.randn(case["batch"], 2, case["in_f"]).to(case["dtype"])
    return x, weight, bias, modules


def assert_additive_forward_equals_fold(x, weight, bias, modules, dtype):
    unmerged = run_site(x, weight, bias, modules)
    merged = F.linear(x, *fold_site(weight, bias, modules))
    assert unmerged.dtype == merged.dtype == dtype
    tol = site_tolerance(x, weight, bias, modules, dtype)
    assert (unmerged.float() - merged.float()).abs().max().item() <= tol


def assert_exact_noop(x, weight, bias, lora, noop):
    """``noop`` leaves the layer, and a LoRA below it, exactly as they are, unmerged and folded."""
    assert torch.equal(run_site(x, weight, bias, [noop]), F.linear(x, weight, bias))
    assert torch.equal(run_site(x, weight, bias, [lora, noop]), run_site(x, weight, bias, [lora]))
    folded_w, folded_b = fold_site(weight, bias, [noop])
    assert torch.equal(folded_w, weight)
    assert folded_b is None or torch.equal(folded_b, bias)


def assert_only_adapter_gets_gradients(x, weight, bias, frozen_lora, adapter):
    frozen_lora.requires_grad_(False)
    loss = run_site(x, weight, bias, [frozen_lora, adapter]).float().square().sum()
    loss.backward()
    assert all(p.grad is None for p in frozen_lora.parameters())
    assert weight.grad is None and (bias is None or bias.grad is None)
    for name, p in adapter.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    # fold is differentiable too (it is the same function on the weight)
    adapter.zero_grad(set_to_none=True)
    folded_w, _ = adapter.fold(weight.float(), None)
    folded_w.square().sum().backward()
    assert all(p.grad is not None for p in adapter.parameters())


def assert_dropouts_are_no_ops_in_eval(case, build, **dropouts):
    x, weight, bias, (plain,) = build(case, "single")
    cfg = dataclasses.replace(plain.config, **dropouts)
    dropped = type(plain)(make_site(case["in_f"], case["out_f"], dtype=case["dtype"]), cfg)
    dropped.load_state_dict(plain.state_dict())
    dropped.eval()
    assert torch.equal(run_site(x, weight, bias, [dropped]), run_site(x, weight, bias, [plain]))


def peft_twins(model, peft_config, spec, config):
    """A PEFT-adapted ``model`` (its children are the target layers), the base tensors of each layer
    and our modules (``config``) loaded from PEFT's saved tensors."""
    base = {n: clone_weights(m) for n, m in model.named_children()}
    peft_model = peft.get_peft_model(model, peft_config)
    saved = peft.get_peft_model_state_dict(peft_model)
    ours = {}
    for name, (weight, _) in base.items():
        module = spec.module_cls(make_site(weight.shape[1], weight.shape[0], dtype=weight.dtype, name=name), config)
        load_peft_layer(module, spec, saved, name)
        ours[name] = module
    return peft_model, base, ours


def assert_layers_match_peft(peft_model, base, ours, x, dtype):
    """Our modules compute PEFT's layer outputs, and fold to PEFT's merged weights up to rounding."""
    layers = peft_model.base_model.model
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


def assert_dropout_draws_match_peft(peft_model, base, ours):
    """Seeded training forwards of ``q_proj`` draw PEFT's dropouts, draw for draw."""
    layer = peft_model.base_model.model.q_proj.train()
    module = ours["q_proj"].train()
    weight, bias = base["q_proj"]
    x = torch.randn(4, weight.shape[1])
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


def assert_peft_round_trip_on_decoder(tmp_path, dtype, peft_config_cls):
    """PEFT checkpoint (with rank and alpha patterns) -> rewriter: same outputs, unmerged and
    merged; rewriter -> PEFT format: the same tensors, and PEFT reproduces our outputs."""
    torch.manual_seed(11)
    model = Decoder().to(dtype)
    twin, fresh = copy.deepcopy(model), copy.deepcopy(model)
    x = torch.randn(3, 16).to(dtype)
    config = peft_config_cls(target_modules=["q_proj", "v_proj"], r=2, alpha=4, init_weights=False,
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


# ---- stacks that scale or rotate (IA3, OFT, BOFT): one rounding per partial fold ---------------

def affine_tolerance(x, weight, bias, dtype):
    """matmul_tolerance of ``x W^T + b``, with the bias as one more input column."""
    x = torch.cat([x.float(), torch.ones(*x.shape[:-1], 1)], -1)
    bias = bias if bias is not None else torch.zeros(weight.shape[0])
    return matmul_tolerance(x, torch.cat([weight.float(), bias.float()[:, None]], 1), dtype)


def largest_scale(module_cls, name: str):
    """A ``scale_of`` for :func:`stack_tolerance`: the largest |entry| of parameter ``name`` on
    ``module_cls`` levels, 1 on the others."""
    def scale_of(module) -> float:
        return getattr(module, name).abs().max().item() if isinstance(module, module_cls) else 1.0
    return scale_of


def stack_tolerance(x, weight, bias, modules, dtype=None, scale_of=None):
    """Allowed |unmerged - merged|: the unmerged forward computes every partial fold
    ``x W_k^T + b_k`` (``W_k = f_k(...f_1(W))``) on the way, rounded in the dtype, and the
    output or input scales above level k amplify its error by at most their largest factor
    ``scale_of(module)`` (rotations and additive levels do not: no ``scale_of``, no gain).
    An additive level computes its delta as a product of factors (LoRA's ``B (A x)``), rounded
    before its terms cancel, so its step is sized by the larger of the net partial fold and the
    fold with every factor in absolute value."""
    dtype = dtype or x.dtype
    w, b = weight.float(), (bias.float() if bias is not None else None)
    wa, ba = w.abs(), (b.abs() if b is not None else None)
    total, gain = affine_tolerance(x, w, b, dtype), 1.0
    with torch.no_grad():
        for module in modules:
            w, b = module.fold(w, b)
            if module.additive:
                (magnitude,) = absolute_copies([module])
                wa, ba = magnitude.fold(wa, ba)
                wa, ba = torch.maximum(wa, w.abs()), (None if b is None else torch.maximum(ba, b.abs()))
            else:
                wa, ba = w.abs(), (b.abs() if b is not None else None)
            total += affine_tolerance(x, wa, ba, dtype)
            gain *= max(1.0, scale_of(module)) if scale_of is not None else 1.0
    return gain * total


def absolute_copies(modules) -> list:
    """Copies of ``modules`` with every parameter replaced by its absolute value."""
    copies = [copy.deepcopy(m) for m in modules]
    with torch.no_grad():
        for m in copies:
            for p in m.parameters():
                p.abs_()
    return copies


def assert_forward_equals_fold(x, weight, bias, modules, conv1d=False, scale_of=None):
    """Unmerged == merged for a ``[out, in]`` weight, also stored as GPT-2 Conv1D ``[in, out]``."""
    tol = stack_tolerance(x, weight, bias, modules, scale_of=scale_of)
    stored = weight.t().contiguous() if conv1d else weight
    unmerged = run_site(x, stored, bias, modules, fan_in_fan_out=conv1d)
    merged_w, merged_b = fold_site(stored, bias, modules, fan_in_fan_out=conv1d)
    merged = F.linear(x, merged_w.t() if conv1d else merged_w, merged_b)
    assert unmerged.dtype == x.dtype
    assert (unmerged.float() - merged.float()).abs().max().item() <= tol
    return unmerged, tol


def draw_site_tensors(draw, in_f, out_f):
    """A site of a drawn dtype, seeded base tensors and input: ``(site, x, weight, bias, seed)``."""
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**16))
    torch.manual_seed(seed)
    weight = torch.randn(out_f, in_f).to(dtype)
    bias = torch.randn(out_f).to(dtype) if draw(st.booleans()) else None
    x = torch.randn(draw(st.integers(1, 3)), 3, in_f).to(dtype)
    return make_site(in_f, out_f, dtype=dtype), x, weight, bias, seed


@st.composite
def boft_geometries(draw):
    """(block_size, block_num, n_factors) that BOFT accepts."""
    n_factors = draw(st.integers(1, 3))
    if n_factors == 1:
        return draw(st.integers(1, 5)), draw(st.integers(1, 6)), 1
    span = 2 ** (n_factors - 1)
    return 2 * draw(st.integers(1, 3)), span * draw(st.integers(1, 6 // span + 1)), n_factors


def boft_geometry_params(draw, geometry):
    """BOFT parameters for ``geometry`` (given by block size or by block number), with or without dropout."""
    block_size, block_num, n_factors = geometry
    params = {"boft_block_size": block_size} if draw(st.booleans()) else {"boft_block_size": 0,
                                                                          "boft_block_num": block_num}
    return {**params, "boft_n_butterfly_factor": n_factors, "boft_dropout": draw(st.sampled_from([0.0, 0.5]))}


class Tiny(nn.Module):
    def __init__(self, features=12):
        super().__init__()
        self.q_proj = nn.Linear(features, 10)
        self.v_proj = nn.Linear(features, 7, bias=False)

    def forward(self, x):
        return self.q_proj(x) + self.v_proj(x).sum(-1, keepdim=True)


def peft_tiny(config, dtype, adapters=("default",), features=12):
    """A seeded Tiny with the PEFT adapters ``adapters``, all of ``config``."""
    torch.manual_seed(0)
    model = peft.get_peft_model(Tiny(features).to(dtype), config, adapter_name=adapters[0])
    for name in adapters[1:]:
        model.add_adapter(name, config)
    return model


def logits_of(output):
    return output.logits if hasattr(output, "logits") else output[0]


def assert_tiny_llama_peft_both_ways(tmp_path, peft_config, *, exact_reload=False):
    """A seeded ``peft_config`` adapter on tiny-llama, PEFT's checkpoint loaded here: PEFT's logits
    unmerged and merged, unmerging restores the unmerged logits exactly; saved back in PEFT's format,
    PEFT reproduces its logits (exactly with ``exact_reload``).  Returns ``(adapted, ids)``."""
    torch.manual_seed(0)
    model, ids = BUILTINS["tiny-llama"]().eval(), torch.randint(0, 512, (2, 7))
    theirs = peft.get_peft_model(copy.deepcopy(model), peft_config).eval()
    with torch.no_grad():
        expected = theirs(input_ids=ids).logits
    theirs.save_pretrained(tmp_path / "peft")
    adapted = rewriter.load_adapter(copy.deepcopy(model), tmp_path / "peft", example_inputs={"input_ids": ids})
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
        if exact_reload:
            assert torch.equal(again(input_ids=ids).logits, expected)
        else:
            assert (again(input_ids=ids).logits - expected).abs().max().item() <= tol
    return adapted, ids


def add_ready_adapter(adapted, rules, name):
    """Add and activate the adapter of a ready rule file; its modules."""
    adapted.add_adapter(rules, name)
    adapted.set_adapter(name)
    return adapted.adapters[name].modules


def assert_active_adapter_is_exact_noop(adapted, ids):
    with torch.no_grad(), adapted.disable_adapters():
        base = logits_of(adapted(input_ids=ids))
    with torch.no_grad():
        assert torch.equal(logits_of(adapted(input_ids=ids)), base)


# ---- FourierFT, MiSS: the house merge tolerance ----------------------------------------------

def merge_tolerance(x, weight, bias, modules):
    """The house tolerance for one site (``weight [out, in]``): matmul_tolerance over the
    magnitudes of every term the two computations add up."""
    return site_merge_error(x, weight, bias, modules)[1]


def seeded_site_tensors(case, op="linear"):
    """A site and seeded base tensors and input for ``case``: ``(site, x, weight [out, in], bias)``."""
    torch.manual_seed(case["seed"])
    in_f, out_f, dtype = case["in_features"], case["out_features"], case["dtype"]
    site = make_site(in_f, out_f, dtype=dtype, op=op)
    weight = (torch.randn(out_f, in_f) / math.sqrt(in_f)).to(dtype)  # [out, in]
    bias = (torch.randn(out_f) * 0.1).to(dtype) if case["bias"] else None
    x = torch.randn(*case["batch"], in_f).to(dtype)
    return site, x, weight, bias


def assert_gradients_reach_every_parameter(x, weight, bias, modules, adapter, param_name):
    """Every stacked parameter gets a finite gradient, ``adapter``'s ``param_name`` a non-zero one,
    through the forward and through the fold."""
    param = getattr(adapter, param_name)
    run_site(x, weight, bias, modules).float().square().sum().backward()
    for module in modules:
        for name, p in module.named_parameters():
            assert p.grad is not None, name
            assert torch.isfinite(p.grad).all(), name
    assert param.grad.abs().sum() > 0
    param.grad = None
    adapter.fold(weight.float(), None)[0].sum().backward()  # the fold is differentiable too
    assert param.grad is not None


def assert_merged_like_peft(peft_model, expected, dtype):
    """PEFT's merged weights equal our folds ``expected[name] = (W, b)`` (layer layout) up to one
    rounding of the weight's size."""
    for name, (merged_w, merged_b) in expected.items():
        base = getattr(peft_model.base_model.model, name).base_layer
        conv1d = isinstance(base, Conv1D)
        as_out_in = (lambda w: w.t()) if conv1d else (lambda w: w)
        identity = torch.eye(as_out_in(merged_w).shape[1])
        assert base.weight.dtype == merged_w.dtype == dtype
        assert max_error(base.weight, merged_w) <= matmul_tolerance(identity, as_out_in(merged_w).float(), dtype)
        assert (base.bias is None) == (merged_b is None)
