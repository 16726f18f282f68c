"""Llama-Adapter (PEFT's adaption prompt): attention blocks found in the graph, zero-gate init exactly
the base, parity with PEFT 0.21.2 both ways on Llama and GPT-2, training, stacking, errors."""
import copy

import peft
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import rewriter
from rewriter.errors import CheckpointError, MergeError, RewriterError, RuleError
from rewriter.rules.peft import rules_from_peft_config
from rewriter.core.tolerance import output_tolerance
from rewriter.core.tracing import trace_model

from shared import RULES_DIR

IDS = torch.randint(0, 512, (2, 7), generator=torch.Generator().manual_seed(3))
TOP = {"tiny-llama": "model.layers.1.self_attn", "tiny-gpt2": "transformer.h.1.attn"}


def rules(**params):
    return {"adapter": {"method": "adaption_prompt", "adapter_len": 4, "adapter_layers": 2, **params}}


def logits(adapted):
    with torch.no_grad():
        return adapted(input_ids=IDS).logits


def set_gates(adapted, value, adapter="default"):
    with torch.no_grad():
        for module in adapted.adapters[adapter].modules.values():
            module.adaption_gate.fill_(value)


def base_logits(traced):
    return logits(rewriter.Adapted(traced.clone()))


@pytest.mark.parametrize("name, dtype", [("tiny-llama", None), ("tiny-llama", torch.bfloat16), ("tiny-mistral", None),
                                         ("tiny-gpt2", None), ("tiny-qwen2", None), ("tiny-gemma", None)])
def test_zero_gate_is_the_base_model_exactly_and_a_gate_changes_it(traced_models, name, dtype):
    traced = traced_models(name, dtype)
    base = base_logits(traced)
    adapted = rewriter.apply(traced, rules())
    modules = adapted.adapters["default"].modules
    assert len(modules) == 2 and all(m.adaption_prompt.shape == (1, 4, 64) for m in modules.values())
    assert all(m.project_output == (name != "tiny-gpt2") for m in modules.values())  # PEFT's GPT-2 convention
    assert torch.equal(logits(adapted), base)
    set_gates(adapted, 0.5)
    assert (logits(adapted).float() - base.float()).abs().max() > 1e-2


def test_shipped_rule_file_takes_the_top_two_self_attention_blocks(traced_models):
    traced = traced_models("tiny-llama")
    base = base_logits(traced)
    adapted = rewriter.apply(traced, RULES_DIR / "adaption-prompt-llama.toml")
    modules = adapted.adapters["default"].modules
    assert list(modules) == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    assert all(m.adaption_prompt.shape == (1, 10, 64) for m in modules.values())
    assert torch.equal(logits(adapted), base)


def test_adapter_layers_counts_from_the_top(traced_models):
    adapted = rewriter.apply(traced_models("tiny-gpt2"), rules(adapter_layers=1))
    assert list(adapted.adapters["default"].modules) == ["transformer.h.1.attn"]


@pytest.mark.parametrize("name, dtype", [("tiny-llama", None), ("tiny-llama", torch.bfloat16), ("tiny-gpt2", None)])
def test_peft_checkpoints_load_here_and_ours_load_in_peft_with_the_same_logits(traced_models, tmp_path, name, dtype):
    traced = traced_models(name, dtype)
    model, base = traced.source, base_logits(traced)
    torch.manual_seed(0)
    config = peft.AdaptionPromptConfig(adapter_len=4, adapter_layers=1, task_type="CAUSAL_LM")
    theirs = peft.get_peft_model(copy.deepcopy(model), config).eval()
    with torch.no_grad():
        for pname, p in theirs.named_parameters():
            if pname.endswith("adaption_gate"):
                p.fill_(2.0)  # large enough to matter beyond the bf16 tolerance; the prompts are N(0, 1)
        expected = theirs(input_ids=IDS).logits
    theirs.save_pretrained(tmp_path / "peft")
    adapted = rewriter.Adapted(traced)
    adapted.load_adapter(tmp_path / "peft")
    assert list(adapted.adapters["default"].modules) == [TOP[name]]
    tol = output_tolerance(expected, dtype or torch.float32, depth=2)
    assert (expected.float() - base.float()).abs().max() > tol  # the adapter matters
    assert (logits(adapted).float() - expected.float()).abs().max() <= tol
    # ours, with values PEFT never had, saved in PEFT's format
    module = adapted.adapters["default"].modules[TOP[name]]
    with torch.no_grad():
        module.adaption_gate.fill_(-2.0)
        module.adaption_prompt.mul_(1.5)
    ours = logits(adapted)
    adapted.save_adapter(tmp_path / "ours", format="peft")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "ours").eval()
    assert isinstance(back, peft.PeftModelForCausalLM)  # task_type CAUSAL_LM was recorded
    with torch.no_grad():
        reloaded = back(input_ids=IDS).logits.float()
    assert (reloaded - ours.float()).abs().max() <= tol
    assert (reloaded - expected.float()).abs().max() > tol


