"""LoRA: ``y = W x + b + s * B A dropout(x)`` with ``A [r, in]``, ``B [out, r]``.

Scaling ``s = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with ``use_rslora``).  Adapter
math runs in the adapter dtype (float32 on low-precision bases, as PEFT does) and the
site output is rounded once at the end.  Fold: ``W <- W + s B A``; with ``lora_bias``
also ``b <- b + s b_B``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .base import (AdapterModule, MethodSpec, check_bool, check_choice, check_int, check_number,
                   check_probability, register, round_like_base)


@dataclass(frozen=True)
class LoraConfig:
    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    use_rslora: bool = False
    init_lora_weights: bool | str = True
    bias: str = "none"
    lora_bias: bool = False
    fan_in_fan_out: bool = False  # accepted for PEFT configs; the layout is read from the graph

    def __post_init__(self):
        check_int("r", self.r, minimum=1)
        check_number("lora_alpha", self.lora_alpha)
        check_probability("lora_dropout", self.lora_dropout)
        check_bool("use_rslora", self.use_rslora)
        check_choice("init_lora_weights", self.init_lora_weights, [True, False, "gaussian"])
        check_choice("bias", self.bias, ["none", "all", "lora_only"])
        check_bool("lora_bias", self.lora_bias)
        check_bool("fan_in_fan_out", self.fan_in_fan_out)

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


class LoraModule(AdapterModule):
    additive = True

    def __init__(self, site, config: LoraConfig):
        super().__init__(site, config)
        r = config.r
        self.scaling = config.scaling
        self.lora_A = nn.Parameter(torch.empty(r, site.in_features))
        self.lora_B = nn.Parameter(torch.zeros(site.out_features, r))
        self.lora_B_bias = nn.Parameter(torch.zeros(site.out_features)) if config.lora_bias else None
        self.dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.reset_parameters(site.dtype)

    @torch.no_grad()
    def reset_parameters(self, base_dtype: torch.dtype = torch.float32) -> None:
        init = self.config.init_lora_weights
        if init == "gaussian":
            nn.init.normal_(self.lora_A, std=1.0 / self.config.r)
        else:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        if init is False:  # both factors random: a non-trivial adapter from the start
            nn.init.kaiming_uniform_(self.lora_B, a=math.sqrt(5))
            if self.lora_B_bias is not None:
                bound = 1 / math.sqrt(self.config.r)
                nn.init.uniform_(self.lora_B_bias, -bound, bound)
        else:
            self.lora_B.zero_()
            if self.lora_B_bias is not None:
                self.lora_B_bias.zero_()
        for p in self.parameters():
            p.copy_(round_like_base(p, base_dtype))

    def post(self, x, y, bias):
        x = x.to(self.lora_A.dtype)
        delta = F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B, self.lora_B_bias)
        return y + delta * self.scaling

    def fold_bias(self, bias):
        if self.lora_B_bias is None:
            return bias
        shift = self.lora_B_bias * self.scaling
        return shift if bias is None else bias.to(shift.dtype) + shift

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    def fold(self, weight, bias):
        weight = weight + self.delta_weight()
        if self.lora_B_bias is not None:
            if bias is None:
                raise ConfigError(f"{self.site_name}: lora_bias cannot be merged into a layer without bias")
            bias = bias + self.lora_B_bias.float() * self.scaling
        return weight, bias


SPEC = register(MethodSpec(
    name="lora",
    config_cls=LoraConfig,
    module_cls=LoraModule,
    peft_type="LORA",
    peft_keys={"lora_A.weight": "lora_A", "lora_B.weight": "lora_B", "lora_B.bias": "lora_B_bias"},
    peft_site_fields={"r": "rank_pattern", "lora_alpha": "alpha_pattern"},
    aliases={"alpha": "lora_alpha", "dropout": "lora_dropout", "init": "init_lora_weights",
             "rslora": "use_rslora"},
    summary="low-rank additive update s*B@A (Hu et al. 2021)",
))
