"""IA3: a learned vector ``l`` rescales a layer's output or, for feedforward sites, its input.

* Output scaling (default): ``y = l * (W x + b)``; the bias is scaled too, as in PEFT.
  Fold: ``W <- diag(l) W``, ``b <- l * b``.
* Input scaling (``is_feedforward = true``): ``y = W (l * x) + b``.  Fold: ``W <- W diag(l)``.

PEFT picks feedforward sites with ``feedforward_modules``; here that is the per-site
parameter ``is_feedforward`` (set by a rule).  ``l`` has PEFT's checkpoint shape:
``(out, 1)`` for output scaling, ``(1, in)`` for input scaling.  Init: ones
(``init_ia3_weights``), or standard normal values when it is false.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from ..errors import ConfigError
from ..core.adapter import AdapterModule
from .base import MethodSpec
from .checks import check_bool, round_like_base
from .registry import register


@dataclass(frozen=True)
class IA3Config:
    init_ia3_weights: bool = True
    is_feedforward: bool = False
    fan_in_fan_out: bool = False  # accepted for PEFT configs; the layout is read from the graph

    def __post_init__(self):
        check_bool("init_ia3_weights", self.init_ia3_weights)
        check_bool("is_feedforward", self.is_feedforward)
        check_bool("fan_in_fan_out", self.fan_in_fan_out)


class IA3Module(AdapterModule):
    """The hook flags depend on ``is_feedforward``, so they are set per instance."""

    additive = False
    has_pre = False
    has_post = True

    def __init__(self, site, config: IA3Config):
        super().__init__(site, config)
        self.is_feedforward = config.is_feedforward
        self.has_pre, self.has_post = self.is_feedforward, not self.is_feedforward
        shape = (1, site.in_features) if self.is_feedforward else (site.out_features, 1)
        self.ia3_l = nn.Parameter(torch.empty(shape))
        self.reset_parameters(site.dtype)

    @torch.no_grad()
    def reset_parameters(self, base_dtype: torch.dtype = torch.float32) -> None:
        if self.config.init_ia3_weights:
            self.ia3_l.fill_(1.0)
        else:
            self.ia3_l.normal_()
        self.ia3_l.copy_(round_like_base(self.ia3_l, base_dtype))

    def pre(self, x):
        return (x.to(self.ia3_l.dtype) * self.ia3_l.view(-1)).to(x.dtype)

    def post(self, x, y, bias):
        return y.to(self.ia3_l.dtype) * self.ia3_l.view(-1)

    def fold_bias(self, bias):
        if self.is_feedforward or bias is None:
            return bias
        return bias.to(self.ia3_l.dtype) * self.ia3_l.view(-1)

    def fold(self, weight, bias):
        scale = self.ia3_l.float()
        if self.is_feedforward:
            return weight * scale, bias
        return weight * scale, (bias * scale.view(-1) if bias is not None else None)

    def extra_repr(self) -> str:
        kind = "input" if self.is_feedforward else "output"
        return f"{self.in_features} -> {self.out_features}, scales the {kind}"


def combine_weighted(vectors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """PEFT's IA3 ``add_weighted_adapter``: the linear combination ``sum_i w_i * l_i``."""
    if len(vectors) == 0 or len(vectors) != len(weights):
        raise ConfigError(f"combine_weighted needs one weight per vector, got {len(vectors)} vectors "
                          f"and {len(weights)} weights", field="weights")
    shapes = {tuple(v.shape) for v in vectors}
    if len(shapes) != 1:
        raise ConfigError(f"combine_weighted needs vectors of one shape, got {sorted(shapes)}")
    combined = torch.zeros_like(vectors[0])
    for vector, weight in zip(vectors, weights):
        combined = combined + weight * vector
    return combined


def combine(adapters: list[dict[str, "IA3Module"]], weights: list[float], combination_type: str = "linear"):
    """PEFT's IA3 ``add_weighted_adapter``: ``l = sum_i w_i l_i`` at every site that has the adapters."""
    if combination_type != "linear":
        raise ConfigError(f"IA3 combines linearly only, got combination_type={combination_type!r}",
                          fix="use combination_type='linear'")
    out = {}
    for site in dict.fromkeys(s for mods in adapters for s in mods):
        present = [(mods[site], w) for mods, w in zip(adapters, weights) if site in mods]
        kinds = {m.is_feedforward for m, _ in present}
        if len(kinds) > 1:
            raise ConfigError(f"{site}: cannot combine feedforward and output IA3 vectors")
        vector = combine_weighted([m.ia3_l.detach().float() for m, _ in present], [w for _, w in present])
        out[site] = (present[0][0].config, {"ia3_l": vector})
    return out


SPEC = register(MethodSpec(
    name="ia3",
    config_cls=IA3Config,
    module_cls=IA3Module,
    peft_type="IA3",
    peft_keys={"ia3_l": "ia3_l"},
    aliases={"init": "init_ia3_weights", "feedforward": "is_feedforward"},
    combine=combine,
    summary="learned rescaling of a layer's output (or input, for feedforward sites) (Liu et al. 2022)",
))
