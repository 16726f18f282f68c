"""Tiny models as ready GraphModules (torch.fx.symbolic_trace takes milliseconds, torch.export seconds),
for the reliability tests, the distributed worker and the CLI's ``--model tiny_graphs:mlp``."""
import torch
from torch import fx

from rewriter.models import TinyMLP


def mlp(width: int = 32, depth: int = 2, seed: int = 0) -> fx.GraphModule:
    """Sites ``layers.<i>.up`` (width -> 2 width), ``layers.<i>.down`` (2 width -> width), ``head`` (width -> 4)."""
    torch.manual_seed(seed)
    return fx.symbolic_trace(TinyMLP(width, depth))
