"""Export a rewritten model: ``.pt2`` (plain torch.export), ONNX, or readable Python code.

Every artifact carries provenance (rewriter version, rule file hashes, adapters, methods).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
import warnings
import zipfile
from pathlib import Path

import torch

from . import progress
from .version import __version__
from .errors import RewriterError
from .core.graph import ADAPTERS_ATTR, run_site
from .methods import get_method
from .core.tolerance import matmul_tolerance
from .core.files import atomic_write, tensor_bytes
from .core.tracing import dynamic_spec


def provenance(adapted, merged: bool) -> dict:
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
    gm, holder, swapped = adapted.gm, adapted.merged_holder, []
    # modules trained whole: the live copies go under the original names too
    for path, copy in adapted.trained_map().items():
        owner_path, _, attr = path.rpartition(".")
        owner = gm.get_submodule(owner_path)
        swapped.append((owner, attr, gm.get_parameter(path)))
        setattr(owner, attr, torch.nn.Parameter(gm.get_parameter(copy).detach(), requires_grad=False))
    trained = adapted.trained_holder
    for name in list(trained._modules):  # detached while exporting, so the graph reads the original names
        swapped.append((trained, name, trained._modules[name]))
        delattr(trained, name)
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
    adapted.refresh()
    return swapped


def _example_inputs(adapted):
    traced = adapted.traced
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
            spec = tuple(dynamic_spec(traced.example_inputs, dynamic).values())
            ep = torch.export.export(adapted.gm, args, dynamic_shapes=spec, strict=False)
        else:
            ep = torch.export.export(adapted.gm, (), dict(traced.example_inputs),
                                     dynamic_shapes=dynamic_spec(traced.example_inputs, dynamic), strict=False)
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


SUFFIXES = {".pt2": "pt2", ".onnx": "onnx", ".py": "code", ".safetensors": "weights"}


def export(adapted, path, format: str | None = None, *, merged: bool = True, dynamic: bool = True,
           program=None) -> Path:
    """Write ``adapted`` to ``path`` as ``pt2`` (torch.export.save; loads with plain torch), ``onnx``
    (torch.onnx dynamo exporter), ``code`` (readable Python with inserted nodes marked) or
    ``weights`` (the active adapters' weights for the slots of the unmerged ``program``, see
    :func:`export_adapter_weights`).  The format defaults from the suffix."""
    path = Path(path)
    format = format or SUFFIXES.get(path.suffix, "")
    if format == "weights":
        if program is None:
            raise RewriterError("an adapter weight file is made for one exported program, and none was given",
                                fix="pass program='base.pt2' (CLI: --program base.pt2), a .pt2 exported unmerged")
        return export_adapter_weights(adapted, path, program)
    if format not in ("pt2", "onnx", "code"):
        raise RewriterError(f"unknown export format {format!r}",
                            fix="use format='pt2', 'onnx', 'code' or 'weights' (or a .pt2/.onnx/.py/.safetensors path)")
    info = provenance(adapted, merged)
    if format == "code":
        text = graph_code(adapted, merged=merged)
        return _atomic_output(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    onnx = _onnx_module() if format == "onnx" else None  # before the slow part
    names = ["torch.export", "write"] if format == "pt2" else ["torch.export", "convert to ONNX"]
    with progress.steps(f"export {path.name}", names) as step:
        step("torch.export")
        ep = export_program(adapted, merged=merged, dynamic=dynamic)
        if format == "pt2":
            if not merged:
                info["adapter_slots"] = {"contract": SLOT_CONTRACT, "slots": adapter_slots(adapted)}
            step("write")
            return _atomic_output(path, lambda tmp: torch.export.save(
                ep, tmp, extra_files={"rewriter.json": json.dumps(info)}))
        step("convert to ONNX")
        return _atomic_output(path, lambda tmp: _onnx(onnx, adapted, ep, tmp, info))


def _onnx_module():
    try:
        import onnx
    except ImportError:
        raise RewriterError("ONNX export needs the onnx packages", fix="pip install 'rewriter[onnx]'") from None
    return onnx


def _onnx(onnx, adapted, ep, tmp: str, info: dict) -> None:
    kwargs = {k: v for k, v in _example_inputs(adapted).example_inputs.items() if isinstance(v, torch.Tensor)}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(ep, (), kwargs=kwargs, dynamo=True, verbose=False)
    except Exception as exc:  # the exporter raises many types; name the root cause and the fix
        raise onnx_failure(exc) from None
    program.save(tmp)
    model = onnx.load(tmp)
    entry = model.metadata_props.add()
    entry.key, entry.value = "rewriter", json.dumps(info)
    onnx.save(model, tmp)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # torch.onnx colours its messages


def onnx_failure(exc: BaseException) -> RewriterError:
    """A RewriterError naming the root cause of a torch.onnx failure and, for known ones, the fix."""
    chain = [exc]
    while (chain[-1].__cause__ or chain[-1].__context__) is not None and len(chain) < 20:
        chain.append(chain[-1].__cause__ or chain[-1].__context__)
    root = chain[-1]
    text = _ANSI.sub("", "\n".join(str(e) for e in chain))
    missing_op = re.search(r"No ONNX function found for <OpOverload\(op='([^']+)'", text)
    if missing_op:
        what = f"the op '{missing_op.group(1)}' has no ONNX translation"
        fix = ("export format='pt2' instead, or give torch.onnx.export a custom_translation_table entry for it, "
               "or change the model so that the op does not appear")
    elif "Cannot view a tensor" in text or "decompose" in text:
        what = "the ONNX exporter could not decompose the graph (known for T5-style sdpa attention)"
        fix = ("re-trace the model with eager attention: model.set_attn_implementation('eager') before "
               "rewriter.apply (CLI: rewriter export ... --attn-implementation eager), or export format='pt2'")
    else:
        what = "torch.onnx could not convert the graph"
        fix = "export format='pt2' instead, or re-trace with attn_implementation='eager'"
    first = _ANSI.sub("", str(root)).strip().splitlines()
    return RewriterError(f"ONNX export failed: {what} ({type(root).__name__}: {(first or [''])[0][:300]})", fix=fix)


# ---- adapters as data: one exported program, many adapters ----------------------------------

#: version of the adapter-slot contract of unmerged .pt2 exports (parameter names and the file layout)
SLOT_CONTRACT = 1


def _slot_state(adapted, adapter: str, slot: str) -> dict[str, torch.Tensor]:
    """The adapter's swappable tensors under the names the program gives slot ``slot``:
    ``rewriter_adapters.<slot>.<site key>.<tensor name>``."""
    record = adapted.adapters[adapter]
    keys = {d.site: adapted.target(d.site, d.method).key for d in record.plan.decisions}
    return {f"{ADAPTERS_ATTR}.{slot}.{keys[site]}.{name}": value
            for site, module in record.modules.items() for name, value in module.state_dict().items()}


def adapter_slots(adapted) -> list[dict]:
    """What an unmerged program reads from each active adapter, bottom to top: the names,
    shapes and dtypes of its swappable tensors, and per site the method and parameters whose
    effect (scaling, index tables, ...) the program holds as constants."""
    slots = []
    for name in adapted.active_adapters:
        record = adapted.adapters[name]
        slots.append({"slot": name, "methods": sorted({d.method for d in record.plan.decisions}),
                      "tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype).split(".")[-1]}
                                  for k, v in _slot_state(adapted, name, name).items()},
                      "sites": json.loads(json.dumps({d.site: {"method": d.method,
                                                               "params": get_method(d.method).config_dict(d.config)}
                                                      for d in record.plan.decisions}, default=str))})
    return slots


def read_provenance(path) -> dict:
    """The ``rewriter.json`` a .pt2 export carries."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            member = next((n for n in archive.namelist() if n.endswith("/rewriter.json") or n == "rewriter.json"), None)
            if member is None:
                raise RewriterError("this .pt2 was not exported by rewriter (no rewriter.json inside)", where=str(path),
                                    fix="export it with rewriter export --unmerged")
            return json.loads(archive.read(member))
    except (OSError, zipfile.BadZipFile) as exc:
        raise RewriterError(f"cannot read the exported program: {exc}", where=str(path),
                            fix="give the .pt2 file that rewriter export wrote") from None


