"""rewriter against PEFT 0.21.2: same model, same inputs, same adapter configs, one run.

Time columns are ratios ours / PEFT, the median over paired repeats: within every repeat each
method times its two sides back to back (alternating which goes first), so machine noise that
lasts longer than one step cancels.  Times are process CPU time (everything timed runs on one
thread; on a shared machine the wall clock mostly measures the other processes).  Peak RSS is measured per method and side in a process of its
own, forked from a parent that holds only the model and the trace.  Our adapter configs are
derived from the PEFT config dicts by ``rewriter.rules.peft.rules_from_peft_config`` and our
timed adapters load PEFT's (perturbed) initial weights, so both sides compute the same function;
the parity column checks that on the eval logits.  X-LoRA's experts are LoRA checkpoints PEFT saves
at the start of the run; both sides load them, and ours copies PEFT's classifier weights.

    python bench/compare_peft.py                      # the standard setting, all methods (~10 min)
    python bench/compare_peft.py --quick              # tiny sizes, a smoke run
    python bench/compare_peft.py --methods lora,ia3 --repeats 3 --json out.json
    python bench/compare_peft.py --methods lora --compile lora  # adds torch.compile (inductor) of lora

The model factories (``standard_model``, ``quick_model``) double as ``--model compare_peft:...``
for the rewriter CLI (with this directory on PYTHONPATH).
"""
from __future__ import annotations

import time

_STARTED = time.perf_counter()  # total wall includes the imports below

import argparse
import copy
import ctypes
import gc
import json
import math
import multiprocessing
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
import transformers
from torch import nn

import rewriter
from rewriter.adapted import Adapted
from rewriter.rules.peft import rules_from_peft_config
from rewriter.core.tolerance import output_tolerance
from rewriter.core.tracing import Traced, trace_model

REPO = Path(__file__).resolve().parents[1]
EXPLAIN_RULES = REPO / "rules" / "lora-llama-all-linear.toml"  # every q,k,v,o,gate,up,down projection
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TRAIN_STEPS_FOR_RSS = 2  # the second step is the first with optimizer state and activations alive together


@dataclass(frozen=True)
class Setting:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    vocab: int
    batch: int
    seq: int
    warmups: int
    repeats: int
    scaling_layers: tuple[int, ...]  #: layer counts for the trace + apply linearity check
    factory: str                     #: this module's function that builds the model, for the CLI


STANDARD = Setting(hidden=512, intermediate=1376, layers=4, heads=8, vocab=4096, batch=4, seq=128,
                   warmups=2, repeats=5, scaling_layers=(4, 8, 16), factory="standard_model")
QUICK = Setting(hidden=64, intermediate=128, layers=2, heads=4, vocab=256, batch=2, seq=16,
                warmups=1, repeats=2, scaling_layers=(1, 2, 4), factory="quick_model")

#: PEFT config dicts (PEFT's field names); every method targets all seven projections unless it says otherwise
METHODS: dict[str, dict] = {
    "lora": {"peft_type": "LORA", "r": 8, "lora_alpha": 16},
    "loha": {"peft_type": "LOHA", "r": 8, "alpha": 8},
    "lokr": {"peft_type": "LOKR", "r": 8, "alpha": 8},
    "oft": {"peft_type": "OFT", "r": 0, "oft_block_size": 32},
    # PEFT without its CUDA extension trains with one butterfly factor; compare like with like
    "boft": {"peft_type": "BOFT", "boft_block_size": 4, "boft_n_butterfly_factor": 1},
    # the benchmark's few steps stay before tinit: every step updates the importance scores, none prunes
    "adalora": {"peft_type": "ADALORA", "init_r": 12, "target_r": 8, "total_step": 1000, "tinit": 200,
                "tfinal": 200},
    "ia3": {"peft_type": "IA3", "target_modules": ["k_proj", "v_proj", "down_proj"],
            "feedforward_modules": ["down_proj"]},
    "fourierft": {"peft_type": "FOURIERFT", "n_frequency": 1000},
    "miss": {"peft_type": "MISS", "r": 64},
    "miss_bat": {"peft_type": "MISS", "r": 32, "init_weights": "bat"},  # r must divide 512 and 1376
    "miss_mini": {"peft_type": "MISS", "r": 64, "mini_r": 32, "init_weights": "mini"},
    # the experts are XLORA_EXPERT checkpoints; hidden_size is the model's
    "xlora": {"peft_type": "XLORA", "task_type": "CAUSAL_LM"},
    "adaption_prompt": {"peft_type": "ADAPTION_PROMPT", "task_type": "CAUSAL_LM", "adapter_len": 10,
                        "adapter_layers": 2, "target_modules": "self_attn"},
}
XLORA_EXPERTS = 3
XLORA_EXPERT = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "init_lora_weights": False}  # random, not a no-op
XLORA_CLASSIFIER = "base_model.internal_xlora_classifier."  #: the classifier's prefix in PEFT's state dict
ADAPTION_GATE = 0.5  # Llama-Adapter's gates start at 0, where the prompts change nothing: open them for parity
COMPILE_SKIPPED = ("skipped unless named in --compile: torch.compile (inductor, CPU) of one model costs about 14 s "
                   "CPU with a warm inductor cache and one to two minutes cold on the 2-core machine this was "
                   "written on (bench/README.md); two compiles per method do not fit the 10-minute budget")