def test_training_reaches_gate_and_prompt_only(traced_models):
    adapted = rewriter.apply(traced_models("tiny-llama"), rules())
    adapted.train()
    modules = list(adapted.adapters["default"].modules.values())
    adapted(input_ids=IDS).logits.square().mean().backward()
    for name, p in adapted.gm.named_parameters():
        if "adaption" not in name:
            assert not p.requires_grad and p.grad is None, name
    for m in modules:  # at gate 0 only the gate learns (as in PEFT): the prompt's gradient is 0
        assert m.adaption_gate.grad.abs().item() > 0
        assert m.adaption_prompt.grad is not None and not m.adaption_prompt.grad.any()
    set_gates(adapted, 0.5)
    adapted.zero_grad(set_to_none=True)
    adapted(input_ids=IDS).logits.square().mean().backward()
    assert all(m.adaption_prompt.grad.abs().max() > 0 for m in modules)


def test_merge_refuses_with_the_reason_and_unload_gives_the_base(traced_models):
    traced = traced_models("tiny-llama")
    base = base_logits(traced)
    adapted = rewriter.apply(traced, rules())
    set_gates(adapted, 0.5)
    with pytest.raises(MergeError, match="attention over learned prompt tokens"):
        adapted.merge()
    assert adapted.merged == []
    with adapted.disable_adapters():
        assert torch.equal(logits(adapted), base)
    adapted.unload()
    assert torch.equal(logits(adapted), base)


KV_LORA = '[adapter]\nname = "kv"\nr = 2\ninit = false\n[[rule]]\nname = "kv"\nsuffix = ["k_proj", "v_proj"]\n'


def test_stacks_with_lora_below_it_that_also_projects_the_prompt(traced_models):
    adapted = rewriter.apply(traced_models("tiny-llama"), KV_LORA)
    lora_only = logits(adapted)
    adapted.add_adapter(rules(), activate=True)
    set_gates(adapted, 0.5)
    both = logits(adapted)
    tol = output_tolerance(both, torch.float32, depth=2)
    assert (both - lora_only).abs().max() > 1000 * tol
    adapted.set_adapter("default")
    assert (logits(adapted) - both).abs().max() > 1000 * tol
    # merging the LoRA alone keeps the outputs: the prompt's keys and values see it merged or not
    adapted.set_adapter(["kv", "default"])
    adapted.merge(["kv"])
    assert adapted.merged == ["kv"]
    assert (logits(adapted) - both).abs().max() <= tol


def test_project_output_overrides_the_architecture_convention(traced_models, tmp_path):
    traced = traced_models("tiny-gpt2")
    outputs = []
    for project in (None, True):
        adapted = rewriter.apply(traced.clone(), rules(project_output=project))
        torch.manual_seed(0)
        with torch.no_grad():
            for m in adapted.adapters["default"].modules.values():
                m.adaption_prompt.normal_()
        set_gates(adapted, 0.5)
        outputs.append(logits(adapted))
    assert (outputs[0] - outputs[1]).abs().max() > 1e-3  # c_proj applied to the adapter output, or not
    with pytest.raises(CheckpointError, match="project_output is set"):
        adapted.save_adapter(tmp_path / "peft", format="peft")


def test_peft_config_without_target_modules_takes_peft_default_for_the_model_type():
    ruleset = rules_from_peft_config({"peft_type": "ADAPTION_PROMPT", "adapter_len": 3, "adapter_layers": 1,
                                      "target_modules": None}, model_type="gpt2")
    assert ruleset.method == "adaption_prompt"
    assert ruleset.params == {"adapter_len": 3, "adapter_layers": 1, "target_modules": "attn"}


def test_target_modules_matching_no_attention_names_the_blocks(traced_models):
    adapted = rewriter.Adapted(traced_models("tiny-llama"))
    with pytest.raises(RuleError) as info:
        adapted.add_adapter(rules(target_modules="mlp"))
    assert "no attention block is named '*.mlp'" in str(info.value)
    assert "model.layers.0.self_attn" in info.value.fix and "field 'target_modules'" in info.value.where
    with pytest.raises(RuleError, match=r"adapter_layers = 3, but the rules match only 2"):
        adapted.add_adapter(rules(adapter_layers=3))
    with pytest.raises(RuleError, match="'adapter_len' must be >= 1"):
        adapted.add_adapter(rules(adapter_len=0))
    assert adapted.adapters == {}


def test_a_model_without_attention_is_refused(traced_models):
    adapted = rewriter.Adapted(traced_models("tiny-mlp"))
    with pytest.raises(RuleError, match="no attention found: the graph has no scaled_dot_product_attention"):
        adapted.add_adapter(rules())


class NormedKeyAttention(nn.Module):
    """Attention whose keys are normalised after k: the prompt cannot be projected like the tokens."""

    def __init__(self, width=16, heads=2):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(width, width) for _ in range(4))

    def forward(self, x):
        batch, tokens, width = x.shape
        split = lambda t: t.view(batch, tokens, self.heads, -1).transpose(1, 2)  # noqa: E731
        k = self.k(x)
        k = k * torch.rsqrt(k.pow(2).mean(-1, keepdim=True) + 1e-6)
        out = F.scaled_dot_product_attention(split(self.q(x)), split(k), split(self.v(x)))
        return self.o(out.transpose(1, 2).reshape(batch, tokens, width))


class NormedKeyModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = NormedKeyAttention()

    def forward(self, x):
        return self.attn(x)


def test_an_attention_pattern_it_cannot_follow_names_the_block_and_the_op():
    adapted = rewriter.Adapted(trace_model(NormedKeyModel(), (torch.randn(2, 5, 16),)))
    with pytest.raises(RewriterError) as info:
        adapted.add_adapter(rules(adapter_layers=1))
    message = str(info.value)
    assert "attention block 'attn' cannot take Llama-Adapter" in message and "rsqrt" in message
