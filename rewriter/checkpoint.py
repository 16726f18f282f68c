"""Adapter checkpoints: rewriter's own format and PEFT's, safetensors only.

rewriter format, one directory per adapter::

    rewriter_adapter.json       manifest: adapter, resolved plan, rule file text, weights file name
    adapter-<digest>.safetensors  tensors, keys ``sites/<site>/<param>`` and ``modules/<module>/<param>``
    rules.toml                  the rule file, for people

Several adapters go in one sub-directory each.  Writes are atomic: the weights go to a
new content-named file first, then the manifest is replaced with ``os.replace`` (the
commit point), then stale weight files are removed — a crash at any moment leaves either
the old or the new checkpoint complete.  Loading validates everything (keys, shapes,
dtypes, finiteness) before it touches the model.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save as st_save

from .errors import CheckpointError, RewriterError
from .methods import get_method
from .rules import Decision, Plan, parse_rules
from .core.sites import canonical_name

MANIFEST = "rewriter_adapter.json"
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
FORMAT_VERSION = 1
_PICKLE_NAMES = ("adapter_model.bin", "pytorch_model.bin", "adapter.bin", "adapter.pt", "adapter.pth")


# ---- atomic file writes ---------------------------------------------------------------------

def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file in the same directory and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _remove_leftover_temps(directory: Path, names: Sequence[str]) -> None:
    """Delete the temp files :func:`atomic_write` left for ``names`` (glob patterns) when a process was
    killed mid-write; a save calls it once its own files are in place."""
    for name in names:
        for junk in directory.glob(f".{name}.*.tmp"):
            junk.unlink(missing_ok=True)


def _tensor_bytes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> bytes:
    return st_save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=dict(metadata or {}))


# ---- reading tensors safely -----------------------------------------------------------------

def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():
        for name in _PICKLE_NAMES:
            if (path.parent / name).exists():
                raise CheckpointError(f"found '{name}', a pickle file; rewriter never unpickles",
                                      where=str(path.parent),
                                      fix="convert it to safetensors in a trusted environment (safetensors.torch.save_file)")
        raise CheckpointError("weights file is missing", where=str(path))
    try:
        out = {}
        with safe_open(str(path), framework="pt") as fh:
            for key in fh.keys():
                out[key] = fh.get_tensor(key)
        return out
    except Exception as exc:  # safetensors raises several types for corrupt files
        raise CheckpointError(f"not a valid safetensors file ({type(exc).__name__}: {str(exc)[:200]})",
                              where=str(path), fix="the file is truncated or corrupt: save the adapter again") from None


def _check_finite(tensors: Mapping[str, torch.Tensor], where: str) -> None:
    for key, t in tensors.items():
        if not t.is_floating_point():
            raise CheckpointError(f"tensor '{key}' has dtype {t.dtype}; adapter weights must be floating point",
                                  where=where)
        if not torch.isfinite(t.float() if t.element_size() == 1 else t).all():  # no isfinite for float8
            raise CheckpointError(f"tensor '{key}' contains NaN or Inf", where=where,
                                  fix="the adapter diverged or the file is corrupt; use an earlier checkpoint")


# ---- state <-> modules ----------------------------------------------------------------------

def _cast_checked(tensor: torch.Tensor, like: torch.Tensor, key: str, where: str) -> torch.Tensor:
    """``tensor`` in ``like``'s dtype and device; a finite value that overflows there is refused."""
    out = tensor.to(dtype=like.dtype, device=like.device)
    if out.is_floating_point() and not torch.isfinite(out).all():
        raise CheckpointError(f"tensor '{key}' ({tensor.dtype}) has values too large for {like.dtype}", where=where,
                              fix="the adapter diverged or was saved in a wider dtype than this model can hold")
    return out


def _module_state(module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in module.state_dict().items()}