# ---- model, inputs, configs ------------------------------------------------------------------

def build_model(setting: Setting, layers: int | None = None) -> nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=setting.hidden, intermediate_size=setting.intermediate,
        num_hidden_layers=layers or setting.layers, num_attention_heads=setting.heads,
        vocab_size=setting.vocab, max_position_embeddings=max(256, setting.seq))
    return transformers.LlamaForCausalLM(config).eval()


def standard_model() -> nn.Module:
    return build_model(STANDARD)


def quick_model() -> nn.Module:
    return build_model(QUICK)


def make_inputs(setting: Setting) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, setting.vocab, (setting.batch, setting.seq), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@dataclass(frozen=True)
class Base:
    """What both sides of every method are built from."""
    model: nn.Module
    traced: Traced
    inputs: dict
    experts: dict[str, str]  #: X-LoRA's experts, name -> PEFT LoRA checkpoint directory (empty without xlora)


def is_xlora(method: str) -> bool:
    return METHODS[method]["peft_type"] == "XLORA"


def peft_dict(method: str) -> dict:
    if is_xlora(method):  # X-LoRA has no targets: its experts name theirs
        return dict(METHODS[method])
    return {"target_modules": ALL_LINEAR, **METHODS[method]}


def peft_config(spec: dict):
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
    return PEFT_TYPE_TO_CONFIG_MAPPING[spec["peft_type"]](**{k: v for k, v in spec.items() if k != "peft_type"})


def our_rules(method: str, experts: dict[str, str] | None = None):
    if is_xlora(method):  # PEFT's X-LoRA config names checkpoint directories, which our rules take as they are
        return {"schema": 1, "adapter": {"method": "xlora", "adapters": experts}}
    return rules_from_peft_config(peft_dict(method), model_type="llama")


def our_setup(method: str, base: Base) -> Adapted:
    return rewriter.apply(base.traced.clone(), our_rules(method, base.experts))


def peft_setup(method: str, model: nn.Module, experts: dict[str, str]) -> nn.Module:
    """``get_peft_model`` on ``model`` (changed in place)."""
    from peft import get_peft_model
    spec = peft_dict(method)
    if is_xlora(method):
        spec.update(adapters=experts, hidden_size=model.config.hidden_size)
        model.config.use_cache = False  # PEFT's X-LoRA refuses a model that caches
    return get_peft_model(model, peft_config(spec))


def save_xlora_experts(model: nn.Module, directory: Path) -> dict[str, str]:
    """X-LoRA's experts: LoRA adapters with random weights, saved by PEFT; name -> directory."""
    from peft import get_peft_model
    paths = {}
    for i in range(XLORA_EXPERTS):
        torch.manual_seed(10 + i)
        get_peft_model(copy.deepcopy(model), peft_config({"target_modules": ALL_LINEAR, **XLORA_EXPERT})
                       ).save_pretrained(directory / str(i))
        paths[str(i)] = str(directory / str(i))
    return paths


# ---- one side: how it trains and runs ----------------------------------------------------------

def next_token_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))


@dataclass
class Side:
    """A model with its training step: forward + loss + backward + AdamW (+ AdaLoRA's allocator)."""
    module: nn.Module
    loss: Callable[[], torch.Tensor]
    logits: Callable[[], torch.Tensor]
    allocate: Callable[[int], None] | None = None
    optimizer: torch.optim.Optimizer | None = field(init=False, default=None)
    steps: int = field(init=False, default=0)

    def __post_init__(self):
        params = [p for p in self.module.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=1e-4) if params else None

    def train_step(self) -> None:
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
        self.loss().backward()
        if self.optimizer is not None:
            self.optimizer.step()
        if self.allocate is not None:  # after the step, before the next zero_grad (gradients alive)
            self.allocate(self.steps)
        self.steps += 1

    @torch.no_grad()
    def forward(self) -> torch.Tensor:
        return self.logits()


def our_side(adapted: Adapted, inputs: dict, adalora: bool) -> Side:
    def loss():
        value = next_token_loss(adapted(**inputs).logits, inputs["input_ids"])
        return value + adapted.regularization_loss() if adalora else value
    return Side(adapted, loss, lambda: adapted(**inputs).logits,
                allocate=adapted.update_and_allocate if adalora else None)


