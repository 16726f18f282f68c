"""Adapter inputs recomputed in the backward instead of saved.

A frozen linear layer saves nothing of its input for the backward; an adapter on it usually saves the
input (LoRA's ``A`` gradient is ``dh^T x``).  When that input is a product ``a * b`` of two tensors that
both require grad, autograd keeps ``a`` and ``b`` for the product's own backward anyway, so the adapter
can keep a recipe instead of ``x`` and multiply again when its backward runs.  In a Llama MLP that is
the down projection's input ``silu(gate) * up``: ``tokens x intermediate`` per layer that no longer
lives from the forward to the backward.  The graph passes ``recompute=(a, b)`` with the site input
(``graph._GraphOps``); :class:`~rewriter.methods.base.AdapterModule` runs the adapter under
:func:`recomputed`.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch


@dataclass(frozen=True)
class _Recipe:
    a: torch.Tensor
    b: torch.Tensor
    versions: tuple[int, int]
    size: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int | torch.SymInt

    def make(self) -> torch.Tensor:
        if (self.a._version, self.b._version) != self.versions:
            raise RuntimeError("an adapter input's operands were modified in place after the forward, so the "
                               "input cannot be recomputed for the backward")
        return torch.mul(self.a, self.b).as_strided(self.size, self.stride, self.offset)


def applies(x: torch.Tensor, operands: tuple[object, object]) -> bool:
    """Only where it saves memory and cannot change a result: training, ``x`` the product of the two
    operands, both kept by autograd, and no compiler tracing the call."""
    a, b = operands
    return (torch.is_grad_enabled() and isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
            and a.requires_grad and b.requires_grad and x.is_contiguous() and a.shape == b.shape == x.shape
            and a.dtype == b.dtype == x.dtype and not (torch.compiler.is_compiling() or torch.compiler.is_exporting()))


@contextlib.contextmanager
def recomputed(x: torch.Tensor, operands: tuple[torch.Tensor, torch.Tensor]) -> Iterator[None]:
    """Tensors saved in this context that are ``x`` or views of it are stored as a recipe."""
    a, b = operands
    # the hooks live as long as what they packed: they must not hold x (nor its storage) themselves
    address, dtype, device = x.untyped_storage().data_ptr(), x.dtype, x.device

    def pack(t: torch.Tensor) -> _Recipe | torch.Tensor:
        if t.dtype == dtype and t.device == device and t.untyped_storage().data_ptr() == address:
            return _Recipe(a, b, (a._version, b._version), tuple(t.shape), t.stride(), t.storage_offset())
        return t

    def unpack(saved: _Recipe | torch.Tensor) -> torch.Tensor:
        return saved.make() if isinstance(saved, _Recipe) else saved

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield
