"""PEFT's adapter checkpoint format: ``adapter_config.json`` plus ``adapter_model.safetensors`` with
PEFT's keys; methods with a layout of their own (``MethodSpec.peft_layout``) read and write it."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import torch

from ..core import files
from ..core.files import PEFT_CONFIG, PEFT_WEIGHTS
from ..adapters import AdapterRecord
from ..core.sites import canonical_name
from ..errors import CheckpointError
from ..methods import get_method
from ..methods.base import MethodSpec
from ..rules import Decision, Plan
from ..rules import plan as make_plan
from ..rules.peft import method_for_peft_type, peft_config_for, peft_task_type, read_peft_config, rules_from_peft_config
from .common import PEFT_PREFIX, Staged, fill_sites, fill_train, materialise, site_state, train_state


def save_one_peft(adapted, name: str, directory: Path) -> None:
    layout = get_method(adapted.adapters[name].method).peft_layout
    if layout is not None:  # the method's own layout (X-LoRA: config, classifier, one directory per expert)
        return layout.save(adapted, name, directory, save_modules_peft)
    save_record_peft(adapted, adapted.adapters[name], directory)


def save_modules_peft(adapted, method: str, modules: Mapping[str, Any], directory: Path) -> None:
    """``{site: module}`` of one method, not installed, as a PEFT checkpoint (X-LoRA's experts)."""
    decisions = [Decision(site=site, rule="saved", method=method, config=m.config) for site, m in modules.items()]
    p = Plan(adapter="expert", decisions=decisions, train=[], counts={"saved": len(decisions)}, skipped={},
             unmatched={}, shadowed={})
    save_record_peft(adapted, AdapterRecord(name="expert", method=method, plan=p, ruleset=None,
                                             modules=dict(modules)), directory)


def save_record_peft(adapted, record, directory: Path) -> None:
    name = record.name
    methods = {d.method for d in record.plan.decisions}
    if len(methods) != 1:
        raise CheckpointError(f"adapter '{name}' mixes methods {sorted(methods)}; a PEFT config holds one",
                              fix="save with format='rewriter'")
    spec = get_method(methods.pop())
    inverse = {ours: peft for peft, ours in spec.peft_keys.items()}
    tensors, extras = {}, {}
    for site, module in record.modules.items():
        state, extra = site_state(record, site, module)
        for k, v in state.items():
            if k not in inverse:
                raise CheckpointError(f"parameter '{k}' of {spec.name} has no PEFT key")
            tensors[f"{PEFT_PREFIX}{site}.{inverse[k]}"] = v
        if extra is not None:
            extras[spec.checkpoint_hooks.peft_key(site)] = extra
    tensors.update({f"{PEFT_PREFIX}{k}": v for k, v in train_state(adapted, record).items()})
    source = adapted.source_model
    base = getattr(getattr(source, "config", None), "_name_or_path", None) or None
    config = peft_config_for(spec, [(d.site, d.config) for d in record.plan.decisions],
                             train_modules=record.train_modules, base_model=base, task_type=peft_task_type(source))
    if spec.checkpoint_hooks is not None and spec.checkpoint_hooks.peft_field:
        config[spec.checkpoint_hooks.peft_field] = extras or None
    directory.mkdir(parents=True, exist_ok=True)
    files.atomic_write(directory / PEFT_WEIGHTS, files.tensor_bytes(tensors, {"format": "pt"}))
    files.atomic_write(directory / PEFT_CONFIG, json.dumps(config, indent=2, sort_keys=True).encode())
    files.remove_leftover_temps(directory, [PEFT_WEIGHTS, PEFT_CONFIG])


def remap_peft_config(cfg: dict, remap, spec, tensors: Mapping[str, torch.Tensor]) -> dict:
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


def load_one_peft(adapted, directory: Path, adapter_name, activate, low_cpu_mem_usage, remap):
    """Read and validate one PEFT-format adapter; returns ``(name, install)``."""
    cfg_path = directory / PEFT_CONFIG
    cfg = read_peft_config(cfg_path)
    name = adapter_name or "default"  # PEFT keeps "default" at the root, others in sub-directories
    adapted.check_new_name(name)
    try:
        spec = method_for_peft_type(cfg["peft_type"])
    except CheckpointError as exc:  # name the file
        raise CheckpointError(exc.what, where=str(cfg_path), fix=exc.fix) from None
    if spec.peft_layout is not None:  # the method's own layout (X-LoRA: experts in their own directories)
        return name, load_layout(adapted, spec, directory, cfg, name, activate, remap)
    weights = directory / PEFT_WEIGHTS
    raw = files.read_tensors(weights)
    files.check_finite(raw, str(weights))
    tensors = {remap.apply(canonical_name(k[len(PEFT_PREFIX):] if k.startswith(PEFT_PREFIX) else k)): v
               for k, v in raw.items()}
    if spec.peft_config_fixup is not None:
        cfg = spec.peft_config_fixup(cfg, tensors)
    if remap:
        cfg = remap_peft_config(cfg, remap, spec, tensors)
    source = adapted.source_model
    model_type = getattr(getattr(source, "config", None), "model_type", None)
    out_emb = None
    if source is not None and hasattr(source, "get_output_embeddings"):
        emb = source.get_output_embeddings()
        out_emb = next((n for n, m in source.named_modules() if m is emb), None) if emb is not None else None
    ruleset = rules_from_peft_config(cfg, adapter_name=name, model_type=model_type, output_embedding=out_emb,
                                     source=str(cfg_path))
    p = make_plan(ruleset, list(adapted.targets(spec.name).values()), adapted.module_names())
    site_keys = {f"{d.site}.{peft}" for d in p.decisions for peft in spec.peft_keys}
    site_tensors = {k: v for k, v in tensors.items() if k in site_keys or belongs_to_site(k, p)}
    train_tensors = {k: v for k, v in tensors.items() if k not in site_tensors}
    inverse = {ours: peft for peft, ours in spec.peft_keys.items()}
    modules = materialise(adapted, p, low_cpu_mem_usage)
    extras = {}
    hooks = spec.checkpoint_hooks
    if hooks is not None and cfg.get(hooks.peft_field):
        by_key = {}
        for key, value in cfg[hooks.peft_field].items():
            if key.endswith(f".{name}") or key.endswith(".default"):
                key = key.rsplit(".", 1)[0]  # some PEFT versions keep the adapter name in the key
            by_key[key] = value
        extras = {d.site: by_key[hooks.peft_key(d.site)] for d in p.decisions if hooks.peft_key(d.site) in by_key}
    fill_sites(modules, p, site_tensors, lambda site, k: f"{site}.{inverse.get(k, k)}", extras, str(weights))
    fill_train(adapted, p, train_tensors, str(weights), check_only=True)
    def install():
        adapted.install(name, p, ruleset, modules, activate=activate, method=spec.name)
        fill_train(adapted, p, train_tensors, str(weights))
    return name, Staged(modules, install)


def load_layout(adapted, spec: MethodSpec, directory: Path, cfg: Mapping[str, Any], name: str, activate,
                remap) -> Staged:
    """A method with its own PEFT layout and one target: its config and values from the layout."""
    config, fill = spec.peft_layout.load(adapted, directory, cfg, remap)
    (target,) = adapted.targets(spec.name).values()
    p = Plan(adapter=name, decisions=[Decision(site=target.name, rule="peft", method=spec.name, config=config)],
             train=[], counts={"peft": 1}, skipped={}, unmatched={}, shadowed={})
    modules = adapted.build_modules(p)
    fill(modules[target.name])

    def install():
        adapted.install(name, p, None, modules, activate=activate, method=spec.name)
    return Staged(modules, install)


def belongs_to_site(key: str, p: Plan) -> bool:
    return any(key.startswith(d.site + ".") for d in p.decisions)
