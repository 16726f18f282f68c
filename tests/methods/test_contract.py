"""The contract every registered method keeps, tested for each one in ``rewriter.METHODS``: a new method
gets these tests by registering (its sizes and parameters, if its defaults do not fit any site, go in
contract_cases.py).

1. forward == fold: at one site, over random sizes, parameters, seeds and dtypes, the unmerged output
   (``run_site``) equals the folded weight's (``fold_site``, then ``F.linear``) within the tolerance
   derived from the dtype and the magnitudes of the terms (``contract_cases.site_tolerance``); a method
   that cannot be merged refuses with a MergeError and its reason.
2. unmerge is exact: on the tiny Llama (float32 and bfloat16), merge then unmerge gives the unmerged
   outputs bit for bit, and the base model's.
3. save/load round trip in both formats: a fresh Adapted of the same traced model gives the same outputs
   bit for bit (a method without a PEFT type: saving in PEFT's format is refused, with the reason).
4. stacked with LoRA: a LoRA below the method on its sites, both active, merged equals unmerged
   (``assert_merge_equivalent``); a graph-scope method runs over a LoRA on its own blocks, which merges
   under it.
"""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import rewriter
from rewriter.check import perturb
from rewriter.core.graph import fold_site, run_site
from rewriter.core.tolerance import output_tolerance
from rewriter.errors import CheckpointError, MergeError
from rewriter.testing import assert_merge_equivalent, make_site

from contract_cases import (LLAMA_PROJECTIONS, STACKED_LORA, install, lora_rules_for, methods, perturb_module,
                            site_cases, site_tolerance)
from shared import LORA_RULES, logits_of

MODEL = "tiny-llama"
METHODS = methods()
SITE_DTYPES = [torch.float32, torch.bfloat16]
SITE_EXAMPLES = 100  # per method, at least: a site case takes milliseconds
IDS = torch.randint(0, 512, (2, 7), generator=torch.Generator().manual_seed(0))


def spec(method: str):
    return rewriter.METHODS[method]


def reasons(adapted, name: str) -> set[str]:
    """Why the modules of adapter ``name`` cannot be merged (empty: they can)."""
    return {m.not_mergeable for m in adapted.adapters[name].modules.values() if m.not_mergeable}


def logits(adapted) -> torch.Tensor:
    with torch.no_grad():
        return logits_of(adapted(input_ids=IDS))


def base_logits(adapted) -> torch.Tensor:
    with adapted.disable_adapters():
        return logits(adapted)


def tolerance(reference, traced) -> float:
    """Allowed |merged - unmerged| of the whole model's logits."""
    return output_tolerance(reference, reference.dtype, depth=traced.source.config.num_hidden_layers)


def assert_changes(output, base, traced) -> None:
    """The adapter moves the outputs by more than float32 rounding could: the checks after this mean
    something (also in bfloat16, where they are bitwise)."""
    depth = traced.source.config.num_hidden_layers
    assert (output.float() - base.float()).abs().max().item() > output_tolerance(base, torch.float32, depth)


# ---- 1. forward == fold ----------------------------------------------------------------------

def assert_site_forward_equals_fold(method: str) -> None:
    method_spec = spec(method)

    @settings(max_examples=max(settings.default.max_examples, SITE_EXAMPLES))
    @given(case=site_cases(method), dtype=st.sampled_from(SITE_DTYPES), with_bias=st.booleans(),
           batch=st.sampled_from([(3,), (2, 5)]), seed=st.integers(0, 2**31 - 1),
           scale=st.sampled_from([0.05, 0.3, 1.0]))
    def check(case, dtype, with_bias, batch, seed, scale):
        in_f, out_f, params = case
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)  # the methods' own random inits
        site = make_site(in_f, out_f, dtype=dtype, bias=with_bias)
        module = method_spec.module_cls(site, method_spec.make_config(params)).eval()
        perturb_module(module, gen, scale)
        weight = (torch.randn(out_f, in_f, generator=gen) / in_f ** 0.5).to(dtype)
        bias = torch.randn(out_f, generator=gen).to(dtype) if with_bias else None
        x = torch.randn(*batch, in_f, generator=gen).to(dtype)
        with torch.no_grad():
            unmerged = run_site(x, weight, bias, [module])
            merged_weight, merged_bias = fold_site(weight, bias, [module])
            merged = F.linear(x, merged_weight, merged_bias)
            change = (module.fold(weight.float(), None)[0] - weight.float()).abs().max().item()
        assert change > 0, "the adapter is a no-op here: the case proves nothing"
        assert unmerged.dtype == merged.dtype == merged_weight.dtype == dtype
        error = (unmerged.float() - merged.float()).abs().max().item()
        tol = site_tolerance(x, weight, bias, [module])
        assert error <= tol, f"{method}: |unmerged - merged| = {error:.3e} > {tol:.3e} ({params})"

    check.hypothesis.inner_test._hypothesis_internal_add_digest = method.encode()  # one example database per method
    check()


