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
from ..core.adapter import AdapterModule
from .base import MethodSpec
from .checks import check_bool, check_choice, check_int, check_number, round_like_base
from .registry import register
from .lora import add_into

#: the seed range ``torch.Generator.manual_seed`` accepts
_SEED_RANGE = (-(2**63), 2**64 - 1)
#: weight entries per learned one above which training uses _SpectralLinear (see FourierFTModule)
_SPECTRAL_MIN_RATIO = 400
#: bytes of the per-chunk temporaries in _spectrum_grad
_CHUNK_BYTES = 1 << 18


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
        # training: the spectrum's gradient from per-token FFTs (_SpectralLinear) beats the dense
        # tokens x out x in weight gradient on CPU above about 400 weight entries per learned one (measured
        # crossover between 512x512 and 768x768 at n_frequency 1000; bench/README.md)
        self.spectral_backward = numel >= _SPECTRAL_MIN_RATIO * config.n_frequency
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
        spectrum = self.fourierft_spectrum
        if (y is None and self.spectral_backward and spectrum.device.type == "cpu" and torch.is_grad_enabled()
                and weight.dtype == spectrum.dtype == torch.float32 and spectrum.requires_grad
                and not (torch.compiler.is_compiling() or torch.compiler.is_exporting())):
            # on 2-D rows: a custom Function's output must not be a view (later posts add into it in place)
            rows = _SpectralLinear.apply(x.to(spectrum.dtype).reshape(-1, x.shape[-1]), weight, bias, spectrum, self)
            return rows.view(*x.shape[:-1], rows.shape[-1])
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


class _SpectralLinear(torch.autograd.Function):
    """``F.linear(x, W + ΔW(c), b)`` whose backward never forms the dense ``dL/dΔW = gᵀ x``.

    ``dL/dc_j = s / (out·in) · Σ_t Re(Ĝ[t, r_j] X̂[t, k_j])`` with ``Ĝ``, ``X̂`` the DFTs of each token's
    output gradient (length out) and input (length in): the cosine basis of ``ΔW`` separates into one
    factor per dimension.  Two batches of 1-D real FFTs and a gather over the ``n`` learned entries
    replace a ``tokens x out x in`` matmul plus a 2-D FFT, about 3x less work per site in training."""

    @staticmethod
    def forward(ctx, x, weight, bias, spectrum, module):  # x: [tokens, in]
        with torch.no_grad():
            merged = weight + module.delta_weight()
        ctx.module = module
        ctx.save_for_backward(x, merged)
        return F.linear(x, merged, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, merged = ctx.saved_tensors
        module = ctx.module
        needs_x, needs_weight, needs_bias, needs_spectrum, _ = ctx.needs_input_grad
        grad_x = grad.matmul(merged) if needs_x else None
        grad_weight = grad.t().matmul(x) if needs_weight else None
        grad_bias = grad.sum(0) if needs_bias else None
        grad_spectrum = _spectrum_grad(module, grad, x) if needs_spectrum else None
        return grad_x, grad_weight, grad_bias, grad_spectrum, None


@functools.lru_cache(maxsize=8)
def _gradient_table(out_features: int, in_features: int, n_frequency: int, seed: int):
    """Where each learned entry ``(r, k)`` reads the per-token real FFTs, ``(rows, cols, sign)``: the DFT
    entry f of a real signal of length m is the rfft's entry f, or the conjugate of entry m - f; ``sign``
    is the imaginary part's sign in ``Re(a b)`` once those conjugations are folded in."""
    flat = _spectral_locations(out_features * in_features, n_frequency, seed)
    r, k = flat // in_features, flat % in_features
    sign = torch.where((r > out_features // 2) == (k > in_features // 2), 1.0, -1.0)
    return torch.minimum(r, out_features - r), torch.minimum(k, in_features - k), sign


def _spectrum_grad(module, tokens_out: torch.Tensor, tokens_in: torch.Tensor) -> torch.Tensor:
    out_f, in_f = module.out_features, module.in_features
    fold_r, fold_c, sign = _gradient_table(out_f, in_f, module.config.n_frequency, module.config.random_loc_seed)
    # per frequency, a contiguous row over tokens: gathering rows is cheap, gathering strided columns is not
    g_hat = torch.view_as_real(torch.fft.rfft(tokens_out.float(), dim=1).t().contiguous())
    x_hat = torch.view_as_real(torch.fft.rfft(tokens_in.float(), dim=1).t().contiguous())
    # Re(a b) = ar br - ai bi, the conjugations folded into sign; in chunks of entries so that the
    # temporaries stay small enough for the allocator to reuse (fresh multi-MB buffers page-fault)
    chunk = max(1, _CHUNK_BYTES // (8 * tokens_out.shape[0]))
    sums = torch.cat([(g_hat[fold_r[i:i + chunk]] * x_hat[fold_c[i:i + chunk]]).sum(1)
                      for i in range(0, len(fold_r), chunk)])
    real, imag = sums.unbind(-1)
    return (real - sign.to(real.dtype) * imag) * (module.scaling / (out_f * in_f))


SPEC = register(MethodSpec(
    name="fourierft",
    config_cls=FourierFTConfig,
    module_cls=FourierFTModule,
    peft_type="FOURIERFT",
    peft_keys={"fourierft_spectrum": "fourierft_spectrum"},
    aliases={"n": "n_frequency", "seed": "random_loc_seed", "init": "init_weights"},
    summary="sparse learned 2-D spectrum, ΔW = scaling * Re(ifft2(S)) (Gao et al. 2024)",
))
