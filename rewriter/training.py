"""Training an ``Adapted``: under HF ``Trainer``, with activation checkpointing, with regularisers.

* :func:`prepare_for_trainer` makes the model look to ``transformers.Trainer`` like the model it
  was traced from; :class:`RewriterCallback` (a ``TrainerCallback``) runs the adapters'
  controllers (AdaLoRA's rank allocator) after every optimizer step and saves the adapter in
  every Trainer checkpoint.
* :func:`with_regularization` adds the adapters' training regularisers to the loss the model
  returns, as PEFT's AdaLoRA does in its forward.
* :func:`checkpoint_layers` is a pure graph transform: torch.export inlines HF's gradient
  checkpointing, so we put it back on the rewritten graph, one ``torch.utils.checkpoint``
  segment per layer (the nodes whose module stack shares a ``...layers.<i>`` prefix).
  :func:`enable_gradient_checkpointing` keeps it on across graph regenerations.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import operator
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import torch
from torch import fx, nn
from torch.utils.checkpoint import checkpoint

from .errors import CheckpointError, RewriterError

if TYPE_CHECKING:
    from .adapted import Adapted

#: submodule of the live GraphModule holding the checkpointed segments
SEGMENTS_ATTR = "rewriter_checkpoint"
#: attribute of an ``Adapted`` holding its :class:`CheckpointConfig` (None: off)
CHECKPOINTING_ATTR = "activation_checkpointing"

_LAYER_PATH = re.compile(r"\.\d+$")
#: keyword options of non-reentrant ``torch.utils.checkpoint.checkpoint``
_CHECKPOINT_OPTIONS = frozenset({"preserve_rng_state", "context_fn", "determinism_check", "debug", "early_stop"})


# ---- HF Trainer ---------------------------------------------------------------------------------

def traced_signature(adapted: Adapted) -> inspect.Signature:
    """The tensor inputs the graph was traced with as keyword parameters, plus the keyword-only
    options of ``Adapted.forward``."""
    keyword = inspect.Parameter.POSITIONAL_OR_KEYWORD
    params = [inspect.Parameter(name, keyword, default=None)
              for name, example in adapted.traced.example_inputs.items() if isinstance(example, torch.Tensor)]
    params += [p for p in inspect.signature(type(adapted).forward).parameters.values()
               if p.kind is inspect.Parameter.KEYWORD_ONLY]
    return inspect.Signature(params)


def prepare_for_trainer(adapted: Adapted) -> Adapted:
    """Make ``adapted`` look to HF ``Trainer`` like the model it was traced from (idempotent):

    * its ``forward`` names the traced inputs: Trainer keeps only the dataset columns that the
      model's forward names (``remove_unused_columns``), and ``Adapted.forward`` takes ``**kwargs``;
    * ``accepts_loss_kwargs = False``: the graph has no ``num_items_in_batch`` input, so Trainer
      scales the loss for gradient accumulation itself instead of passing it;
    * its state dict holds tied weights once (Trainer saves it with safetensors, which refuses
      shared tensors); loading fills the other names back in."""
    if vars(adapted).get("accepts_loss_kwargs") is False:  # prepared already (the hooks must not stack)
        return adapted
    adapted.accepts_loss_kwargs = False
    if not adapted.traced.positional:
        forward = functools.partial(type(adapted).forward, adapted)
        forward.__signature__ = traced_signature(adapted)
        adapted.forward = forward
    adapted.register_state_dict_post_hook(_drop_tied_aliases)
    adapted.register_load_state_dict_pre_hook(_restore_tied_aliases)
    return adapted


def _tied_aliases(module: nn.Module) -> dict[str, str]:
    """Each later name of a parameter or buffer held under several names -> its first name."""
    first: dict[int, str] = {}
    aliases = {}
    for name, tensor in [*module.named_parameters(remove_duplicate=False),
                         *module.named_buffers(remove_duplicate=False)]:
        kept = first.setdefault(id(tensor), name)
        if kept != name:
            aliases[name] = kept
    return aliases


def _drop_tied_aliases(module, state_dict, prefix, local_metadata) -> None:
    for alias in _tied_aliases(module):
        state_dict.pop(prefix + alias, None)


def _restore_tied_aliases(module, state_dict, prefix, *_) -> None:
    for alias, kept in _tied_aliases(module).items():
        if prefix + kept in state_dict:
            state_dict.setdefault(prefix + alias, state_dict[prefix + kept])


def with_regularization(adapted: Adapted, outputs):
    """``outputs`` with the active adapters' regularisers (AdaLoRA's orthogonality term) added to
    its ``loss``, as PEFT's AdaLoRA forward does; outputs without a loss are returned as they are."""
    loss = outputs.get("loss") if isinstance(outputs, Mapping) else None
    if isinstance(loss, torch.Tensor):
        outputs["loss"] = loss + adapted.regularization_loss().to(loss.device)
    return outputs