def peft_side(peft_model: nn.Module, inputs: dict, adalora: bool) -> Side:
    def loss():
        if adalora:  # PEFT adds AdaLoRA's orthogonality regulariser only to a loss the model computes
            return peft_model(**inputs, labels=inputs["input_ids"]).loss
        return next_token_loss(peft_model(**inputs).logits, inputs["input_ids"])
    return Side(peft_model, loss, lambda: peft_model(**inputs).logits,
                allocate=peft_model.base_model.update_and_allocate if adalora else None)


def base_side(model: nn.Module, inputs: dict) -> Side:
    """The frozen model: backward still runs through every layer (the embeddings' output requires
    grad), which is the floor for any adapter below the top layer; there is nothing to optimize."""
    def loss():
        embeds = model.get_input_embeddings()(inputs["input_ids"]).requires_grad_()
        return next_token_loss(model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"]).logits,
                               inputs["input_ids"])
    return Side(model, loss, lambda: model(**inputs).logits)


# ---- measuring ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Sample:
    """One timing.  Ratios use process CPU time: everything timed runs on this one thread, and on
    a shared machine the wall clock mostly measures the other processes' load."""
    cpu: float
    wall: float


def timed_call(fn: Callable[[], object]) -> tuple[object, Sample]:
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return result, Sample(time.process_time() - cpu, time.perf_counter() - wall)


def timed(fn: Callable[[], object]) -> Sample:
    return timed_call(fn)[1]


def rounds(shared: dict[str, Callable[[], Sample]], paired: dict[str, list[tuple[str, Callable[[], Sample]]]],
           warmups: int, repeats: int) -> dict[tuple[str, str], list[Sample]]:
    """Run every task once per round; ``paired[method]`` tasks run back to back, their order
    alternating between rounds and methods.  Each task times itself.  Returns the samples of the
    rounds after the warm-ups, keyed ``(method or "base", task)``."""
    times: dict[tuple[str, str], list[Sample]] = {}
    for r in range(warmups + repeats):
        gc.collect()
        sequence = [(("base", name), fn) for name, fn in shared.items()]
        for i, (method, tasks) in enumerate(paired.items()):
            ordered = tasks if (r + i) % 2 == 0 else tasks[::-1]
            sequence += [((method, name), fn) for name, fn in ordered]
        for key, fn in sequence:
            elapsed = fn()
            if r >= warmups:
                times.setdefault(key, []).append(elapsed)
    return times


def median_ratio(a: list[Sample], b: list[Sample]) -> float:
    return statistics.median(x.cpu / y.cpu for x, y in zip(a, b))


def median_cpu(samples: list[Sample]) -> float:
    return statistics.median(x.cpu for x in samples)


def median_wall(samples: list[Sample]) -> float:
    return statistics.median(x.wall for x in samples)


# ---- peak RSS, one forked process per method and side -----------------------------------------

def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {key} in /proc/self/status")


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, <malloc.h>


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # "5" resets VmHWM to the current RSS
        f.write("5")


_FORK_STATE: dict[str, Base] = {}  # what forked children inherit: model, trace, inputs, experts


