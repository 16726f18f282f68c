"""AdaLoRA: site-level properties, and parity with PEFT 0.21.2 (layers, rank allocator,
orthogonal regulariser, pruned checkpoints)."""
from __future__ import annotations

import copy
import types
import warnings

import peft
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st
from torch import nn

from rewriter.errors import CheckpointError, ConfigError, RewriterError
from rewriter.core.graph import fold_site, run_site
from rewriter.methods.adalora import (SPEC, AdaLoraConfig, AdaLoraModule, RankAllocator, peft_state,
                                      prune_state)
from rewriter.methods.lora import LoraConfig, LoraModule
from rewriter.testing import make_site
from rewriter.core.tolerance import matmul_tolerance, output_tolerance, unit_roundoff
from shared import DTYPES, Decoder, config_error, config_from_peft, max_error, peft_layer_state, targets

PEFT_DTYPES = DTYPES
SITES = ("q_proj", "v_proj")


def adalora(site, **params):
    params.setdefault("total_step", 10)
    params.setdefault("init_lora_weights", False)
    params.setdefault("target_r", min(params.get("init_r", 12), 8))
    module = AdaLoraModule(site, AdaLoraConfig(**params))
    return module.eval()


def delta_bound(module) -> torch.Tensor:
    """Elementwise bound on |dW| as the factorised forward computes it (|B| |diag E| |A| |s|)."""
    with torch.no_grad():
        if isinstance(module, LoraModule):
            return module.lora_B.abs() @ module.lora_A.abs() * abs(module.scaling)
        factor = abs(module.scaling / module.ranknum)
        return module.lora_B.abs() @ (module.lora_A.abs() * module.lora_E.abs()) * factor


def site_tolerance(x, weight, bias, modules, dtype) -> float:
    """matmul_tolerance for x @ (W + sum dW)^T + b, the bias as an extra input column."""
    bound = weight.detach().float().abs() + sum((delta_bound(m) for m in modules), torch.zeros(()))
    if bias is not None:
        x = torch.cat([x, torch.ones_like(x[..., :1])], dim=-1)
        bound = torch.cat([bound, bias.detach().float().abs()[:, None]], dim=1)
    return matmul_tolerance(x, bound, dtype)


# ---- config ----------------------------------------------------------------------------------

@pytest.mark.parametrize("params, field", [
    ({}, "total_step"),
    ({"total_step": 0}, "total_step"),
    ({"total_step": 10, "init_r": 0}, "init_r"),
    ({"total_step": 10, "init_r": 2.5}, "init_r"),
    ({"total_step": 10, "target_r": -1}, "target_r"),
    ({"total_step": 10, "init_r": 4, "target_r": 5}, "target_r"),
    ({"total_step": 10, "tinit": -1}, "tinit"),
    ({"total_step": 10, "tfinal": -2}, "tfinal"),
    ({"total_step": 10, "tinit": 6, "tfinal": 4}, "tinit"),
    ({"total_step": 10, "deltaT": 0}, "deltaT"),
    ({"total_step": 10, "beta1": 1.0}, "beta1"),
    ({"total_step": 10, "beta2": 0.0}, "beta2"),
    ({"total_step": 10, "beta2": "high"}, "beta2"),
    ({"total_step": 10, "orth_reg_weight": -0.1}, "orth_reg_weight"),
    ({"total_step": 10, "lora_alpha": "8"}, "lora_alpha"),
    ({"total_step": 10, "lora_dropout": 1.0}, "lora_dropout"),
    ({"total_step": 10, "init_lora_weights": "gaussian"}, "init_lora_weights"),
    ({"total_step": 10, "bias": "some"}, "bias"),
    ({"total_step": 10, "fan_in_fan_out": 1}, "fan_in_fan_out"),
    ({"total_step": 10, "r": -3}, "r"),
])
def test_config_rejects_bad_values(params, field):
    error = config_error(lambda: AdaLoraConfig(**params))
    assert error.field == field
    assert field in str(error)


def test_config_defaults_are_peft_defaults():
    ours = AdaLoraConfig(total_step=7)
    theirs = peft.AdaLoraConfig(total_step=7)
    for name in SPEC.field_names():
        assert getattr(ours, name) == getattr(theirs, name), name


def test_config_r_is_ignored_with_a_warning():
    with pytest.warns(UserWarning, match="init_r"):
        config = AdaLoraConfig(total_step=10, r=4)
    module = AdaLoraModule(make_site(5, 3), config)
    assert module.r == config.init_r == 12
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        AdaLoraConfig(total_step=10, r=8)


