"""AdaLoRA: LoRA in SVD form with an importance-driven rank budget (Zhang et al. 2023).

``y = W x + b + B diag(E) A dropout(x) * s / (ranknum + 1e-5)`` with ``A [r, in]`` (right
singular vectors), ``E [r, 1]`` (singular values), ``B [out, r]`` (left singular vectors).
``s = lora_alpha`` (``r`` if ``lora_alpha <= 0``) is not divided by r: ``ranknum`` does that.
It stays ``init_r`` while ranks are masked or pruned, so the scaling never changes.  It is
a plain number, never trained or saved, as in PEFT (and so it survives meta-device init).

:class:`RankAllocator` trains the budget: it scores every triplet ``(A_k, E_k, B_k)`` from
EMAs of ``|p * grad|`` and zeroes the ``E`` entries of the least important ones, following
a cubic schedule from ``init_r`` per site down to ``target_r`` per site on average.
Fold: ``W <- W + dW``.  PEFT checkpoints drop the masked ranks and list the kept ones in
``rank_pattern``: :func:`peft_state` / :func:`prune_state` write them,
:meth:`AdaLoraModule.load_pruned_state` reads them.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError, ConfigError, RewriterError
from ..core.adapter import AdapterModule
from .base import MethodSpec, SavedStateHooks
from .checks import check_bool, check_choice, check_int, check_number, check_probability, round_like_base
from .registry import register
from .lora import add_into, up_projection

#: LoraConfig fields that PEFT's AdaLoRA layers never read; accepted from PEFT configs
_UNUSED_LORA_FIELDS = frozenset({
    "use_rslora", "lora_bias", "use_dora", "loftq_config", "eva_config", "corda_config", "lora_ga_config",
    "velora_config", "monteclora_config", "kasa_config", "arrow_config", "use_bdlora", "alora_invocation_tokens",
    "use_qalora", "qalora_group_size", "megatron_config", "megatron_core", "layer_replication",
    "runtime_config", "target_parameters", "trainable_token_indices", "ensure_weight_tying",
})


@dataclass(frozen=True)
class AdaLoraConfig:
    init_r: int = 12              #: rank of every site at the start
    target_r: int = 8             #: average rank per site at the end
    tinit: int = 0                #: warmup steps without masking
    tfinal: int = 0               #: final steps with the ranks fixed
    deltaT: int = 1               #: mask every deltaT steps while the budget shrinks
    beta1: float = 0.85           #: EMA coefficient of the sensitivity
    beta2: float = 0.85           #: EMA coefficient of the uncertainty
    orth_reg_weight: float = 0.5
    total_step: int | None = None  #: required: the number of training steps
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    init_lora_weights: bool = True
    bias: str = "none"
    fan_in_fan_out: bool = False  # accepted for PEFT configs; the layout is read from the graph
    r: int = 8                    # PEFT's LoraConfig field; AdaLoRA uses init_r

    def __post_init__(self):
        check_int("init_r", self.init_r, minimum=1)
        check_int("target_r", self.target_r, minimum=0)
        if self.target_r > self.init_r:
            raise ConfigError(f"'target_r' ({self.target_r}) must not exceed 'init_r' ({self.init_r}): "
                              "AdaLoRA only removes ranks", field="target_r")
        check_int("tinit", self.tinit, minimum=0)
        check_int("tfinal", self.tfinal, minimum=0)
        check_int("deltaT", self.deltaT, minimum=1)
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            check_number(name, value)
            if not 0.0 < value < 1.0:
                raise ConfigError(f"'{name}' must be in (0, 1), got {value}", field=name)
        check_number("orth_reg_weight", self.orth_reg_weight)
        if self.orth_reg_weight < 0:
            raise ConfigError(f"'orth_reg_weight' must be >= 0, got {self.orth_reg_weight}", field="orth_reg_weight")
        if self.total_step is None:
            raise ConfigError("'total_step' is required by AdaLoRA", field="total_step",
                              fix="set total_step to the number of training steps (its budget schedule needs it)")
        check_int("total_step", self.total_step, minimum=1)
        if self.tinit >= self.total_step - self.tfinal:
            raise ConfigError(f"'tinit' ({self.tinit}) must be < total_step - tfinal "
                              f"({self.total_step} - {self.tfinal}): no steps are left to shrink the budget",
                              field="tinit", fix="decrease tinit or tfinal, or increase total_step")
        check_number("lora_alpha", self.lora_alpha)
        check_probability("lora_dropout", self.lora_dropout)
        check_bool("init_lora_weights", self.init_lora_weights)
        check_choice("bias", self.bias, ["none", "all", "lora_only"])
        check_bool("fan_in_fan_out", self.fan_in_fan_out)
        check_int("r", self.r, minimum=0)
        if self.r != 8:  # PEFT's default
            warnings.warn("'r' is not used by AdaLoRA and is ignored; set the initial rank with 'init_r'",
                          stacklevel=3)

    @property
    def final_step(self) -> int:
        """The step at which the ranks are fixed."""
        return self.total_step - self.tfinal


class AdaLoraModule(AdapterModule):
    additive = True

    def __init__(self, site, config: AdaLoraConfig):
        super().__init__(site, config)
        r = config.init_r
        # PEFT's draw order (A, E, B, then a value for ranknum that it overwrites): a seeded
        # init gives PEFT's tensors
        self.lora_A = nn.Parameter(torch.randn(r, site.in_features))
        self.lora_E = nn.Parameter(torch.randn(r, 1))
        self.lora_B = nn.Parameter(torch.randn(site.out_features, r))
        torch.randn(1)
        # PEFT keeps ranknum as a tensor in the adapter dtype, rounded through the base dtype,
        # and adds 1e-5 to it in that dtype: the same roundings here
        dtype = torch.float64 if site.dtype == torch.float64 else torch.float32
        ranknum = round_like_base(torch.tensor(float(r), dtype=dtype, device="cpu"), site.dtype)
        self.ranknum = ranknum.item()
        self._rank_divisor = (ranknum + 1e-5).item()
        self.dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        #: which of the init_r ranks this module still holds, after loading a pruned checkpoint
        self.rank_mask: list[bool] | None = None
        with torch.no_grad():
            if config.init_lora_weights:
                self.reset_parameters()
            for p in self.parameters():
                p.copy_(round_like_base(p, site.dtype))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """No-op start: ``E = 0``; ``A`` and ``B`` small Gaussians so that gradients reach ``E``."""
        self.lora_E.zero_()
        nn.init.normal_(self.lora_A, mean=0.0, std=0.02)
        nn.init.normal_(self.lora_B, mean=0.0, std=0.02)

    @property
    def r(self) -> int:
        """The current rank (``init_r`` unless a pruned checkpoint was loaded)."""
        return self.lora_A.shape[0]

    @property
    def scaling(self) -> float:
        # with lora_alpha <= 0 PEFT uses the layer's rank, which is the pruned one after a reload
        alpha = self.config.lora_alpha
        return alpha if alpha > 0 else float(self.r)

    def post(self, x, y, bias):
        x = x.to(self.lora_A.dtype)
        # scale the r-wide hidden state rather than the output: the cheapest place
        singular = self.lora_E.view(-1) * (self.scaling / self._rank_divisor)
        return add_into(y, up_projection(F.linear(self.dropout(x), self.lora_A) * singular, self.lora_B))

    def delta_weight(self) -> torch.Tensor:
        return self.lora_B @ (self.lora_A * self.lora_E) * self.scaling / self._rank_divisor

    def fold(self, weight, bias):
        return weight + self.delta_weight().to(weight.dtype), bias

    @torch.no_grad()
    def load_pruned_state(self, state: Mapping[str, torch.Tensor], mask: Sequence[bool]) -> None:
        """Load ``{"lora_A", "lora_E", "lora_B"}`` saved with pruned ranks (PEFT's checkpoints with a
        ``rank_pattern``; ``mask`` is this site's entry, over the ``init_r`` ranks).  The parameters
        are resized to the kept rank, 0 included; ``ranknum`` keeps ``init_r``, so the adapter
        computes what it computed before pruning.  The parameter objects are kept (resized in
        place), so optimizers and hooks holding them stay attached."""
        missing = {"lora_A", "lora_E", "lora_B"} - set(state)
        if missing:
            raise CheckpointError(f"pruned AdaLoRA state lacks {sorted(missing)}", where=self.site_name)
        mask = [bool(keep) for keep in mask]
        if len(mask) != self.config.init_r:
            raise CheckpointError(f"rank_pattern entry has {len(mask)} values, expected init_r={self.config.init_r}",
                                  where=self.site_name)
        rank = sum(mask)
        expected = {"lora_A": (rank, self.in_features), "lora_E": (rank, 1), "lora_B": (self.out_features, rank)}
        for name, shape in expected.items():
            if tuple(state[name].shape) != shape:
                raise CheckpointError(
                    f"'{name}' has shape {tuple(state[name].shape)}, expected {shape} for the {rank} ranks that "
                    f"rank_pattern keeps on a {self.in_features} -> {self.out_features} layer", where=self.site_name)
        for name in expected:
            param = getattr(self, name)
            param.data = state[name].to(device=param.device, dtype=param.dtype).clone()
            param.grad = None
        self.rank_mask = mask


def prune_state(module: AdaLoraModule, mask: Sequence[bool] | torch.Tensor) -> dict[str, torch.Tensor]:
    """The module's tensors without the ranks where ``mask`` is False, as PEFT saves them:
    ``lora_A [k, in]``, ``lora_E [k, 1]``, ``lora_B [out, k]`` (k may be 0)."""
    keep = torch.as_tensor(mask, dtype=torch.bool, device=module.lora_A.device).view(-1)
    if keep.numel() != module.r:
        raise CheckpointError(f"rank mask has {keep.numel()} entries but the adapter has rank {module.r}",
                              where=module.site_name)
    return {"lora_A": module.lora_A.detach()[keep], "lora_E": module.lora_E.detach()[keep],
            "lora_B": module.lora_B.detach()[:, keep]}


def peft_state(module: AdaLoraModule, mask: Sequence[bool] | None = None):
    """``(tensors, rank_pattern entry)`` that PEFT saves for this site: the tensors without the
    ranks ``mask`` (the allocator's, over the current ranks) drops, and the mask over the
    ``init_r`` ranks that PEFT's loader needs, which also covers ranks pruned by an earlier
    load.  The entry is None when no rank was ever masked."""
    if mask is None:
        tensors = {name: getattr(module, name).detach() for name in ("lora_A", "lora_E", "lora_B")}
        return tensors, module.rank_mask
    tensors = prune_state(module, mask)
    kept_now = [bool(keep) for keep in torch.as_tensor(mask).view(-1).tolist()]
    if module.rank_mask is None:
        return tensors, kept_now
    current = iter(kept_now)  # one value per rank the module still holds
    return tensors, [next(current) if present else False for present in module.rank_mask]


class RankAllocator:
    """AdaLoRA's rank budget over one adapter's sites, with PEFT's semantics.

    Call :meth:`update_and_allocate` every step after ``backward()`` and before ``zero_grad()``,
    and add :meth:`regularization` to the loss.  With identical gradients the masks are PEFT's.
    """

    def __init__(self, modules: Mapping[str, AdaLoraModule], config: AdaLoraConfig):
        self.modules = dict(modules)
        self.config = config
        self.init_budget = sum(m.r for m in self.modules.values())
        self.target_budget = config.target_r * len(self.modules)
        #: per-site rank after the final allocation (None before it)
        self.final_ranks: dict[str, int] | None = None
        self._keep: dict[str, torch.Tensor] = {}  # latest mask per site
        self._sensitivity: list[torch.Tensor] = []
        self._uncertainty: list[torch.Tensor] = []
        self._calls = 0
        self._optimizer_steps = 0
        self._warned = False
        self._watch_backward()

    # ---- schedule -----------------------------------------------------------------------------

    def budget(self, step: int) -> tuple[int, bool]:
        """``(total rank budget, whether to mask)`` at ``step``: constant until ``tinit``, cubic
        decrease to ``target_r`` per site at ``total_step - tfinal``, masking every ``deltaT`` steps."""
        c = self.config
        if step <= c.tinit:
            return self.init_budget, False
        if step > c.final_step:
            return self.target_budget, True
        remaining = 1 - (step - c.tinit) / (c.final_step - c.tinit)
        budget = int((self.init_budget - self.target_budget) * remaining ** 3 + self.target_budget)
        return budget, step % c.deltaT == 0

    def update_and_allocate(self, step: int) -> int:
        """Update the importance scores and mask to the budget of ``step``; from ``total_step -
        tfinal`` on, fix the mask (once) and keep the masked singular values at zero.  Returns
        the budget.  (If the call at ``total_step - tfinal`` is skipped, the first later call fixes
        the mask; PEFT would keep re-applying the last intermediate mask instead.)"""
        self._calls += 1
        if step < self.config.final_step:
            self._update_importance()
            budget, mask_now = self.budget(step)
            if mask_now:
                self._mask_to_budget(budget)
            return budget
        if self.final_ranks is None:
            self._mask_to_budget(self.target_budget)
            self.final_ranks = {site: int(keep.sum()) for site, keep in self._keep.items()}
            self._sensitivity, self._uncertainty = [], []
        else:
            self._apply_mask()
        return self.target_budget

    def rank_pattern(self) -> dict[str, list[bool]]:
        """The latest mask per site (kept ranks True); the final one after ``total_step - tfinal``.
        Empty before the first masking step."""
        return {site: keep.tolist() for site, keep in self._keep.items()}

    # ---- importance and masking -----------------------------------------------------------------

    def _params(self) -> list[torch.Tensor]:
        return [p for m in self.modules.values() for p in (m.lora_A, m.lora_E, m.lora_B)]

    @torch.no_grad()
    def _update_importance(self) -> None:
        params = self._params()
        for site, m in self.modules.items():
            if any(p.grad is None for p in (m.lora_A, m.lora_E, m.lora_B)):
                raise RewriterError(f"AdaLoRA: no gradient on the adapter of '{site}'",
                                    fix="call update_and_allocate(step) after backward() and before zero_grad()")
        if not self._sensitivity:
            self._sensitivity = [torch.zeros_like(p) for p in params]
            self._uncertainty = [torch.zeros_like(p) for p in params]
        b1, b2 = self.config.beta1, self.config.beta2
        importance = torch._foreach_abs(torch._foreach_mul(params, [p.grad for p in params]))
        self._sensitivity = torch._foreach_add(torch._foreach_mul(self._sensitivity, b1),
                                               torch._foreach_mul(importance, 1 - b1))
        deviation = torch._foreach_abs(torch._foreach_sub(importance, self._sensitivity))
        self._uncertainty = torch._foreach_add(torch._foreach_mul(self._uncertainty, b2),
                                               torch._foreach_mul(deviation, 1 - b2))

    def _triplet_scores(self) -> torch.Tensor:
        """Score of each rank k of each site: ``s(E_k) + mean_j s(A_kj) + mean_o s(B_ok)`` with
        ``s = sensitivity * uncertainty``; all sites concatenated in order."""
        if not self._sensitivity:
            raise RewriterError("AdaLoRA: no importance scores to allocate ranks with",
                                fix="call update_and_allocate(step) every step from the first one")
        scores = torch._foreach_mul(self._sensitivity, self._uncertainty)
        per_site = []
        for a, e, b in zip(scores[0::3], scores[1::3], scores[2::3]):
            per_site.append(e.view(-1) + (a.mean(dim=1) + b.mean(dim=0)))
        return torch.cat(per_site)

    @torch.no_grad()
    def _mask_to_budget(self, budget: int) -> None:
        scores = self._triplet_scores()
        to_remove = self.init_budget - budget
        if to_remove > 0:
            threshold = torch.kthvalue(scores, to_remove).values
            keep = ~(scores <= threshold)  # ties at the threshold go too, as in PEFT
        else:  # target_r == init_r: nothing to remove (PEFT fails here)
            keep = torch.ones_like(scores, dtype=torch.bool)
        sizes = [m.r for m in self.modules.values()]
        self._keep = dict(zip(self.modules, keep.split(sizes)))
        self._apply_mask()

    @torch.no_grad()
    def _apply_mask(self) -> None:
        for site, keep in self._keep.items():
            self.modules[site].lora_E.masked_fill_(~keep.view(-1, 1), 0.0)

    # ---- regulariser ----------------------------------------------------------------------------

    def regularization(self) -> torch.Tensor:
        """``orth_reg_weight * mean ||C - I||_F`` over ``C = A A^T`` and ``C = B^T B`` of every site."""
        norms = []
        for m in self.modules.values():
            for gram in (m.lora_A @ m.lora_A.T, m.lora_B.T @ m.lora_B):
                eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
                norms.append(torch.linalg.matrix_norm(gram - eye))
        if not norms:
            return torch.zeros(())
        return self.config.orth_reg_weight * torch.stack(norms).mean()

    # ---- misuse detection -----------------------------------------------------------------------

    def _watch_backward(self) -> None:
        """Count optimizer steps by the first gradient that reaches an empty ``.grad`` (the first
        backward after ``zero_grad()``); gradient accumulation does not count extra steps."""
        if not self.modules:
            return
        watched = next(iter(self.modules.values())).lora_E
        trainable = watched.requires_grad
        watched.requires_grad_(True)  # a hook needs it; it survives later toggles

        def on_gradient(grad):
            if watched.grad is None:
                self._optimizer_steps += 1
                self._check_calls()
            return None

        watched.register_hook(on_gradient)
        watched.requires_grad_(trainable)

    def _check_calls(self) -> None:
        step = self._optimizer_steps - 1  # the step whose backward is running
        if self._warned or step <= self.config.tinit or self._calls >= step:
            return
        self._warned = True
        warnings.warn(
            f"AdaLoRA: backward() has run for {step + 1} training steps but update_and_allocate() was called "
            f"{self._calls} times; without a call after every backward() (before zero_grad()) the ranks are "
            "not allocated as configured", stacklevel=2)


class PrunedCheckpoint(SavedStateHooks):
    """Checkpoint hooks: AdaLoRA saves only the ranks its allocator kept, as PEFT does, with the
    mask per site in PEFT's ``rank_pattern`` (key ``<site>.lora_E``)."""
    peft_field = "rank_pattern"

    def peft_key(self, site: str) -> str:
        return f"{site}.lora_E"

    def save(self, module: AdaLoraModule, controller, site: str):
        mask = controller.rank_pattern().get(site) if isinstance(controller, RankAllocator) else None
        return peft_state(module, mask)

    def load(self, module: AdaLoraModule, tensors: Mapping[str, torch.Tensor], mask) -> None:
        module.load_pruned_state(tensors, mask)


SPEC = register(MethodSpec(
    name="adalora",
    config_cls=AdaLoraConfig,
    module_cls=AdaLoraModule,
    peft_type="ADALORA",
    peft_keys={"lora_A": "lora_A", "lora_E": "lora_E", "lora_B": "lora_B"},
    aliases={"alpha": "lora_alpha", "dropout": "lora_dropout", "init": "init_lora_weights"},
    ignored_peft_fields=_UNUSED_LORA_FIELDS,
    summary="LoRA in SVD form with an importance-driven rank budget (Zhang et al. 2023)",
    controller=RankAllocator,
    checkpoint_hooks=PrunedCheckpoint(),
))