def _fixed_malloc_thresholds() -> None:
    """glibc returns a freed block of 64 KB or more to the OS at once.  By default its thresholds move
    with the process's history, so the same step's peak RSS varied by +-10% between runs; fixed, it
    repeats to 1 MiB and follows the memory actually in use (both sides alike)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: measure with its defaults
        return
    libc.mallopt(M_MMAP_THRESHOLD, 65536)
    libc.mallopt(M_TRIM_THRESHOLD, 65536)


def _rss_child(job: tuple[str, str]) -> tuple[float, float] | str:
    """Peak RSS growth in MiB of setting up ``method`` on ``side`` and training it a few steps, less the
    shared-library code that the run paged in for the first time (``RssFile`` growth: clean, shared,
    file-backed pages, which touching more of libtorch's code adds; see bench/README.md); and that code."""
    method, side = job
    base = _FORK_STATE["base"]
    _fixed_malloc_thresholds()
    try:
        baseline, code_baseline = _status_kb("VmRSS"), _status_kb("RssFile")
        _reset_peak_rss()
        adalora = method == "adalora"
        if side == "ours":  # this forked child owns its trace: adapt it in place, as PEFT adapts its model
            adapted = rewriter.apply(base.traced, our_rules(method, base.experts))
            runner = our_side(adapted, base.inputs, adalora)
        else:
            runner = peft_side(peft_setup(method, base.model, base.experts), base.inputs, adalora)
        runner.module.train()
        for _ in range(TRAIN_STEPS_FOR_RSS):
            runner.train_step()
        code = (_status_kb("RssFile") - code_baseline) / 1024
        return (_status_kb("VmHWM") - baseline) / 1024 - code, code
    except Exception as exc:  # reported in the table, the other measurements go on
        return f"{type(exc).__name__}: {exc}"


def _rss_children(jobs: list[tuple[str, str]], sender) -> None:
    with multiprocessing.get_context("fork").Pool(2, maxtasksperchild=1) as pool:
        sender.send(pool.map(_rss_child, jobs, chunksize=1))


def start_peak_rss(methods: list[str], base: Base) -> Callable[[], dict[tuple[str, str], float | str]]:
    """Fork a snapshot of this process as it is now (the model and the trace, nothing else); the
    snapshot forks one child per method and side from that state, two at a time, while this
    process goes on.  Returns the function that waits for the results."""
    _FORK_STATE["base"] = base
    gc.collect()  # the models that saved X-LoRA's experts hold reference cycles: keep them out of the snapshot
    jobs = [(m, side) for m in methods for side in ("ours", "peft")]
    receiver, sender = multiprocessing.Pipe(duplex=False)
    snapshot = multiprocessing.get_context("fork").Process(target=_rss_children, args=(jobs, sender))
    snapshot.start()

    def results():
        values = receiver.recv()
        snapshot.join()
        out = {}
        for job, value in zip(jobs, values):
            out[job] = value[0] if isinstance(value, tuple) else value
            out[(*job, "library_code")] = value[1] if isinstance(value, tuple) else None
        return out
    return results


# ---- setup and parity --------------------------------------------------------------------------

@dataclass
class Pair:
    method: str
    ours: Side
    peft: Side
    inputs: dict
    apply: Sample           #: rewriter.apply on a fresh clone of the trace
    peft_setup: Sample      #: get_peft_model
    parity: float           #: max |ours - PEFT| of the eval logits with PEFT's weights loaded into ours
    tolerance: float
    effect: float           #: max |PEFT - base| of the same logits: parity only means something above tolerance
    not_mergeable: str | None  #: why the method cannot merge, from the method itself
    float64_errors: dict | None = None  #: each side's error against float64 PEFT, when parity > tolerance
    timings: dict = field(default_factory=dict)  #: filled by time_pairs


@torch.no_grad()
def _perturb(module: nn.Module) -> None:
    """Move every adapter parameter off its (often no-op) initial value, so parity means something."""
    gen = torch.Generator().manual_seed(0)
    for name, p in module.named_parameters():
        if name.endswith("adaption_gate"):
            p.fill_(ADAPTION_GATE)
        elif p.requires_grad:
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.02)


def _not_mergeable(adapted: Adapted) -> str | None:
    return next((m.not_mergeable for a in adapted.adapters.values() for m in a.modules.values() if m.not_mergeable),
                None)


def make_pair(method: str, base: Base, workdir: Path) -> Pair:
    """Both sides with the same weights: ours loads the checkpoint PEFT saves after ``_perturb``;
    X-LoRA's timed model is our setup's, its experts loaded from the same directories as PEFT's and
    PEFT's classifier copied in (PEFT 0.21.2 leaves part of the classifier out of its checkpoints)."""
    adalora = method == "adalora"
    applied, apply = timed_call(lambda: our_setup(method, base))
    base_copy = copy.deepcopy(base.model)
    peft_model, peft_setup_time = timed_call(lambda: peft_setup(method, base_copy, base.experts))
    _perturb(peft_model)
    if is_xlora(method):
        ours = applied
        classifier = {k[len(XLORA_CLASSIFIER):]: v for k, v in peft_model.state_dict().items()
                      if k.startswith(XLORA_CLASSIFIER)}
        ours.adapters["default"].modules["model"].classifier.load_state_dict(classifier)
    else:
        peft_model.save_pretrained(workdir / method)
        ours = Adapted(base.traced.clone())
        ours.load_adapter(workdir / method)
    ours.eval()
    peft_model.eval()
    small = {k: v[:2, :32] for k, v in base.inputs.items()}  # parity needs no full-size forward
    with torch.no_grad():
        expected = peft_model(**small).logits
        parity = (ours(**small).logits - expected).abs().max().item()
        effect = (base.model(**small).logits - expected).abs().max().item()
    tolerance = output_tolerance(expected, torch.float32, depth=base.model.config.num_hidden_layers)
    errors = _float64_errors(peft_model, ours, small) if parity > tolerance else None
    return Pair(method, our_side(ours, base.inputs, adalora), peft_side(peft_model, base.inputs, adalora),
                base.inputs, apply, peft_setup_time, parity, tolerance, effect, _not_mergeable(ours), errors)


