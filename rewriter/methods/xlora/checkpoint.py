"""X-LoRA's adapter checkpoints.  Ours: the module's tensors (classifier and experts) plus the
experts' layouts, which let a fresh model build the experts before their values are filled in.
PEFT's: ``adapter_config.json`` with the experts' directories and the classifier's weights."""
from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path
from typing import Any, Mapping

import torch

from ...core.files import PEFT_CONFIG, PEFT_WEIGHTS, atomic_write, read_tensors, tensor_bytes
from ...core.statedict import fill_modules
from ...errors import CheckpointError, ConfigError
from ..base import SavedStateHooks
from ..registry import get_method
from .config import XLoraConfig
from .module import XLoraModule
from .target import TARGET, read_expert

PEFT_CLASSIFIER = "base_model.internal_xlora_classifier."
PEFT_ONLY_FIELDS = {"peft_type", "task_type", "inference_mode", "base_model_name_or_path", "revision",
                    "auto_mapping", "peft_version"}


class XLoraCheckpoint(SavedStateHooks):
    """Checkpoint hooks for rewriter's format: the experts' layouts are the site's extra."""

    def save(self, module: XLoraModule, controller, site: str):
        return module.state_dict(), {"experts": module.expert_layouts()}

    def load(self, module: XLoraModule, tensors, extra) -> None:
        fill_modules({TARGET: module}, tensors, lambda site, key: key, where=f"X-LoRA adapter '{TARGET}'")

    def remap(self, extra, tensors, remap):
        """Rename the experts' sites in the saved layouts and in the expert tensor keys
        (``experts.<i>.<site key>.<parameter>``, a site key being its name with "." as "__")."""
        experts = [{**e, "sites": {remap.apply(site): params for site, params in e["sites"].items()}}
                   for e in extra["experts"]]

        def key(name: str) -> str:
            parts = name.split(".")
            if len(parts) == 4 and parts[0] == "experts":
                parts[2] = remap.apply(parts[2].replace("__", ".")).replace(".", "__")
            return ".".join(parts)
        return {**extra, "experts": experts}, {key(k): v for k, v in tensors.items()}

    def config_with_extra(self, config: XLoraConfig, extra) -> XLoraConfig:
        experts = extra.get("experts") if isinstance(extra, Mapping) else None
        try:
            return dataclasses.replace(config, adapters=experts)
        except ConfigError as exc:
            raise CheckpointError(f"invalid X-LoRA expert layouts in the manifest: {exc.what}",
                                  fix="the manifest was edited or corrupted: save the adapter again") from None


class XLoraPeftLayout:
    """PEFT's layout: ``adapter_config.json`` (XLoraConfig, ``adapters`` = absolute paths of the
    expert sub-directories ``<dir>/<i>/``, plain LoRA checkpoints), and the classifier in
    ``adapter_model.safetensors``."""
    owns_subdirectories = True

    def save(self, model, name: str, directory: Path, save_modules) -> None:
        """All classifier keys are written (PEFT 0.21.2's own save drops those containing
        ``.<expert name>.``)."""
        directory = Path(directory).resolve()
        module: XLoraModule = model.adapters[name].modules[TARGET]
        paths = {}
        by_key = dict(zip(module.layer_keys, module.layers))
        for i, experts in enumerate(module.experts):
            save_modules(model, "lora", {by_key[k]: m for k, m in experts.items()}, directory / str(i))
            paths[str(i)] = str(directory / str(i))
        source = model.source_model
        config = {**dataclasses.asdict(module.config), "adapters": paths,
                  "hidden_size": module.classifier.layers[0].in_features,
                  "peft_type": "XLORA", "task_type": "CAUSAL_LM", "inference_mode": True, "revision": None,
                  "base_model_name_or_path": getattr(getattr(source, "config", None), "_name_or_path", None) or None,
                  "auto_mapping": None, "peft_version": "0.21.2"}
        tensors = {PEFT_CLASSIFIER + k: v for k, v in module.classifier.state_dict().items()}
        atomic_write(directory / PEFT_WEIGHTS, tensor_bytes(tensors, {"format": "pt"}))
        atomic_write(directory / PEFT_CONFIG, json.dumps(dict(sorted(config.items())), indent=2).encode())

    def load(self, model, directory: Path, cfg: Mapping[str, Any], remap=None):
        """Experts come from the config's paths, relative ones also tried against the directory, then
        PEFT's ``<dir>/<key>/`` copies; with a ``remap`` table, they are read renamed.  Classifier keys
        PEFT 0.21.2 failed to save keep their fresh values, with a warning."""
        directory = Path(directory)
        where = str(directory / PEFT_CONFIG)
        fields = {k: v for k, v in cfg.items() if k not in PEFT_ONLY_FIELDS}
        paths = fields.get("adapters")
        if not isinstance(paths, Mapping) or not paths:
            raise CheckpointError("X-LoRA config has no 'adapters' table of expert paths", where=where)
        fields["adapters"] = {key: expert_path(directory, key, path, where) for key, path in paths.items()}
        renamed = {}
        if remap:  # read the experts renamed, then build from their layouts and fill them in below
            renamed = {key: read_expert(model, key, path, remap) for key, path in fields["adapters"].items()}
            lora_spec = get_method("lora")
            fields["adapters"] = [{"name": key, "sites": {site: lora_spec.config_dict(m.config)
                                                          for site, m in modules.items()}}
                                  for key, modules in renamed.items()]
        try:
            config = get_method("xlora").make_config(fields)
        except ConfigError as exc:
            raise CheckpointError(f"invalid X-LoRA config: {exc.what}", where=where, fix=exc.fix) from None
        weights = directory / PEFT_WEIGHTS
        raw = read_tensors(weights) if weights.exists() else {}
        saved = {k[len(PEFT_CLASSIFIER):]: v for k, v in raw.items() if k.startswith(PEFT_CLASSIFIER)}
        foreign = sorted(k for k in raw if not k.startswith(PEFT_CLASSIFIER))

        def fill(module: XLoraModule) -> None:
            state = module.classifier.state_dict()
            unexpected = sorted(set(saved) - set(state)) + foreign
            bad = [k for k in saved if k in state and saved[k].shape != state[k].shape]
            if unexpected or bad:
                raise CheckpointError(f"X-LoRA classifier weights do not fit: unexpected {unexpected[:4]}, shape "
                                      f"mismatch {bad[:4]}", where=str(weights),
                                      fix="load it onto the model it was trained for")
            missing = sorted(set(state) - set(saved))
            if missing:
                warnings.warn(f"{weights}: X-LoRA classifier keys {missing} are missing and keep fresh random values, "
                              "as in PEFT (PEFT 0.21.2's save drops keys containing '.<expert name>.', e.g. layers.0): "
                              "outputs will differ from the model that was saved", stacklevel=5)
            with torch.no_grad():
                for k, v in saved.items():
                    state[k].copy_(v)
                for experts, modules in zip(module.experts, renamed.values()):
                    for site, expert in modules.items():
                        experts[model.sites[site].key].load_state_dict(expert.state_dict())
        return config, fill


def expert_path(directory: Path, key: str, path: str, where: str) -> str:
    for candidate in (Path(path), directory / path, directory / key):
        if candidate.is_dir():
            return str(candidate)
    raise CheckpointError(f"X-LoRA expert '{key}': no directory at '{path}' (nor at {directory / key})", where=where,
                          fix="copy the expert LoRA checkpoints there; PEFT 0.21.2's own copies in the sub-directories "
                              "are incomplete, so use the original expert directories")
