"""Llama-Adapter's module: the prompt and gate of one attention block."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import ConfigError
from ...core.adapter import AdapterModule
from ..checks import round_like_base
from .config import AdaptionPromptConfig
from .find import Attention


class AdaptionPromptModule(AdapterModule):
    """The prompt and gate of one attention block; ``forward`` is the gated attention over them."""

    has_post = False
    not_mergeable = ("Llama-Adapter adds attention over learned prompt tokens, which no change of the "
                     "weights expresses")

    def __init__(self, target: Attention, config: AdaptionPromptConfig):
        if target.problem:
            raise ConfigError(f"attention block '{target.name}' cannot take Llama-Adapter: {target.problem}")
        super().__init__(target, config)
        self.adapter_len = config.adapter_len
        self.heads, self.kv_heads, self.head_dim, self.scale = (target.heads, target.kv_heads, target.head_dim,
                                                                target.scale)
        self.key_channels, self.value_channels = target.keys.channels, target.values.channels
        self.compute_dtype = target.dtype
        self.project_output = (config.project_output if config.project_output is not None
                               else not target.output_conv1d)
        if not self.project_output and target.output is None:
            raise ConfigError(f"attention block '{target.name}' has no output projection to add the unprojected "
                              "adapter output to", field="project_output", fix="set project_output = true")
        self.adaption_prompt = nn.Parameter(torch.empty(1, config.adapter_len, target.in_features))
        self.adaption_gate = nn.Parameter(torch.zeros(1))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.adaption_prompt.normal_()
        self.adaption_prompt.copy_(round_like_base(self.adaption_prompt, self.compute_dtype))
        self.adaption_gate.zero_()

    def forward(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """``query`` (B, H, T, hd); ``keys``/``values``: the block's projections of the prompt."""
        k = self._heads(keys, self.key_channels)
        v = self._heads(values, self.value_channels)
        scores = torch.matmul(query, k.transpose(2, 3).to(query.dtype)) * self.scale
        probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        return torch.matmul(self.adaption_gate.to(query.dtype) * probs, v)

    def _heads(self, projected: torch.Tensor, channels: tuple[int, int]) -> torch.Tensor:
        """(1, heads, L, hd) from a projection's output (1, L, C) or (L, C)."""
        start, stop = channels
        mine = projected.reshape(self.adapter_len, -1)[:, start:stop]
        heads = mine.reshape(1, self.adapter_len, self.kv_heads, self.head_dim).transpose(1, 2)
        return heads.repeat_interleave(self.heads // self.kv_heads, dim=1)

    def extra_repr(self) -> str:
        return (f"{self.adapter_len} prompt tokens, {self.heads} heads ({self.kv_heads} kv) x {self.head_dim}, "
                f"{'projected' if self.project_output else 'unprojected'} output")