def _float64_errors(peft_model: nn.Module, ours: Adapted, inputs: dict) -> dict[str, float]:
    """When the two sides differ by more than the tolerance: each side's max |error| against PEFT's
    model run in float64, the arbiter.  Adapters whose weights come out of long sums that cancel
    (FourierFT's inverse FFT with scaling 150 on a tiny layer) round far more than one unit per weight,
    on both sides.  PEFT's own error then measures float32 rounding for this computation; ours passes
    within twice that (plus the tolerance): where ours folds an adapter into the base weight, ``W + ΔW``
    is rounded once more, by as much as ΔW itself is."""
    exact = copy.deepcopy(peft_model).double()
    with torch.no_grad():
        truth = exact(**inputs).logits
        return {"ours": (ours(**inputs).logits.double() - truth).abs().max().item(),
                "peft": (peft_model(**inputs).logits.double() - truth).abs().max().item()}


# ---- the phases --------------------------------------------------------------------------------

def _merge_then_unmerge(merge: Callable[[], None], unmerge: Callable[[], None]) -> Sample:
    elapsed = timed(merge)
    unmerge()
    return elapsed


def time_pairs(pairs: list[Pair], base: Side, setting: Setting) -> None:
    w, n = setting.warmups, setting.repeats
    for p in pairs:
        p.ours.module.train()
        p.peft.module.train()
    train = rounds({"train": lambda: timed(base.train_step)},
                   {p.method: [("ours", lambda p=p: timed(p.ours.train_step)),
                               ("peft", lambda p=p: timed(p.peft.train_step))] for p in pairs}, w, n)
    _progress("train steps timed")
    for p in pairs:
        p.ours.module.eval()
        p.peft.module.eval()
    evals = rounds({}, {p.method: [("ours", lambda p=p: timed(p.ours.forward)),
                                   ("peft", lambda p=p: timed(p.peft.forward))] for p in pairs}, w, n)
    mergeable = [p for p in pairs if p.not_mergeable is None]
    merges = rounds({}, {p.method: [
        ("ours", lambda p=p: _merge_then_unmerge(p.ours.module.merge, p.ours.module.unmerge)),
        ("peft", lambda p=p: _merge_then_unmerge(p.peft.module.merge_adapter, p.peft.module.unmerge_adapter)),
    ] for p in mergeable}, w, n)
    _progress("eval forwards and merges timed")
    for p in mergeable:
        p.ours.module.merge()
    merged = rounds({"forward": lambda: timed(base.forward)},
                    {p.method: [("ours", lambda p=p: timed(p.ours.forward))] for p in mergeable}, w, n)
    for p in pairs:
        phases = (("train", train), ("eval", evals)) + ((("merge", merges),) if p.not_mergeable is None else ())
        t = {phase: {side: times[(p.method, side)] for side in ("ours", "peft")} for phase, times in phases}
        t["base_train"] = train[("base", "train")]
        if p.not_mergeable is None:
            t["merged"] = merged[(p.method, "ours")]
        t["base_forward"] = merged[("base", "forward")]
        p.timings = t


def time_compiled(pairs: list[Pair], setting: Setting) -> None:
    """``torch.compile`` (inductor) of both sides, unmerged, eval: the first call's CPU time (the
    compile) and the paired eval forwards of the compiled models, into ``p.timings["compile"]``."""
    forwards, first_call = {}, {}
    for p in pairs:
        if p.not_mergeable is None:
            p.ours.module.unmerge()  # time_pairs left ours merged
        for side, model in (("ours", p.ours.module), ("peft", p.peft.module)):
            model.eval()
            compiled = torch.compile(model)
            forwards[(p.method, side)] = lambda c=compiled, p=p: timed(lambda: torch_no_grad_logits(c, p.inputs))
            first_call[side] = forwards[(p.method, side)]()
            _progress(f"compiled {p.method} ({side}) in {first_call[side].cpu:.0f} s CPU")
        p.timings["compile_first_call"] = dict(first_call)
    times = rounds({}, {p.method: [(side, forwards[(p.method, side)]) for side in ("ours", "peft")] for p in pairs},
                   setting.warmups, setting.repeats)
    for p in pairs:
        p.timings["compile"] = {side: times[(p.method, side)] for side in ("ours", "peft")}


@torch.no_grad()
def torch_no_grad_logits(model: Callable, inputs: dict) -> torch.Tensor:
    return model(**inputs).logits


def scaling(setting: Setting) -> list[dict]:
    """Trace + apply (LoRA on all seven projections) at growing depth, in this warm process."""
    rows = []
    for layers in setting.scaling_layers:
        traced, trace = timed_call(lambda: trace_model(build_model(setting, layers)))
        apply = timed(lambda: rewriter.apply(traced, our_rules("lora")))
        rows.append({"layers": layers, "trace_cpu_s": trace.cpu, "trace_wall_s": trace.wall,
                     "apply_cpu_s": apply.cpu, "apply_wall_s": apply.wall})
    return rows