def test_spec_aliases_and_unknown_fields():
    config = SPEC.make_config({"alpha": 16, "dropout": 0.1, "init": False, "total_step": 5})
    assert (config.lora_alpha, config.lora_dropout, config.init_lora_weights) == (16, 0.1, False)
    with pytest.raises(ConfigError, match="init_r"):
        SPEC.make_config({"init_rank": 4, "total_step": 5})
    # every PEFT AdaLoraConfig field is either ours, ignored, or handled by the core's rules
    core_fields = {"task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
                   "inference_mode", "target_modules", "exclude_modules", "modules_to_save", "layers_to_transform",
                   "layers_pattern", "rank_pattern", "alpha_pattern"}
    peft_fields = {f for f in peft.AdaLoraConfig.__dataclass_fields__}
    assert peft_fields - core_fields == set(SPEC.field_names()) | SPEC.ignored_peft_fields


# ---- site-level properties -------------------------------------------------------------------

@given(in_features=st.integers(1, 16), out_features=st.integers(1, 16), rank=st.integers(1, 6),
       batch=st.integers(1, 4), dtype=st.sampled_from(DTYPES), alpha=st.sampled_from([8, 3.5, 0, -2]),
       stack=st.sampled_from(["single", "two", "lora_below", "lora_above"]), with_bias=st.booleans(),
       seed=st.integers(0, 2**16))
def test_forward_equals_fold(in_features, out_features, rank, batch, dtype, alpha, stack, with_bias, seed):
    torch.manual_seed(seed)
    site = make_site(in_features, out_features, dtype=dtype)
    ours = adalora(site, init_r=rank, lora_alpha=alpha)
    other = {
        "single": [],
        "two": [adalora(site, init_r=rank + 1, lora_alpha=5)],
        "lora_below": [LoraModule(site, LoraConfig(r=3, init_lora_weights=False)).eval()],
        "lora_above": [LoraModule(site, LoraConfig(r=2, init_lora_weights=False)).eval()],
    }[stack]
    modules = other + [ours] if stack == "lora_below" else [ours] + other
    weight = torch.randn(out_features, in_features).to(dtype)
    bias = torch.randn(out_features).to(dtype) if with_bias else None
    x = torch.randn(batch, 3, in_features).to(dtype)
    with torch.no_grad():
        unmerged = run_site(x, weight, bias, modules)
        merged = F.linear(x, *fold_site(weight, bias, modules))
    assert unmerged.dtype == merged.dtype == dtype
    assert max_error(unmerged, merged) <= site_tolerance(x, weight, bias, modules, dtype)


