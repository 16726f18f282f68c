"""Validation helpers shared by method configs, and PEFT's initial rounding."""
from __future__ import annotations

from typing import Collection, cast

import torch

from ..errors import ConfigError


def check_int(name: str, value: object, *, minimum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"'{name}' must be an integer, got {value!r}", field=name)
    if minimum is not None and value < minimum:
        raise ConfigError(f"'{name}' must be >= {minimum}, got {value}", field=name)


def check_number(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"'{name}' must be a number, got {value!r}", field=name)


def check_probability(name: str, value: object) -> None:
    check_number(name, value)
    if not 0.0 <= cast(float, value) < 1.0:  # check_number let only an int or a float through
        raise ConfigError(f"'{name}' must be in [0, 1), got {value}", field=name)


def check_choice(name: str, value: object, choices: Collection[object]) -> None:
    if value not in choices:
        raise ConfigError(f"'{name}' must be one of {list(choices)}, got {value!r}", field=name)


def check_bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"'{name}' must be true or false, got {value!r}", field=name)


def round_like_base(t: torch.Tensor, base_dtype: torch.dtype) -> torch.Tensor:
    """PEFT creates adapter weights in the base dtype and then upcasts them to float32;
    doing the same rounding keeps initial values identical on low-precision bases."""
    if base_dtype.is_floating_point and base_dtype != t.dtype:
        return t.to(base_dtype).to(t.dtype)
    return t
