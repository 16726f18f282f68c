"""Training an ``Adapted``: under HF ``Trainer``, with activation checkpointing, with regularisers.

* :func:`prepare_for_trainer` makes the model look to ``transformers.Trainer`` like the model it
  was traced from; :class:`RewriterCallback` (a ``TrainerCallback``) runs the adapters'
  controllers (AdaLoRA's rank allocator) after every optimizer step and saves the adapter in
  every Trainer checkpoint.
* :func:`with_regularization` adds the adapters' training regularisers to the loss the model
  returns, as PEFT's AdaLoRA does in its forward.
* :func:`enable_gradient_checkpointing` turns activation checkpointing (the graph pass in
  :mod:`rewriter.core.activation_checkpointing`) on for the live graph, kept across regenerations.
"""
from __future__ import annotations

import functools
from pathlib import Path

from .adapters import AdaptedModel
from .core.activation_checkpointing import checkpoint_layers
from .errors import CheckpointError

# ---- HF Trainer ---------------------------------------------------------------------------------

def prepare_for_trainer(adapted: AdaptedModel) -> AdaptedModel:
    """Make ``adapted`` look to HF ``Trainer`` like the model it was traced from (idempotent; see
    :meth:`rewriter.adapters.AdaptedModel.prepare_for_trainer`)."""
    adapted.prepare_for_trainer()
    return adapted


def with_regularization(adapted: AdaptedModel, outputs):
    """``outputs`` with the active adapters' regularisers (AdaLoRA's orthogonality term) added to
    its ``loss``, as PEFT's AdaLoRA forward does; outputs without a loss are returned as they are."""
    return adapted.state.with_regularization(outputs)


def apply_activation_checkpointing(adapted: AdaptedModel) -> None:
    """Checkpoint the live graph's layers if ``adapted`` has activation checkpointing on (what every
    regeneration of the live graph does)."""
    if adapted.activation_checkpointing is not None:
        checkpoint_layers(adapted.gm, adapted.activation_checkpointing)


def enable_gradient_checkpointing(adapted: AdaptedModel, *, every_n_layers: int = 1, offload: bool = False,
                                  **checkpoint_kwargs) -> None:
    """Recompute the layers' activations in backward (HF's ``gradient_checkpointing_enable``):
    less memory, one more forward per step, the same gradients."""
    adapted.gradient_checkpointing_enable(checkpoint_kwargs, every_n_layers=every_n_layers, offload=offload)


def disable_gradient_checkpointing(adapted: AdaptedModel) -> None:
    adapted.gradient_checkpointing_disable()


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

        def __init__(self, adapted: AdaptedModel, *, adapter_dir: str = "adapter", format: str = "rewriter"):
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