def __getattr__(name: str):
    if name == "RewriterCallback":  # importing transformers' trainer stack takes seconds: only on use
        return _callback_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@functools.cache
def _callback_class() -> type:
    from transformers import TrainerCallback
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    class RewriterCallback(TrainerCallback):
        """``Trainer(model=adapted, callbacks=[RewriterCallback(adapted)])``: prepares ``adapted``
        (:func:`prepare_for_trainer`), runs its controllers (``update_and_allocate(step)``, AdaLoRA's
        rank allocator) after every optimizer step, before the gradients are zeroed, and saves the
        adapter in each checkpoint folder under ``adapter_dir`` in ``format`` ("rewriter" or "peft")."""

        def __init__(self, adapted: Adapted, *, adapter_dir: str = "adapter", format: str = "rewriter"):
            if format not in ("rewriter", "peft"):
                raise CheckpointError(f"unknown checkpoint format {format!r}", fix="use 'rewriter' or 'peft'")
            self.adapted = prepare_for_trainer(adapted)
            self.adapter_dir, self.format = adapter_dir, format

        def on_optimizer_step(self, args, state, control, **kwargs):
            self.adapted.update_and_allocate(state.global_step)  # the 0-based index of this step

        def on_save(self, args, state, control, **kwargs):
            if args.should_save:
                folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}" / self.adapter_dir
                self.adapted.save_adapter(folder, format=self.format)

    RewriterCallback.__qualname__ = "RewriterCallback"
    return RewriterCallback


# ---- activation checkpointing -----------------------------------------------------------------

@dataclass(frozen=True)
class CheckpointConfig:
    """Which layers to checkpoint and how (HF's ``activation_checkpointing_enable`` arguments)."""
    every_n_layers: int = 1       #: checkpoint layers 0, n, 2n, ... (in graph order)
    offload: bool = False         #: keep the tensors saved for recomputation in CPU memory
    #: more keyword arguments for ``torch.utils.checkpoint.checkpoint`` (always non-reentrant)
    checkpoint_kwargs: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if isinstance(self.every_n_layers, bool) or not isinstance(self.every_n_layers, int) \
                or self.every_n_layers < 1:
            raise RewriterError(f"every_n_layers must be an integer >= 1, got {self.every_n_layers!r}")
        options = dict(self.checkpoint_kwargs)
        if options.pop("use_reentrant", False):
            raise RewriterError("reentrant checkpointing is not supported: it gives no gradients to adapters in "
                                "layers whose inputs do not require grad (a frozen base)",
                                fix="leave use_reentrant out, or set it to False")
        unknown = sorted(set(options) - _CHECKPOINT_OPTIONS)
        if unknown:
            raise RewriterError(f"unknown torch.utils.checkpoint option(s) {unknown}",
                                fix=f"known: {', '.join(sorted(_CHECKPOINT_OPTIONS))}")
        object.__setattr__(self, "checkpoint_kwargs", options)


class CheckpointedSegment(nn.Module):
    """Runs a graph segment under ``torch.utils.checkpoint`` when gradients are on.  The segment
    is held unregistered: the modules it calls belong to the outer graph and must not be listed
    (or saved) twice."""

    def __init__(self, segment: fx.GraphModule, config: CheckpointConfig):
        super().__init__()
        object.__setattr__(self, "segment", segment)
        self.config = config

    def forward(self, *args):
        if not torch.is_grad_enabled():  # nothing is saved for backward: nothing to recompute
            return self.segment(*args)
        saving = torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available()) if self.config.offload \
            else contextlib.nullcontext()
        with saving:
            return checkpoint(self.segment, *args, use_reentrant=False, **self.config.checkpoint_kwargs)


def _layer_of(node: fx.Node) -> str | None:
    """The outermost module path ending in an index (``model.layers.3``, ``encoder.block.0``)."""
    for path, _ in (node.meta.get("nn_module_stack") or {}).values():
        if isinstance(path, str) and _LAYER_PATH.search(path):
            return path
    return None