def fill_modules(modules: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], key_of, where: str) -> None:
    """Copy ``tensors`` into ``modules`` after checking every key and shape; raise naming the
    modules with missing, unexpected or mismatched keys, and change nothing in that case."""
    expected = {}
    for site, module in modules.items():
        for param, value in _module_state(module).items():
            expected[key_of(site, param)] = (site, param, value)
    missing = sorted(k for k in expected if k not in tensors)
    unexpected = sorted(k for k in tensors if k not in expected)
    mismatched = [f"{k}: checkpoint {tuple(tensors[k].shape)} vs model {tuple(v[2].shape)}"
                  for k, v in expected.items() if k in tensors and tuple(tensors[k].shape) != tuple(v[2].shape)]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} key(s): {', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} key(s): {', '.join(unexpected[:6])}"
                        f"{' ...' if len(unexpected) > 6 else ''}")
    if mismatched:
        problems.append(f"shape mismatch: {'; '.join(mismatched[:6])}")
    if problems:
        raise CheckpointError("checkpoint does not fit the model: " + " | ".join(problems), where=where,
                              fix="load it onto the model (and rules) it was trained for; if the model's modules "
                                  "were renamed, pass remap= (CLI: --remap) with a [remap] table")
    cast = {key: _cast_checked(tensors[key], value, key, where) for key, (_, _, value) in expected.items()}
    with torch.no_grad():
        for key, (site, param, value) in expected.items():
            value.copy_(cast[key])


def _is_entry(entry, text_keys: tuple[str, ...]) -> bool:
    return isinstance(entry, Mapping) and all(isinstance(entry.get(k), str) for k in text_keys)


def _plan_from_json(data: Mapping[str, Any], where: str) -> Plan:
    sites = data.get("sites") if isinstance(data, Mapping) else None
    train_entries = data.get("train", []) if isinstance(data, Mapping) else None
    if (not isinstance(sites, list) or not sites or not isinstance(train_entries, list)
            or not all(_is_entry(e, ("site", "rule", "method")) and isinstance(e.get("params"), Mapping) for e in sites)
            or not all(_is_entry(e, ("module", "rule")) for e in train_entries)):
        raise CheckpointError("invalid plan in manifest: expected 'sites' (a non-empty list of {site, rule, method, "
                              "params}) and 'train' (a list of {module, rule})", where=where,
                              fix="the manifest was edited or corrupted: save the adapter again")
    names = [e["site"] for e in sites]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise CheckpointError(f"invalid plan in manifest: site(s) {twice[:5]} appear more than once", where=where,
                              fix="the manifest was edited or corrupted: save the adapter again")
    try:
        decisions = [Decision(site=e["site"], rule=e["rule"], method=e["method"],
                              config=get_method(e["method"]).make_config(e["params"])) for e in sites]
    except RewriterError as exc:
        raise CheckpointError(f"invalid plan in manifest: {exc.what}", where=where, fix=exc.fix) from None
    train = [(e["module"], e["rule"]) for e in train_entries]
    counts: dict[str, int] = {}
    for d in decisions:
        counts[d.rule] = counts.get(d.rule, 0) + 1
    return Plan(adapter=data.get("adapter", "default"), decisions=decisions, train=train, counts=counts,
                skipped={}, unmatched={}, shadowed={})


# ---- save -----------------------------------------------------------------------------------

def save_adapter(adapted, directory, adapter_names: Sequence[str] | None = None, format: str = "rewriter") -> Path:
    """Save adapters (default: all) to ``directory``; one adapter goes in the directory itself,
    several in one sub-directory each.  ``format`` is "rewriter" or "peft"."""
    directory = Path(directory)
    names = list(adapter_names) if adapter_names is not None else list(adapted.adapters)
    if not names:
        raise CheckpointError("there is no adapter to save")
    for n in names:
        adapted._require(n)
    if format not in ("rewriter", "peft"):
        raise CheckpointError(f"unknown checkpoint format {format!r}", fix="use 'rewriter' or 'peft'")
    writer = _save_one_peft if format == "peft" else _save_one
    if len(names) == 1:
        writer(adapted, names[0], directory)
    else:
        for n in names:
            writer(adapted, n, directory / n)
    return directory


def _train_state(adapted, record) -> dict[str, torch.Tensor]:
    """The adapter's own copies of the modules it trains whole, under the modules' names."""
    if not record.train_modules:  # also for records not installed on the model (X-LoRA's experts)
        return {}
    return adapted.trained_parameters(record.name)


def _save_one(adapted, name: str, directory: Path) -> None:
    from . import __version__
    record = adapted.adapters[name]
    tensors, extras = {}, {}
    for site, module in record.modules.items():
        state, extra = _site_state(record, site, module)
        tensors.update({f"sites/{site}/{k}": v for k, v in state.items()})
        if extra is not None:
            extras[site] = extra
    tensors.update({f"modules/{k}": v for k, v in _train_state(adapted, record).items()})
    blob = _tensor_bytes(tensors, {"format": "rewriter", "adapter": name})
    weights = f"adapter-{hashlib.sha256(blob).hexdigest()[:16]}.safetensors"
    rules_text = record.ruleset.text if record.ruleset is not None else None
    manifest = {"format": "rewriter", "format_version": FORMAT_VERSION, "rewriter_version": __version__,
                "adapter": name, "method": record.method, "weights": weights,
                "plan": record.plan.to_json(), "rules": rules_text, "site_extra": extras}
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(directory / weights, blob)
    atomic_write(directory / MANIFEST, json.dumps(manifest, indent=2).encode())  # the commit point
    if rules_text:
        atomic_write(directory / "rules.toml", rules_text.encode())
    for stale in directory.glob("adapter-*.safetensors"):
        if stale.name != weights:
            stale.unlink(missing_ok=True)
    _remove_leftover_temps(directory, ["adapter-*.safetensors", MANIFEST, "rules.toml"])


def _hooks(record, site: str):
    return get_method(record.decision(site).method).checkpoint_hooks


def _site_state(record, site: str, module):
    """What a site saves: the module's state, or what its method's checkpoint hooks say."""
    hooks = _hooks(record, site)
    if hooks is None:
        return _module_state(module), None
    return hooks.save(module, record.controller, site)


def _fill(modules, plan: Plan, tensors, key_of, extras: Mapping[str, Any], where: str) -> None:
    """fill_modules for plain sites; sites with extra checkpoint data go through their hooks."""
    special = {d.site: get_method(d.method).checkpoint_hooks for d in plan.decisions if d.site in extras}
    plain = {s: m for s, m in modules.items() if s not in special}
    names = {s: set(_module_state(m)) for s, m in modules.items() if s in special}
    hooked_keys = {key_of(s, k): (s, k) for s in special for k in names[s]}
    fill_modules(plain, {k: v for k, v in tensors.items() if k not in hooked_keys}, key_of, where)
    for site, hooks in special.items():
        own = {k: tensors[key_of(site, k)] for k in names[site] if key_of(site, k) in tensors}
        hooks.load(modules[site], own, extras[site])


def _save_one_peft(adapted, name: str, directory: Path) -> None:
    save_peft = getattr(get_method(adapted.adapters[name].method).checkpoint_hooks, "save_peft", None)
    if save_peft is not None:  # X-LoRA: its own layout (config, classifier, one directory per expert)
        return save_peft(adapted, name, directory)
    _save_record_peft(adapted, adapted.adapters[name], directory)


def save_modules_peft(adapted, method: str, modules: Mapping[str, Any], directory: Path) -> None:
    """``{site: module}`` of one method, not installed, as a PEFT checkpoint (X-LoRA's experts)."""
    from .adapted import AdapterRecord
    decisions = [Decision(site=site, rule="saved", method=method, config=m.config) for site, m in modules.items()]
    p = Plan(adapter="expert", decisions=decisions, train=[], counts={"saved": len(decisions)}, skipped={},
             unmatched={}, shadowed={})
    _save_record_peft(adapted, AdapterRecord(name="expert", method=method, plan=p, ruleset=None,
                                             modules=dict(modules)), directory)


def _save_record_peft(adapted, record, directory: Path) -> None:
    from .peft_config import peft_config_for, peft_task_type
    name = record.name
    methods = {d.method for d in record.plan.decisions}
    if len(methods) != 1:
        raise CheckpointError(f"adapter '{name}' mixes methods {sorted(methods)}; a PEFT config holds one",
                              fix="save with format='rewriter'")
    spec = get_method(methods.pop())
    inverse = {ours: peft for peft, ours in spec.peft_keys.items()}
    tensors, extras = {}, {}
    for site, module in record.modules.items():
        state, extra = _site_state(record, site, module)
        for k, v in state.items():
            if k not in inverse:
                raise CheckpointError(f"parameter '{k}' of {spec.name} has no PEFT key")
            tensors[f"{PEFT_PREFIX}{site}.{inverse[k]}"] = v
        if extra is not None:
            extras[spec.checkpoint_hooks.peft_key(site)] = extra
    tensors.update({f"{PEFT_PREFIX}{k}": v for k, v in _train_state(adapted, record).items()})
    source = adapted.source_model
    base = getattr(getattr(source, "config", None), "_name_or_path", None) or None
    config = peft_config_for(spec, [(d.site, d.config) for d in record.plan.decisions],
                             train_modules=record.train_modules, base_model=base, task_type=peft_task_type(source))
    if spec.checkpoint_hooks is not None:
        config[spec.checkpoint_hooks.peft_field] = extras or None
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(directory / PEFT_WEIGHTS, _tensor_bytes(tensors, {"format": "pt"}))
    atomic_write(directory / PEFT_CONFIG, json.dumps(config, indent=2, sort_keys=True).encode())
    _remove_leftover_temps(directory, [PEFT_WEIGHTS, PEFT_CONFIG])


