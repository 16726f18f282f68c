"""PEFT BOFT checkpoints saved by PEFT's CPU fallback (config says N factors, tensors have 1) load."""
import copy
import warnings

import torch
from peft import BOFTConfig, get_peft_model

import rewriter
from rewriter.models import load_model


def test_peft_cpu_fallback_checkpoint_loads_with_one_factor(tmp_path):
    torch.manual_seed(0)
    model = load_model("builtin:tiny-llama")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(copy.deepcopy(model), BOFTConfig(
            boft_block_size=4, boft_n_butterfly_factor=2, target_modules=["q_proj"], init_weights=False))
    peft_model.eval().save_pretrained(tmp_path)
    ids = torch.randint(0, 512, (2, 6))
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        adapted = rewriter.load_adapter(model, tmp_path)
    assert any("1 butterfly factor" in str(w.message) for w in caught)
    with torch.no_grad():
        assert (adapted(input_ids=ids).logits - expected).abs().max() <= 1e-5
