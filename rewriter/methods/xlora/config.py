"""X-LoRA's config: the experts, the classifier's shape, and the runtime scaling settings."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from ...errors import ConfigError
from ..checks import check_bool, check_int, check_number, check_probability


@dataclass(frozen=True)
class XLoraConfig:
    #: the experts: names of LoRA adapters on this model, or PEFT's ``{"0": path, ...}`` of LoRA
    #: checkpoint directories (either format); a loaded checkpoint holds its experts' layouts here
    adapters: Any = ()
    hidden_size: int | None = None   #: the classifier's input size; None: read from the graph
    enable_softmax: bool = True
    enable_softmax_topk: bool = False
    softmax_temperature: float = 1.0
    layerwise_scalings: bool = False
    top_k_lora: int | None = None
    xlora_depth: int = 1
    xlora_size: int = 2048
    xlora_dropout_p: float = 0.2
    use_trainable_adapters: bool = False
    scaling_pass_value: float = 0.0
    global_scaling_weight: float = 1.0

    def __post_init__(self):
        object.__setattr__(self, "adapters", normalise_adapters(self.adapters))
        if self.hidden_size is not None:
            check_int("hidden_size", self.hidden_size, minimum=1)
        for name in ("enable_softmax", "enable_softmax_topk", "layerwise_scalings", "use_trainable_adapters"):
            check_bool(name, getattr(self, name))
        for name in ("softmax_temperature", "scaling_pass_value", "global_scaling_weight"):
            check_number(name, getattr(self, name))
        if self.softmax_temperature <= 0:
            raise ConfigError(f"'softmax_temperature' must be > 0, got {self.softmax_temperature}",
                              field="softmax_temperature")
        if self.top_k_lora is not None:
            check_int("top_k_lora", self.top_k_lora, minimum=1)
        check_int("xlora_depth", self.xlora_depth, minimum=1)
        check_int("xlora_size", self.xlora_size, minimum=1)
        check_probability("xlora_dropout_p", self.xlora_dropout_p)


def normalise_adapters(adapters):
    """Names -> tuple of str; PEFT's paths -> dict str -> str; saved layouts -> tuple of dicts."""
    bad = ConfigError(f"'adapters' must be a list of LoRA adapter names or a table of checkpoint paths "
                      f"(PEFT's {{\"0\" = \"path\", ...}}), got {adapters!r}", field="adapters",
                      fix='e.g. adapters = ["math", "code"] (adapters on the model) or adapters = {0 = "ckpt/math"}')
    if isinstance(adapters, Mapping):
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in adapters.items()):
            raise bad
        return dict(adapters)
    if isinstance(adapters, (list, tuple)):
        if all(isinstance(a, str) for a in adapters):
            if len(set(adapters)) != len(adapters):
                raise ConfigError(f"'adapters' names an expert twice: {list(adapters)}", field="adapters")
            return tuple(adapters)
        if all(isinstance(a, Mapping) and isinstance(a.get("sites"), Mapping) for a in adapters):
            return tuple({"name": str(a.get("name", i)), "sites": dict(a["sites"])} for i, a in enumerate(adapters))
    raise bad
