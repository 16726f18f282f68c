"""The training surface of the engine: trainable parameters, activation checkpointing on the
live graph, the per-step controllers, and what HF ``Trainer`` expects of a model."""
from __future__ import annotations

import functools

import torch
from torch import nn

from ..core.activation_checkpointing import SEGMENTS_ATTR, ActivationCheckpointing, checkpoint_layers
from .calling import drop_tied_aliases, restore_tied_aliases, traced_signature


class Trainable:
    """Mixed into :class:`rewriter.adapters.AdaptedModel` (which provides ``gm``, ``state``,
    ``refresh`` and ``activation_checkpointing``)."""

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def print_trainable_parameters(self) -> str:
        trainable = sum(p.numel() for p in self.trainable_parameters())
        total = sum(p.numel() for p in self.parameters())
        line = (f"trainable params: {trainable:,d} || all params: {total:,d} || "
                f"trainable%: {100 * trainable / max(total, 1):.4f}")
        print(line)
        return line

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None, *, every_n_layers: int = 1,
                                      offload: bool = False) -> None:
        """Recompute each layer's activations in backward (same gradients, less memory); HF's name."""
        config = ActivationCheckpointing(every_n_layers, offload, dict(gradient_checkpointing_kwargs or {}))
        self.gradient_checkpointing_disable()  # a fresh live graph, without an earlier setting's segments
        checkpoint_layers(self.gm, config)
        self.activation_checkpointing = config  # only once it worked: every regeneration re-applies it

    def gradient_checkpointing_disable(self) -> None:
        self.activation_checkpointing = None
        self.refresh()
        if hasattr(self.gm, SEGMENTS_ATTR):
            delattr(self.gm, SEGMENTS_ATTR)

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None, every_n_layers: int = 1,
                                        offload: bool = False) -> None:
        """What ``transformers.Trainer`` calls with ``activation_checkpointing=True``."""
        self.gradient_checkpointing_enable(activation_checkpointing_kwargs, every_n_layers=every_n_layers,
                                           offload=offload)

    activation_checkpointing_disable = gradient_checkpointing_disable

    def update_and_allocate(self, step: int) -> None:
        """Run the per-step controllers of the active adapters (e.g. AdaLoRA's rank allocator)."""
        self.state.update_and_allocate(step)

    def regularization_loss(self) -> torch.Tensor:
        """Sum of the active adapters' training regularisers (0 when none has one)."""
        return self.state.regularization_loss()

    def prepare_for_trainer(self) -> None:
        """Look to HF ``Trainer`` like the traced model (idempotent): ``forward`` names the traced
        inputs (Trainer keeps only the dataset columns it names), ``accepts_loss_kwargs = False`` (the
        graph takes no ``num_items_in_batch``), and the state dict holds tied weights once (Trainer
        saves it with safetensors, which refuses shared tensors)."""
        if vars(self).get("accepts_loss_kwargs") is False:  # prepared already (the hooks must not stack)
            return
        self.accepts_loss_kwargs = False
        if not self._traced.positional:
            forward = functools.partial(type(self).forward, self)
            forward.__signature__ = traced_signature(self._traced, type(self).forward)  # type: ignore[attr-defined]
            self.forward = forward  # type: ignore[method-assign]
        self.register_state_dict_post_hook(drop_tied_aliases)
        self.register_load_state_dict_pre_hook(restore_tied_aliases)