# ---- load -----------------------------------------------------------------------------------

def _adapter_dirs(directory: Path) -> list[Path]:
    """The adapter directories under ``directory``: itself (PEFT's "default") and/or one
    sub-directory per further adapter."""
    def is_adapter(p: Path) -> bool:
        return (p / MANIFEST).exists() or (p / PEFT_CONFIG).exists()

    found = [directory] if is_adapter(directory) else []
    if directory.is_dir() and not _holds_xlora_experts(directory):
        found += sorted(p for p in directory.iterdir() if p.is_dir() and is_adapter(p))
    if not found:
        raise CheckpointError("no adapter here: expected rewriter_adapter.json or adapter_config.json",
                              where=str(directory), fix="point at the directory save_adapter wrote")
    return found


def _holds_xlora_experts(directory: Path) -> bool:
    """A PEFT X-LoRA directory keeps its experts in sub-directories: they are not adapters of their own."""
    try:
        return json.loads((directory / PEFT_CONFIG).read_text(encoding="utf-8")).get("peft_type") == "XLORA"
    except (OSError, ValueError, AttributeError):  # no or unreadable config: the loader reports it
        return False


def load_adapter_into(adapted, directory, adapter_name: str | None = None, *, activate: bool | None = None,
                      low_cpu_mem_usage: bool = False, remap=None) -> list[str]:
    """Load every adapter found in ``directory`` onto ``adapted``; returns their names.  ``remap``
    (a dict, or a TOML file with a ``[remap]`` table) renames the checkpoint's module names first."""
    from .rules import read_remap
    remap = read_remap(remap)
    directory = Path(directory)
    dirs = _adapter_dirs(directory)
    if adapter_name is not None and len(dirs) > 1:
        raise CheckpointError(f"{len(dirs)} adapters found; adapter_name applies to one", where=str(directory),
                              fix="point at one adapter's directory")
    staged = []  # (name, install): every adapter is read and validated before any is installed
    for d in dirs:
        loader = _load_one if (d / MANIFEST).exists() else _load_one_peft
        name = adapter_name or (d.name if d != directory else None)
        staged.append(loader(adapted, d, name, activate, low_cpu_mem_usage, remap))
    names = [name for name, _ in staged]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise CheckpointError(f"several adapters here are named {twice}", where=str(directory),
                              fix="load them one directory at a time with adapter_name=...")
    for _, install in staged:
        install()
    return names


def _materialise(adapted, p: Plan, low_cpu_mem_usage: bool):
    modules = adapted.build_modules(p, device="meta" if low_cpu_mem_usage else None)
    if low_cpu_mem_usage:  # real storage only now, right before the values are copied in
        methods = {d.site: d.method for d in p.decisions}
        for site, m in modules.items():
            w = adapted.gm.get_parameter(adapted.target(site, methods[site]).weight)
            modules[site] = m.to_empty(device=w.device)
            modules[site].init_buffers()
    return modules


def _check_sites(adapted, p: Plan, where: str) -> None:
    import difflib
    missing = [d.site for d in p.decisions if d.site not in adapted.targets(d.method)]
    if missing:
        close = difflib.get_close_matches(missing[0], list(adapted.targets(p.decisions[0].method)), n=1)
        raise CheckpointError(f"the model has no module(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}",
                              where=where, fix=(f"closest: '{close[0]}'; " if close else "")
                              + "was the adapter trained on another architecture or renamed modules?")


