"""LoHa: ``y = W x + b + ΔW x`` with the low-rank Hadamard product
``ΔW = ((w1_a @ w1_b) ⊙ (w2_a @ w2_b)) · alpha / r`` (``w*_a [out, r]``, ``w*_b [r, in]``).

Forward: ΔW has rank at most r², and ``(A1 B1) ⊙ (A2 B2) = U V`` with ``U [out, r²]`` the
row-wise and ``V [r², in]`` the column-wise Kronecker products of the factors.  When
``r² (in + out) < in · out`` the forward applies ``U (V x)`` instead of building the dense ΔW
(PEFT's way): the same function at a fraction of the cost.  Fold: ``W <- W + ΔW``.

Training-only dropouts, as PEFT: ``module_dropout`` skips the whole adapter with probability
p; ``rank_dropout`` zeroes output rows of ΔW with probability p and rescales the kept ones
by ``1 / mean``.  The random draws are PEFT's (same calls, same order), so a seeded run
matches PEFT's.  Unlike PEFT, a rank dropout that drops every row gives a zero update
instead of NaN.

``use_effective_conv2d`` is accepted for PEFT configs; it only changes convolutions with
kernels larger than 1 and sites here are linear layers, so it has no effect.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..core.adapter import AdapterModule
from .base import MethodSpec
from .checks import check_bool, check_int, check_number, check_probability, round_like_base
from .registry import register
from .lora import up_projection


@dataclass(frozen=True)
class LycorisConfig:
    """The fields LoHa and LoKr share; each method's config adds its own after them."""
    r: int = 8
    alpha: float = 8
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    use_effective_conv2d: bool = False  # convolutions only: no effect on linear sites

    def __post_init__(self):
        check_int("r", self.r, minimum=1)
        check_number("alpha", self.alpha)
        check_probability("rank_dropout", self.rank_dropout)
        check_probability("module_dropout", self.module_dropout)
        check_bool("use_effective_conv2d", self.use_effective_conv2d)

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


@dataclass(frozen=True)
class LoHaConfig(LycorisConfig):
    init_weights: bool = True

    def __post_init__(self):
        super().__post_init__()
        check_bool("init_weights", self.init_weights)


def sample_dropout(module_dropout: float, rank_dropout: float, out_features: int, rescale: bool):
    """One training step's draws for the LyCORIS dropouts, in PEFT's order.

    Returns ``(applied, row_scale)``: ``applied`` is False when module dropout skips the
    adapter; ``row_scale [out]`` (or None) multiplies the output rows of ΔW."""
    if not torch.rand(1).item() > module_dropout:
        return False, None
    if rank_dropout == 0:
        return True, None
    keep = (torch.rand(out_features) > rank_dropout).float()
    if rescale:  # all rows dropped: PEFT divides 0 by 0; a zero update is the sane limit
        keep = keep / keep.mean().clamp_min(torch.finfo(keep.dtype).tiny)
    return True, keep


class LycorisModule(AdapterModule):
    """LoHa's and LoKr's forward and fold around the subclass's ``delta(x)`` and ``delta_weight()``:
    ``y + ΔW x`` with PEFT's training-only dropouts, and ``W <- W + ΔW``.  ``rescale_rows``: the
    kept rows of ``rank_dropout`` are rescaled by ``1 / mean``."""

    additive = True

    def __init__(self, site, config, *, rescale_rows: bool):
        super().__init__(site, config)
        self.scaling = config.scaling
        self.rescale_rows = rescale_rows
        self.uses_dropout = config.module_dropout > 0 or config.rank_dropout > 0

    def post(self, x, y, bias):
        row_scale = None
        if self.training and self.uses_dropout:
            applied, row_scale = sample_dropout(self.config.module_dropout, self.config.rank_dropout,
                                                self.out_features, rescale=self.rescale_rows)
            if not applied:
                return y
        delta = self.delta(x.to(self.adapter_dtype))
        if row_scale is not None:
            delta = delta * row_scale.to(delta.device)
        return y + delta

    def fold(self, weight, bias):
        return weight + self.delta_weight().float(), bias


class LoHaModule(LycorisModule):
    def __init__(self, site, config: LoHaConfig):
        super().__init__(site, config, rescale_rows=True)
        r, out_f, in_f = config.r, site.out_features, site.in_features
        self.hada_w1_a = nn.Parameter(torch.empty(out_f, r))
        self.hada_w1_b = nn.Parameter(torch.empty(r, in_f))
        self.hada_w2_a = nn.Parameter(torch.empty(out_f, r))
        self.hada_w2_b = nn.Parameter(torch.empty(r, in_f))
        # multiply-adds per token: r² (in + out) through the rank-r² factors, in · out dense
        self.factored = r * r * (in_f + out_f) < in_f * out_f
        self.reset_parameters(site.dtype)

    @torch.no_grad()
    def reset_parameters(self, base_dtype: torch.dtype = torch.float32) -> None:
        # PEFT's draw order, so a seeded init matches PEFT's
        for p in (self.hada_w1_a, self.hada_w1_b, self.hada_w2_a):
            nn.init.kaiming_uniform_(p, a=math.sqrt(5))
        if self.config.init_weights:
            self.hada_w2_b.zero_()  # ΔW = 0: the adapter starts as the identity
        else:
            nn.init.kaiming_uniform_(self.hada_w2_b, a=math.sqrt(5))
        for p in self.parameters():
            p.copy_(round_like_base(p, base_dtype))

    def delta_weight(self) -> torch.Tensor:
        return (self.hada_w1_a @ self.hada_w1_b) * (self.hada_w2_a @ self.hada_w2_b) * self.scaling

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        if not self.factored:
            return F.linear(x, self.delta_weight())
        r2 = self.config.r ** 2
        u = (self.hada_w1_a[:, :, None] * self.hada_w2_a[:, None, :]).reshape(self.out_features, r2)
        v = (self.hada_w1_b[:, None, :] * self.hada_w2_b[None, :, :]).reshape(r2, self.in_features)
        return up_projection(F.linear(x, v), u * self.scaling)

    def extra_repr(self) -> str:
        form = "factored" if self.factored else "dense"
        return f"{self.in_features} -> {self.out_features}, r={self.config.r}, {form}"


SPEC = register(MethodSpec(
    name="loha",
    config_cls=LoHaConfig,
    module_cls=LoHaModule,
    peft_type="LOHA",
    peft_keys={name: name for name in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")},
    peft_site_fields={"r": "rank_pattern", "alpha": "alpha_pattern"},
    aliases={"init": "init_weights"},
    summary="low-rank Hadamard product update (w1_a@w1_b)*(w2_a@w2_b)*alpha/r (Hyeon-Woo et al. 2022)",
))
