"""Llama-Adapter (PEFT's "adaption prompt"): learned prompt tokens that the top attention layers
also attend to, through a separate softmax scaled by a zero-initialised gate (Zhang et al. 2023).

This is not a per-linear rewrite: the targets are attention blocks, found in the graph.  Each
``aten.scaled_dot_product_attention`` node is one block, named by the module that computes it
(``nn_module_stack``).  From its key and value arguments the finder walks back through layout
ops (view, reshape, transpose, expand, slice, split + getitem of a fused projection) and the
RoPE ops (mul, add, cat, neg by position tensors) to the one linear site each comes from, and
reads the head count, head size and softmax scale off the node and its metadata.  Nothing here
is per-model code, so Qwen2, Gemma, Phi-3, OPT or BERT work as Llama and GPT-2 do; an op the walk
does not know (a key norm, say) makes the block unsupported, with its name and the op.

Per block, with prompt ``P`` (1, L, hidden) and gate ``g`` (1,)::

    K, V = the block's key and value projections of P   (no RoPE; GQA heads repeated)
    a    = g * softmax_fp32(q K^T * scale).to(q.dtype) @ V   (q: the block's own RoPE'd query)

The prompt is projected by replaying the live graph's computation of the projection sites,
so merged weights and unmerged adapters on k/v (LoRA below this adapter) apply to the prompt
exactly as they apply to the tokens: merging them changes nothing but rounding.

Where ``a`` goes, ``project_output``:

* true: added to the attention output (B, H, T, hd) before the block's output projection,
  which then projects both.  For Llama this is PEFT's ``o_proj(attn) + o_proj(a)`` up to
  rounding, except that a biased ``o_proj`` adds its bias once here, twice in PEFT.
* false: added, unprojected, to the output projection's result (PEFT's GPT-2 convention).
* unset (default): as PEFT does for the architecture: unprojected when the output projection
  is a GPT-2 ``Conv1D`` (the one such model PEFT supports), projected otherwise.  PEFT's
  checkpoints do not record the convention, so this default is what makes a PEFT GPT-2
  checkpoint reproduce PEFT's outputs; every other architecture gets the paper's projected form.

Dtypes: the parameters are stored in float32 on half-precision bases like every adapter here
(master weights for training), but the forward computes as PEFT does, in the base dtype: the
prompt is cast to it before the projections, the gate before it scales the scores.  The scale
is the attention node's own (PEFT always uses 1/sqrt(head_dim), the same on its models).

With the gate at zero the block's output is bit-identical to the base: the adapter adds exact
zeros.  Not mergeable: it attends over learned tokens, which no weight change expresses.
"""
from __future__ import annotations

from ..base import MethodSpec
from ..registry import register
from .config import AdaptionPromptConfig, select
from .find import Attention, Projection, SiteResult, find_targets
from .module import AdaptionPromptModule
from .rewrite import AttentionBlocks

__all__ = ["SPEC", "AdaptionPromptConfig", "AdaptionPromptModule", "Attention", "AttentionBlocks", "Projection",
           "SiteResult", "find_targets", "select"]

SPEC = register(MethodSpec(
    name="adaption_prompt",
    config_cls=AdaptionPromptConfig,
    module_cls=AdaptionPromptModule,
    peft_type="ADAPTION_PROMPT",
    peft_keys={"adaption_prompt": "adaption_prompt", "adaption_gate": "adaption_gate"},
    scope=AttentionBlocks(),
    summary="Llama-Adapter: gated learned prompt tokens attended to by the top attention layers (Zhang et al. 2023)",
))