def _remap_plan(p: Plan, remap) -> Plan:
    if not remap:
        return p
    decisions = [dataclasses.replace(d, site=remap.apply(d.site)) for d in p.decisions]
    names = [d.site for d in decisions]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise CheckpointError(f"the remap table sends several saved modules to {twice[:3]}",
                              fix="give every renamed prefix its own target in [remap]")
    return dataclasses.replace(p, decisions=decisions, train=[(remap.apply(m), r) for m, r in p.train])


def _load_one(adapted, directory: Path, adapter_name, activate, low_cpu_mem_usage, remap):
    """Read and validate one rewriter-format adapter; returns ``(name, install)``."""
    where = str(directory / MANIFEST)
    try:
        manifest = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # ValueError: bad JSON or bad UTF-8
        raise CheckpointError(f"cannot read manifest: {exc}", where=where) from None
    if not isinstance(manifest, dict) or manifest.get("format") != "rewriter":
        raise CheckpointError("not a rewriter manifest", where=where)
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"format version {manifest.get('format_version')} is not supported", where=where,
                              fix=f"this rewriter reads version {FORMAT_VERSION}")
    name = adapter_name or manifest.get("adapter", "default")
    adapted._check_new_name(name)
    p = _remap_plan(_plan_from_json(manifest.get("plan", {}), where), remap)
    p.adapter = name
    _check_sites(adapted, p, where)
    method = manifest.get("method")
    if method is not None and method not in {d.method for d in p.decisions}:
        raise CheckpointError(f"manifest method {method!r} is not one of the plan's methods", where=where,
                              fix="the manifest was edited or corrupted: save the adapter again")
    weights_name = manifest.get("weights")
    if not isinstance(weights_name, str) or Path(weights_name).name != weights_name or weights_name in ("", ".", ".."):
        raise CheckpointError(f"manifest names weights file {weights_name!r}; it must be a file name inside the "
                              "adapter directory", where=where, fix="the manifest was edited: save the adapter again")
    weights = directory / weights_name
    tensors = read_tensors(weights)
    _check_finite(tensors, str(weights))
    site_tensors = {_remap_site_key(k, remap): v for k, v in tensors.items() if k.startswith("sites/")}
    train_tensors = {remap.apply(k[len("modules/"):]): v for k, v in tensors.items() if k.startswith("modules/")}
    extras = manifest.get("site_extra") or {}
    extras = {remap.apply(k): v for k, v in extras.items()} if isinstance(extras, Mapping) else extras
    hooked = {d.site for d in p.decisions if get_method(d.method).checkpoint_hooks is not None}
    if not isinstance(extras, Mapping) or not set(extras) <= hooked:
        raise CheckpointError("manifest 'site_extra' names sites whose method keeps no extra checkpoint data",
                              where=where, fix="the manifest was edited or corrupted: save the adapter again")
    if remap:
        extras, site_tensors = _remap_inside(p, extras, site_tensors, remap, where)
    p = _configs_with_extras(p, extras)
    modules = _materialise(adapted, p, low_cpu_mem_usage)
    _fill(modules, p, site_tensors, lambda site, k: f"sites/{site}/{k}", extras, str(weights))
    _fill_train(adapted, p, train_tensors, str(weights), check_only=True)
    ruleset = None
    if isinstance(manifest.get("rules"), str):
        try:
            ruleset = parse_rules(manifest["rules"], source=str(directory / "rules.toml"))
        except RewriterError:
            ruleset = None  # the plan is authoritative; the text is informational
    def install():
        adapted.install(name, p, ruleset, modules, activate=activate, method=method)
        _fill_train(adapted, p, train_tensors, str(weights))
    return name, _Staged(modules, install)


def _remap_peft_config(cfg: dict, remap, spec, tensors: Mapping[str, torch.Tensor]) -> dict:
    """Module names in a PEFT config, renamed.  Target patterns written for the old names cannot be
    translated in general, so a per-layer method targets exactly the (renamed) modules that have
    tensors in the checkpoint."""
    cfg = dict(cfg)
    for key in ("exclude_modules", "modules_to_save"):
        if isinstance(cfg.get(key), list):
            cfg[key] = [remap.apply(n) for n in cfg[key]]
    for key in ("rank_pattern", "alpha_pattern"):
        if isinstance(cfg.get(key), Mapping):
            cfg[key] = {remap.apply(k): v for k, v in cfg[key].items()}
    if spec.graph_scope is None:
        suffixes = ["." + k for k in spec.peft_keys]
        cfg["target_modules"] = sorted({k[:-len(s)] for k in tensors for s in suffixes if k.endswith(s)})
        cfg["layers_to_transform"] = None
    return cfg


