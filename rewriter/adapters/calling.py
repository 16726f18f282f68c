"""Calling the graph like the model it was traced from: inputs bound by name, the traced
signature for HF Trainer, and state dicts that hold tied weights once."""
from __future__ import annotations

import inspect
from typing import Any, Callable

import torch
from torch import nn

from ..core.tracing import Traced
from ..errors import RewriterError


def bind_inputs(traced: Traced, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The graph's keyword inputs for a call ``(*args, **kwargs)`` of a keyword-traced graph:
    positional arguments by traced order, static inputs checked against their traced values,
    an attention mask of ones and token types of zeros when left out."""
    names = list(traced.example_inputs)
    for name, value in zip(names, args):
        if name in kwargs:
            raise TypeError(f"input '{name}' given twice")
        kwargs[name] = value
    call = {}
    for name, example in traced.example_inputs.items():
        if name in kwargs:
            value = kwargs.pop(name)
            if not isinstance(example, torch.Tensor) and value != example:
                raise RewriterError(f"'{name}={value!r}' differs from the traced value {example!r}",
                                    fix=f"re-trace with {name}={value!r} in example_inputs")
            call[name] = value
        elif not isinstance(example, torch.Tensor):
            call[name] = example
        elif name in ("attention_mask", "token_type_ids") and "input_ids" in call:
            ids = call["input_ids"]
            call[name] = torch.ones_like(ids) if name == "attention_mask" else torch.zeros_like(ids)
        elif name == "labels":
            raise RewriterError("this graph computes the loss, so it needs 'labels'",
                                fix="pass labels, or trace without them for inference (with_labels=False)")
        else:
            raise RewriterError(f"missing input '{name}'", fix=f"the graph was traced with inputs {names}")
    extra = [k for k, v in kwargs.items() if v is not None]
    if extra:
        fix = ("re-trace with the loss in the graph: rewriter.apply(model, rules, with_labels=True)"
               if extra == ["labels"] else
               "re-trace with them: rewriter.apply(model, rules, example_inputs={...all inputs...})")
        raise RewriterError(f"the graph was traced without input(s) {extra}; it takes {names}", fix=fix)
    return call


def traced_signature(traced: Traced, forward: Callable) -> inspect.Signature:
    """The tensor inputs the graph was traced with as keyword parameters, plus the keyword-only
    options of ``forward``."""
    keyword = inspect.Parameter.POSITIONAL_OR_KEYWORD
    params = [inspect.Parameter(name, keyword, default=None)
              for name, example in traced.example_inputs.items() if isinstance(example, torch.Tensor)]
    params += [p for p in inspect.signature(forward).parameters.values()
               if p.kind is inspect.Parameter.KEYWORD_ONLY]
    return inspect.Signature(params)


def tied_aliases(module: nn.Module) -> dict[str, str]:
    """Each later name of a parameter or buffer held under several names -> its first name."""
    first: dict[int, str] = {}
    aliases = {}
    for name, tensor in [*module.named_parameters(remove_duplicate=False),
                         *module.named_buffers(remove_duplicate=False)]:
        kept = first.setdefault(id(tensor), name)
        if kept != name:
            aliases[name] = kept
    return aliases


def drop_tied_aliases(module, state_dict, prefix, local_metadata) -> None:
    for alias in tied_aliases(module):
        state_dict.pop(prefix + alias, None)


def restore_tied_aliases(module, state_dict, prefix, *_) -> None:
    for alias, kept in tied_aliases(module).items():
        if prefix + kept in state_dict:
            state_dict.setdefault(prefix + alias, state_dict[prefix + kept])