def layer_segments(graph: fx.Graph) -> list[list[fx.Node]]:
    """The nodes of each layer, in graph order: from a layer's first to its last node, including
    the unstamped nodes between them (casts), excluding ``get_attr`` (read outside, passed in).
    Layers whose nodes interleave form one segment."""
    nodes = list(graph.nodes)
    spans: dict[str, list[int]] = {}
    for i, node in enumerate(nodes):
        layer = _layer_of(node)
        if layer is not None and node.op not in ("placeholder", "get_attr", "output"):
            spans.setdefault(layer, [i, i])[1] = i
    merged: list[list[int]] = []
    for first, last in sorted(spans.values()):
        if merged and first <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], last)
        else:
            merged.append([first, last])
    return [[n for n in nodes[first:last + 1] if n.op != "get_attr"] for first, last in merged]


def _outline(gm: fx.GraphModule, nodes: list[fx.Node], name: str, config: CheckpointConfig) -> None:
    """Move ``nodes`` into a :class:`CheckpointedSegment` ``name`` and call it from where they were."""
    inside = set(nodes)
    inputs = list(dict.fromkeys(a for n in nodes for a in n.all_input_nodes if a not in inside))
    outputs = [n for n in nodes if any(u not in inside for u in n.users)]
    sub = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for a in inputs:
        env[a] = sub.placeholder(a.name)
        env[a].meta = dict(a.meta)
    for n in nodes:
        env[n] = sub.node_copy(n, env.__getitem__)
    sub.output(tuple(env[o] for o in outputs))
    segment = CheckpointedSegment(fx.GraphModule(gm, sub), config)  # shares gm's (adapter) submodules
    gm.get_submodule(SEGMENTS_ATTR).add_module(name, segment)

    graph = gm.graph
    with graph.inserting_after(nodes[-1]):
        call = graph.call_module(f"{SEGMENTS_ATTR}.{name}", tuple(inputs))
    last = call
    for i, out in enumerate(outputs):
        with graph.inserting_after(last):
            last = graph.call_function(operator.getitem, (call, i))
        if "val" in out.meta:
            last.meta["val"] = out.meta["val"]
        out.replace_all_uses_with(last, delete_user_cb=lambda user: user not in inside)
    for n in reversed(nodes):
        graph.erase_node(n)


def is_checkpointed(gm: fx.GraphModule) -> bool:
    return any(n.op == "call_module" and str(n.target).startswith(SEGMENTS_ATTR + ".") for n in gm.graph.nodes)


def checkpoint_layers(gm: fx.GraphModule, config: CheckpointConfig = CheckpointConfig()) -> fx.GraphModule:
    """Run every ``config.every_n_layers``-th layer of ``gm`` under ``torch.utils.checkpoint``
    (its activations are recomputed in backward instead of kept).  In place; returns ``gm``.
    Outputs and gradients are the same; a graph already checkpointed is left as it is."""
    if is_checkpointed(gm):
        return gm
    segments = layer_segments(gm.graph)
    if not segments:
        raise RewriterError("no layers to checkpoint: no graph node belongs to a module path ending in an index "
                            "(like 'model.layers.0')",
                            fix="trace the model with torch.export (rewriter.apply does), which records module paths")
    setattr(gm, SEGMENTS_ATTR, nn.Module())  # replaces the segments of an earlier graph
    for i, nodes in enumerate(segments[::config.every_n_layers]):
        _outline(gm, nodes, f"segment_{i}", config)
    gm.graph.lint()
    gm.recompile()
    return gm


def apply_activation_checkpointing(adapted: Adapted) -> None:
    """Checkpoint the live graph's layers if ``adapted`` has checkpointing on.  ``Adapted._refresh``
    calls this after regenerating the live graph, so the setting survives adapter changes."""
    config = getattr(adapted, CHECKPOINTING_ATTR, None)
    if config is not None:
        checkpoint_layers(adapted.gm, config)


def enable_gradient_checkpointing(adapted: Adapted, *, every_n_layers: int = 1, offload: bool = False,
                                  **checkpoint_kwargs) -> None:
    """Recompute the layers' activations in backward (HF's ``gradient_checkpointing_enable``):
    less memory, one more forward per step, the same gradients."""
    config = CheckpointConfig(every_n_layers, offload, checkpoint_kwargs)
    disable_gradient_checkpointing(adapted)  # a fresh live graph, without an earlier setting's segments
    checkpoint_layers(adapted.gm, config)
    setattr(adapted, CHECKPOINTING_ATTR, config)  # only once it worked: every regeneration re-applies it


def disable_gradient_checkpointing(adapted: Adapted) -> None:
    setattr(adapted, CHECKPOINTING_ATTR, None)
    adapted._refresh()
    if hasattr(adapted.gm, SEGMENTS_ATTR):
        delattr(adapted.gm, SEGMENTS_ATTR)
