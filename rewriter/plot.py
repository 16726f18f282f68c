"""X-LoRA scalings heatmaps (tokens x experts), like the X-LoRA paper's figure, as PNG files.

No plotting library: the image is a grid of cells written with zlib and struct.  Colour runs from
white (0) to dark blue (the largest scaling shown); a one-pixel grey line separates the cells.
"""
from __future__ import annotations

import argparse
import struct
import sys
import zlib
from pathlib import Path
from typing import Sequence

import torch

from .core.files import atomic_write, read_tensors
from .errors import RewriterError

CELL = 16  #: pixels per heatmap cell
_LOW, _HIGH, _GRID = (255, 255, 255), (8, 48, 107), (200, 200, 200)


def heatmap(scalings: torch.Tensor, layer: int | None = None, tokens: Sequence[int] | None = None) -> torch.Tensor:
    """The (tokens, experts) matrix of one sample's scalings ``(seq, n_layers, n_experts)``, or a batch's
    first sample ``(batch, seq, n_layers, n_experts)``: layer ``layer``, or the mean over layers."""
    s = scalings.detach().float()
    if s.dim() == 4:
        s = s[0]
    if s.dim() != 3:
        raise RewriterError(f"scalings must have shape (batch, seq, layers, experts) or (seq, layers, experts), "
                            f"got {tuple(scalings.shape)}")
    if layer is not None and not -s.shape[1] <= layer < s.shape[1]:
        raise RewriterError(f"layer {layer} is out of range: the scalings have {s.shape[1]} layers",
                            fix=f"pick a layer in 0..{s.shape[1] - 1}, or leave it out for the mean")
    m = s.mean(1) if layer is None else s[:, layer]
    if tokens is not None:
        bad = [t for t in tokens if not -m.shape[0] <= t < m.shape[0]]
        if bad:
            raise RewriterError(f"token positions {bad} are out of range for {m.shape[0]} tokens")
        m = m[list(tokens)]
    return m


def png_bytes(matrix: torch.Tensor, cell: int = CELL) -> bytes:
    """A PNG of ``matrix`` (rows x columns), one ``cell`` x ``cell`` square per entry."""
    rows, cols = matrix.shape
    level = matrix.abs().float() / (matrix.abs().max().item() or 1.0)
    level = level.repeat_interleave(cell, 0).repeat_interleave(cell, 1)
    level = torch.nn.functional.pad(level, (0, 1, 0, 1))  # the closing grid line
    low, high = torch.tensor(_LOW, dtype=torch.float32), torch.tensor(_HIGH, dtype=torch.float32)
    rgb = (low + (high - low) * level[..., None]).round().to(torch.uint8)
    height, width = rgb.shape[:2]
    on_grid = (torch.arange(height)[:, None] % cell == 0) | (torch.arange(width)[None, :] % cell == 0)
    rgb[on_grid] = torch.tensor(_GRID, dtype=torch.uint8)
    raw = torch.cat([torch.zeros(height, 1, dtype=torch.uint8), rgb.reshape(height, width * 3)], 1)  # filter 0

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw.numpy().tobytes()))
            + chunk(b"IEND", b""))


def plot_scalings(scalings_or_adapted, path, layer: int | None = None, tokens: Sequence[int] | None = None) -> Path:
    """Write the heatmap of X-LoRA scalings (a tensor, or an ``Adapted`` whose latest scalings are
    used) to ``path`` (PNG): rows are tokens, columns experts; ``layer`` None averages the layers."""
    scalings = scalings_or_adapted
    if not isinstance(scalings, torch.Tensor):
        scalings = scalings_or_adapted.get_latest_scalings()
        if scalings is None:
            raise RewriterError("the X-LoRA adapter has no scalings yet", fix="run a forward pass first")
    path = Path(path)
    atomic_write(path, png_bytes(heatmap(scalings, layer, tokens)))
    return path


def main_plot_scalings(argv: Sequence[str] | None = None) -> int:
    """``rewriter plot-scalings SCALINGS.safetensors --out heat.png [--layer L] [--tokens 0,1,2]``: the
    file holds one tensor (``scalings``, or the only one), e.g. saved from ``get_latest_scalings()``."""
    parser = argparse.ArgumentParser(prog="rewriter plot-scalings",
                                     description="X-LoRA scalings heatmap (tokens x experts) as a PNG")
    parser.add_argument("scalings", help="safetensors file with the scalings (batch, seq, layers, experts)")
    parser.add_argument("--out", required=True, help="PNG file to write")
    parser.add_argument("--layer", type=int, default=None, help="one layer (default: the mean over layers)")
    parser.add_argument("--tokens", default=None, help="comma-separated token positions (default: all)")
    args = parser.parse_args(argv)
    try:
        tensors = read_tensors(Path(args.scalings))
        if "scalings" not in tensors and len(tensors) != 1:
            raise RewriterError(f"expected a tensor named 'scalings' (or a single tensor), found {sorted(tensors)}",
                                where=args.scalings)
        scalings = tensors.get("scalings", next(iter(tensors.values())))
        tokens = None
        if args.tokens:
            try:
                tokens = [int(t) for t in args.tokens.split(",")]
            except ValueError:
                raise RewriterError(f"--tokens must be comma-separated integers, got {args.tokens!r}") from None
        out = plot_scalings(scalings, args.out, layer=args.layer, tokens=tokens)
    except RewriterError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0
