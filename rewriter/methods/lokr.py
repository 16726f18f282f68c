"""LoKr: ``y = W x + b + ΔW x`` with the Kronecker product ``ΔW = kron(W1, W2) · alpha / r``.

With ``out = a·b`` and ``in = c·d`` from :func:`factorization`, ``W1 [a, c]`` is ``lokr_w1``
(or ``lokr_w1_a [a, r] @ lokr_w1_b [r, c]`` when ``decompose_both`` and ``r < max(a, c) / 2``)
and ``W2 [b, d]`` is ``lokr_w2`` (or ``lokr_w2_a [b, r] @ lokr_w2_b [r, d]`` when
``r < max(b, d) / 2``), exactly PEFT's shapes.  The scaling is ``alpha / r`` even when both
factors are full matrices, as in PEFT.

Forward: ``kron(W1, W2) x = vec(W1 X W2ᵀ)`` with ``X = x`` viewed as ``[c, d]``; that costs
``b·c·(a + d)`` (or ``a·d·(b + c)``, whichever is less) multiply-adds per token instead of
``a·b·c·d`` for the dense ΔW that PEFT builds, e.g. 32x fewer on a 4096x4096 layer, and it
never materialises ΔW.  Fold: ``W <- W + ΔW``.

Dropouts (training only) as in PEFT and :mod:`.loha`, except that the kept rows of
``rank_dropout`` are rescaled by ``1 / mean`` only with ``rank_dropout_scale``.
``use_effective_conv2d`` only concerns convolutions: no effect on linear sites.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError
from .base import MethodSpec
from .checks import check_bool, check_int, round_like_base
from .registry import register
from .loha import LycorisConfig, LycorisModule


@dataclass(frozen=True)
class LoKrConfig(LycorisConfig):
    decompose_both: bool = False
    decompose_factor: int = -1
    rank_dropout_scale: bool = False
    init_weights: bool | str = True

    def __post_init__(self):
        super().__post_init__()
        check_bool("decompose_both", self.decompose_both)
        check_int("decompose_factor", self.decompose_factor)
        if self.decompose_factor == 0 or self.decompose_factor < -1:
            raise ConfigError(f"'decompose_factor' must be -1 (factors near the square root) or a positive "
                              f"integer, got {self.decompose_factor}", field="decompose_factor")
        check_bool("rank_dropout_scale", self.rank_dropout_scale)
        if not (isinstance(self.init_weights, bool) or self.init_weights == "lycoris"):
            raise ConfigError(f"'init_weights' must be true, false or \"lycoris\", got {self.init_weights!r}",
                              field="init_weights")


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """PEFT's split ``dimension = m · n`` (reference §4.3).

    If ``factor`` divides ``dimension`` the answer is ``(factor, dimension // factor)``, unsorted.
    Otherwise ``m`` walks up the divisors while ``m < n`` and ``m <= factor`` (no limit for -1),
    and the last pair is returned sorted."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    limit = dimension if factor == -1 else factor
    m, n = 1, dimension
    candidate = 2
    while m < n:
        while dimension % candidate:
            candidate += 1
        if candidate > limit:
            break
        m, n = candidate, dimension // candidate
        candidate += 1
    return min(m, n), max(m, n)


class LoKrModule(LycorisModule):
    def __init__(self, site, config: LoKrConfig):
        super().__init__(site, config, rescale_rows=config.rank_dropout_scale)
        r = config.r
        a, b = factorization(site.out_features, config.decompose_factor)
        c, d = factorization(site.in_features, config.decompose_factor)
        self.blocks = (a, b, c, d)
        full_w1 = not (config.decompose_both and r < max(a, c) / 2)
        full_w2 = r >= max(b, d) / 2
        # creation order = PEFT's init draw order; absent factors are None (not saved)
        self.lokr_w1 = nn.Parameter(torch.empty(a, c)) if full_w1 else None
        self.lokr_w1_a = None if full_w1 else nn.Parameter(torch.empty(a, r))
        self.lokr_w1_b = None if full_w1 else nn.Parameter(torch.empty(r, c))
        self.lokr_w2 = nn.Parameter(torch.empty(b, d)) if full_w2 else None
        self.lokr_w2_a = None if full_w2 else nn.Parameter(torch.empty(b, r))
        self.lokr_w2_b = None if full_w2 else nn.Parameter(torch.empty(r, d))
        # contract the cheaper side first: W2 then W1 costs b·c·(d + a), W1 then W2 a·d·(c + b)
        self.w2_first = b * c * (d + a) <= a * d * (c + b)
        self.reset_parameters(site.dtype)

    @torch.no_grad()
    def reset_parameters(self, base_dtype: torch.dtype = torch.float32) -> None:
        init = self.config.init_weights
        # which tensor starts at zero so that ΔW = 0 (init True: W1's, "lycoris": W2's)
        zero = {True: ("lokr_w1", "lokr_w1_a"), "lycoris": ("lokr_w2", "lokr_w2_b"), False: ()}[init]
        for name, p in self.named_parameters():  # PEFT's draw order: w1 (or w1_a, w1_b), then w2 likewise
            if name in zero:
                p.zero_()
            else:
                nn.init.kaiming_uniform_(p, a=math.sqrt(5))
        for p in self.parameters():
            p.copy_(round_like_base(p, base_dtype))

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        w1 = self.lokr_w1 if self.lokr_w1 is not None else self.lokr_w1_a @ self.lokr_w1_b
        w2 = self.lokr_w2 if self.lokr_w2 is not None else self.lokr_w2_a @ self.lokr_w2_b
        return w1, w2

    def delta_weight(self) -> torch.Tensor:
        w1, w2 = self.factors()
        return torch.kron(w1, w2) * self.scaling

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        a, b, c, d = self.blocks
        w1, w2 = self.factors()
        w1 = w1 * self.scaling
        blocks = x.reshape(-1, c, d)
        if self.w2_first:
            out = torch.matmul(w1, blocks @ w2.t())
        else:
            out = torch.matmul(w1, blocks) @ w2.t()
        return out.reshape(*x.shape[:-1], a * b)

    def extra_repr(self) -> str:
        a, b, c, d = self.blocks
        return f"{self.in_features} -> {self.out_features}, kron([{a}, {c}], [{b}, {d}]), r={self.config.r}"


_LINEAR_KEYS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")

SPEC = register(MethodSpec(
    name="lokr",
    config_cls=LoKrConfig,
    module_cls=LoKrModule,
    peft_type="LOKR",
    peft_keys={name: name for name in _LINEAR_KEYS},
    peft_site_fields={"r": "rank_pattern", "alpha": "alpha_pattern"},
    aliases={"init": "init_weights", "factor": "decompose_factor"},
    summary="Kronecker-product update kron(W1, W2)*alpha/r (Edalati et al. 2022, LyCORIS)",
))
