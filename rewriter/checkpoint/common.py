"""What both adapter checkpoint formats share: site state through method hooks, validated fills,
modules trained whole, renaming (remap), and staging (every adapter in a directory is read and
validated before any is installed)."""
from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Callable, Mapping

import torch

from ..core.statedict import cast_checked, fill_modules
from ..errors import CheckpointError
from ..methods import get_method
from ..rules import Plan

MANIFEST = "rewriter_adapter.json"
PEFT_PREFIX = "base_model.model."
FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class Staged:
    """A read and validated adapter; calling it installs it.  ``read_adapter_modules`` takes its
    ``modules`` without installing them (X-LoRA's experts)."""
    modules: dict
    install: Callable[[], None]

    def __call__(self) -> None:
        self.install()


def hooks_of(record, site: str):
    return get_method(record.decision(site).method).checkpoint_hooks


def site_state(record, site: str, module):
    """What a site saves: the module's state, or what its method's checkpoint hooks say."""
    hooks = hooks_of(record, site)
    if hooks is None:
        return dict(module.state_dict()), None
    return hooks.save(module, record.controller, site)


def fill_sites(modules, plan: Plan, tensors, key_of, extras: Mapping[str, Any], where: str) -> None:
    """fill_modules for plain sites; sites with extra checkpoint data go through their hooks."""
    special = {d.site: get_method(d.method).checkpoint_hooks for d in plan.decisions if d.site in extras}
    plain = {s: m for s, m in modules.items() if s not in special}
    names = {s: set(dict(m.state_dict())) for s, m in modules.items() if s in special}
    hooked_keys = {key_of(s, k): (s, k) for s in special for k in names[s]}
    fill_modules(plain, {k: v for k, v in tensors.items() if k not in hooked_keys}, key_of, where)
    for site, hooks in special.items():
        own = {k: tensors[key_of(site, k)] for k in names[site] if key_of(site, k) in tensors}
        hooks.load(modules[site], own, extras[site])


def train_state(adapted, record) -> dict[str, torch.Tensor]:
    """The adapter's own copies of the modules it trains whole, under the modules' names."""
    if not record.train_modules:  # also for records not installed on the model (X-LoRA's experts)
        return {}
    return adapted.trained_parameters(record.name)


def fill_train(adapted, p: Plan, tensors: Mapping[str, torch.Tensor], where: str, check_only: bool = False) -> None:
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
    cast = {k: cast_checked(tensors[k], param, k, where) for k, param in expected.items()}
    if not check_only:  # into the adapter's own copies; the model's modules stay as they are
        copies = adapted.trained_parameters(p.adapter)
        with torch.no_grad():
            for k in expected:
                copies[k].copy_(cast[k])


def materialise(adapted, p: Plan, low_cpu_mem_usage: bool):
    modules = adapted.build_modules(p, device="meta" if low_cpu_mem_usage else None)
    if low_cpu_mem_usage:  # real storage only now, right before the values are copied in
        methods = {d.site: d.method for d in p.decisions}
        for site, m in modules.items():
            w = adapted.gm.get_parameter(adapted.target(site, methods[site]).weight)
            modules[site] = m.to_empty(device=w.device)
            modules[site].init_buffers()
    return modules


def check_sites(adapted, p: Plan, where: str) -> None:
    missing = [d.site for d in p.decisions if d.site not in adapted.targets(d.method)]
    if missing:
        close = difflib.get_close_matches(missing[0], list(adapted.targets(p.decisions[0].method)), n=1)
        raise CheckpointError(f"the model has no module(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}",
                              where=where, fix=(f"closest: '{close[0]}'; " if close else "")
                              + "was the adapter trained on another architecture or renamed modules?")


def remap_plan(p: Plan, remap) -> Plan:
    if not remap:
        return p
    decisions = [dataclasses.replace(d, site=remap.apply(d.site)) for d in p.decisions]
    names = [d.site for d in decisions]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise CheckpointError(f"the remap table sends several saved modules to {twice[:3]}",
                              fix="give every renamed prefix its own target in [remap]")
    return dataclasses.replace(p, decisions=decisions, train=[(remap.apply(m), r) for m, r in p.train])


def remap_site_key(key: str, remap) -> str:
    """``sites/<site>/<tensor>`` with the site renamed."""
    site, _, tensor = key[len("sites/"):].rpartition("/")
    return f"sites/{remap.apply(site)}/{tensor}"


def remap_inside(p: Plan, extras: Mapping[str, Any], site_tensors: dict, remap, where: str):
    """Module names a method keeps inside its own saved data (X-LoRA: its experts' sites), renamed by
    the method's ``remap`` checkpoint hook."""
    extras, site_tensors = dict(extras), dict(site_tensors)
    for d in p.decisions:
        hooks = get_method(d.method).checkpoint_hooks
        if hooks is None or d.site not in extras:
            continue
        prefix = f"sites/{d.site}/"
        mine = {k[len(prefix):]: site_tensors.pop(k) for k in [k for k in site_tensors if k.startswith(prefix)]}
        try:
            extras[d.site], mine = hooks.remap(extras[d.site], mine, remap)
        except (KeyError, TypeError, AttributeError, ValueError):
            raise CheckpointError(f"the saved data of '{d.site}' ({d.method}) cannot be renamed: it is malformed",
                                  where=where, fix="the manifest was edited or corrupted: save the adapter again") from None
        site_tensors.update({prefix + k: v for k, v in mine.items()})
    return extras, site_tensors


def configs_with_extras(p: Plan, extras: Mapping[str, Any]) -> Plan:
    """Methods whose modules cannot be built from the config alone (X-LoRA: its experts' layouts)
    take their saved extra into the config first."""
    decisions = []
    for d in p.decisions:
        hooks = get_method(d.method).checkpoint_hooks
        decisions.append(dataclasses.replace(d, config=hooks.config_with_extra(d.config, extras.get(d.site)))
                         if hooks is not None else d)
    return dataclasses.replace(p, decisions=decisions)
