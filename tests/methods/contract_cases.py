"""What the contract test (test_contract.py) needs to know per method: the sizes and parameters a
site-level case draws, the tolerance it is held to, and how a method goes onto the tiny Llama (its ready
rule file; a graph-scope method may need more first, and says where a LoRA below it goes).

A per-site method with no entry in SITE_CASES is drawn at any size with its default parameters; a method
without a ready rule file ``rules/<method>-llama*.toml`` fails the whole-model legs and says so."""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from hypothesis import strategies as st

import rewriter
from rewriter.check import perturb
from rewriter.core.tolerance import matmul_tolerance
from rewriter.testing import fold_magnitude

from shared import LORA_RULES, RULES_DIR, absolute_copies, boft_geometries, boft_geometry_params

MAX_FEATURES = 24  #: site sizes drawn: small, so that a case takes milliseconds
#: the tiny Llama's linear projections (``model.layers.<i>.self_attn.q_proj``, ...), as LoRA suffixes
LLAMA_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def methods() -> list[str]:
    """Every registered method, sorted."""
    rewriter.methods.load_all()
    return sorted(rewriter.METHODS)


def features(draw, low: int = 1) -> tuple[int, int]:
    return draw(st.integers(low, MAX_FEATURES)), draw(st.integers(1, MAX_FEATURES))


# ---- site level: (in_features, out_features, parameters) a method accepts -------------------------

def _lora(draw):
    return (*features(draw), dict(r=draw(st.integers(1, 8)), lora_alpha=draw(st.sampled_from([1, 8, 16])),
                                  use_rslora=draw(st.booleans()), init_lora_weights=False))


def _lycoris(draw, **extra):
    return (*features(draw), dict(r=draw(st.integers(1, 8)), alpha=draw(st.sampled_from([1, 4, 8.0, 16, 0.5])),
                                  init_weights=False, **{k: draw(v) for k, v in extra.items()}))


def _adalora(draw):
    init_r = draw(st.integers(1, 6))
    return (*features(draw), dict(init_r=init_r, target_r=draw(st.integers(1, init_r)), total_step=10,
                                  lora_alpha=draw(st.sampled_from([8, 3.5, -2])), init_lora_weights=False))


def _fourierft(draw):
    in_f, out_f = features(draw)
    return in_f, out_f, dict(n_frequency=draw(st.integers(1, min(in_f * out_f, 64))),
                             scaling=draw(st.sampled_from([1.0, 150.0, -37.5])),
                             random_loc_seed=draw(st.integers(0, 2**31 - 1)))


def _miss(draw):
    variant = draw(st.sampled_from([True, False, "mini", "bat"]))
    r = draw(st.integers(1, 8))
    if variant == "bat":  # r divides both dimensions
        return r * draw(st.integers(1, 3)), r * draw(st.integers(1, 3)), dict(r=r, init_weights="bat")
    mini_r = draw(st.integers(1, 6))
    in_f = draw(st.integers(r, MAX_FEATURES))
    out_f = mini_r * draw(st.integers(1, 4)) if variant == "mini" else draw(st.integers(1, MAX_FEATURES))
    return in_f, out_f, dict(r=r, mini_r=mini_r, init_weights=variant)


def _ia3(draw):
    return (*features(draw), dict(is_feedforward=draw(st.booleans())))


def _oft(draw):
    block = draw(st.integers(2, 6))  # a block of 1 has no parameter: nothing to rotate
    in_f = block * draw(st.integers(1, 4))
    by_block = draw(st.booleans())
    return in_f, draw(st.integers(1, MAX_FEATURES)), dict(
        oft_block_size=block if by_block else 0, r=0 if by_block else in_f // block,
        use_cayley_neumann=draw(st.booleans()), block_share=draw(st.booleans()))


def _boft(draw):
    geometry = draw(boft_geometries())
    return geometry[0] * geometry[1], draw(st.integers(1, MAX_FEATURES)), boft_geometry_params(draw, geometry)


SITE_CASES = {
    "lora": _lora,
    "loha": _lycoris,
    "lokr": lambda draw: _lycoris(draw, decompose_both=st.booleans(), decompose_factor=st.sampled_from([-1, 2, 3])),
    "adalora": _adalora,
    "fourierft": _fourierft,
    "miss": _miss,
    "ia3": _ia3,
    "oft": _oft,
    "boft": _boft,
}


@st.composite
def site_cases(draw, method: str):
    """``(in_features, out_features, params)`` for a ``method`` site."""
    case = SITE_CASES.get(method)
    return case(draw) if case is not None else (*features(draw), {})