def _remap_site_key(key: str, remap) -> str:
    """``sites/<site>/<tensor>`` with the site renamed."""
    site, _, tensor = key[len("sites/"):].rpartition("/")
    return f"sites/{remap.apply(site)}/{tensor}"


def _remap_inside(p: Plan, extras: Mapping[str, Any], site_tensors: dict, remap, where: str):
    """Module names a method keeps inside its own saved data (X-LoRA: its experts' sites), renamed by
    the method's ``remap`` checkpoint hook."""
    extras, site_tensors = dict(extras), dict(site_tensors)
    for d in p.decisions:
        hook = getattr(get_method(d.method).checkpoint_hooks, "remap", None)
        if hook is None or d.site not in extras:
            continue
        prefix = f"sites/{d.site}/"
        mine = {k[len(prefix):]: site_tensors.pop(k) for k in [k for k in site_tensors if k.startswith(prefix)]}
        try:
            extras[d.site], mine = hook(extras[d.site], mine, remap)
        except (KeyError, TypeError, AttributeError, ValueError):
            raise CheckpointError(f"the saved data of '{d.site}' ({d.method}) cannot be renamed: it is malformed",
                                  where=where, fix="the manifest was edited or corrupted: save the adapter again") from None
        site_tensors.update({prefix + k: v for k, v in mine.items()})
    return extras, site_tensors


def _configs_with_extras(p: Plan, extras: Mapping[str, Any]) -> Plan:
    """Methods whose modules cannot be built from the config alone (X-LoRA: its experts' layouts)
    take their saved extra into the config first."""
    decisions = []
    for d in p.decisions:
        hook = getattr(get_method(d.method).checkpoint_hooks, "config_with_extra", None)
        decisions.append(dataclasses.replace(d, config=hook(d.config, extras.get(d.site))) if hook else d)
    return dataclasses.replace(p, decisions=decisions)


@dataclasses.dataclass(frozen=True)
class _Staged:
    """A read and validated adapter; calling it installs it.  X-LoRA takes its experts' ``modules``
    from checkpoints this way without installing them."""
    modules: dict
    install: Callable[[], None]

    def __call__(self) -> None:
        self.install()


def read_adapter_modules(adapted, directory, remap=None) -> dict:
    """The ``{site: module}`` of the one adapter in ``directory`` (either format), validated, not installed;
    ``remap`` renames its modules first (see :func:`load_adapter_into`)."""
    from .rules import read_remap
    directory = Path(directory)
    if _adapter_dirs(directory)[0] != directory:
        raise CheckpointError("expected one adapter here, not a directory of adapters", where=str(directory))
    name = "xlora_expert"
    while name in adapted.adapters:
        name += "_"
    loader = _load_one if (directory / MANIFEST).exists() else _load_one_peft
    return loader(adapted, directory, name, False, False, read_remap(remap))[1].modules


def _fill_train(adapted, p: Plan, tensors: Mapping[str, torch.Tensor], where: str, check_only: bool = False) -> None:
    expected = {}
    for module, _ in p.train:
        try:
            sub = adapted.gm.get_submodule(module)
        except AttributeError:
            raise CheckpointError(f"the model has no module '{module}' (saved with the adapter)", where=where) from None
        for pname, param in sub.named_parameters(recurse=False):
            expected[f"{module}.{pname}"] = param
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    bad = [k for k in expected if k in tensors and tensors[k].shape != expected[k].shape]
    if missing or unexpected or bad:
        raise CheckpointError(f"saved module weights do not fit: missing {missing[:4]}, unexpected {unexpected[:4]}, "
                              f"shape mismatch {bad[:4]}", where=where)
    cast = {k: _cast_checked(tensors[k], param, k, where) for k, param in expected.items()}
    if not check_only:  # into the adapter's own copies; the model's modules stay as they are
        copies = adapted.trained_parameters(p.adapter)
        with torch.no_grad():
            for k in expected:
                copies[k].copy_(cast[k])