@pytest.mark.parametrize("method", METHODS)
def test_forward_equals_fold_or_merge_is_refused(method, traced_models):
    if spec(method).module_cls.not_mergeable is None and spec(method).graph_scope is None:
        assert_site_forward_equals_fold(method)
        return
    traced = traced_models(MODEL)
    adapted, name = install(method, traced)
    if spec(method).module_cls.not_mergeable is None:  # a mergeable graph-scope method: on the whole model
        report = assert_merge_equivalent(adapted)
        assert report.sites and report.output_error <= report.output_tolerance
        return
    before = logits(adapted)
    (reason,) = reasons(adapted, name)
    with pytest.raises(MergeError) as info:
        adapted.merge()
    assert reason in str(info.value)
    assert adapted.merged == []
    with pytest.raises(MergeError, match="cannot be merged"):
        rewriter.check_merge(adapted)
    assert torch.equal(logits(adapted), before)  # a refused merge changes nothing


# ---- 2. unmerge is exact ---------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("method", METHODS)
def test_unmerge_is_exact(method, dtype, traced_models):
    traced = traced_models(MODEL, None if dtype == torch.float32 else dtype)  # None: the session's trace
    adapted, name = install(method, traced)
    base, before = base_logits(adapted), logits(adapted)
    assert before.dtype == dtype
    assert_changes(before, base, traced)
    if reasons(adapted, name):
        with pytest.raises(MergeError):
            adapted.merge()
    else:
        adapted.merge()
        assert adapted.merged == [name]
        merged = logits(adapted)
        assert (merged.float() - before.float()).abs().max().item() <= tolerance(before, traced)
    adapted.unmerge()
    assert adapted.merged == []
    assert torch.equal(logits(adapted), before)
    assert torch.equal(base_logits(adapted), base)


# ---- 3. save and load ------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["rewriter", "peft"])
@pytest.mark.parametrize("method", METHODS)
def test_save_load_round_trip_is_exact(method, fmt, traced_models, tmp_path):
    traced = traced_models(MODEL)
    adapted, name = install(method, traced)
    expected = logits(adapted)
    assert_changes(expected, base_logits(adapted), traced)
    if fmt == "peft" and spec(method).peft_type is None:
        with pytest.raises(CheckpointError, match="no PEFT equivalent"):
            adapted.save_adapter(tmp_path, [name], format="peft")
        assert not any(tmp_path.iterdir())
        return
    adapted.save_adapter(tmp_path, [name], format=fmt)
    fresh = rewriter.Adapted(traced_models(MODEL))
    fresh.load_adapter(tmp_path)
    (loaded,) = fresh.adapters  # one adapter (X-LoRA: its experts inside it)
    fresh.set_adapter(loaded)
    assert fresh.adapters[loaded].method == method
    assert torch.equal(logits(fresh), expected)


# ---- 4. stacked with LoRA --------------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
def test_stacked_over_lora(method, traced_models):
    traced = traced_models(MODEL)
    adapted, name = install(method, traced)
    alone = logits(adapted)
    if spec(method).graph_scope is None:
        sites = sorted(adapted.adapters[name].modules)
        adapted.add_adapter(lora_rules_for(sites), "lora")
    else:  # on the method's own blocks
        projections = STACKED_LORA.get(method, LLAMA_PROJECTIONS)
        adapted.add_adapter(LORA_RULES.format(targets=json.dumps(projections)), "lora")
    perturb(adapted, seed=1, scale=0.1, adapter_names=["lora"])
    adapted.set_adapter("lora")
    lora_alone = logits(adapted)
    adapted.set_adapter(["lora", name])
    both = logits(adapted)
    assert torch.isfinite(both).all()
    assert_changes(both, alone, traced)
    assert_changes(both, lora_alone, traced)
    if not reasons(adapted, name):
        report = assert_merge_equivalent(adapted)
        checked = {s.site: s.adapters for s in report.sites}
        assert checked and all(names[-2:] == ["lora", name] for names in checked.values())
        if spec(method).graph_scope is None:
            assert checked == {s: ["lora", name] for s in sites}
        assert report.output_error <= report.output_tolerance
    else:  # the LoRA below merges under it
        adapted.merge(["lora"])
        assert adapted.merged == ["lora"]
        assert (logits(adapted) - both).abs().max().item() <= tolerance(both, traced)
        adapted.unmerge()
        assert torch.equal(logits(adapted), both)