@given(in_features=st.integers(1, 16), out_features=st.integers(1, 16), rank=st.integers(1, 6),
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
def test_noop_init_is_exactly_the_base(in_features, out_features, rank, dtype, seed):
    torch.manual_seed(seed)
    site = make_site(in_features, out_features, dtype=dtype)
    module = adalora(site, init_r=rank, init_lora_weights=True)
    assert not module.lora_E.any() and module.lora_A.any() and module.lora_B.any()
    weight = torch.randn(out_features, in_features).to(dtype)
    bias = torch.randn(out_features).to(dtype)
    x = torch.randn(2, in_features).to(dtype)
    with torch.no_grad():
        assert torch.equal(run_site(x, weight, bias, [module]), F.linear(x, weight, bias))
        folded_weight, folded_bias = fold_site(weight, bias, [module])
    assert torch.equal(folded_weight, weight) and torch.equal(folded_bias, bias)


@given(in_features=st.integers(1, 12), out_features=st.integers(1, 12), rank=st.integers(1, 5),
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
def test_only_adapter_parameters_get_gradients(in_features, out_features, rank, dtype, seed):
    torch.manual_seed(seed)
    site = make_site(in_features, out_features, dtype=dtype)
    module = adalora(site, init_r=rank)
    lora = LoraModule(site, LoraConfig(r=2, init_lora_weights=False)).requires_grad_(False)
    assert {n for n, _ in module.named_parameters()} == {"lora_A", "lora_E", "lora_B"}
    assert all(p.dtype == torch.float32 for p in module.parameters())
    weight = torch.randn(out_features, in_features).to(dtype)
    bias = torch.randn(out_features).to(dtype)
    x = torch.randn(3, in_features).to(dtype)
    run_site(x, weight, bias, [lora, module]).float().pow(2).sum().backward()
    for name, p in module.named_parameters():
        assert p.grad is not None and p.grad.shape == p.shape and torch.isfinite(p.grad).all(), name
    assert module.lora_E.grad.any()
    assert all(p.grad is None for p in lora.parameters())
    assert set(module.state_dict()) == {"lora_A", "lora_E", "lora_B"}


def test_meta_device_build_then_load_computes_the_same():
    """The core's low_cpu_mem_usage path: build on meta, allocate empty, copy the state in."""
    torch.manual_seed(2)
    site = make_site(9, 7, dtype=torch.bfloat16)
    reference = adalora(site, init_r=3, lora_alpha=6)
    with torch.device("meta"):
        lazy = AdaLoraModule(site, reference.config)
    lazy = lazy.to_empty(device="cpu").eval()
    lazy.load_state_dict(reference.state_dict())
    weight, x = torch.randn(7, 9).to(torch.bfloat16), torch.randn(4, 9).to(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(run_site(x, weight, None, [lazy]), run_site(x, weight, None, [reference]))
        assert torch.equal(lazy.delta_weight(), reference.delta_weight())


def test_dropout_only_in_training_mode():
    torch.manual_seed(0)
    site = make_site(64, 8)
    module = adalora(site, init_r=4, lora_dropout=0.5)
    weight, x = torch.randn(8, 64), torch.randn(16, 64)
    with torch.no_grad():
        merged = F.linear(x, *fold_site(weight, None, [module]))
        assert max_error(run_site(x, weight, None, [module]), merged) <= site_tolerance(x, weight, None, [module],
                                                                                         torch.float32)
        module.train()
        assert max_error(run_site(x, weight, None, [module]), merged) > site_tolerance(x, weight, None, [module],
                                                                                         torch.float32)


# ---- PEFT parity at layer level ----------------------------------------------------------------

class Attention(nn.Module):
    def __init__(self, hidden=12, inner=10):
        super().__init__()
        self.q_proj = nn.Linear(hidden, inner)
        self.v_proj = nn.Linear(inner, hidden)

    def forward(self, x):
        return self.v_proj(torch.tanh(self.q_proj(x)))


class Tiny(nn.Module):
    """``layers.<i>.q_proj`` / ``v_proj``; returns an object with ``loss`` (AdaLoRA's regulariser
    is added to it by PEFT's tuner)."""

    def __init__(self, layers=2):
        super().__init__()
        self.layers = nn.ModuleList(Attention() for _ in range(layers))

    def forward(self, x, zero_loss=False):
        for layer in self.layers:
            x = layer(x)
        loss = torch.zeros(()) if zero_loss else x.float().pow(2).mean()
        return types.SimpleNamespace(loss=loss, out=x)


def peft_config(**params):
    params.setdefault("total_step", 10)
    params.setdefault("target_r", min(params.get("init_r", 12), 8))
    params.setdefault("init_lora_weights", False)
    return peft.AdaLoraConfig(target_modules=list(SITES), **params)


def twin_modules(peft_model, config, dtype):
    """Our modules with the PEFT model's adapter tensors, loaded through ``peft_keys``."""
    state = peft.get_peft_model_state_dict(peft_model)
    modules = {}
    for name, layer in peft_model.base_model.model.named_modules():
        if not isinstance(layer, peft.tuners.adalora.SVDLinear):
            continue
        site = make_site(layer.in_features, layer.out_features, dtype=dtype, name=name)
        module = AdaLoraModule(site, config).eval()
        saved = peft_layer_state(state, name)
        assert set(saved) == set(SPEC.peft_keys)  # a PEFT checkpoint maps one-to-one onto our state
        assert set(module.state_dict()) == set(SPEC.peft_keys.values())
        module.load_state_dict({SPEC.peft_keys[k]: v for k, v in saved.items()}, strict=True)
        modules[name] = module
    return modules


@pytest.mark.parametrize("dtype", PEFT_DTYPES)
@pytest.mark.parametrize("alpha", [8, 0])
def test_layer_outputs_and_merge_match_peft(dtype, alpha):
    torch.manual_seed(1)
    config = peft_config(init_r=5, lora_alpha=alpha)
    peft_model = peft.get_peft_model(Tiny().to(dtype), config)
    modules = twin_modules(peft_model, config_from_peft(SPEC, config), dtype)
    for name, module in modules.items():
        layer = peft_model.base_model.model.get_submodule(name)
        assert layer.lora_A["default"].dtype == torch.float32
        base = layer.base_layer
        x = torch.randn(3, 4, base.in_features).to(dtype)
        with torch.no_grad():
            theirs = layer(x)
            ours = run_site(x, base.weight, base.bias, [module])
            ours_weight, ours_bias = fold_site(base.weight, base.bias, [module])
            layer.merge()
        assert ours.dtype == theirs.dtype == dtype
        error = max_error(ours, theirs)
        assert error <= site_tolerance(x, base.weight, base.bias, [module], dtype)
        # same float32 formula, one cast: the merged weights are identical
        assert torch.equal(ours_weight, base.weight) and torch.equal(ours_bias, base.bias)


class GPT2Attention(nn.Module):
    def __init__(self):
        super().__init__()
        from transformers.pytorch_utils import Conv1D
        self.c_attn = Conv1D(18, 8)  # weight [in, out]: PEFT sets fan_in_fan_out itself

    def forward(self, x):
        return self.c_attn(x)


@pytest.mark.parametrize("dtype", PEFT_DTYPES)
def test_conv1d_site_matches_peft(dtype):
    torch.manual_seed(11)
    with pytest.warns(UserWarning, match="fan_in_fan_out"):
        peft_model = peft.get_peft_model(GPT2Attention().to(dtype), peft.AdaLoraConfig(
            target_modules=["c_attn"], init_r=3, target_r=3, total_step=5, init_lora_weights=False))
    layer = peft_model.base_model.model.c_attn
    site = make_site(8, 18, dtype=dtype, name="c_attn", op="conv1d")
    module = AdaLoraModule(site, AdaLoraConfig(init_r=3, target_r=3, total_step=5)).eval()
    saved = peft.get_peft_model_state_dict(peft_model)
    module.load_state_dict({SPEC.peft_keys[k.removeprefix("base_model.model.c_attn.")]: v for k, v in saved.items()})
    base = layer.base_layer
    x = torch.randn(2, 5, 8).to(dtype)
    with torch.no_grad():
        theirs = layer(x)
        ours = run_site(x, base.weight, base.bias, [module], fan_in_fan_out=True)
        ours_weight, _ = fold_site(base.weight, base.bias, [module], fan_in_fan_out=True)
        layer.merge()
    assert max_error(ours, theirs) <= site_tolerance(x, base.weight.t(), base.bias, [module], dtype)
    assert torch.equal(ours_weight, base.weight)


@pytest.mark.parametrize("dtype", PEFT_DTYPES)
@pytest.mark.parametrize("init", [True, False])
def test_seeded_init_matches_peft(dtype, init):
    base = Attention().to(dtype)
    config = peft_config(init_r=3, init_lora_weights=init)
    torch.manual_seed(7)
    peft_model = peft.get_peft_model(base, config)
    torch.manual_seed(7)
    module = AdaLoraModule(make_site(12, 10, dtype=dtype, name="q_proj"), config_from_peft(SPEC, config))
    layer = peft_model.base_model.model.q_proj
    for name in ("lora_A", "lora_E", "lora_B"):
        assert torch.equal(getattr(module, name), getattr(layer, name)["default"]), name
    assert module.ranknum == layer.ranknum["default"].item() == 3


# ---- rank allocator ----------------------------------------------------------------------------

def reference_budget(step, init_budget, target_budget, tinit, tfinal, total_step):
    """The cubic schedule as the reference writes it (§7.4)."""
    if step <= tinit:
        return init_budget
    if step >= total_step - tfinal:
        return target_budget
    progress = (step - tinit) / (total_step - tfinal - tinit)
    return int((init_budget - target_budget) * (1 - progress) ** 3 + target_budget)


def allocator_for(sites, init_r, **params):
    params.setdefault("target_r", min(init_r, 8))
    config = AdaLoraConfig(init_r=init_r, init_lora_weights=False, **params)
    modules = {f"layers.{i}.q_proj": AdaLoraModule(make_site(6, 5, name=f"layers.{i}.q_proj"), config)
               for i in range(sites)}
    return RankAllocator(modules, config)


def test_budget_schedule_reference_example():
    allocator = allocator_for(2, init_r=6, target_r=2, tinit=2, tfinal=4, total_step=20)
    assert (allocator.init_budget, allocator.target_budget) == (12, 4)
    assert [allocator.budget(s)[0] for s in range(1, 11)] == [12, 12, 10, 9, 7, 6, 6, 5, 5, 4]


@given(sites=st.integers(1, 4), init_r=st.integers(1, 8), data=st.data())
def test_budget_schedule_formula(sites, init_r, data):
    target_r = data.draw(st.integers(0, init_r))
    total_step = data.draw(st.integers(1, 60))
    tfinal = data.draw(st.integers(0, total_step - 1))
    tinit = data.draw(st.integers(0, total_step - tfinal - 1))
    delta = data.draw(st.integers(1, 5))
    allocator = allocator_for(sites, init_r, target_r=target_r, tinit=tinit, tfinal=tfinal,
                              total_step=total_step, deltaT=delta)
    init_budget, target_budget = sites * init_r, sites * target_r
    final = total_step - tfinal
    mid = (tinit + final) // 2
    assert allocator.budget(tinit) == (init_budget, False)
    assert allocator.budget(final)[0] == target_budget
    assert allocator.budget(final + 1) == (target_budget, True)
    for step in (tinit + 1, mid, final - 1):
        if tinit < step < final:
            budget, mask = allocator.budget(step)
            assert budget == reference_budget(step, init_budget, target_budget, tinit, tfinal, total_step)
            assert mask == (step % delta == 0)
    budgets = [allocator.budget(s)[0] for s in range(total_step + 2)]
    assert all(a >= b for a, b in zip(budgets, budgets[1:]))
    # PEFT's own schedule as the oracle
    peft_model = peft.get_peft_model(Tiny(1), peft_config(init_r=init_r, target_r=target_r, tinit=tinit,
                                                          tfinal=tfinal, total_step=total_step, deltaT=delta))
    theirs = peft_model.base_model.rankallocator
    assert theirs.init_bgt == 2 * init_r  # Tiny(1) has two sites
    twin = allocator_for(2, init_r, target_r=target_r, tinit=tinit, tfinal=tfinal, total_step=total_step,
                         deltaT=delta)
    assert [twin.budget(s) for s in range(final + 1)] == [theirs.budget_schedule(s) for s in range(final + 1)]


def copy_gradients(peft_model, modules):
    for name, module in modules.items():
        layer = peft_model.base_model.model.get_submodule(name)
        for attr in ("lora_A", "lora_E", "lora_B"):
            getattr(module, attr).grad = getattr(layer, attr)["default"].grad.clone()


def sgd_step(parameters, lr=1e-3):
    with torch.no_grad():
        for p in parameters:
            p -= lr * p.grad


@pytest.mark.parametrize("init", [False, True])
def test_allocator_matches_peft(init):
    """Identical gradients give identical masks, singular values and final ranks."""
    torch.manual_seed(3)
    config = peft_config(init_r=4, target_r=2, tinit=2, tfinal=3, deltaT=2, total_step=12, beta1=0.8,
                         beta2=0.9, init_lora_weights=init)
    peft_model = peft.get_peft_model(Tiny(3), config)
    modules = twin_modules(peft_model, config_from_peft(SPEC, config), torch.float32)
    allocator = RankAllocator(modules, config_from_peft(SPEC, config))
    peft_params = [p for n, p in peft_model.named_parameters() if "lora_" in n]
    ours_params = [p for m in modules.values() for p in m.parameters()]
    masked_steps = 0
    for step in range(config.total_step + 3):
        peft_model.base_model(torch.randn(8, 12)).loss.backward()
        copy_gradients(peft_model, modules)
        sgd_step(peft_params)
        sgd_step(ours_params)
        peft_model.base_model.update_and_allocate(step)
        budget = allocator.update_and_allocate(step)
        assert budget == peft_model.base_model.rankallocator.budget_schedule(step)[0]
        for name, module in modules.items():
            layer = peft_model.base_model.model.get_submodule(name)
            assert torch.equal(module.lora_E, layer.lora_E["default"]), (step, name)
        theirs = peft_model.peft_config["default"].rank_pattern
        if theirs is not None:
            expected = {k.removesuffix(".lora_E.default"): v for k, v in theirs.items()}
            assert allocator.rank_pattern() == expected, step
            masked_steps += 1
        for p in peft_params + ours_params:
            p.grad = None
    assert masked_steps >= 5
    assert sum(allocator.final_ranks.values()) <= allocator.target_budget
    assert allocator.final_ranks == {k: sum(v) for k, v in allocator.rank_pattern().items()}


def test_regularization_matches_peft():
    torch.manual_seed(4)
    config = peft_config(init_r=4, orth_reg_weight=0.3)
    peft_model = peft.get_peft_model(Tiny(2), config)
    modules = twin_modules(peft_model, config_from_peft(SPEC, config), torch.float32)
    allocator = RankAllocator(modules, config_from_peft(SPEC, config))
    with torch.no_grad():  # PEFT's tuner adds the regulariser to the model's (here zero) loss
        theirs = peft_model.base_model(torch.randn(2, 12), zero_loss=True).loss
    ours = allocator.regularization()
    # the same Frobenius norms, averaged in another order: positive terms, one rounding per add
    terms = 2 * len(modules)
    tolerance = 2 * terms * unit_roundoff(torch.float32) * theirs.item()
    assert theirs.item() > 0 and abs(ours.item() - theirs.item()) <= tolerance
    ours.backward()
    assert all(m.lora_A.grad is not None and m.lora_B.grad is not None for m in modules.values())
    assert all(m.lora_E.grad is None for m in modules.values())


def test_allocator_requires_gradients():
    allocator = allocator_for(2, init_r=3, total_step=10)
    with pytest.raises(RewriterError, match="after backward"):
        allocator.update_and_allocate(0)
    with pytest.raises(RewriterError, match="importance"):
        allocator.update_and_allocate(10)


def train_steps(allocator, steps, call_every=1, backwards_per_step=1):
    params = [p for m in allocator.modules.values() for p in m.parameters()]
    for step in range(steps):
        for _ in range(backwards_per_step):
            sum(m.lora_E.sum() + m.lora_A.sum() + m.lora_B.sum() for m in allocator.modules.values()).backward()
        if step % call_every == 0:
            allocator.update_and_allocate(step)
        for p in params:
            p.grad = None


def test_warns_once_when_allocation_is_forgotten():
    allocator = allocator_for(2, init_r=3, target_r=1, tinit=2, total_step=10)
    with pytest.warns(UserWarning, match="update_and_allocate") as caught:
        train_steps(allocator, 6, call_every=100)  # only step 0 is allocated
    assert len([w for w in caught if "update_and_allocate" in str(w.message)]) == 1


@pytest.mark.parametrize("backwards_per_step", [1, 3])
def test_no_warning_when_allocation_follows_every_step(backwards_per_step):
    allocator = allocator_for(2, init_r=3, target_r=1, tinit=1, total_step=6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train_steps(allocator, 9, backwards_per_step=backwards_per_step)
    assert allocator.final_ranks is not None and sum(allocator.final_ranks.values()) <= 2


def test_target_equal_to_init_keeps_every_rank():
    allocator = allocator_for(2, init_r=3, target_r=3, total_step=4)
    train_steps(allocator, 6)
    assert allocator.final_ranks == {name: 3 for name in allocator.modules}
    assert all(m.lora_E.all() for m in allocator.modules.values())


# ---- pruned checkpoints ------------------------------------------------------------------------

# PEFT's own false alarms on AdaLoRA's pruned checkpoints (zero-rank tensors, rank_pattern keys)
@pytest.mark.filterwarnings("ignore:.*invalid shape")
@pytest.mark.filterwarnings("ignore:.*rank_pattern keys did not match")
def test_pruned_checkpoint_matches_peft(tmp_path):
    """PEFT saves masked ranks pruned; our prune_state gives the same tensors, and both sides load
    the checkpoint (rank 0 included) to the same outputs."""
    torch.manual_seed(5)
    config = peft_config(init_r=4, target_r=2, tinit=1, tfinal=1, total_step=5)
    base = Tiny(2)
    base_state = copy.deepcopy(base.state_dict())
    peft_model = peft.get_peft_model(base, config)
    modules = twin_modules(peft_model, config_from_peft(SPEC, config), torch.float32)
    allocator = RankAllocator(modules, config_from_peft(SPEC, config))
    peft_params = [p for n, p in peft_model.named_parameters() if "lora_" in n]
    for step in range(config.total_step + 1):
        peft_model.base_model(torch.randn(8, 12)).loss.backward()
        copy_gradients(peft_model, modules)
        peft_model.base_model.update_and_allocate(step)
        allocator.update_and_allocate(step)
        for p in peft_params:
            p.grad = None
    pattern = allocator.rank_pattern()
    pattern["layers.1.v_proj"] = [False] * 4  # force a rank-0 site on both sides
    peft_model.peft_config["default"].rank_pattern = {f"{k}.lora_E.default": v for k, v in pattern.items()}
    with torch.no_grad():
        modules["layers.1.v_proj"].lora_E.zero_()
        peft_model.base_model.model.layers[1].v_proj.lora_E["default"].zero_()

    saved = peft.get_peft_model_state_dict(peft_model)
    saved_pattern = peft_model.peft_config["default"].rank_pattern
    assert set(saved_pattern) == {f"{k}.lora_E" for k in pattern}
    for name, module in modules.items():
        pruned, entry = peft_state(module, pattern[name])
        assert entry == saved_pattern[f"{name}.lora_E"]
        for key, attr in SPEC.peft_keys.items():
            assert torch.equal(pruned[attr], saved[f"base_model.model.{name}.{key}"]), (name, key)
    assert saved["base_model.model.layers.1.v_proj.lora_A"].shape == (0, 10)

    peft_model.save_pretrained(tmp_path)
    fresh_base = Tiny(2)
    fresh_base.load_state_dict(base_state)
    reloaded = peft.PeftModel.from_pretrained(fresh_base, tmp_path)
    resaved = peft.get_peft_model_state_dict(reloaded)
    for name, module in modules.items():
        fresh = AdaLoraModule(make_site(module.in_features, module.out_features, name=name), module.config).eval()
        fresh.load_pruned_state(prune_state(module, pattern[name]), pattern[name])
        assert fresh.r == sum(pattern[name])
        # saving again gives what PEFT saves again for its reloaded model
        tensors, entry = peft_state(fresh)
        assert entry == pattern[name] == reloaded.peft_config["default"].rank_pattern[f"{name}.lora_E"]
        for key, attr in SPEC.peft_keys.items():
            assert torch.equal(tensors[attr], resaved[f"base_model.model.{name}.{key}"]), (name, key)
        assert fresh.ranknum == module.ranknum == 4
        layer = reloaded.base_model.model.get_submodule(name)
        base = layer.base_layer
        x = torch.randn(5, base.in_features)
        with torch.no_grad():
            ours = run_site(x, base.weight, base.bias, [fresh])
            before_pruning = run_site(x, base.weight, base.bias, [module])
            theirs = layer(x)
            tolerance = site_tolerance(x, base.weight, base.bias, [module], torch.float32)
            assert max_error(ours, theirs) <= tolerance
            assert max_error(ours, before_pruning) <= tolerance
            if fresh.r == 0:
                assert torch.equal(ours, F.linear(x, base.weight, base.bias))
                assert torch.equal(fold_site(base.weight, base.bias, [fresh])[0], base.weight)


def test_pruned_state_round_trip_and_training_after_load():
    torch.manual_seed(8)
    site = make_site(7, 5)
    module = adalora(site, init_r=4)
    mask = [True, False, True, False]
    pruned = prune_state(module, mask)
    assert [t.shape for t in pruned.values()] == [(2, 7), (2, 1), (5, 2)]
    assert torch.equal(pruned["lora_A"], module.lora_A[[0, 2]].detach())
    target = adalora(site, init_r=4)
    parameter = target.lora_A
    target.lora_A.sum().backward()
    target.load_pruned_state(pruned, mask)
    assert target.lora_A is parameter and parameter.grad is None
    assert torch.equal(target.lora_B, module.lora_B[:, [0, 2]].detach())
    tensors, entry = peft_state(target)
    assert entry == mask and all(torch.equal(tensors[k], pruned[k]) for k in pruned)
    target(torch.randn(3, 7), torch.zeros(3, 5), None).sum().backward()
    assert target.lora_A.grad.shape == (2, 7)
    # a later allocation masks one of the two remaining ranks: the entry covers all init_r ranks
    tensors, entry = peft_state(target, [False, True])
    assert entry == [False, False, True, False] and tensors["lora_A"].shape == (1, 7)
    assert torch.equal(tensors["lora_E"], module.lora_E[[2]].detach())
    empty = prune_state(module, torch.zeros(4, dtype=torch.bool))
    target.load_pruned_state(empty, [False] * 4)
    assert target.r == 0 and target.scaling == module.scaling
    assert not target(torch.randn(3, 7), torch.zeros(3, 5), None).any()
    assert peft_state(target)[1] == [False] * 4


def test_unpruned_module_has_no_rank_pattern_entry():
    module = adalora(make_site(6, 4), init_r=3)
    tensors, entry = peft_state(module)
    assert entry is None and all(torch.equal(tensors[k], v) for k, v in module.state_dict().items())
    assert peft_state(module, [True, True, False])[1] == [True, True, False]


def test_pruned_state_errors_name_the_site():
    module = adalora(make_site(7, 5, name="layers.3.mlp.up_proj"), init_r=4)
    with pytest.raises(CheckpointError, match="layers.3.mlp.up_proj"):
        prune_state(module, [True, False])
    state = prune_state(module, [True, True, False, False])
    with pytest.raises(CheckpointError, match=r"layers.3.mlp.up_proj.*\(5, 2\)"):
        module.load_pruned_state({**state, "lora_B": torch.zeros(5, 3)}, [True, True, False, False])
    with pytest.raises(CheckpointError, match="lora_E"):
        module.load_pruned_state({"lora_A": state["lora_A"], "lora_B": state["lora_B"]}, [True, True, False, False])
    with pytest.raises(CheckpointError, match="init_r=4"):
        module.load_pruned_state(state, [True, True, False, False, False, False])
    with pytest.raises(CheckpointError, match="lora_A"):
        module.load_pruned_state(state, [True, True, True, False])


# ---- whole model (rewriter.apply) -------------------------------------------------------------

SCHEDULE = dict(init_r=4, target_r=2, tinit=1, tfinal=2, deltaT=1, total_step=8, lora_alpha=6, orth_reg_weight=0.2,
                init_lora_weights=False)


def test_rule_file_loads_and_targets_llama_projections():
    import rewriter
    from rewriter.models import load_model
    ruleset = rewriter.load_rules("rules/adalora-llama.toml")
    assert ruleset.method == "adalora"
    config = SPEC.make_config(ruleset.params)
    assert config.total_step > config.tinit + config.tfinal and config.target_r <= config.init_r
    names = [n for n, m in load_model("builtin:tiny-llama").named_modules() if isinstance(m, nn.Linear)]
    targeted = [n for n in names if targets(ruleset, n)]
    assert len(targeted) == 2 * 7 and "lm_head" not in targeted


def test_training_loop_on_a_model_matches_peft():
    """rewriter.apply + Adapted.update_and_allocate / regularization_loss against PEFT's tuner, with
    PEFT's gradients copied in: same outputs, same masks at every step, same final ranks."""
    import rewriter
    torch.manual_seed(9)
    model = Decoder()
    twin = copy.deepcopy(model)
    x = torch.randn(4, 16)
    rules = {"schema": 1, "adapter": {"method": "adalora", **SCHEDULE},
             "rule": [{"name": "attention", "suffix": list(SITES)}]}
    adapted = rewriter.apply(model, rules, example_inputs=(x,))
    peft_model = peft.get_peft_model(twin, peft.AdaLoraConfig(target_modules=list(SITES), **SCHEDULE))
    modules = adapted.adapters["default"].modules
    assert len(modules) == 4
    with torch.no_grad():
        for name, module in modules.items():
            layer = peft_model.base_model.model.get_submodule(name)
            for attr in ("lora_A", "lora_E", "lora_B"):
                getattr(layer, attr)["default"].copy_(getattr(module, attr))
    with torch.no_grad():
        ours, theirs = adapted(x), peft_model(x)
    assert max_error(ours, theirs) <= output_tolerance(theirs, torch.float32, depth=4)

    ours_params = [p for p in adapted.parameters() if p.requires_grad]
    peft_params = [p for n, p in peft_model.named_parameters() if "lora_" in n]
    assert len(ours_params) == len(peft_params) == 12
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for step in range(SCHEDULE["total_step"] + 2):
            inputs = torch.randn(4, 16)
            loss = adapted(inputs).pow(2).mean() + adapted.regularization_loss()
            loss.backward()
            assert all(p.grad is not None for p in ours_params)
            peft_model(inputs).pow(2).mean().backward()
            copy_gradients(peft_model, modules)
            sgd_step(ours_params)
            sgd_step(peft_params)
            adapted.update_and_allocate(step)
            peft_model.base_model.update_and_allocate(step)
            for name, module in modules.items():
                assert torch.equal(module.lora_E, peft_model.base_model.model.get_submodule(name).lora_E["default"])
            for p in ours_params + peft_params:
                p.grad = None
    allocator = adapted.adapters["default"].controller
    theirs_pattern = peft_model.peft_config["default"].rank_pattern
    assert allocator.rank_pattern() == {k.removesuffix(".lora_E.default"): v for k, v in theirs_pattern.items()}
    assert sum(allocator.final_ranks.values()) <= SCHEDULE["target_r"] * 4


def test_model_training_without_allocation_warns():
    import rewriter
    torch.manual_seed(10)
    x = torch.randn(4, 16)
    rules = {"schema": 1, "adapter": {"method": "adalora", **SCHEDULE},
             "rule": [{"name": "attention", "suffix": list(SITES)}]}
    adapted = rewriter.apply(Decoder(), rules, example_inputs=(x,))
    params = [p for p in adapted.parameters() if p.requires_grad]
    with pytest.warns(UserWarning, match="update_and_allocate"):
        for _ in range(SCHEDULE["tinit"] + 3):
            adapted(torch.randn(4, 16)).pow(2).mean().backward()
            for p in params:
                p.grad = None