def _misfit(adapted, adapter: str, slot: dict) -> list[str]:
    """Why ``adapter`` cannot fill ``slot`` (empty: it can).  Beyond names and shapes, each site's
    module is rebuilt with the slot's parameters, given the adapter's tensors, and must compute
    what the adapter computes: a different scaling or index table would be silently wrong."""
    state, expected = _slot_state(adapted, adapter, slot["slot"]), slot["tensors"]
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k}: {list(v.shape)} vs {expected[k]['shape']}" for k, v in state.items()
              if k in expected and list(v.shape) != expected[k]["shape"]]
    found = (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes))
    problems = [f"{what} {len(keys)}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
                for what, keys in found if keys]
    if problems:
        return problems
    if adapted.adapters[adapter].graph_scope is not None:
        return []  # no per-site function to compare: names and shapes are the contract
    gen = torch.Generator().manual_seed(0)
    for site_name, module in adapted.adapters[adapter].modules.items():
        site, entry = adapted.sites[site_name], slot["sites"][site_name]
        spec = get_method(entry["method"])
        template = spec.module_cls(site, spec.make_config(entry["params"])).to(module.adapter_dtype)
        template.load_state_dict(module.state_dict())
        weight = adapted.gm.get_parameter(site.weight).detach().float()
        weight = weight.t() if site.fan_in_fan_out else weight
        bias = adapted.gm.get_parameter(site.bias).detach().float() if site.bias else None
        x = torch.randn(4, site.in_features, generator=gen)
        was_training = module.training
        try:
            with torch.no_grad():
                ours, theirs = (run_site(x, weight, bias, [m.eval()]) for m in (module, template))
        finally:
            module.train(was_training)
        err, tol = (ours - theirs).abs().max().item(), matmul_tolerance(x, weight)
        if err > tol:
            differing = [k for k, v in spec.config_dict(module.config).items() if entry["params"].get(k) != v]
            return [f"at '{site_name}' it computes differently from the program's {entry['method']} "
                    f"(max |diff| {err:.2e} > {tol:.2e})" + (f"; parameters differ: {', '.join(differing)}"
                                                             if differing else "")]
    return []