def explain_time(setting: Setting) -> dict:
    """``rewriter explain`` from the shell on the benchmark model, twice on a fresh site cache: cold (it
    traces) and warm (the model is unchanged, so its sites come from the cache); wall and CPU seconds
    of each, or the error."""
    exe = shutil.which("rewriter", path=str(Path(sys.executable).parent)) or shutil.which("rewriter")
    command = [exe] if exe else [sys.executable, "-m", "rewriter.cli"]
    args = ["explain", str(EXPLAIN_RULES), "--model", f"compare_peft:{setting.factory}"]
    runs = {}
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "REWRITER_CACHE_DIR": cache,
               "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")]))}
        for run in ("cold", "warm"):
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            done, sample = timed_call(lambda: subprocess.run(command + args, env=env, capture_output=True, text=True))
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            out = {"wall_s": sample.wall, "cpu_s": after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime}
            if done.returncode != 0:
                out["error"] = (done.stderr.strip().splitlines() or ["failed"])[-1]
            runs[run] = out
    return runs


# ---- report ------------------------------------------------------------------------------------

def method_result(p: Pair, trace: Sample, rss: dict) -> dict:
    """Every metric, null where it does not apply (merging a method that cannot merge), with the reason."""
    t = p.timings
    ours_mb, peft_mb = rss[(p.method, "ours")], rss[(p.method, "peft")]
    rss_ok = isinstance(ours_mb, float) and isinstance(peft_mb, float)
    merged = p.not_mergeable is None
    return {
        "train_step_ratio": median_ratio(t["train"]["ours"], t["train"]["peft"]),
        "eval_forward_ratio": median_ratio(t["eval"]["ours"], t["eval"]["peft"]),
        "merged_forward_vs_base": median_ratio(t["merged"], t["base_forward"]) if merged else None,
        "peak_rss_ratio": ours_mb / peft_mb if rss_ok and peft_mb > 0 else None,
        "setup_s": trace.cpu + p.apply.cpu,
        "train_step_vs_base": median_ratio(t["train"]["ours"], t["base_train"]),
        **({} if merged else {"reason": f"merge and merged forward: not mergeable: {p.not_mergeable}"}),
        "details": {  # seconds are CPU seconds unless named wall
            "trace_s": trace.cpu, "apply_s": p.apply.cpu, "peft_setup_s": p.peft_setup.cpu,
            "setup_wall_s": {"ours": trace.wall + p.apply.wall, "peft": p.peft_setup.wall},
            "train_step_s": {side: median_cpu(v) for side, v in t["train"].items()},
            "train_step_wall_s": {side: median_wall(v) for side, v in t["train"].items()},
            "base_train_step_s": median_cpu(t["base_train"]),
            "peft_train_step_vs_base": median_ratio(t["train"]["peft"], t["base_train"]),
            "eval_forward_s": {side: median_cpu(v) for side, v in t["eval"].items()},
            "eval_forward_wall_s": {side: median_wall(v) for side, v in t["eval"].items()},
            "merge_s": {side: median_cpu(v) for side, v in t["merge"].items()} if merged else None,
            "merge_ratio": median_ratio(t["merge"]["ours"], t["merge"]["peft"]) if merged else None,
            "merged_forward_s": median_cpu(t["merged"]) if merged else None,
            "base_forward_s": median_cpu(t["base_forward"]),
            "peak_rss_mb": {"ours": ours_mb, "peft": peft_mb},
            "library_code_paged_in_mb": {side: rss[(p.method, side, "library_code")] for side in ("ours", "peft")},
            "parity_max_abs_diff": p.parity, "parity_tolerance": p.tolerance,
            "parity_ok": p.parity <= p.tolerance or (p.float64_errors is not None and  # see _float64_errors
                                                      p.float64_errors["ours"] <= 2 * p.float64_errors["peft"] + p.tolerance),
            "parity_float64_errors": p.float64_errors,
            "adapter_effect_max_abs": p.effect,
            "raw": _raw({k: v for k, v in t.items() if k != "compile_first_call"}),
            "compile": _compile_result(t),
        },
    }


def _compile_result(t: dict) -> dict | None:
    if "compile" not in t:
        return None
    return {"eval_forward_ratio": median_ratio(t["compile"]["ours"], t["compile"]["peft"]),
            "eval_forward_s": {side: median_cpu(v) for side, v in t["compile"].items()},
            "first_call_s": {side: s.cpu for side, s in t["compile_first_call"].items()}}


def _raw(timings: dict) -> dict:
    """Every timed repeat as [cpu, wall] pairs, paired by position across sides."""
    if isinstance(timings, list):
        return [[round(x.cpu, 5), round(x.wall, 5)] for x in timings]
    return {k: _raw(v) for k, v in timings.items()}


def _ms(seconds: float) -> str:
    return f"{1e3 * seconds:.0f}"


