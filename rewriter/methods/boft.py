"""BOFT: a butterfly-factorised orthogonal rotation of the input plus an output scale,
``y = s * ((x R_tot) W^T) + b`` (the scale does not touch the bias).

``R_tot = M_{N-1} ... M_1 M_0`` with ``N = boft_n_butterfly_factor`` factors
``M_i = P_i BD_i P_i^T``: ``BD_i`` is block-diagonal with ``m`` orthogonal blocks of size
``b`` (``m * b = in``), each the Cayley transform ``(I - S)(I + S)^-1`` of
``S = (R - R^T) / 2`` for a full parameter block ``R`` (parameter ``boft_R``,
``(N, m, b, b)``).  ``P_i`` is the block butterfly permutation (``P_i[j, perm_i[j]] = 1``):
within each chunk of ``b * 2^i`` features, the sub-chunks of ``b / 2`` features are
reordered evens first, then odds; ``P_0`` is the identity.  ``boft_s`` is ``(out, 1)``.

The permutations are reshapes and transposes of the feature axis and the block products
act on ``(..., m, b)`` views, so no ``(in, in)`` matrix is ever built.  PEFT without its
CUDA extension (any CPU machine) silently uses ``N = 1``; here ``N > 1`` works everywhere.

Fold: ``W <- diag(s) W R_tot^T``, bias unchanged.  ``boft_dropout`` (training only):
in one random factor, ``int(p * m)`` random blocks are replaced by the identity.
``bias`` is a PEFT training option that the core handles.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError
from ..core.adapter import AdapterModule
from .base import MethodSpec
from .checks import check_bool, check_choice, check_int, check_probability, round_like_base
from .registry import register


@dataclass(frozen=True)
class BOFTConfig:
    boft_block_size: int = 4
    boft_block_num: int = 0
    boft_n_butterfly_factor: int = 1
    boft_dropout: float = 0.0
    fan_in_fan_out: bool = False  # accepted for PEFT configs; the layout is read from the graph
    bias: str = "none"
    init_weights: bool = True

    def __post_init__(self):
        check_int("boft_block_size", self.boft_block_size, minimum=0)
        check_int("boft_block_num", self.boft_block_num, minimum=0)
        if (self.boft_block_size == 0) == (self.boft_block_num == 0):
            raise ConfigError(
                f"give exactly one of 'boft_block_size' and 'boft_block_num' (the other 0), got "
                f"boft_block_size={self.boft_block_size} and boft_block_num={self.boft_block_num}",
                field="boft_block_size", fix="boft_block_size * boft_block_num == in_features, so one determines "
                                             "the other")
        check_int("boft_n_butterfly_factor", self.boft_n_butterfly_factor, minimum=1)
        check_probability("boft_dropout", self.boft_dropout)
        check_bool("fan_in_fan_out", self.fan_in_fan_out)
        check_choice("bias", self.bias, ["none", "all", "boft_only"])
        check_bool("init_weights", self.init_weights)


def _geometry(site, config: BOFTConfig) -> tuple[int, int]:
    """``(block_size, block_num)`` for the site, with PEFT's checks (errors name the site)."""
    features, extra = site.in_features, config.boft_n_butterfly_factor - 1
    span = 2 ** extra  # the last factor mixes blocks across chunks of 2^(N-1) blocks

    def fail(what, field="boft_n_butterfly_factor"):
        raise ConfigError(f"{site.name}: {what} (in_features={features}, boft_n_butterfly_factor="
                          f"{config.boft_n_butterfly_factor})", field=field)

    if config.boft_block_num:
        num = config.boft_block_num
        if features % num:
            fail(f"boft_block_num={num} does not divide in_features", "boft_block_num")
        if extra and (extra > int(math.log2(num)) or num % span):
            fail(f"boft_block_num={num} must be a multiple of 2^(boft_n_butterfly_factor - 1) = {span}")
        size = features // num
    else:
        size = config.boft_block_size
        if features % size:
            fail(f"boft_block_size={size} does not divide in_features", "boft_block_size")
        if extra and features % (size * span):
            fail(f"boft_block_size * 2^(boft_n_butterfly_factor - 1) = {size * span} does not divide in_features")
        num = features // size
    if extra and (num % 2 or size % 2):
        fail(f"with more than one butterfly factor the block size ({size}) and block number ({num}) must be even")
    return size, num


