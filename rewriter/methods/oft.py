"""OFT: a block-diagonal orthogonal rotation of the layer input, ``y = (x R_bd) W^T + b``.

``R_bd = blockdiag(R_0, ..., R_{r-1})`` with ``r`` blocks of size ``b`` (``r * b = in``).
Each block comes from a vector of ``b(b-1)/2`` parameters (the parameter ``oft_R``,
``(r, b(b-1)/2)``, or ``(1, ...)`` with ``block_share``), made skew-symmetric
(``Q[i, j] = v``, ``i < j``, upper triangle row-major; ``Q <- Q - Q^T``) and then:

* exact Cayley (``use_cayley_neumann = false``): ``R = (I - Q)(I + Q)^-1``;
* Neumann series with ``n = num_cayley_neumann_terms`` (default):
  ``R = I + 2 sum_{k=1}^{m-1} Q^k + Q^m`` with ``m = max(3, n - 1)`` (``n = 1``: ``I``,
  ``n = 2``: ``I + 2Q``).  Like PEFT, this approximates ``(I + Q)(I - Q)^-1``, the
  *transpose* of the exact mode's rotation for the same parameters.

COFT (``coft``) projects each block's skew matrix into the Frobenius ball of radius
``eps / sqrt(number of parameter rows)`` and writes the projected values back into the
parameter, without gradient, before every forward and fold (as PEFT does).

The forward rotates ``x`` on a ``(..., r, b)`` view (the dense ``(in, in)`` matrix is never
built); fold: ``W <- W R_bd^T``.  ``module_dropout`` is accepted for PEFT configs but, as
in PEFT 0.21.2, has no effect.  ``bias`` is a PEFT training option that the core handles.
A block size (or ``r``) that does not divide ``in`` is moved to the nearest divisor, ties
to the lower one, with a warning, as PEFT does.
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
from .checks import check_bool, check_choice, check_int, check_number, check_probability, round_like_base
from .registry import register


@dataclass(frozen=True)
class OFTConfig:
    r: int = 0
    oft_block_size: int = 32
    module_dropout: float = 0.0  # accepted for PEFT configs; unused in PEFT 0.21.2's forward
    fan_in_fan_out: bool = False  # accepted for PEFT configs; the layout is read from the graph
    bias: str = "none"
    init_weights: bool = True
    coft: bool = False
    eps: float = 6e-5
    block_share: bool = False
    use_cayley_neumann: bool = True
    num_cayley_neumann_terms: int = 5

    def __post_init__(self):
        check_int("r", self.r, minimum=0)
        check_int("oft_block_size", self.oft_block_size, minimum=0)
        if (self.r == 0) == (self.oft_block_size == 0):
            raise ConfigError(f"give exactly one of 'r' and 'oft_block_size' (the other 0), got r={self.r} and "
                              f"oft_block_size={self.oft_block_size}", field="oft_block_size",
                              fix="r * oft_block_size == in_features, so one of them determines the other")
        check_probability("module_dropout", self.module_dropout)
        check_bool("fan_in_fan_out", self.fan_in_fan_out)
        check_choice("bias", self.bias, ["none", "all", "oft_only"])
        check_bool("init_weights", self.init_weights)
        check_bool("coft", self.coft)
        check_number("eps", self.eps)
        if not self.eps > 0:
            raise ConfigError(f"'eps' must be > 0, got {self.eps}", field="eps")
        check_bool("block_share", self.block_share)
        check_bool("use_cayley_neumann", self.use_cayley_neumann)
        check_int("num_cayley_neumann_terms", self.num_cayley_neumann_terms, minimum=1)


def nearest_divisor(n: int, value: int) -> int:
    """The divisor of ``n`` closest to ``value`` (ties: the lower one); PEFT's auto-adjustment."""
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    return min(divisors, key=lambda d: (abs(d - value), d))


