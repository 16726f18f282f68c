"""Turn a model into a torch.fx GraphModule.

Hugging Face models (and any ``nn.Module``) go through ``torch.export`` (non-strict, eval
mode, ``use_cache=False``, batch and sequence dims dynamic) and we work on
``ep.module()``, which shares the model's parameters.  A GraphModule the user already
has is taken as it is.

The graph takes exactly the inputs it was traced with.  Tracing with ``labels``
(``with_labels=True``) puts the model's own loss into the graph, so the output carries
``loss`` as the eager model's does; the graph then needs labels on every call.
"""
from __future__ import annotations

import inspect
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping, cast

import torch
from torch import fx, nn

from ..errors import TraceError
from .graph import copy_graph

#: example inputs: keyword tensors, a tuple (or list) of positional ones, or one tensor
_Examples = Mapping[str, Any] | tuple[Any, ...] | list[Any] | torch.Tensor


@dataclass
class Traced:
    """A traced graph plus what is needed to call it like the original model."""
    gm: fx.GraphModule
    #: keyword arguments the graph was traced with; tensors are examples, the rest are constants
    example_inputs: dict[str, Any] = field(default_factory=dict)
    #: non-tensor keyword arguments baked into the graph (e.g. use_cache=False)
    static_kwargs: dict[str, Any] = field(default_factory=dict)
    #: positional calling convention (plain modules traced from a tuple of tensors)
    positional: bool = False
    source: nn.Module | None = None
    seconds: float = 0.0

    def clone(self) -> "Traced":
        """A new GraphModule over the same parameters, so one trace can take several rule sets
        (each ``Adapted`` adds its own submodules and rewrites its own graph)."""
        gm = fx.GraphModule(self.gm, copy_graph(self.gm.graph))
        for attr in ("_in_spec", "_out_spec"):
            if hasattr(self.gm, attr):
                setattr(gm, attr, getattr(self.gm, attr))
        return Traced(gm=gm, example_inputs=dict(self.example_inputs), static_kwargs=dict(self.static_kwargs),
                      positional=self.positional, source=self.source, seconds=0.0)


def _is_hf(model: nn.Module) -> bool:
    return hasattr(model, "config") and hasattr(model.config, "model_type")


