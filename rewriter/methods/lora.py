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
from ..core.adapter import AdapterModule
from .base import MethodSpec
from .checks import check_bool, check_choice, check_int, check_number, check_probability, round_like_base
from .registry import register


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


def add_into(y: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``y + delta``, written into ``y`` where that gives the same tensor.  Legal because the graph
    (``graph.chain``) hands every post a fresh ``y`` that nothing else reads and no backward saved:
    the base matmul's output or the result of the post below.  A dtype promotion (a float32 adapter
    on a low-precision base) or a broadcast needs the out-of-place add."""
    if y.dtype == delta.dtype and y.shape == delta.shape:
        return y.add_(delta)
    return y + delta


def up_projection(h: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``h @ B.T`` for a low-rank ``B [out, r]``, multiplied against a row-major copy of ``B.T`` (r x out, a
    few KB).  Same values as ``F.linear(h, B)``, but autograd then forms both backward matmuls in the
    layouts CPU GEMMs are fast at (``h.T @ g`` and ``g @ B`` over a transposed view): ``F.linear``'s
    ``g.T @ h`` for the weight gradient costs about 8x more at rank 8 (bench/README.md).  Only when ``B``
    is trained: exported graphs keep ``F.linear(h, B)``, where ``B`` stays a named, swappable weight (ONNX
    would fold the copy into an anonymous constant)."""
    if torch.is_grad_enabled() and B.requires_grad and not torch.compiler.is_exporting():
        return torch.matmul(h, B.t().contiguous())
    return F.linear(h, B)


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
        h = F.linear(self.dropout(x.to(self.lora_A.dtype)), self.lora_A)
        if self.lora_B_bias is not None:
            return add_into(y, F.linear(h, self.lora_B, self.lora_B_bias).mul_(self.scaling))
        # scaling the rank-r activations, not the output: r columns instead of out
        return add_into(y, up_projection(h.mul_(self.scaling), self.lora_B))

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


def combine(adapters: list[dict[str, "LoraModule"]], weights: list[float], combination_type: str = "svd",
            svd_rank: int | None = None, svd_clamp: float | None = None):
    """PEFT's ``add_weighted_adapter`` for LoRA: per site, a new config and its tensors.

    ``linear`` (equal ranks): A = sum sign(w s) sqrt|w s| A_i, B = sum sqrt|w s| B_i (cross terms
    ignored, as PEFT); ``cat``: exact, rank = sum of ranks; ``svd``: the rank-``svd_rank`` SVD of
    ``sum w_i dW_i``.  The new adapter has scaling 1 (lora_alpha = r); unlike PEFT, also for
    rslora sources (PEFT then scales by sqrt(r), which mis-scales the combined delta)."""
    import dataclasses
    if combination_type not in ("linear", "cat", "svd"):
        raise ConfigError(f"combination_type {combination_type!r} is not supported",
                          fix="use 'linear', 'cat' or 'svd'")
    if len(adapters) == 1:
        combination_type = "linear"
    ranks = {m.config.r for mods in adapters for m in mods.values()}
    if combination_type == "linear" and len(ranks) > 1:
        raise ConfigError(f"'linear' needs equal ranks, got {sorted(ranks)}", fix="use 'cat' or 'svd'")
    sites = list(dict.fromkeys(site for mods in adapters for site in mods))
    total_rank = sum(max(m.config.r for m in mods.values()) for mods in adapters)
    new_rank = {"linear": max(ranks), "cat": total_rank, "svd": svd_rank or max(ranks)}[combination_type]
    out = {}
    for site in sites:
        present = [(mods[site], w) for mods, w in zip(adapters, weights) if site in mods]
        first = present[0][0]
        config = dataclasses.replace(first.config, r=new_rank, lora_alpha=new_rank, use_rslora=False,
                                     lora_bias=False, init_lora_weights=True)
        A = torch.zeros(new_rank, first.in_features)
        B = torch.zeros(first.out_features, new_rank)
        with torch.no_grad():
            if combination_type == "linear":
                for m, w in present:
                    ws = w * m.scaling
                    A += math.copysign(math.sqrt(abs(ws)), ws) * m.lora_A.float()
                    B += math.sqrt(abs(ws)) * m.lora_B.float()
            elif combination_type == "cat":
                row = 0
                for m, w in present:
                    r = m.config.r
                    A[row:row + r] = w * m.scaling * m.lora_A.float()
                    B[:, row:row + r] = m.lora_B.float()
                    row += r
            else:
                delta = sum(w * m.delta_weight() for m, w in present)
                U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
                k = min(new_rank, S.numel())
                B[:, :k], A[:k] = U[:, :k] * S[:k], Vh[:k]
                if svd_clamp is not None:
                    limit = torch.quantile(torch.cat([B.flatten(), A.flatten()]).abs(), svd_clamp)
                    A.clamp_(-limit, limit)
                    B.clamp_(-limit, limit)
        out[site] = (config, {"lora_A": A, "lora_B": B})
    return out


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
    combine=combine,
))