def _row(method: str, r: dict) -> str:
    d = r["details"]
    rss = d["peak_rss_mb"]
    mb = [f"{v:.0f}" if isinstance(v, float) else "error" for v in (rss["ours"], rss["peft"])]
    rss_ratio = f"{r['peak_rss_ratio']:.2f}" if r["peak_rss_ratio"] is not None else "n/a"
    parity = "ok" if d["parity_ok"] else f"MISMATCH {d['parity_max_abs_diff']:.2g} > {d['parity_tolerance']:.2g}"
    if d["parity_float64_errors"]:
        f64 = d["parity_float64_errors"]
        parity += (f" (differ by {d['parity_max_abs_diff']:.2g} > {d['parity_tolerance']:.2g}; against float64 "
                   f"PEFT: ours {f64['ours']:.2g}, PEFT {f64['peft']:.2g})")
    if d["adapter_effect_max_abs"] <= d["parity_tolerance"]:
        parity += f" (but the adapter changes the logits by only {d['adapter_effect_max_abs']:.2g})"
    merge = (f"{_ms(d['merge_s']['ours'])} / {_ms(d['merge_s']['peft'])}", f"{r['merged_forward_vs_base']:.2f}") \
        if d["merge_s"] is not None else ("n/a", "n/a: not mergeable")
    cells = [
        method,
        f"{r['setup_s']:.1f} ({d['trace_s']:.1f} + {d['apply_s']:.2f}) / {d['peft_setup_s']:.2f}",
        f"**{r['train_step_ratio']:.2f}** ({_ms(d['train_step_s']['ours'])} / {_ms(d['train_step_s']['peft'])})",
        f"{r['train_step_vs_base']:.2f} / {d['peft_train_step_vs_base']:.2f}",
        f"**{r['eval_forward_ratio']:.2f}** ({_ms(d['eval_forward_s']['ours'])} / "
        f"{_ms(d['eval_forward_s']['peft'])})",
        *merge,
        f"{mb[0]} / {mb[1]} ({rss_ratio})",
        _compile_cell(d["compile"]),
        parity,
    ]
    return "| " + " | ".join(cells) + " |"


def _compile_cell(c: dict | None) -> str:
    if c is None:
        return "skipped"
    first, ms = c["first_call_s"], c["eval_forward_s"]
    return (f"eval **{c['eval_forward_ratio']:.2f}** ({_ms(ms['ours'])} / {_ms(ms['peft'])}); "
            f"compile s {first['ours']:.0f} / {first['peft']:.0f}")