def example_inputs_for(model: nn.Module, batch: int = 2, seq: int = 8, *, labels: bool = False) -> dict[str, Any]:
    """Example keyword inputs for a Hugging Face model, made from its config; with ``labels``
    also example labels (see :func:`_with_example_labels`)."""
    if not _is_hf(model):
        raise TraceError(f"cannot make example inputs for {type(model).__name__}",
                         fix="pass example_inputs=(tensor, ...) or a dict of keyword tensors")
    cfg: Any = model.config  # a transformers config (nn.Module types attributes as Tensor | Module)
    params = inspect.signature(model.forward).parameters
    text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    vocab = getattr(text_cfg, "vocab_size", None) or 100
    gen = torch.Generator().manual_seed(0)
    inputs: dict[str, Any] = {}
    main = getattr(model, "main_input_name", "input_ids")
    if main == "pixel_values":
        ch = getattr(cfg, "num_channels", 3)
        size = getattr(cfg, "image_size", 32)
        size = size if isinstance(size, int) else size[0]
        inputs["pixel_values"] = torch.randn(batch, ch, size, size, generator=gen)
    elif main == "input_features":
        bins = getattr(cfg, "num_mel_bins", 80)
        length = 2 * getattr(cfg, "max_source_positions", 1500)
        inputs["input_features"] = torch.randn(batch, bins, length, generator=gen)
    else:
        inputs["input_ids"] = torch.randint(0, vocab, (batch, seq), generator=gen)
        if "attention_mask" in params:
            inputs["attention_mask"] = torch.ones(batch, seq, dtype=torch.long)
        # bool(): in an ``and``, mypy solves getattr's default type from the left operand (bool)
        if "token_type_ids" in params and bool(getattr(cfg, "type_vocab_size", 0)):
            inputs["token_type_ids"] = torch.zeros(batch, seq, dtype=torch.long)
    if getattr(cfg, "is_encoder_decoder", False) and "decoder_input_ids" in params:
        inputs["decoder_input_ids"] = torch.randint(0, vocab, (batch, max(2, seq // 2)), generator=gen)
    return _with_example_labels(model, inputs) if labels else inputs


def _with_example_labels(model: nn.Module, inputs: dict[str, Any]) -> dict[str, Any]:
    """``inputs`` plus example ``labels`` shaped as the model's loss reads them, read off the
    logits of one eager call: token logits ``[B, L, C]`` take token ids ``[B, L]``, sequence
    logits ``[B, C]`` take one class per sample (floats for regression and multi-label, as
    ``config.problem_type`` says).  Encoder-decoders lose ``decoder_input_ids``: with labels the
    model makes them by shifting the labels right, as in training."""
    name = type(model).__name__
    if "labels" not in inspect.signature(model.forward).parameters:
        raise TraceError(f"{name}.forward takes no 'labels', so the graph cannot compute a loss",
                         fix="trace without labels and compute the loss from the outputs")
    with torch.no_grad():
        logits = getattr(model(**inputs), "logits", None)
    if not isinstance(logits, torch.Tensor) or logits.dim() not in (2, 3):
        raise TraceError(f"cannot tell which labels {name} expects: its output has no [batch, classes] or "
                         "[batch, length, classes] logits",
                         fix="pass example_inputs with an example 'labels' tensor")
    gen = torch.Generator().manual_seed(1)
    batch, classes = logits.shape[0], logits.shape[-1]
    problem = getattr(model.config, "problem_type", None) or \
        ("regression" if classes == 1 else "single_label_classification")
    if logits.dim() == 3:
        labels = torch.randint(0, classes, logits.shape[:2], generator=gen)
    elif problem == "single_label_classification":
        labels = torch.randint(0, classes, (batch,), generator=gen)
    elif problem == "multi_label_classification":
        labels = torch.randint(0, 2, (batch, classes), generator=gen).float()
    else:  # regression
        labels = torch.randn((batch, classes) if classes > 1 else (batch,), generator=gen)
    out = {k: v for k, v in inputs.items() if not (k == "decoder_input_ids" and logits.dim() == 3)}
    return {**out, "labels": labels}


def dynamic_spec(inputs: Mapping[str, Any], dynamic: bool) -> dict[str, dict[int, Any] | None]:
    spec: dict[str, dict[int, Any] | None] = {}
    for name, value in inputs.items():
        if isinstance(value, torch.Tensor) and dynamic and value.dim() >= 1:
            dims: dict[int, Any] = {0: torch.export.Dim.AUTO}
            if value.dim() >= 2 and not value.is_floating_point():  # token dims: (batch, seq)
                dims[1] = torch.export.Dim.AUTO
            spec[name] = dims
        else:
            spec[name] = None
    return spec


def trace(model: object, example_inputs: _Examples | None = None, *, dynamic: bool = True,
          with_labels: bool = False) -> fx.GraphModule:
    """Trace ``model`` into a GraphModule (see :func:`trace_model` for the details kept)."""
    return trace_model(model, example_inputs, dynamic=dynamic, with_labels=with_labels).gm


def trace_model(model: object, example_inputs: _Examples | None = None, *, dynamic: bool = True,
                with_labels: bool = False) -> Traced:
    """Trace with ``example_inputs`` (a dict of keyword inputs, or a tuple of positional tensors;
    default: :func:`example_inputs_for` the model).  ``with_labels=True`` makes the graph compute
    the model's loss: example labels are made when no example inputs are given."""
    if isinstance(model, fx.GraphModule):
        return Traced(gm=model, positional=True, source=None)
    if not isinstance(model, nn.Module):
        raise TraceError(f"expected an nn.Module or a torch.fx.GraphModule, got {type(model).__name__}")
    if with_labels and example_inputs is not None and not (isinstance(example_inputs, Mapping)
                                                           and "labels" in example_inputs):
        raise TraceError("with_labels=True, but example_inputs has no 'labels'",
                         fix="add an example 'labels' tensor to the example_inputs dict, or leave example_inputs "
                             "out to have them made")
    start = time.perf_counter()
    was_training = model.training
    model.eval()  # export bakes dropout: trace the inference graph
    hf = _is_hf(model)
    positional = False
    if example_inputs is None and not hf and getattr(model, "example_inputs", None) is not None:
        # plain modules may carry their own (e.g. builtin:tiny-mlp)
        example_inputs = cast(_Examples, model.example_inputs)
    if example_inputs is None:
        kwargs = example_inputs_for(model, labels=with_labels)
    elif isinstance(example_inputs, Mapping):
        kwargs = dict(example_inputs)
    else:
        positional = True
        args = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    static: dict[str, Any] = {}
    if hf and not positional:
        params = inspect.signature(model.forward).parameters
        for key, value in (("use_cache", False), ("return_dict", True)):
            if key in params and key not in kwargs:
                kwargs[key] = value
        static = {k: v for k, v in kwargs.items() if not isinstance(v, torch.Tensor)}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if positional:
                spec = tuple(dynamic_spec({str(i): a for i, a in enumerate(args)}, dynamic).values())
                ep = torch.export.export(model, args, dynamic_shapes=spec, strict=False)
            else:
                ep = torch.export.export(model, (), kwargs, dynamic_shapes=dynamic_spec(kwargs, dynamic),
                                         strict=False)
    except Exception as exc:  # torch.export raises many types; wrap with the fix
        raise TraceError(
            f"torch.export failed for {type(model).__name__}: {type(exc).__name__}: {str(exc).splitlines()[0]}",
            fix="try dynamic=False, attn_implementation='eager', or trace the model yourself and pass the GraphModule",
        ) from exc
    finally:
        model.train(was_training)
    gm = ep.module()
    share_float_attention_masks(gm)
    examples = {str(i): a for i, a in enumerate(args)} if positional else kwargs
    return Traced(gm=gm, example_inputs=examples, static_kwargs=static, positional=positional, source=model,
                  seconds=time.perf_counter() - start)


_SDPA = torch.ops.aten.scaled_dot_product_attention.default


def share_float_attention_masks(gm: fx.GraphModule) -> None:
    """Give attention one additive float mask per boolean mask, made once.

    ``scaled_dot_product_attention`` turns a boolean mask into a float one on every call and keeps that
    copy for its backward: one ``batch x tokens x tokens`` tensor per layer where one per model does.
    (Eager transformers usually skips the mask; an exported graph keeps it.)  The conversion is the one
    sdpa applies itself (``-inf`` where the mask is False, else 0), so results are bitwise unchanged."""
    graph = gm.graph
    users: dict[fx.Node, list[fx.Node]] = {}
    for node in graph.nodes:
        if node.op == "call_function" and node.target is _SDPA:
            mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
            if isinstance(mask, fx.Node) and getattr(mask.meta.get("val"), "dtype", None) is torch.bool:
                users.setdefault(mask, []).append(node)
    changed = False
    for mask, calls in users.items():
        # sdpa's query is a node, and export stamps a val (with a dtype) on every tensor node
        dtypes = {getattr(cast(fx.Node, c.args[0]).meta.get("val"), "dtype", None) for c in calls}
        if len(dtypes) != 1 or not cast(torch.dtype, next(iter(dtypes))).is_floating_point:
            continue
        (dtype,) = dtypes
        with graph.inserting_after(mask):
            masked = graph.call_function(torch.ops.aten.logical_not.default, (mask,))
        with graph.inserting_after(masked):
            zero = graph.call_function(torch.ops.aten.scalar_tensor.default, (0.0,),
                                       {"dtype": dtype, "device": mask.meta["val"].device})
        with graph.inserting_after(zero):
            additive = graph.call_function(torch.ops.aten.where.ScalarSelf, (masked, float("-inf"), zero))
        fake = mask.meta["val"]
        mode = getattr(fake, "fake_mode", None)
        if mode is not None:
            with mode:
                m = torch.ops.aten.logical_not.default(fake)
                z = torch.ops.aten.scalar_tensor.default(0.0, dtype=dtype, device=fake.device)
                for node, val in ((masked, m), (zero, z),
                                  (additive, torch.ops.aten.where.ScalarSelf(m, float("-inf"), z))):
                    node.meta["val"] = val
        for node in (masked, zero, additive):
            for key in ("nn_module_stack", "stack_trace"):
                if key in mask.meta:
                    node.meta[key] = mask.meta[key]
        for call in calls:
            if len(call.args) > 3:
                call.update_arg(3, additive)
            else:
                call.update_kwarg("attn_mask", additive)
        changed = True
    if changed:
        graph.lint()
        gm.recompile()
