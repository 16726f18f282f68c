"""MiSS: one small block shared by every input shard (PEFT's ``MissConfig``).

Three variants, chosen by ``init_weights``:

* balance (``True``, zeros; ``False``, kaiming-random): ``miss_block B [r, out]``,
  ``ΔW[o, i] = B[i mod r, o]``.  The forward sums the (dropped-out) input over its
  r-wide shards, zero-padding the last one, and adds ``x_sum @ B``.
* ``"mini"``: ``B [r, mini_r]`` tiled along the outputs, ``ΔW[o, i] = B[i mod r, o mod mini_r]``;
  the forward adds ``x_sum @ B`` to every ``mini_r``-wide output group.
* ``"bat"``: ``B [out/r, r, r]``; with ``W`` cut into r×r blocks ``W[β, γ]`` (output block β,
  input block γ), ``W'[β, γ] = W[β, γ] + W[β, γ] @ B[β] + B[β]``.  The update depends on
  ``W``, so the forward reads the site's weight and computes ``F.linear(x, W', b)``
  in float32 (no dropout, as in PEFT).

Balance and mini are additive; bat is not (``needs_weight``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..core.adapter import AdapterModule
from .base import MethodSpec
from .checks import check_choice, check_int, check_probability, round_like_base
from .registry import register
from .lora import add_into


@dataclass(frozen=True)
class MissConfig:
    r: int = 64
    miss_dropout: float = 0.0
    mini_r: int = 1
    init_weights: bool | str = True
    bias: str = "none"

    def __post_init__(self):
        check_int("r", self.r, minimum=1)
        check_probability("miss_dropout", self.miss_dropout)
        check_int("mini_r", self.mini_r, minimum=1)
        if not (isinstance(self.init_weights, bool) or self.init_weights in ("bat", "mini")):
            raise ConfigError(f"'init_weights' must be one of [True, False, 'bat', 'mini'], got {self.init_weights!r}",
                              field="init_weights")
        check_choice("bias", self.bias, ["none", "all", "MiSS_only", "miss_only"])


class MissModule(AdapterModule):
    """Building ``MissModule(site, config)`` returns the variant that ``config.init_weights`` names."""

    def __new__(cls, site=None, config=None):
        if cls is MissModule and config is not None:
            cls = {"bat": MissBatModule, "mini": MissMiniModule}.get(config.init_weights, MissBalanceModule)
        return super().__new__(cls)

    def __init__(self, site, config: MissConfig):
        super().__init__(site, config)
        self.r = config.r
        if config.r > site.in_features:
            raise ConfigError(f"{site.name}: r={config.r} exceeds in_features={site.in_features}",
                              field="r", fix=f"use r <= {site.in_features} for this layer")

    def _shard_sum(self, x: torch.Tensor) -> torch.Tensor:
        """``x_sum[..., j] = sum_k x[..., k*r + j]``, the last shard zero-padded."""
        pad = -self.in_features % self.r
        if pad:
            x = F.pad(x, (0, pad))
        return x.unflatten(-1, (-1, self.r)).sum(-2)

    def _tile_inputs(self, block_t: torch.Tensor) -> torch.Tensor:
        """``[out, r]`` -> ``ΔW [out, in]`` with column ``i`` taken from column ``i mod r``."""
        repeats = -(-self.in_features // self.r)
        return block_t.repeat(1, repeats)[:, :self.in_features]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}"


class MissBalanceModule(MissModule):
    additive = True

    def __init__(self, site, config: MissConfig):
        super().__init__(site, config)
        self.miss_block = nn.Parameter(torch.zeros(config.r, site.out_features))
        self.dropout = nn.Dropout(config.miss_dropout) if config.miss_dropout > 0 else nn.Identity()
        self.reset_parameters(site.dtype)

    @torch.no_grad()
    def reset_parameters(self, base_dtype: torch.dtype = torch.float32) -> None:
        if self.config.init_weights:
            self.miss_block.zero_()
        else:  # fan_in of a [r, out] tensor is out: U(±1/sqrt(out))
            nn.init.kaiming_uniform_(self.miss_block, a=math.sqrt(5))
            self.miss_block.copy_(round_like_base(self.miss_block, base_dtype))

    def post(self, x, y, bias):
        x = self.dropout(x.to(self.miss_block.dtype))
        return add_into(y, self._shard_sum(x) @ self.miss_block)

    def fold(self, weight, bias):
        return weight + self._tile_inputs(self.miss_block.float().t()), bias


class MissMiniModule(MissModule):
    additive = True

    def __init__(self, site, config: MissConfig):
        super().__init__(site, config)
        if site.out_features % config.mini_r:
            raise ConfigError(f"{site.name}: out_features={site.out_features} is not divisible by "
                              f"mini_r={config.mini_r}", field="mini_r",
                              fix="pick a mini_r that divides out_features")
        self.mini_r = config.mini_r
        self.miss_block = nn.Parameter(torch.zeros(config.r, config.mini_r))
        self.dropout = nn.Dropout(config.miss_dropout) if config.miss_dropout > 0 else nn.Identity()

    def post(self, x, y, bias):
        x = self.dropout(x.to(self.miss_block.dtype))
        delta = self._shard_sum(x) @ self.miss_block  # [..., mini_r], the same for every output group
        return (y.unflatten(-1, (-1, self.mini_r)) + delta.unsqueeze(-2)).flatten(-2)

    def fold(self, weight, bias):
        block_t = self.miss_block.float().t().repeat(self.out_features // self.mini_r, 1)  # [out, r]
        return weight + self._tile_inputs(block_t), bias

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, mini_r={self.mini_r}"


class MissBatModule(MissModule):
    additive = False
    needs_weight = True
    replaces_base = True

    def __init__(self, site, config: MissConfig):
        super().__init__(site, config)
        if site.in_features % config.r or site.out_features % config.r:
            raise ConfigError(f"{site.name}: init_weights='bat' needs r={config.r} to divide both "
                              f"in_features={site.in_features} and out_features={site.out_features}",
                              field="r", fix="pick an r that divides both dimensions")
        self.miss_block = nn.Parameter(torch.zeros(site.out_features // config.r, config.r, config.r))

    def updated_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """``W + ΔW(W)`` for ``weight [out, in]``, computed in the adapter dtype."""
        block = self.miss_block
        weight = weight.to(block.dtype)
        r = self.r
        tiles = weight.unflatten(0, (-1, r)).unflatten(-1, (-1, r)).transpose(1, 2)  # [out/r, in/r, r, r]
        delta = tiles @ block.unsqueeze(1) + block.unsqueeze(1)
        return weight + delta.transpose(1, 2).reshape(weight.shape)

    def post(self, x, y, bias, *, weight):
        # replaces the base output: the layer runs with the updated weight
        dtype = self.miss_block.dtype
        bias = bias.to(dtype) if bias is not None else None
        return F.linear(x.to(dtype), self.updated_weight(weight), bias)

    def fold(self, weight, bias):
        return self.updated_weight(weight).float(), bias


SPEC = register(MethodSpec(
    name="miss",
    config_cls=MissConfig,
    module_cls=MissModule,
    peft_type="MISS",
    peft_keys={"miss_block": "miss_block"},
    aliases={"dropout": "miss_dropout", "init": "init_weights"},
    summary="shard-shared block update: balance, mini or bat (Kang et al. 2024)",
))