def _load_one_peft(adapted, directory: Path, adapter_name, activate, low_cpu_mem_usage, remap):
    """Read and validate one PEFT-format adapter; returns ``(name, install)``."""
    from .peft_config import method_for_peft_type, read_peft_config, rules_from_peft_config
    from .rules import plan as make_plan
    cfg_path = directory / PEFT_CONFIG
    cfg = read_peft_config(cfg_path)
    name = adapter_name or "default"  # PEFT keeps "default" at the root, others in sub-directories
    adapted._check_new_name(name)
    try:
        spec = method_for_peft_type(cfg["peft_type"])
    except CheckpointError as exc:  # name the file
        raise CheckpointError(exc.what, where=str(cfg_path), fix=exc.fix) from None
    load_peft = getattr(spec.checkpoint_hooks, "load_peft", None)
    if load_peft is not None:  # X-LoRA: experts from their own directories, the classifier from here
        return load_peft(adapted, directory, cfg, name, activate, remap)
    weights = directory / PEFT_WEIGHTS
    raw = read_tensors(weights)
    _check_finite(raw, str(weights))
    tensors = {remap.apply(canonical_name(k[len(PEFT_PREFIX):] if k.startswith(PEFT_PREFIX) else k)): v
               for k, v in raw.items()}
    if spec.peft_config_fixup is not None:
        cfg = spec.peft_config_fixup(cfg, tensors)
    if remap:
        cfg = _remap_peft_config(cfg, remap, spec, tensors)
    source = adapted.source_model
    model_type = getattr(getattr(source, "config", None), "model_type", None)
    out_emb = None
    if source is not None and hasattr(source, "get_output_embeddings"):
        emb = source.get_output_embeddings()
        out_emb = next((n for n, m in source.named_modules() if m is emb), None) if emb is not None else None
    ruleset = rules_from_peft_config(cfg, adapter_name=name, model_type=model_type, output_embedding=out_emb,
                                     source=str(cfg_path))
    p = make_plan(ruleset, list(adapted.targets(spec.name).values()), adapted._module_names())
    site_keys = {f"{d.site}.{peft}" for d in p.decisions for peft in spec.peft_keys}
    site_tensors = {k: v for k, v in tensors.items() if k in site_keys or _belongs_to_site(k, p)}
    train_tensors = {k: v for k, v in tensors.items() if k not in site_tensors}
    inverse = {ours: peft for peft, ours in spec.peft_keys.items()}
    modules = _materialise(adapted, p, low_cpu_mem_usage)
    extras = {}
    hooks = spec.checkpoint_hooks
    if hooks is not None and cfg.get(hooks.peft_field):
        by_key = {}
        for key, value in cfg[hooks.peft_field].items():
            if key.endswith(f".{name}") or key.endswith(".default"):
                key = key.rsplit(".", 1)[0]  # some PEFT versions keep the adapter name in the key
            by_key[key] = value
        extras = {d.site: by_key[hooks.peft_key(d.site)] for d in p.decisions if hooks.peft_key(d.site) in by_key}
    _fill(modules, p, site_tensors, lambda site, k: f"{site}.{inverse.get(k, k)}", extras, str(weights))
    _fill_train(adapted, p, train_tensors, str(weights), check_only=True)
    def install():
        adapted.install(name, p, ruleset, modules, activate=activate, method=spec.name)
        _fill_train(adapted, p, train_tensors, str(weights))
    return name, _Staged(modules, install)


def _belongs_to_site(key: str, p: Plan) -> bool:
    return any(key.startswith(d.site + ".") for d in p.decisions)


def load_adapter(model_or_adapted, adapter_dir, adapter_name: str | None = None, *, example_inputs=None,
                 low_cpu_mem_usage: bool = False, remap=None):
    """Load an adapter directory (rewriter's or PEFT's format) onto a model, tracing it when
    needed, or onto an existing ``Adapted``; returns the ``Adapted``."""
    from .adapted import Adapted
    from .core.tracing import trace_model
    adapted = model_or_adapted if isinstance(model_or_adapted, Adapted) else \
        Adapted(trace_model(model_or_adapted, example_inputs))
    load_adapter_into(adapted, adapter_dir, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage, remap=remap)
    return adapted
