"""X-LoRA's module: PEFT's classifier, per-token top-k, and the weighted expert mixture."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...core.adapter import AdapterModule
from ...errors import ConfigError
from ..lora import LoraModule, add_into, up_projection
from ..registry import get_method
from .config import XLoraConfig
from .target import XLoraTarget


class XLoraClassifier(nn.Module):
    """PEFT's classifier (same layer indices, so PEFT's ``internal_xlora_classifier`` keys load)."""

    def __init__(self, hidden: int, n_experts: int, n_layers: int, config: XLoraConfig):
        super().__init__()
        self.n_experts, self.n_layers, self.config = n_experts, n_layers, config
        out = n_experts * n_layers if config.layerwise_scalings else n_experts
        layers: list[nn.Module] = []
        width = hidden
        for _ in range(config.xlora_depth - 1):
            layers += [nn.Linear(width, config.xlora_size), nn.ReLU()]
            if config.xlora_dropout_p > 0:
                layers.append(nn.Dropout(config.xlora_dropout_p))
            width = config.xlora_size
        self.layers = nn.Sequential(*layers, nn.Linear(width, out))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.layers(hidden)
        b, s = hidden.shape[:2]
        if self.config.layerwise_scalings:  # entry l * n + i is expert i at layer l
            logits = logits.reshape(b, s, self.n_layers, self.n_experts)
        else:
            logits = logits.unsqueeze(2).expand(b, s, self.n_layers, self.n_experts)
        if self.config.enable_softmax:
            return torch.softmax(logits / self.config.softmax_temperature, dim=-1)
        return logits


def select_top_k(scalings: torch.Tensor, top_k: int | None, softmax_topk: bool) -> torch.Tensor:
    """PEFT's per-token expert selection: zero all but the top k (no renormalisation), then
    optionally softmax over the entries that are not zero."""
    if top_k is not None:
        keep = torch.zeros_like(scalings, dtype=torch.bool).scatter_(-1, scalings.topk(top_k, dim=-1).indices, True)
        scalings = scalings * keep.to(scalings.dtype)
    if softmax_topk:
        nonzero = scalings != 0
        scalings = scalings.masked_fill(~nonzero, float("-inf")).softmax(-1).masked_fill(~nonzero, 0.0)
    return scalings


class XLoraModule(AdapterModule):
    has_post = False  # not a per-layer adapter: the method's rewrite inserts its nodes
    not_mergeable = ("X-LoRA weights its experts per token with scalings computed from the input, so no fixed "
                     "weight computes it (PEFT 0.21.2 'merges' the unweighted sum of the experts, which changes "
                     "the outputs)")

    def __init__(self, target: XLoraTarget, config: XLoraConfig):
        super().__init__(target, config)
        experts = target.resolve(config)
        used = {site for _, modules in experts for site in modules}
        self.layers = tuple(site for site in target.module_order if site in used)  #: layer l -> site name
        self.layer_keys = tuple(target.sites[site].key for site in self.layers)
        self.expert_names = tuple(label for label, _ in experts)
        n = len(experts)
        hidden = config.hidden_size or target.in_features
        if hidden != target.in_features:
            raise ConfigError(f"'hidden_size' is {hidden} but the model's last hidden state has "
                              f"{target.in_features} features", field="hidden_size",
                              fix=f"set hidden_size = {target.in_features}, or leave it out")
        if config.top_k_lora is not None and config.top_k_lora > n:
            raise ConfigError(f"'top_k_lora' is {config.top_k_lora} but there are only {n} experts",
                              field="top_k_lora")
        self.classifier = XLoraClassifier(hidden, n, len(self.layers), config)
        self.experts = nn.ModuleList(nn.ModuleDict({target.sites[s].key: m for s, m in modules.items()})
                                     for _, modules in experts)
        self.latest_scalings: torch.Tensor | None = None
        self.scalings_log: list[torch.Tensor] = []
        self.logging = False
        self.requires_grad_(False)

    def requires_grad_(self, requires_grad: bool = True):
        """The experts stay frozen unless ``use_trainable_adapters`` (PEFT trains only the classifier)."""
        self.classifier.requires_grad_(requires_grad)
        self.experts.requires_grad_(requires_grad and self.config.use_trainable_adapters)
        return self

    def set_config(self, config: XLoraConfig) -> None:
        self.config = self.classifier.config = config

    def forward(self, x, y=None, scalings=None, *, stage: str, layer: int | None = None):
        if stage == "scalings":
            return self.scalings(x)
        return self.mix(x, y, scalings, layer)

    def scalings(self, hidden: torch.Tensor) -> torch.Tensor:
        """Classifier scalings for the main pass (after top-k); records the raw ones."""
        raw = self.classifier(hidden.to(self.adapter_dtype))
        self.latest_scalings = raw.detach()
        if self.logging:
            self.scalings_log.append(self.latest_scalings)
        return select_top_k(raw, self.config.top_k_lora, self.config.enable_softmax_topk)

    def mix(self, x, y, scalings, layer: int):
        """Layer ``layer``'s output ``y`` plus its experts weighted per token; ``scalings`` None: the
        scaling pass's constant ``scaling_pass_value``.  ``x`` may be flattened to (tokens, in)."""
        n = len(self.experts)
        if scalings is None:
            constant = torch.full((*x.shape[:-1], 1, n), self.config.scaling_pass_value, dtype=self.adapter_dtype,
                                  device=x.device)
            lam = select_top_k(constant, self.config.top_k_lora, self.config.enable_softmax_topk)[..., 0, :]
        else:
            lam = scalings[:, :, layer].reshape(*x.shape[:-1], n)
        weight = self.config.global_scaling_weight
        key = self.layer_keys[layer]
        out_dtype = y.dtype
        present = [(i, experts[key]) for i, experts in enumerate(self.experts) if key in experts]
        if all(linear_in_x(expert) for _, expert in present):
            return fused_mix(x, y, lam, present, weight).to(out_dtype)
        for i, experts in enumerate(self.experts):
            if key not in experts:
                continue  # PEFT still counts it: expert i keeps scalings column i
            expert = experts[key]
            x_i = x.to(expert.adapter_dtype) * lam[..., i:i + 1]
            if weight == 1:
                y = expert.post(x_i, y, None)
            else:
                y = y + weight * expert.post(x_i, torch.zeros_like(y, dtype=expert.adapter_dtype), None)
        return y.to(out_dtype)

    def expert_layouts(self) -> list[dict]:
        """Per expert, its sites and LoRA parameters: enough to rebuild the experts' shapes."""
        lora = get_method("lora")
        by_key = dict(zip(self.layer_keys, self.layers))
        return [{"name": label, "sites": {by_key[k]: lora.config_dict(m.config) for k, m in experts.items()}}
                for label, experts in zip(self.expert_names, self.experts)]

    def extra_repr(self) -> str:
        return f"experts={list(self.expert_names)}, layers={len(self.layers)}"


def linear_in_x(expert: LoraModule) -> bool:
    """The expert's delta is linear in its input: no bias on B, no dropout drawing a mask now."""
    return expert.lora_B_bias is None and (isinstance(expert.dropout, nn.Identity) or not expert.training)


def fused_mix(x, y, lam, present, weight):
    """``y + sum_i g s_i B_i A_i (x lam_i)`` as two matmuls for all experts: lam_i is one number per
    token, so it moves past A_i and scales expert i's rank columns (exact up to rounding)."""
    dtype = present[0][1].adapter_dtype
    a = torch.cat([expert.lora_A for _, expert in present])
    b = torch.cat([expert.lora_B for _, expert in present], dim=1)
    columns = torch.cat([torch.full((expert.lora_A.shape[0],), i, device=x.device) for i, expert in present])
    per_rank = torch.cat([torch.full((expert.lora_A.shape[0],), expert.scaling * weight, dtype=dtype,
                                     device=x.device) for _, expert in present])
    h = F.linear(x.to(dtype), a) * (lam[..., columns] * per_rank)
    return add_into(y, up_projection(h, b))
