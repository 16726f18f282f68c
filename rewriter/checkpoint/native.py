"""rewriter's adapter checkpoint format, one directory per adapter::

    rewriter_adapter.json         manifest: adapter, resolved plan, rule file text, weights file name
    adapter-<digest>.safetensors  tensors, keys ``sites/<site>/<param>`` and ``modules/<module>/<param>``
    rules.toml                    the rule file, for people

Writes are atomic: the weights go to a new content-named file first, then the manifest is
replaced with ``os.replace`` (the commit point), then stale weight files are removed — a crash
at any moment leaves either the old or the new checkpoint complete.  Loading validates
everything (keys, shapes, dtypes, finiteness) before it touches the model."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Mapping

from ..core import files
from ..errors import CheckpointError, RewriterError
from ..methods import get_method
from ..rules import Decision, Plan, parse_rules
from ..version import __version__
from .common import (FORMAT_VERSION, MANIFEST, Staged, check_sites, configs_with_extras, fill_sites, fill_train,
                     materialise, remap_inside, remap_plan, remap_site_key, site_state, train_state)


def is_entry(entry, text_keys: tuple[str, ...]) -> bool:
    return isinstance(entry, Mapping) and all(isinstance(entry.get(k), str) for k in text_keys)


def plan_from_json(data: Mapping[str, Any], where: str) -> Plan:
    sites = data.get("sites") if isinstance(data, Mapping) else None
    train_entries = data.get("train", []) if isinstance(data, Mapping) else None
    if (not isinstance(sites, list) or not sites or not isinstance(train_entries, list)
            or not all(is_entry(e, ("site", "rule", "method")) and isinstance(e.get("params"), Mapping) for e in sites)
            or not all(is_entry(e, ("module", "rule")) for e in train_entries)):
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


def save_one(adapted, name: str, directory: Path) -> None:
    record = adapted.adapters[name]
    tensors, extras = {}, {}
    for site, module in record.modules.items():
        state, extra = site_state(record, site, module)
        tensors.update({f"sites/{site}/{k}": v for k, v in state.items()})
        if extra is not None:
            extras[site] = extra
    tensors.update({f"modules/{k}": v for k, v in train_state(adapted, record).items()})
    blob = files.tensor_bytes(tensors, {"format": "rewriter", "adapter": name})
    weights = f"adapter-{hashlib.sha256(blob).hexdigest()[:16]}.safetensors"
    rules_text = record.ruleset.text if record.ruleset is not None else None
    manifest = {"format": "rewriter", "format_version": FORMAT_VERSION, "rewriter_version": __version__,
                "adapter": name, "method": record.method, "weights": weights,
                "plan": record.plan.to_json(), "rules": rules_text, "site_extra": extras}
    directory.mkdir(parents=True, exist_ok=True)
    files.atomic_write(directory / weights, blob)
    files.atomic_write(directory / MANIFEST, json.dumps(manifest, indent=2).encode())  # the commit point
    if rules_text:
        files.atomic_write(directory / "rules.toml", rules_text.encode())
    for stale in directory.glob("adapter-*.safetensors"):
        if stale.name != weights:
            stale.unlink(missing_ok=True)
    files.remove_leftover_temps(directory, ["adapter-*.safetensors", MANIFEST, "rules.toml"])


def load_one(adapted, directory: Path, adapter_name, activate, low_cpu_mem_usage, remap):
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
    adapted.check_new_name(name)
    p = remap_plan(plan_from_json(manifest.get("plan", {}), where), remap)
    p.adapter = name
    check_sites(adapted, p, where)
    method = manifest.get("method")
    if method is not None and method not in {d.method for d in p.decisions}:
        raise CheckpointError(f"manifest method {method!r} is not one of the plan's methods", where=where,
                              fix="the manifest was edited or corrupted: save the adapter again")
    weights_name = manifest.get("weights")
    if not isinstance(weights_name, str) or Path(weights_name).name != weights_name or weights_name in ("", ".", ".."):
        raise CheckpointError(f"manifest names weights file {weights_name!r}; it must be a file name inside the "
                              "adapter directory", where=where, fix="the manifest was edited: save the adapter again")
    weights = directory / weights_name
    tensors = files.read_tensors(weights)
    files.check_finite(tensors, str(weights))
    site_tensors = {remap_site_key(k, remap): v for k, v in tensors.items() if k.startswith("sites/")}
    train_tensors = {remap.apply(k[len("modules/"):]): v for k, v in tensors.items() if k.startswith("modules/")}
    extras = manifest.get("site_extra") or {}
    extras = {remap.apply(k): v for k, v in extras.items()} if isinstance(extras, Mapping) else extras
    hooked = {d.site for d in p.decisions if get_method(d.method).checkpoint_hooks is not None}
    if not isinstance(extras, Mapping) or not set(extras) <= hooked:
        raise CheckpointError("manifest 'site_extra' names sites whose method keeps no extra checkpoint data",
                              where=where, fix="the manifest was edited or corrupted: save the adapter again")
    if remap:
        extras, site_tensors = remap_inside(p, extras, site_tensors, remap, where)
    p = configs_with_extras(p, extras)
    modules = materialise(adapted, p, low_cpu_mem_usage)
    fill_sites(modules, p, site_tensors, lambda site, k: f"sites/{site}/{k}", extras, str(weights))
    fill_train(adapted, p, train_tensors, str(weights), check_only=True)
    ruleset = None
    if isinstance(manifest.get("rules"), str):
        try:
            ruleset = parse_rules(manifest["rules"], source=str(directory / "rules.toml"))
        except RewriterError:
            ruleset = None  # the plan is authoritative; the text is informational
    def install():
        adapted.install(name, p, ruleset, modules, activate=activate, method=method)
        fill_train(adapted, p, train_tensors, str(weights))
    return name, Staged(modules, install)