def export_adapter_weights(adapted, path, program, adapter_names=None) -> Path:
    """Write the weights of ``adapter_names`` (default: the active adapters, bottom to top) as a
    safetensors file that fills the adapter slots of ``program``, an unmerged .pt2 export, so one
    exported program serves many adapters.  In plain torch::

        model = torch.export.load("base.pt2").module()
        missing, unexpected = model.load_state_dict(safetensors.torch.load_file("style.safetensors"), strict=False)
        assert not unexpected

    Keys are ``rewriter_adapters.<slot>.<site key>.<tensor>`` (contract :data:`SLOT_CONTRACT`).
    An adapter fits a slot when it has the same sites, methods and shapes as the one exported,
    and the parameters the program holds as constants (scaling, index tables) act the same."""
    path, program = Path(path), Path(program)
    info = read_provenance(program)
    slots = (info.get("adapter_slots") or {}).get("slots")
    if not slots:
        raise RewriterError("the program has no adapter slots: it was exported merged", where=str(program),
                            fix="export the program with merged=False (rewriter export --unmerged)")
    if info["adapter_slots"].get("contract") != SLOT_CONTRACT:
        raise RewriterError(f"the program uses adapter-slot contract {info['adapter_slots'].get('contract')}, this "
                            f"rewriter writes {SLOT_CONTRACT}", where=str(program), fix="re-export the program")
    names = list(adapter_names) if adapter_names is not None else adapted.active_adapters
    if len(names) != len(slots):
        raise RewriterError(f"the program has {len(slots)} adapter slot(s) {[s['slot'] for s in slots]}, "
                            f"{len(names)} adapter(s) were given {names}", where=str(program),
                            fix="give one adapter per slot, bottom to top")
    tensors = {}
    for slot, name in zip(slots, names):
        if name not in adapted.adapters:
            raise RewriterError(f"no adapter named '{name}'", fix=f"adapters: {', '.join(adapted.adapters) or 'none'}")
        problems = _misfit(adapted, name, slot)
        if problems:
            raise RewriterError(f"adapter '{name}' does not fit slot '{slot['slot']}': {'; '.join(problems)}",
                                where=str(program), fix="an adapter fits a slot exported with the same method, "
                                "sites, shapes (ranks) and scaling; export a program for this adapter instead")
        tensors.update({k: v.to(getattr(torch, slot["tensors"][k]["dtype"]))
                        for k, v in _slot_state(adapted, name, slot["slot"]).items()})
    meta = {**provenance(adapted, merged=False), "contract": SLOT_CONTRACT, "slots": [s["slot"] for s in slots],
            "filled_with": names, "program_slots_sha256": hashlib.sha256(json.dumps(slots).encode()).hexdigest()}
    atomic_write(path, tensor_bytes(tensors, {"rewriter": json.dumps(meta)}))
    return path


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
