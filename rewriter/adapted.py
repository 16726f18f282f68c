"""``Adapted``: the model users hold after rewriting.

The engine (:class:`rewriter.adapters.AdaptedModel`) owns the traced graph and the adapter
state and regenerates the live graph on every change, so the forward is straight-line code
for the current configuration.  This facade adds what needs the features above the engine:
checkpoints, generation, code export, weighted combinations and X-LoRA's runtime API (PEFT's
names).  Each is a short delegator.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from .adapters import AdaptedModel, AdapterRecord, add_weighted_adapter
from .checkpoint import load_adapter_into, read_adapter_modules, save_adapter
from .core.tracing import Traced, trace_model
from .exporter import graph_code
from .generate import generate
from .methods.xlora import runtime as xlora
from .rules import format_plan


class Adapted(AdaptedModel):
    def __init__(self, traced: Traced):
        super().__init__(traced, reader=read_adapter_modules)

    def explain(self) -> str:
        return "\n\n".join(format_plan(r.plan) for r in self.adapters.values())

    def save_adapter(self, directory, adapter_names: Sequence[str] | None = None, format: str = "rewriter") -> Path:
        return save_adapter(self, directory, adapter_names=adapter_names, format=format)

    def load_adapter(self, directory, adapter_name: str | None = None, *, activate: bool | None = None,
                     low_cpu_mem_usage: bool = False, remap=None):
        """Load an adapter directory (rewriter's or PEFT's format).  ``remap``: a dict or a TOML file with a
        ``[remap]`` table renaming the checkpoint's modules (``"transformer.h" = "model.layers"``)."""
        return load_adapter_into(self, directory, adapter_name=adapter_name, activate=activate,
                                 low_cpu_mem_usage=low_cpu_mem_usage, remap=remap)

    def add_weighted_adapter(self, adapters: Sequence[str], weights: Sequence[float], adapter_name: str,
                             combination_type: str = "svd", **options) -> AdapterRecord:
        """A new adapter combining ``adapters`` with ``weights`` (PEFT's semantics; LoRA: linear, cat,
        svd with ``svd_rank``/``svd_clamp``; IA3: linear).  It is added inactive, like PEFT's."""
        return add_weighted_adapter(self, adapters, weights, adapter_name, combination_type, **options)

    def generate(self, input_ids, max_new_tokens: int = 20, **kwargs):
        """Token generation for causal LMs with a static-KV-cache graph rewritten like this one
        (see :func:`rewriter.generate.generate`)."""
        return generate(self, input_ids, max_new_tokens=max_new_tokens, **kwargs)

    def code(self) -> str:
        return graph_code(self)

    # ---- X-LoRA runtime API (PEFT's names; the active X-LoRA adapter) -------------------------------

    def get_latest_scalings(self) -> torch.Tensor | None:
        """The last forward's classifier scalings, (batch, seq, n_layers, n_experts), detached."""
        return xlora.active_module(self).latest_scalings

    def enable_scalings_logging(self) -> None:
        xlora.active_module(self).logging = True

    def disable_scalings_logging(self) -> None:
        """Stop logging (the log is kept); a disabled log costs nothing."""
        xlora.active_module(self).logging = False

    def clear_scalings_log(self) -> None:
        xlora.active_module(self).scalings_log.clear()

    def get_scalings_log(self) -> list[torch.Tensor]:
        return list(xlora.active_module(self).scalings_log)

    def get_bucketed_scalings_log(self) -> dict[int, tuple[list[int], list[torch.Tensor]]]:
        """The log by sequence length: ``{seq_len: (positions in the log, scalings)}``."""
        return xlora.bucketed(xlora.active_module(self).scalings_log)

    def get_global_scaling_weight(self) -> float:
        return xlora.active_module(self).config.global_scaling_weight

    def set_global_scaling_weight(self, weight: float) -> None:
        xlora.update_config(self, global_scaling_weight=weight)

    def set_scaling_pass_value(self, value: float | None) -> None:
        """The experts' constant scaling in the scaling pass; None: 1 / n_experts."""
        xlora.update_config(self, scaling_pass_value=1 / len(xlora.active_module(self).experts) if value is None
                            else value)

    def set_topk_lora(self, value: int | None) -> None:
        xlora.update_config(self, top_k_lora=value)


def apply(model_or_graph, rules, *, example_inputs=None, adapter_name: str | None = None,
          dynamic: bool = True, with_labels: bool = False) -> Adapted:
    """Trace (when needed) and insert the adapter described by ``rules``.  ``with_labels=True``
    traces the model's loss into the graph (the forward then takes ``labels``)."""
    if isinstance(model_or_graph, Adapted):
        model_or_graph.add_adapter(rules, adapter_name)
        return model_or_graph
    traced = model_or_graph if isinstance(model_or_graph, Traced) else \
        trace_model(model_or_graph, example_inputs, dynamic=dynamic, with_labels=with_labels)
    adapted = Adapted(traced)
    adapted.add_adapter(rules, adapter_name)
    return adapted


def load_adapter(model_or_adapted, adapter_dir, adapter_name: str | None = None, *, example_inputs=None,
                 low_cpu_mem_usage: bool = False, remap=None) -> Adapted:
    """Load an adapter directory (rewriter's or PEFT's format) onto a model, tracing it when
    needed, or onto an existing ``Adapted``; returns the ``Adapted``."""
    adapted = model_or_adapted if isinstance(model_or_adapted, Adapted) else \
        Adapted(trace_model(model_or_adapted, example_inputs))
    load_adapter_into(adapted, adapter_dir, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage, remap=remap)
    return adapted