class OFTModule(AdapterModule):
    additive = False
    has_pre = True
    has_post = False

    def __init__(self, site, config: OFTConfig):
        super().__init__(site, config)
        features = site.in_features
        given, name = (config.oft_block_size, "oft_block_size") if config.r == 0 else (config.r, "r")
        if features % given != 0 or given > features:
            adjusted = nearest_divisor(features, given)
            warnings.warn(f"{site.name}: {name}={given} does not divide in_features={features}; "
                          f"using {name}={adjusted} instead", stacklevel=2)
            given = adjusted
        self.block_size = given if name == "oft_block_size" else features // given
        self.r = features // self.block_size
        n_elements = self.block_size * (self.block_size - 1) // 2
        self.oft_R = nn.Parameter(torch.empty(1 if config.block_share else self.r, n_elements))
        # upper-triangle positions, in the order of the parameter vector
        rows, cols = torch.triu_indices(self.block_size, self.block_size, 1)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)
        self.reset_parameters(site.dtype)

    @torch.no_grad()
    def reset_parameters(self, base_dtype: torch.dtype = torch.float32) -> None:
        if self.config.init_weights:
            self.oft_R.zero_()
        else:
            self.oft_R.normal_(0.0, 0.1)
        self.oft_R.copy_(round_like_base(self.oft_R, base_dtype))

    @torch.no_grad()
    def _project_coft(self) -> None:
        # ||skew(v)||_F = sqrt(2) ||v||: scale every block whose norm exceeds the radius back onto it
        radius = self.config.eps / math.sqrt(self.oft_R.shape[0])
        norm = math.sqrt(2) * self.oft_R.norm(dim=1, keepdim=True)
        self.oft_R.mul_(torch.clamp(radius / norm, max=1.0))

    def _skew(self) -> torch.Tensor:
        blocks, b = self.oft_R.shape[0], self.block_size
        q = self.oft_R.new_zeros(blocks, b, b)
        q[:, self.rows, self.cols] = self.oft_R
        return q - q.transpose(1, 2)

    def blocks(self) -> torch.Tensor:
        """The rotation blocks ``(r or 1, b, b)`` in the parameter dtype."""
        if self.config.coft:
            self._project_coft()
        q = self._skew()
        eye = torch.eye(self.block_size, dtype=q.dtype, device=q.device)
        if not self.config.use_cayley_neumann:
            return torch.linalg.solve_ex(eye + q, eye - q, left=False)[0]  # I + Q is never singular (Q skew)
        terms = self.config.num_cayley_neumann_terms
        if terms == 1:
            return eye.expand_as(q)
        # alpha=2: one kernel per term instead of a scaled copy and an add (2 * power is exact either way)
        rotation = torch.add(eye, q, alpha=2)
        if terms == 2:
            return rotation
        power = q
        for _ in range(2, max(3, terms - 1)):
            power = power @ q
            rotation = torch.add(rotation, power, alpha=2)
        return rotation + power @ q

    def _rotate(self, x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        """``x R_bd`` for rows ``x (..., in)``, block by block on a ``(..., r, b)`` view."""
        view = x.reshape(*x.shape[:-1], self.r, self.block_size)
        if blocks.shape[0] == 1:  # block_share: one plain matmul
            rotated = view @ blocks[0]
        else:
            rotated = torch.einsum("...rk,rkc->...rc", view, blocks)
        return rotated.reshape(x.shape)

    def pre(self, x):
        blocks = self.blocks()
        return self._rotate(x.to(blocks.dtype), blocks).to(x.dtype)

    def fold(self, weight, bias):
        # W R_bd^T: each row of W is rotated by the transposed blocks
        return self._rotate(weight, self.blocks().float().transpose(1, 2)), bias

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, r={self.r}, block_size={self.block_size}"


SPEC = register(MethodSpec(
    name="oft",
    config_cls=OFTConfig,
    module_cls=OFTModule,
    peft_type="OFT",
    peft_keys={"oft_R.weight": "oft_R"},
    aliases={"block_size": "oft_block_size", "init": "init_weights", "neumann_terms": "num_cayley_neumann_terms"},
    summary="block-diagonal orthogonal rotation of the layer input (Qiu et al. 2023)",
))
