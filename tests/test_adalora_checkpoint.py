"""AdaLoRA checkpoints with pruned ranks (PEFT's rank_pattern), through the core, both formats."""
import copy

import torch
from peft import AdaLoraConfig, PeftModel, get_peft_model

import rewriter
from rewriter.models import load_model


def _peft_allocated(tmp_path):
    torch.manual_seed(0)
    model = load_model("builtin:tiny-llama")
    cfg = AdaLoraConfig(init_r=6, target_r=2, tinit=0, tfinal=1, deltaT=1, total_step=5, lora_alpha=8,
                        target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_model = get_peft_model(copy.deepcopy(model), cfg)
    peft_model.train()
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(4))
    for step in range(5):
        loss = peft_model(input_ids=ids).logits.logsumexp(-1).mean()
        loss.backward()
        opt.step()
        peft_model.base_model.update_and_allocate(step)
        opt.zero_grad()
    peft_model.eval()
    peft_model.save_pretrained(tmp_path / "peft")
    return model, peft_model, ids


def test_pruned_peft_checkpoint_loads_and_round_trips(tmp_path):
    model, peft_model, ids = _peft_allocated(tmp_path)
    pattern = peft_model.peft_config["default"].rank_pattern
    assert pattern and any(not all(v) for v in pattern.values()), "the allocator must have pruned something"
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
    adapted = rewriter.load_adapter(model, tmp_path / "peft")
    with torch.no_grad():
        got = adapted(input_ids=ids).logits
    assert (got - expected).abs().max() <= 1e-5
    ranks = {s: m.lora_E.shape[0] for s, m in adapted.adapters["default"].modules.items()}
    assert ranks == {k.rsplit(".lora_E", 1)[0].removeprefix("base_model.model."): sum(v) for k, v in pattern.items()}

    adapted.save_adapter(tmp_path / "ours")
    fresh = copy.deepcopy(model)
    again = rewriter.load_adapter(fresh, tmp_path / "ours")
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, got)

    adapted.save_adapter(tmp_path / "ours-peft", format="peft")
    reloaded = PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "ours-peft")
    with torch.no_grad():
        assert (reloaded(input_ids=ids).logits - got).abs().max() <= 1e-5
