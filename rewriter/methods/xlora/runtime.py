"""X-LoRA's runtime API (PEFT's names, delegated to from ``Adapted``): scalings, logs, settings."""
from __future__ import annotations

import dataclasses

import torch

from ...errors import ConfigError, RewriterError
from .module import XLoraModule
from .target import TARGET


def active_adapter(adapted) -> tuple[str, XLoraModule]:
    """The active X-LoRA adapter, else the only one on the model."""
    found = [(n, r.modules[TARGET]) for n, r in adapted.adapters.items() if r.method == "xlora"]
    active = [(n, m) for n, m in found if n in adapted.active_adapters]
    if len(active) == 1 or len(found) == 1:
        return (active or found)[0]
    raise RewriterError("no X-LoRA adapter on this model" if not found else
                        f"several X-LoRA adapters ({', '.join(n for n, _ in found)}) and not exactly one active",
                        fix="add one with method = \"xlora\"" if not found else "set_adapter() the one you mean")


def update_config(adapted, **changes) -> None:
    """Change runtime settings of the X-LoRA adapter; the plan (what is saved) follows."""
    name, module = active_adapter(adapted)
    config = dataclasses.replace(module.config, **changes)
    if config.top_k_lora is not None and config.top_k_lora > len(module.experts):
        raise ConfigError(f"top_k_lora {config.top_k_lora} > {len(module.experts)} experts", field="top_k_lora")
    module.set_config(config)
    plan = adapted.adapters[name].plan
    plan.decisions = [dataclasses.replace(d, config=config) for d in plan.decisions]
    adapted.refresh()


def bucketed(log: list[torch.Tensor]) -> dict[int, tuple[list[int], list[torch.Tensor]]]:
    """PEFT's ``get_bucketed_scalings_log``: ``{seq_len: (positions in the log, tensors)}``."""
    out: dict[int, tuple[list[int], list[torch.Tensor]]] = {}
    for i, s in enumerate(log):
        positions, tensors = out.setdefault(s.shape[1], ([], []))
        positions.append(i)
        tensors.append(s)
    return out


def active_module(adapted) -> XLoraModule:
    """The module of the active X-LoRA adapter, else of the only one on the model."""
    return active_adapter(adapted)[1]
