"""X-LoRA: a mixture of LoRA experts weighted per token and per layer by a learned classifier.

One adapter for the whole model (target ``model``).  Its experts are copies of LoRA adapters (by
name, from this model) or LoRA checkpoints (PEFT's ``{"0": path, ...}``), frozen unless
``use_trainable_adapters``.  The live graph computes PEFT 0.21.2's two passes as straight-line code:

1. scaling pass: a copy of only the nodes the classifier's input needs (the LM head's input, i.e.
   after the final norm, or the ``last_hidden_state`` output), with every expert scaled by
   ``scaling_pass_value``.  At 0 (the default) experts without a bias add exactly 0, so that pass
   has no expert nodes at all.  Its hidden state is detached (no gradient reaches the pass);
2. the classifier turns that hidden state into scalings ``(batch, seq, n_layers, n_experts)``;
3. main pass: every expert layer ``l`` computes ``y + sum_i g * s_i * B_i A_i dropout(x * lam_i)``
   with ``lam = scalings[:, :, l]`` after top-k (no renormalisation) and the optional softmax over
   the kept entries, ``g`` the global scaling weight.

``n_layers`` counts the expert layers (the union of the experts' sites) in the model's module order,
as PEFT numbers them.  The output depends on the input, so the adapter is not mergeable.
"""
from __future__ import annotations

from ..base import MethodSpec
from ..registry import register
from .checkpoint import XLoraCheckpoint, XLoraPeftLayout
from .config import XLoraConfig
from .module import XLoraClassifier, XLoraModule, select_top_k
from .rewrite import WholeModel
from .runtime import active_adapter, active_module, bucketed, update_config
from .target import TARGET, XLoraTarget, find_targets, resolve_experts

SPEC = register(MethodSpec(
    name="xlora",
    config_cls=XLoraConfig,
    module_cls=XLoraModule,
    peft_type="XLORA",
    scope=WholeModel(),
    checkpoint_hooks=XLoraCheckpoint(),
    peft_layout=XLoraPeftLayout(),
    summary="mixture of LoRA experts, weighted per token and layer by a classifier (Buehler & Buehler 2024)",
    cannot_generate="X-LoRA's scaling pass runs the whole model a second time, which the static-KV-cache decoding "
                    "graph does not",
))

__all__ = ["SPEC", "TARGET", "XLoraConfig", "XLoraTarget", "XLoraModule", "XLoraClassifier", "select_top_k",
           "find_targets", "resolve_experts", "active_adapter", "active_module", "bucketed", "update_config"]
