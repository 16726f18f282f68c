"""LoRA parity with PEFT 0.21.2 (the oracle): same weights, same outputs; checkpoints both ways."""
import copy

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

import rewriter
from rewriter.models import load_model
from rewriter.core.tolerance import output_tolerance

CASES = {  # model -> (PEFT target_modules, extra config)
    "tiny-llama": (["q_proj", "v_proj", "down_proj"], {"rank_pattern": {"down_proj": 2}, "alpha_pattern": {"v_proj": 4}}),
    "tiny-gpt2": (["c_attn", "c_proj"], {"fan_in_fan_out": True}),
    "tiny-bert": (["query", "value"], {"lora_dropout": 0.1, "use_rslora": True}),
}


def _inputs(model):
    ids = torch.randint(0, 512, (3, 10), generator=torch.Generator().manual_seed(3))
    inputs = {"input_ids": ids}
    if "bert" in type(model).__name__.lower():
        inputs["attention_mask"] = torch.ones_like(ids)
    return inputs


def _peft_trained(name, dtype=torch.float32, steps=3):
    torch.manual_seed(0)
    model = load_model(f"builtin:{name}", dtype=dtype)
    targets, extra = CASES[name]
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules=targets, **extra))
    peft_model.train()
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    inputs = _inputs(model)
    for _ in range(steps):  # a few real steps, so B is non-zero
        out = peft_model(**inputs).logits.float()
        loss = out.logsumexp(-1).mean() - out[..., 0].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    peft_model.eval()
    return model, peft_model, inputs


@pytest.mark.parametrize("name", sorted(CASES))
def test_peft_trained_checkpoint_loads_and_reproduces_outputs(name, tmp_path):
    model, peft_model, inputs = _peft_trained(name)
    peft_model.save_pretrained(tmp_path)
    with torch.no_grad():
        expected = peft_model(**inputs).logits
    adapted = rewriter.load_adapter(model, tmp_path)
    with torch.no_grad():
        got = adapted(**inputs).logits
    assert (got - expected).abs().max().item() <= output_tolerance(expected, torch.float32) / 100
    assert len(adapted.adapters["default"].modules) == len([m for m in peft_model.modules() if hasattr(m, "lora_A")])


@pytest.mark.parametrize("name", sorted(CASES))
def test_rewriter_saves_peft_format_that_peft_loads(name, tmp_path):
    model, peft_model, inputs = _peft_trained(name)
    peft_model.save_pretrained(tmp_path / "peft")
    adapted = rewriter.load_adapter(model, tmp_path / "peft")
    adapted.save_adapter(tmp_path / "ours", format="peft")
    reloaded = PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "ours")
    with torch.no_grad():
        ours = adapted(**inputs).logits
        theirs = reloaded(**inputs).logits
    assert torch.equal(ours, theirs)


def test_bf16_base_with_fp32_adapters_matches_peft(tmp_path):
    model, peft_model, inputs = _peft_trained("tiny-llama", dtype=torch.bfloat16, steps=2)
    assert all(p.dtype == torch.float32 for n, p in peft_model.named_parameters() if "lora_" in n)
    peft_model.save_pretrained(tmp_path)
    adapted = rewriter.load_adapter(model, tmp_path)
    assert all(p.dtype == torch.float32 for m in adapted.adapters["default"].modules.values() for p in m.parameters())
    with torch.no_grad():
        expected = peft_model(**inputs).logits
        got = adapted(**inputs).logits
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, expected)  # same math, same single rounding at the end of each site
