"""FourierFT: a sparse learned 2-D spectrum whose inverse DFT is the weight update.

``n_frequency`` spectral entries ``c_j`` sit at fixed locations ``(r_j, k_j)`` of an
``[out, in]`` grid; ``ΔW = scaling * Re(ifft2(S))`` where ``S`` holds ``c`` at those
locations and zeros elsewhere.  ``ifft2`` uses the "backward" norm, so
``ΔW[p, q] = scaling / (out * in) * sum_j c_j cos(2π (p r_j / out + q k_j / in))``.

The locations are a prefix of ``randperm(out * in)`` drawn from a CPU generator seeded
with ``random_loc_seed``, exactly as PEFT draws them: checkpoints store only the
spectrum, and every layer of one shape shares the same locations.  The FFT always runs
in float32 (it does not support bf16/fp16).  Additive: ``y = W x + b + ΔW x`` and
``fold: W <- W + ΔW``.  As the lowest adapter of its site (float32 weight), the forward
computes ``(W + ΔW) x + b``: one matmul instead of two, forward and backward.

``Re(ifft2(S)) = ifft2(H)`` with the Hermitian (here: real, point-symmetric) ``H[r, k] =
(S[r, k] + S[-r, -k]) / 2``, so ΔW comes from a real inverse FFT of ``H``'s non-redundant
half: about half the work of the complex ``ifft2`` PEFT runs, forward and backward.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .base import (AdapterModule, MethodSpec, check_bool, check_choice, check_int, check_number, register,
                   round_like_base)
from .lora import add_into

#: the seed range ``torch.Generator.manual_seed`` accepts
_SEED_RANGE = (-(2**63), 2**64 - 1)


@dataclass(frozen=True)
class FourierFTConfig:
    n_frequency: int = 1000
    scaling: float = 150.0
    random_loc_seed: int = 777
    init_weights: bool = False    # PEFT's default: a random (non-zero) spectrum; True gives zeros
    bias: str = "none"
    fan_in_fan_out: bool = False  # accepted for PEFT configs; the layout is read from the graph

    def __post_init__(self):
        check_int("n_frequency", self.n_frequency, minimum=1)
        check_number("scaling", self.scaling)
        check_int("random_loc_seed", self.random_loc_seed)
        low, high = _SEED_RANGE
        if not low <= self.random_loc_seed <= high:
            raise ConfigError(f"'random_loc_seed' must be in [{low}, {high}], got {self.random_loc_seed}",
                              field="random_loc_seed")
        check_bool("init_weights", self.init_weights)
        check_choice("bias", self.bias, ["none", "all", "fourier_only"])
        check_bool("fan_in_fan_out", self.fan_in_fan_out)


@functools.lru_cache(maxsize=8)
def _spectral_locations(numel: int, n_frequency: int, seed: int) -> torch.Tensor:
    """Flat indices (``row * in + col``) of the learned entries; cached because every
    layer of one shape draws the same permutation, which is slow for large layers."""
    generator = torch.Generator().manual_seed(seed)
    # explicit device: modules may be built under a ``torch.device("meta")`` context;
    # clone: the cache must not keep the whole permutation alive
    return torch.randperm(numel, generator=generator, device="cpu")[:n_frequency].clone()


@functools.lru_cache(maxsize=8)
def _half_spectrum_table(out_features: int, in_features: int, n_frequency: int, seed: int):
    """Where each learned entry lands in the half spectrum ``[out, in // 2 + 1]`` of ``H``:
    ``(rows, cols, source)``, ``source`` indexing the spectrum vector.  An entry and its point
    mirror ``(-r, -k)`` each carry half its value; those in the stored half are kept."""
    flat = _spectral_locations(out_features * in_features, n_frequency, seed)
    r, k = flat // in_features, flat % in_features
    mirror_r, mirror_k = (-r) % out_features, (-k) % in_features
    half = in_features // 2 + 1
    keep, keep_mirror = k < half, mirror_k < half
    source = torch.arange(n_frequency, device="cpu")  # explicit: see _spectral_locations
    return (torch.cat([r[keep], mirror_r[keep_mirror]]), torch.cat([k[keep], mirror_k[keep_mirror]]),
            torch.cat([source[keep], source[keep_mirror]]))


class FourierFTModule(AdapterModule):
    additive = True
    # ΔW is dense anyway: as the lowest adapter, fold it into the base matmul (graph.chain passes the weight)
    needs_weight = True
    replaces_base = True

    def __init__(self, site, config: FourierFTConfig):
        super().__init__(site, config)
        numel = site.in_features * site.out_features
        if config.n_frequency > numel:
            raise ConfigError(
                f"{site.name}: n_frequency={config.n_frequency} exceeds the {numel} entries of the "
                f"[out={site.out_features}, in={site.in_features}] weight",
                field="n_frequency", fix=f"use n_frequency <= {numel} for this layer")
        self.scaling = config.scaling
        # derived from the seed, never saved (PEFT does not save it either)
        self.register_buffer("indices", self._locations(), persistent=False)
        for name, table in zip(("half_rows", "half_cols", "half_source"), self._half_table()):
            self.register_buffer(name, table, persistent=False)
        self.fourierft_spectrum = nn.Parameter(torch.zeros(config.n_frequency))
        self.reset_parameters(site.dtype)

    def _locations(self) -> torch.Tensor:
        numel = self.in_features * self.out_features
        # a copy: the cached tensor is shared by every layer of this shape
        return _spectral_locations(numel, self.config.n_frequency, self.config.random_loc_seed).clone()

    def _half_table(self) -> tuple[torch.Tensor, ...]:
        tables = _half_spectrum_table(self.out_features, self.in_features, self.config.n_frequency,
                                      self.config.random_loc_seed)
        return tuple(t.clone() for t in tables)  # copies, as in _locations

    def to_empty(self, *, device, recurse: bool = True):
        """Storage without values (loading onto meta-built modules) would lose the locations:
        draw them again."""
        super().to_empty(device=device, recurse=recurse)
        self.indices = self._locations().to(device)
        self.half_rows, self.half_cols, self.half_source = (t.to(device) for t in self._half_table())
        return self

    @torch.no_grad()
    def reset_parameters(self, base_dtype: torch.dtype = torch.float32) -> None:
        if self.config.init_weights:
            self.fourierft_spectrum.zero_()
        else:
            self.fourierft_spectrum.normal_()
        self.fourierft_spectrum.copy_(round_like_base(self.fourierft_spectrum, base_dtype))

    def delta_weight(self) -> torch.Tensor:
        """``ΔW [out, in]`` in the adapter dtype, from a float32 inverse FFT."""
        spectrum = self.fourierft_spectrum
        half = torch.zeros(self.out_features, self.in_features // 2 + 1, dtype=torch.float32, device=spectrum.device)
        # scaled before the FFT (linear): no pass over the dense result; accumulate: an entry may be its own mirror
        values = spectrum.float()[self.half_source] * (self.scaling / 2)
        half.index_put_((self.half_rows, self.half_cols), values, accumulate=True)
        return torch.fft.irfft2(half, s=(self.out_features, self.in_features)).to(spectrum.dtype)

    def post(self, x, y, bias, *, weight):
        delta = self.delta_weight()
        if y is None and weight.dtype == delta.dtype:  # the base matmul is ours to compute
            return F.linear(x.to(delta.dtype), weight + delta, bias)
        if y is None:  # low-precision base: its output rounds on its own, as PEFT's does
            y = F.linear(x, weight, bias)
        return add_into(y, F.linear(x.to(delta.dtype), delta))

    def fold(self, weight, bias):
        return weight + self.delta_weight().float(), bias

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, n_frequency={self.config.n_frequency}, scaling={self.scaling}"


SPEC = register(MethodSpec(
    name="fourierft",
    config_cls=FourierFTConfig,
    module_cls=FourierFTModule,
    peft_type="FOURIERFT",
    peft_keys={"fourierft_spectrum": "fourierft_spectrum"},
    aliases={"n": "n_frequency", "seed": "random_loc_seed", "init": "init_weights"},
    summary="sparse learned 2-D spectrum, ΔW = scaling * Re(ifft2(S)) (Gao et al. 2024)",
))
