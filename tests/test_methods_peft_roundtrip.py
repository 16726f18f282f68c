"""Every method, two architectures, PEFT 0.21.2 as the oracle: PEFT-saved checkpoints (several adapters,
in sub-directories) load and reproduce PEFT's outputs, and our PEFT-format saves load back into PEFT."""
import copy
import warnings

import peft
import pytest
import torch

import rewriter
from rewriter.models import load_model

TARGETS = {"tiny-llama": ["q_proj", "v_proj"], "tiny-bert": ["query", "value"]}
CONFIGS = {  # method -> PEFT config factory (targets) with non-trivial initial weights
    "lora": lambda t: peft.LoraConfig(r=4, lora_alpha=8, target_modules=t, init_lora_weights=False),
    "loha": lambda t: peft.LoHaConfig(r=4, alpha=8, target_modules=t, init_weights=False),
    "lokr": lambda t: peft.LoKrConfig(r=4, alpha=8, target_modules=t, init_weights=False),
    "adalora": lambda t: peft.AdaLoraConfig(init_r=4, target_r=2, total_step=10, target_modules=t,
                                            init_lora_weights=False),
    "fourierft": lambda t: peft.FourierFTConfig(n_frequency=40, target_modules=t, init_weights=False),
    "miss": lambda t: peft.MissConfig(r=8, target_modules=t, init_weights=False),
    "miss_bat": lambda t: peft.MissConfig(r=8, target_modules=t, init_weights="bat"),
    "miss_mini": lambda t: peft.MissConfig(r=8, mini_r=8, target_modules=t, init_weights="mini"),
    "ia3": lambda t: peft.IA3Config(target_modules=t, feedforward_modules=t[:1], init_ia3_weights=False),
    "oft": lambda t: peft.OFTConfig(r=0, oft_block_size=8, target_modules=t, init_weights=False),
    "boft": lambda t: peft.BOFTConfig(boft_block_size=4, target_modules=t, init_weights=False),
}


def _randomize_zero_parameters(model, seed):
    """Some inits are no-ops (MiSS bat/mini): move them so outputs differ from the base."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and p.abs().max() == 0:
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)


@pytest.mark.parametrize("arch", sorted(TARGETS))
@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_peft_checkpoints_both_ways(method, arch, tmp_path):
    torch.manual_seed(0)
    model = load_model(f"builtin:{arch}")
    make = CONFIGS[method]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = peft.get_peft_model(copy.deepcopy(model), make(TARGETS[arch]))
        second = make(TARGETS[arch][:1])
        second.inference_mode = True  # AdaLoRA trains one adapter at a time
        peft_model.add_adapter("second", second)
        for name in ("default", "second"):
            peft_model.set_adapter(name)
            _randomize_zero_parameters(peft_model, seed=len(name))
        peft_model.eval()
        peft_model.save_pretrained(tmp_path / "peft")
    ids = torch.randint(0, 512, (2, 7), generator=torch.Generator().manual_seed(5))
    adapted = rewriter.load_adapter(model, tmp_path / "peft")
    assert sorted(adapted.adapters) == ["default", "second"]
    for name in ("default", "second"):
        peft_model.set_adapter(name)
        adapted.set_adapter(name)
        with torch.no_grad():
            expected = peft_model(input_ids=ids).logits
            got = adapted(input_ids=ids).logits
            with adapted.disable_adapters():
                base = adapted(input_ids=ids).logits
        error, change = (got - expected).abs().max(), (got - base).abs().max()
        assert error <= 1e-5, name
        assert change > 1e-6 and error <= change / 10, f"{name}: the adapter must visibly change the outputs"
    adapted.save_adapter(tmp_path / "ours", format="peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "ours" / "default")
    reloaded.eval()
    adapted.set_adapter("default")
    with torch.no_grad():
        assert (reloaded(input_ids=ids).logits - adapted(input_ids=ids).logits).abs().max() <= 1e-5