def _rotate_blocks(view: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """Row blocks ``view (..., m, b)`` times their matrices ``blocks (m, b, b)``."""
    return torch.einsum("...mk,mkc->...mc", view, blocks)


class BOFTModule(AdapterModule):
    additive = False
    has_pre = True
    has_post = True
    reads_bias = True

    def __init__(self, site, config: BOFTConfig):
        super().__init__(site, config)
        self.block_size, self.block_num = _geometry(site, config)
        self.n_factors = config.boft_n_butterfly_factor
        b = self.block_size
        self.boft_R = nn.Parameter(torch.empty(self.n_factors, self.block_num, b, b))
        self.boft_s = nn.Parameter(torch.empty(site.out_features, 1))
        self.reset_parameters(site.dtype)

    @torch.no_grad()
    def reset_parameters(self, base_dtype: torch.dtype = torch.float32) -> None:
        if self.config.init_weights:
            self.boft_R.zero_()
            self.boft_s.fill_(1.0)
        else:
            self.boft_R.normal_(0.0, 0.1)
            self.boft_s.normal_(1.0, 0.1)
        for p in self.parameters():
            p.copy_(round_like_base(p, base_dtype))

    def blocks(self, dropout: bool = False) -> torch.Tensor:
        """The orthogonal blocks ``(N, m, b, b)`` (Cayley transforms of the parameter)."""
        skew = 0.5 * (self.boft_R - self.boft_R.transpose(-1, -2))
        eye = torch.eye(self.block_size, dtype=skew.dtype, device=skew.device)
        blocks = torch.linalg.solve_ex(eye + skew, eye - skew, left=False)[0]  # I + S is never singular (S skew)
        count = int(self.config.boft_dropout * self.block_num)
        if dropout and count:
            dropped = torch.zeros(self.n_factors, self.block_num, 1, 1, dtype=torch.bool, device=blocks.device)
            factor = int(torch.randint(self.n_factors, ()))
            dropped[factor, torch.randperm(self.block_num, device=blocks.device)[:count]] = True
            blocks = torch.where(dropped, eye, blocks)
        return blocks

    def _factor(self, x: torch.Tensor, blocks: torch.Tensor, i: int) -> torch.Tensor:
        """``x M_i = x P_i BD_i P_i^T`` for rows ``x (..., in)``."""
        lead, m, b = x.shape[:-1], self.block_num, self.block_size
        if i == 0:  # P_0 is the identity
            return _rotate_blocks(x.reshape(*lead, m, b), blocks).reshape(x.shape)
        groups, half = 2 ** i, b // 2
        chunks = m // groups
        # x P_i: block (chunk, g) holds sub-chunks g of the chunk's first and second halves
        gathered = x.reshape(*lead, chunks, 2, groups, half).transpose(-3, -2).reshape(*lead, m, b)
        rotated = _rotate_blocks(gathered, blocks)
        # (.) P_i^T puts every sub-chunk back where it came from
        return rotated.reshape(*lead, chunks, groups, 2, half).transpose(-3, -2).reshape(x.shape)

    def rotate(self, x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        """``x R_tot = x M_{N-1} ... M_0``."""
        for i in reversed(range(self.n_factors)):
            x = self._factor(x, blocks[i], i)
        return x

    def pre(self, x):
        blocks = self.blocks(dropout=self.training)
        return self.rotate(x.to(blocks.dtype), blocks).to(x.dtype)

    def post(self, x, y, bias):
        scale = self.boft_s.view(-1)
        y = y.to(scale.dtype) * scale
        if bias is None:
            return y
        # s * (y - b) + b, written so that s = 1 returns y exactly
        return y + bias.to(scale.dtype) * (1 - scale)

    def fold(self, weight, bias):
        # W R_tot^T = W M_0^T M_1^T ... with M_i^T = P_i BD_i^T P_i^T
        blocks = self.blocks().float().transpose(-1, -2)
        for i in range(self.n_factors):
            weight = self._factor(weight, blocks[i], i)
        return weight * self.boft_s.float(), bias

    def extra_repr(self) -> str:
        return (f"{self.in_features} -> {self.out_features}, blocks={self.block_num}x{self.block_size}, "
                f"butterfly_factors={self.n_factors}")


def fix_peft_config(config: dict, tensors: dict) -> dict:
    """PEFT on a machine without its CUDA extension trains with one butterfly factor but keeps
    the requested count in its config; the saved ``boft_R`` (first dim 1) says what was used."""
    factors = config.get("boft_n_butterfly_factor", 1)
    saved = {t.shape[0] for k, t in tensors.items() if k.endswith(".boft_R")}
    if factors > 1 and saved == {1}:
        warnings.warn(f"this PEFT BOFT checkpoint was trained with 1 butterfly factor (PEFT's fallback without "
                      f"its CUDA extension) although its config says {factors}; loading it with 1", stacklevel=3)
        return {**config, "boft_n_butterfly_factor": 1}
    return config


SPEC = register(MethodSpec(
    name="boft",
    config_cls=BOFTConfig,
    module_cls=BOFTModule,
    peft_type="BOFT",
    peft_keys={"boft_R": "boft_R", "boft_s": "boft_s"},
    aliases={"block_size": "boft_block_size", "block_num": "boft_block_num",
             "n_butterfly_factor": "boft_n_butterfly_factor", "dropout": "boft_dropout", "init": "init_weights"},
    summary="butterfly-factorised orthogonal input rotation plus output scale (Liu et al. 2024)",
    peft_config_fixup=fix_peft_config,
))
