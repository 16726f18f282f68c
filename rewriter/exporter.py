"""Export a rewritten model: ``.pt2`` (plain torch.export), ONNX, or readable Python code.

Every artifact carries provenance (rewriter version, rule file hashes, adapters, methods).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path

import torch

from .errors import RewriterError
from .graph import ADAPTERS_ATTR
from .trace import _dynamic_spec


def provenance(adapted, merged: bool) -> dict:
    from . import __version__
    adapters = {}
    for name, record in adapted.adapters.items():
        text = record.ruleset.text if record.ruleset is not None and record.ruleset.text else None
        adapters[name] = {
            "methods": sorted({d.method for d in record.plan.decisions}),
            "sites": len(record.plan.decisions),
            "rules_sha256": hashlib.sha256(text.encode()).hexdigest() if text else None,
            "active": name in adapted.active_adapters,
        }
    return {"rewriter_version": __version__, "merged": merged, "adapters": adapters,
            "active": adapted.active_adapters, "torch_version": torch.__version__}


@contextlib.contextmanager
def exporting_state(adapted, merged: bool):
    """Eval mode, and the active adapters merged (or unmerged) for the duration of an export.

    Merged: folded weights take the place of the original parameters (same names, so the
    artifact looks like the base model with new weights) and adapter modules are detached,
    so nothing but the deployable weights is exported.  Unmerged: only the live adapters stay.
    """
    was_training, previous = adapted.training, adapted.merged
    adapted.eval()
    if merged:
        adapted.merge()
    elif previous:
        adapted.unmerge()
    gm = adapted.gm
    container = gm.get_submodule(ADAPTERS_ATTR)
    live = set(adapted.active_adapters) - set(adapted.merged)
    detached = {n: container._modules.pop(n) for n in list(container._modules) if n not in live}
    swapped = _swap_in_merged(adapted) if merged else []
    try:
        yield
    finally:
        for owner, attr, original in swapped:
            setattr(owner, attr, original)
        container._modules.update(detached)
        adapted.unmerge()
        if previous:
            adapted.merge(previous)
        adapted.train(was_training)


def _swap_in_merged(adapted) -> list:
    """Put folded weights where the original (untied) parameters were; tied ones keep their
    separate folded copy so the other users of the tensor see the original."""
    gm, holder, swapped = adapted.gm, adapted._merged_holder, []
    for site in adapted.sites.values():
        for path, key in ((site.weight, f"{site.key}__weight"), (site.bias, f"{site.key}__bias")):
            if path is None or not hasattr(holder, key):
                continue
            param = gm.get_parameter(path)
            if sum(p is param for _, p in gm.named_parameters(remove_duplicate=False)) > 1:
                continue
            owner_path, _, attr = path.rpartition(".")
            owner = gm.get_submodule(owner_path)
            swapped.append((owner, attr, param))
            setattr(owner, attr, torch.nn.Parameter(getattr(holder, key), requires_grad=False))
            delattr(holder, key)
    adapted._refresh()
    return swapped


def _example_inputs(adapted):
    traced = adapted._traced
    if not traced.example_inputs:
        raise RewriterError("this model was given as a GraphModule, so rewriter has no example inputs to export with",
                            fix="build it with rewriter.apply(model, rules, example_inputs=...) instead")
    return traced


def export_program(adapted, *, merged: bool = True, dynamic: bool = True):
    """``torch.export`` the live graph; with ``merged=True`` the result has no adapter ops."""
    traced = _example_inputs(adapted)
    with exporting_state(adapted, merged), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if traced.positional:
            args = tuple(traced.example_inputs.values())
            spec = tuple(_dynamic_spec(traced.example_inputs, dynamic).values())
            ep = torch.export.export(adapted.gm, args, dynamic_shapes=spec, strict=False)
        else:
            ep = torch.export.export(adapted.gm, (), dict(traced.example_inputs),
                                     dynamic_shapes=_dynamic_spec(traced.example_inputs, dynamic), strict=False)
    if merged:
        left = adapter_nodes(ep.graph)
        if left:
            raise RewriterError(f"merged export still has {len(left)} adapter op(s), e.g. {left[0]}",
                                fix="an adapter could not be merged; export with merged=False")
    return ep


def adapter_nodes(graph) -> list[str]:
    """Names of nodes that belong to inserted adapters (by module stack or provenance)."""
    out = []
    for node in graph.nodes:
        stack = node.meta.get("nn_module_stack") or {}
        paths = [v[0] for v in stack.values()] if stack else []
        if node.meta.get("rewrite") or any(ADAPTERS_ATTR in str(p) for p in paths) or \
                (node.op in ("get_attr", "placeholder") and ADAPTERS_ATTR.replace(".", "_") in node.name):
            out.append(node.name)
    return out


def _atomic_output(path: Path, write) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.tmp-", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def export(adapted, path, format: str | None = None, *, merged: bool = True, dynamic: bool = True) -> Path:
    """Write ``adapted`` to ``path`` as ``pt2`` (torch.export.save; loads with plain torch), ``onnx``
    (torch.onnx dynamo exporter) or ``code`` (readable Python with inserted nodes marked)."""
    path = Path(path)
    format = format or {".pt2": "pt2", ".onnx": "onnx", ".py": "code"}.get(path.suffix, "")
    info = provenance(adapted, merged)
    if format == "pt2":
        ep = export_program(adapted, merged=merged, dynamic=dynamic)
        return _atomic_output(path, lambda tmp: torch.export.save(
            ep, tmp, extra_files={"rewriter.json": json.dumps(info)}))
    if format == "onnx":
        return _atomic_output(path, lambda tmp: _onnx(adapted, tmp, merged, dynamic, info))
    if format == "code":
        text = graph_code(adapted, merged=merged)
        return _atomic_output(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    raise RewriterError(f"unknown export format {format!r}", fix="use format='pt2', 'onnx' or 'code'")


def _onnx(adapted, tmp: str, merged: bool, dynamic: bool, info: dict) -> None:
    try:
        import onnx
    except ImportError:
        raise RewriterError("ONNX export needs the onnx packages", fix="pip install 'rewriter[onnx]'") from None
    traced = _example_inputs(adapted)
    kwargs = {k: v for k, v in traced.example_inputs.items() if isinstance(v, torch.Tensor)}
    ep = export_program(adapted, merged=merged, dynamic=dynamic)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(ep, (), kwargs=kwargs, dynamo=True, verbose=False)
    except Exception as exc:
        msg = str(exc)
        fix = "re-trace the model with attn_implementation='eager'" if "view" in msg or "decompose" in msg else \
            "export format='pt2' instead, or re-trace with attn_implementation='eager'"
        raise RewriterError(f"ONNX export failed: {type(exc).__name__}: {msg.splitlines()[0][:300]}", fix=fix) from None
    program.save(tmp)
    model = onnx.load(tmp)
    entry = model.metadata_props.add()
    entry.key, entry.value = "rewriter", json.dumps(info)
    onnx.save(model, tmp)


def graph_code(adapted, merged: bool | None = None) -> str:
    """The live graph as Python, each inserted node marked with its rule, method and adapter."""
    if merged is not None and merged != bool(adapted.merged):
        with exporting_state(adapted, merged):
            return graph_code(adapted)
    marks = {}
    for node in adapted.gm.graph.nodes:
        r = node.meta.get("rewrite")
        if r:
            marks[node.name] = f"  # rewriter: rule '{r['rule']}', {r['method']}, adapter '{r['adapter']}'"
    lines = []
    for line in adapted.gm.code.splitlines():
        name = line.strip().split(" = ", 1)[0] if " = " in line else None
        lines.append(line + marks[name] if name in marks else line)
    header = f"# rewriter {json.dumps(provenance(adapted, bool(adapted.merged)))}\n"
    return header + "\n".join(lines) + "\n"
