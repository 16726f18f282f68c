"""Merge equivalence: does the merged model compute what the unmerged one does?

Checked per site on the activations the model really sees, with tolerances derived from
the dtype and the layer sizes (``rewriter.tolerance``), plus the whole-model output.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from . import progress
from .errors import MergeError
from .core.graph import fold_site, run_site
from .core.tolerance import matmul_tolerance, output_tolerance


@dataclass
class SiteCheck:
    site: str
    adapters: list[str]
    max_error: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.max_error <= self.tolerance


@dataclass
class MergeReport:
    sites: list[SiteCheck]
    output_error: float
    output_tolerance: float
    dtype: str
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(s.ok for s in self.sites)

    def worst_first(self) -> list[SiteCheck]:
        return sorted(self.sites, key=lambda s: s.max_error / max(s.tolerance, 1e-30), reverse=True)

    def to_dict(self) -> dict:
        return {"ok": self.ok, "dtype": self.dtype, "output_error": self.output_error,
                "output_tolerance": self.output_tolerance, "notes": self.notes,
                "sites": [{**asdict(s), "ok": s.ok} for s in self.worst_first()]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def summary(self) -> str:
        return (f"{'OK' if self.ok else 'FAILED'}: {sum(s.ok for s in self.sites)}/{len(self.sites)} sites equal "
                f"within tolerance ({self.dtype})")

    def format(self, limit: int | None = None, *, failures_only: bool = False) -> str:
        """The per-site table, worst first; ``failures_only`` keeps the mismatches and the summary."""
        ranked = [s for s in self.worst_first() if not (failures_only and s.ok)]
        rows = ranked[:limit]
        width = max([len(s.site) for s in rows] + [4])
        stacked = any(len(s.adapters) > 1 for s in self.sites)  # then say which adapters each site stacks
        lines = [f"{'site':<{width}}  {'max |err|':>10}  {'tolerance':>10}  result"
                 + ("    adapters" if stacked else ""),
                 f"{'-' * width}  {'-' * 10}  {'-' * 10}  ------" + ("    --------" if stacked else "")] if rows else []
        for s in rows:
            result = "ok" if s.ok else "MISMATCH"
            result = f"{result:<8}  {' < '.join(s.adapters)}" if stacked else result
            lines.append(f"{s.site:<{width}}  {s.max_error:>10.3e}  {s.tolerance:>10.3e}  {result}")
        if len(ranked) > len(rows):
            lines.append(f"... {len(ranked) - len(rows)} more site(s)")
        if not failures_only:
            lines.append(f"whole-model output: max |merged - unmerged| = {self.output_error:.3e} "
                         f"(expected <= {self.output_tolerance:.3e}, {self.dtype})")
            lines += self.notes
        lines.append(self.summary())
        return "\n".join(lines)


def _first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)):
        return _first_tensor(out[0])
    if hasattr(out, "values"):
        return _first_tensor(next(iter(out.values())))
    raise TypeError(f"cannot find an output tensor in {type(out).__name__}")


@torch.no_grad()
def perturb(adapted, seed: int = 0, scale: float = 0.02, adapter_names=None) -> None:
    """Move the parameters of every adapter (or of ``adapter_names``) away from their (often
    no-op) init, so checks mean something."""
    gen = torch.Generator().manual_seed(seed)
    names = list(adapted.adapters) if adapter_names is None else list(adapter_names)
    for name in names:
        for module in adapted.adapters[name].modules.values():
            for p in module.parameters():
                noise = torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p)
                p.add_(noise * scale)


@torch.no_grad()
def check_merge(adapted, inputs=None, atol: float | None = None, adapter_names=None) -> MergeReport:
    """Compare merged and unmerged computation of the active (or given) adapters, per site."""
    names = list(adapter_names) if adapter_names is not None else adapted.active_adapters
    previous_active, previous_merged, was_training = adapted.active_adapters, adapted.merged, adapted.training
    adapted.eval()
    if previous_merged:
        adapted.unmerge()
    if names != previous_active:
        adapted.set_adapter(names)
    for n in names:
        for m in adapted.adapters[n].modules.values():
            if m.not_mergeable:
                raise MergeError(f"adapter '{n}' cannot be merged: {m.not_mergeable}")
    if inputs is None:
        inputs = {k: v for k, v in adapted.traced.example_inputs.items() if isinstance(v, torch.Tensor)}
    call = (lambda: adapted(*inputs)) if isinstance(inputs, (tuple, list)) else (lambda: adapted(**inputs))
    stacks = {s: [adapted.adapters[a].modules[s] for a in names if s in adapted.adapters[a].modules]
              for s in adapted.sites}
    stacks = {s: m for s, m in stacks.items() if m}
    captured: dict[str, torch.Tensor] = {}
    def capture(site):
        def hook(module, args):
            captured.setdefault(site, args[0])  # returning None keeps the call's arguments
        return hook

    hooks = [stack[-1].register_forward_pre_hook(capture(site)) for site, stack in stacks.items()]
    try:
        unmerged = _first_tensor(call()).float()
    finally:
        for h in hooks:
            h.remove()
    adapted.merge(names)
    merged = _first_tensor(call()).float()
    adapted.unmerge()
    checks = []
    dtype = None
    for site_name, stack in progress.bar(stacks.items(), desc="checking merged sites", unit="site"):
        if site_name not in captured:
            continue
        site = adapted.sites[site_name]
        weight = adapted.gm.get_parameter(site.weight)
        bias = adapted.gm.get_parameter(site.bias) if site.bias else None
        x = captured[site_name]
        dtype = weight.dtype
        reference = run_site(x, weight, bias, stack, fan_in_fan_out=site.fan_in_fan_out)
        w, b = fold_site(weight, bias, stack, fan_in_fan_out=site.fan_in_fan_out)
        w_out_in = w.t() if site.fan_in_fan_out else w
        folded = F.linear(x.to(w.dtype), w_out_in, b)
        err = (folded.float() - reference.float()).abs().max().item()
        tol = atol if atol is not None else matmul_tolerance(x.to(w.dtype), w_out_in, w.dtype)
        checks.append(SiteCheck(site=site_name, adapters=[a for a in names if site_name in adapted.adapters[a].modules],
                                max_error=err, tolerance=tol))
    dtype = dtype or torch.float32
    layers = len({s.layer for s in adapted.sites.values() if s.layer is not None}) or 1
    report = MergeReport(sites=checks, output_error=(merged - unmerged).abs().max().item(),
                         output_tolerance=output_tolerance(unmerged, dtype, layers), dtype=str(dtype).split(".")[-1])
    if set(stacks) - set(captured):
        report.notes.append(f"note: {len(set(stacks) - set(captured))} adapted site(s) were not reached by the inputs")
    if names != previous_active:
        adapted.set_adapter(previous_active)
    if previous_merged:
        adapted.merge(previous_merged)
    adapted.train(was_training)
    return report