def markdown(results: dict, run: dict) -> str:
    s = run["setting"]
    lines = [
        f"## rewriter vs PEFT {run['versions']['peft']}: Llama h={s['hidden']} i={s['intermediate']} "
        f"L={s['layers']} heads={s['heads']} vocab={s['vocab']}, batch {s['batch']} x seq {s['seq']}, float32, "
        f"1 thread; median of {s['repeats']} paired repeats after {s['warmups']} warm-ups; times are CPU time "
        f"(ms unless marked s)",
        "",
        "| method | setup s: ours (trace + apply) / PEFT | train step ours/PEFT (ms) | train step vs frozen base: "
        "ours / PEFT | eval fwd ours/PEFT (ms) | merge ms ours / PEFT | merged fwd vs base "
        "| peak RSS growth MiB, less library code: ours / PEFT (ratio) | torch.compile (inductor) ours/PEFT | parity |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [_row(method, r) for method, r in results.items()]
    lines += [f"- {method}: {r['reason']}." for method, r in results.items() if r.get("reason")]
    lines += [f"- peak RSS {m} {side} failed: {v}" for (m, side), v in run["rss_errors"].items()]
    explain = run["explain"]
    lines += [
        "",
        f"Frozen base: train step (forward + backward down to the embeddings, nothing to optimize) "
        f"{_ms(run['base_train_step_s'])} ms, eval forward {_ms(run['base_forward_s'])} ms.",
        f"Trace (cold: the process's first torch.export): {run['trace'].cpu:.1f} s CPU ({run['trace'].wall:.1f} s "
        f"wall), peak RSS growth {run['trace_peak_mb']:.0f} MiB; the per-method peaks are forked after it.",
        f"torch.compile: {COMPILE_SKIPPED}." if not run["compiled"] else
        f"torch.compile (inductor, default mode) for {', '.join(run['compiled'])}: eval forward ours/PEFT "
        "(ms), and the first call's CPU seconds (the compile; the inductor cache may be warm).",
        f"`rewriter explain {EXPLAIN_RULES.relative_to(REPO)} --model compare_peft:{s['factory']}` from the shell: "
        + "; ".join(f"{run} {r['wall_s']:.1f} s wall, {r['cpu_s']:.1f} s CPU"
                    + (f" (failed: {r['error']})" if "error" in r else "") for run, r in explain.items())
        + " (cold: traces the model; warm: the unchanged model's sites come from the site cache).",
        "",
        "Trace + apply (LoRA on all seven projections) by depth, warm process:",
        "",
        "| layers | trace s CPU (wall) | apply s CPU (wall) | CPU s per layer |",
        "|---|---|---|---|",
    ]
    lines += [f"| {row['layers']} | {row['trace_cpu_s']:.2f} ({row['trace_wall_s']:.2f}) | "
              f"{row['apply_cpu_s']:.2f} ({row['apply_wall_s']:.2f}) | "
              f"{(row['trace_cpu_s'] + row['apply_cpu_s']) / row['layers']:.2f} |" for row in run["scaling"]]
    lines += ["", f"Load average (1, 5, 15 min) at start {run['load_start']}, at end {run['load_end']}; "
              f"{os.cpu_count()} CPUs; total {run['wall_s']:.0f} s wall; torch {run['versions']['torch']}, "
              f"transformers {run['versions']['transformers']}."]
    return "\n".join(lines)


def _progress(what: str) -> None:
    print(f"[{time.perf_counter() - _STARTED:6.0f} s] {what}", file=sys.stderr, flush=True)


def _load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def parse_args(argv=None) -> argparse.Namespace:
    known = list(METHODS)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", help=f"comma-separated, from: {', '.join(known)} (default: all)")
    parser.add_argument("--repeats", type=int, help="paired repeats per measurement (default 5; 2 with --quick)")
    parser.add_argument("--quick", action="store_true", help="tiny model and sizes: a smoke run")
    parser.add_argument("--json", type=Path, help="write {method: {ratios, details}} here")
    parser.add_argument("--compile", default="", help="comma-separated methods (also in --methods) to time under "
                                                       "torch.compile too; each costs two compiles")
    args = parser.parse_args(argv)
    args.methods = args.methods.split(",") if args.methods else known
    unknown = [m for m in args.methods if m not in known]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; known: {', '.join(known)}")
    args.compile = args.compile.split(",") if args.compile else []
    not_timed = [m for m in args.compile if m not in args.methods]
    if not_timed:
        parser.error(f"--compile {not_timed}: each must also be in --methods")
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be at least 1")
    return args


def measure(setting: Setting, methods: list[str], compile_methods: list[str]) -> tuple[dict, dict]:
    """Every measurement: the cold trace first; then the forked peak-RSS children, beside the depth
    scaling and the setups (CPU times, little disturbed); then, alone, the paired timings (every
    timed model alive together) and the shell explain."""
    model, inputs = build_model(setting), make_inputs(setting)
    rss_before = _status_kb("VmRSS")
    _reset_peak_rss()
    traced, trace = timed_call(lambda: trace_model(model))
    run = {"trace": trace, "trace_peak_mb": (_status_kb("VmHWM") - rss_before) / 1024}
    with tempfile.TemporaryDirectory() as tmp:
        experts = save_xlora_experts(model, Path(tmp)) if any(is_xlora(m) for m in methods) else {}
        base = Base(model, traced, inputs, experts)
        _progress(f"traced in {trace.wall:.1f} s; peak RSS children in the background; trace + apply scaling")
        rss_results = start_peak_rss(methods, base)
        run["scaling"] = scaling(setting)
        _progress("setup and parity")
        pairs = [make_pair(m, base, Path(tmp)) for m in methods]
        _progress("waiting for the peak RSS children")
        rss = rss_results()  # the paired timings run alone
    run["rss_errors"] = {k: v for k, v in rss.items() if isinstance(v, str)}
    if pairs:
        _progress("paired timings")
        time_pairs(pairs, base_side(model, inputs), setting)
    if compile_methods:
        _progress(f"torch.compile of {compile_methods}")
        time_compiled([p for p in pairs if p.method in compile_methods], setting)
    run["compiled"] = compile_methods
    timings = pairs[0].timings if pairs else {"base_train": [Sample(math.nan, math.nan)],
                                              "base_forward": [Sample(math.nan, math.nan)]}
    run["base_train_step_s"] = median_cpu(timings["base_train"])
    run["base_forward_s"] = median_cpu(timings["base_forward"])
    _progress("rewriter explain")
    run["explain"] = explain_time(setting)
    return {p.method: method_result(p, trace, rss) for p in pairs}, run


def main(argv=None) -> int:
    args = parse_args(argv)
    warnings.simplefilter("ignore")
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(1)
    import peft
    setting = QUICK if args.quick else STANDARD
    if args.repeats:
        setting = replace(setting, repeats=args.repeats)
    load_start = _load()
    results, run = measure(setting, args.methods, args.compile)
    run.update(setting=asdict(setting), load_start=load_start, load_end=_load(),
               wall_s=time.perf_counter() - _STARTED,
               versions={"torch": torch.__version__, "peft": peft.__version__,
                         "transformers": transformers.__version__})
    print(markdown(results, run))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.json.with_name(args.json.name + ".tmp")
        tmp.write_text(json.dumps(results, indent=2) + "\n")
        os.replace(tmp, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