def chain_factor(weight, modules) -> float:
    """``sqrt`` of how much longer the unmerged path's accumulation is than the ``in``-long dot product
    ``matmul_tolerance`` sizes: an additive level sums its factored delta over an inner dimension (LoRA's
    rank: its parameters over ``in + out``) and adds it on, one rounding more per level; on narrow sites
    (``in`` of 1 or 2) those sums dominate."""
    out_f, in_f = weight.shape
    inner = sum(math.ceil(sum(p.numel() for p in m.parameters()) / (in_f + out_f)) for m in modules if m.additive)
    return math.sqrt((in_f + inner + len(modules)) / in_f)


@torch.no_grad()
def site_tolerance(x, weight, bias, modules) -> float:
    """Allowed |unmerged - merged| at one site (``weight [out, in]``): ``matmul_tolerance`` over the
    magnitudes of the terms the two forms add up.  Per fold step the larger of the net change
    (``rewriter.testing.fold_magnitude``) and the change with every factor taken in absolute value (the
    fold of |W| by copies with |parameters|, as ``shared.site_tolerance`` takes it): a factored delta
    (rank terms of LoRA, AdaLoRA, ...) rounds its terms before they cancel.  The bias is one more input
    column of its own magnitude, |b| + the changes the folds make to it: ``site_merge_error`` allows it
    one rounding of its own size, too little where a method scales the output after the bias is added
    (BOFT's ``boft_s``: the unmerged form rounds ``y + b``, then the product)."""
    absolute_bias = bias.abs() if bias is not None else None
    magnitude = torch.maximum(fold_magnitude(weight, bias, modules),
                              fold_magnitude(weight.abs(), absolute_bias, absolute_copies(modules)))
    if bias is None:
        return matmul_tolerance(x, magnitude, weight.dtype) * chain_factor(weight, modules)
    bias_magnitude = torch.zeros(bias.shape)
    for w, b, mods in ((weight.float(), bias.float(), modules),
                       (weight.float().abs(), absolute_bias.float(), absolute_copies(modules))):
        total = b.abs()
        for module in mods:
            w, folded = module.fold(w, b)
            total = total + (folded - b).abs()
            b = folded
        bias_magnitude = torch.maximum(bias_magnitude, total)
    ones = torch.ones(*x.shape[:-1], 1)
    return chain_factor(weight, modules) * matmul_tolerance(
        torch.cat([x.float(), ones], -1), torch.cat([magnitude, bias_magnitude[:, None]], 1),
        weight.dtype)


@torch.no_grad()
def perturb_module(module, generator: torch.Generator, scale: float) -> None:
    """Move every parameter off its (often exact no-op) init: ``p += scale * N(0, 1)``."""
    for p in module.parameters():
        p.add_(torch.randn(p.shape, generator=generator).to(p) * scale)


# ---- whole model: the method on the tiny Llama -------------------------------------------------------

def ready_rule_file(method: str) -> Path:
    """The method's ready rule file for Llama, ``rules/<method>-llama*.toml`` (the first one)."""
    shipped = sorted(RULES_DIR.glob(f"{method.replace('_', '-')}-llama*.toml"))
    assert shipped, f"rules/{method.replace('_', '-')}-llama*.toml is missing: every method ships a ready rule file"
    return shipped[0]


def _xlora_experts(adapted) -> None:
    """The LoRA adapters rules/xlora-llama.toml mixes, on different layers."""
    adapted.add_adapter(LORA_RULES.format(targets='["q_proj", "v_proj"]'), "math")
    adapted.add_adapter(LORA_RULES.format(targets='["k_proj", "o_proj"]'), "code")


#: graph-scope methods: what the model needs before the method goes on
PREPARE = {"xlora": _xlora_experts}
#: graph-scope methods: the projections a LoRA below them adapts (the method's own blocks; X-LoRA refuses
#: other adapters at its experts' layers, so its LoRA takes the MLP, inside its target: the whole model)
STACKED_LORA = {"adaption_prompt": ["k_proj", "v_proj"], "xlora": ["gate_proj", "up_proj", "down_proj"]}


def install(method: str, traced, seed: int = 0) -> tuple[rewriter.Adapted, str]:
    """An Adapted of ``traced`` with ``method``'s ready rule file active alone, its weights perturbed
    (``rewriter.check.perturb``) away from their init; ``(adapted, adapter name)``."""
    torch.manual_seed(seed)
    adapted = rewriter.Adapted(traced)
    PREPARE.get(method, lambda a: None)(adapted)
    before = set(adapted.adapters)
    adapted.add_adapter(ready_rule_file(method))
    (name,) = set(adapted.adapters) - before
    adapted.set_adapter(name)
    perturb(adapted, seed=seed, scale=0.1, adapter_names=[name])
    return adapted, name


def lora_rules_for(sites) -> str:
    """LORA_RULES on exactly ``sites``."""
    return LORA_RULES.format(targets=json.dumps(sorted(sites)))
