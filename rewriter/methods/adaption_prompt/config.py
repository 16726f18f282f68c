"""Llama-Adapter's configuration, and PEFT's choice of the blocks it adapts."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from ...errors import ConfigError
from ..checks import check_bool, check_int
from .find import Attention


@dataclass(frozen=True)
class AdaptionPromptConfig:
    adapter_len: int                     #: prompt tokens L
    adapter_layers: int                  #: how many attention blocks, counted from the top
    target_modules: str | None = None    #: keep blocks whose name ends with "." + this (None: all)
    project_output: bool | None = None   #: see the package docstring (None: as PEFT does)

    def __post_init__(self):
        check_int("adapter_len", self.adapter_len, minimum=1)
        check_int("adapter_layers", self.adapter_layers, minimum=1)
        if self.target_modules is not None and (not isinstance(self.target_modules, str) or not self.target_modules):
            raise ConfigError(f"'target_modules' must be the name of the attention modules (a string), got "
                              f"{self.target_modules!r}", field="target_modules",
                              fix="e.g. target_modules = \"self_attn\"; leave it out to use every attention block")
        if self.project_output is not None:
            check_bool("project_output", self.project_output)


def select(pairs: Sequence[tuple[Attention, AdaptionPromptConfig]]) -> list[Attention]:
    """PEFT's choice: of the blocks whose name ends with "." + target_modules, the last adapter_layers."""
    kept = []
    for config in dict.fromkeys(c for _, c in pairs):
        blocks = [t for t, c in pairs if c == config]
        suffix = config.target_modules
        named = [t for t in blocks if suffix is None or t.name.endswith("." + suffix)]
        if not named:
            raise ConfigError(f"no attention block is named '*.{suffix}'", field="target_modules",
                              fix=f"attention blocks: {', '.join(t.name for t in blocks[:4])}"
                                  f"{' ...' if len(blocks) > 4 else ''}; name the last part of theirs, or leave "
                                  "target_modules out to use them all")
        if len(named) < config.adapter_layers:
            raise ConfigError(f"adapter_layers = {config.adapter_layers}, but the rules match only {len(named)} "
                              f"attention block(s){f' named *.{suffix}' if suffix else ''}", field="adapter_layers",
                              fix=f"use adapter_layers <= {len(named)}")
        kept += named[-config.adapter_layers:]
    return kept
