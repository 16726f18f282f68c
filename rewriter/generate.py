"""Token generation for causal LMs (``Adapted.generate``).

The graph of an ``Adapted`` has no KV cache, so generation runs a second graph: the source
model exported as one decoding step over a static KV cache (:class:`DecodeStep`), once per
(batch size, cache length) and kept on the ``Adapted``.  That graph is wrapped in an ``Adapted``
of its own that holds the SAME adapter modules (shared parameters, the same plans) and, at each
call, the same active / merged / disabled state.  The loop is ours (parallel prefill, then one
token per step): transformers' helper for exported programs feeds the first new token at the
wrong cache position (docs/generate.md).
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Callable, Sequence

import torch
from torch import nn

from .adapters import AdaptedModel
from .errors import RewriterError, TraceError
from .methods import get_method
from .core.tracing import Traced

GRAPHS_ATTR = "generation_graphs"  #: where an Adapted keeps its decoding graphs
KEEP_GRAPHS = 2                     #: decoding graphs kept per Adapted (each holds a whole KV cache)
MIN_CACHE_LEN = 64                  #: default cache lengths are powers of two from here, so graphs get reused


def generate(adapted, input_ids: torch.Tensor, max_new_tokens: int = 20, *, do_sample: bool = False,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None,
             attention_mask: torch.Tensor | None = None, generator: torch.Generator | None = None,
             max_cache_len: int | None = None) -> torch.Tensor:
    """Generate up to ``max_new_tokens`` tokens after the prompts ``input_ids`` ``[batch, length]``
    with the adapters as they are now (active, merged, or disabled inside ``disable_adapters()``).

    Returns the prompts followed by the new tokens, as ``model.generate`` does: greedy by default,
    else sampled with ``temperature``, ``top_k``, ``top_p`` (``generator`` makes it reproducible).
    A row stops at ``eos_token_id`` (default: the model's generation config) and is then filled with
    ``pad_token_id``; generation ends early once every row has stopped.  Batches of different prompt
    lengths are padded on the left, with ``attention_mask`` marking the real tokens.  ``max_cache_len``
    (default: prompt + new tokens, rounded up to a power of two) sizes the static KV cache."""
    model = causal_lm(adapted)
    ids, mask = check_prompt(input_ids, attention_mask)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise RewriterError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    pick = token_picker(do_sample, temperature, top_k, top_p, generator)
    length = cache_length(model, ids.shape[1], max_new_tokens, max_cache_len)
    config = model.generation_config
    eos = eos_token_id if eos_token_id is not None else config.eos_token_id
    eos = None if eos is None else torch.tensor([eos] if isinstance(eos, int) else list(eos), device=model.device)
    pad = pad_token_id if pad_token_id is not None else config.pad_token_id
    pad = pad if pad is not None or eos is None else int(eos[0])  # transformers' fallback
    with torch.no_grad(), _in_eval(adapted), _keep_requires_grad(adapted, model):
        gen = decoding_adapted(adapted, model, ids.shape[0], length)
        mirror(adapted, gen)
        for name, buffer in gen.gm.named_buffers():
            if name.startswith("cache_"):
                buffer.zero_()  # stale slots are masked, but must not hold non-finite values from a past run

        def step(tokens, seen, positions, start):
            return gen.gm(input_ids=tokens, attention_mask=seen, position_ids=positions,
                          start=torch.tensor(start, device=model.device))

        out = decode(step, ids.to(model.device), mask.to(model.device), length, max_new_tokens, pick, eos, pad)
    return out.to(input_ids.device)


# ---- checking the request ---------------------------------------------------------------------

def causal_lm(adapted) -> nn.Module:
    """The transformers decoder-only LM the Adapted was traced from, or a clear error."""
    model = adapted.source_model
    fix = "trace a transformers causal LM (e.g. LlamaForCausalLM): rewriter.apply(model, rules)"
    if model is None:
        raise RewriterError("generate() needs the model this Adapted was traced from, and it was built from a "
                            "GraphModule", fix=fix)
    can_generate = getattr(model, "can_generate", None)
    if not (callable(can_generate) and can_generate()) or getattr(model.config, "is_encoder_decoder", False):
        raise RewriterError(f"generate() works on decoder-only transformers causal LMs; the model is "
                            f"{type(model).__name__}", fix=fix)
    return model


def check_prompt(input_ids, attention_mask) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` as long tensors; the mask must pad on the left."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point() \
            or input_ids.shape[1] == 0:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise RewriterError(f"input_ids must be an integer tensor [batch, length] with length >= 1, got {shape}",
                            fix="a single prompt is input_ids[None]")
    if attention_mask is None:
        return input_ids.long(), torch.ones_like(input_ids, dtype=torch.long)
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
        shape = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else attention_mask
        raise RewriterError(f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, got {shape}")
    mask = attention_mask.long()
    ok = ((mask == 0) | (mask == 1)).all(-1) & (mask[:, 1:] >= mask[:, :-1]).all(-1) & (mask[:, -1] == 1)
    if not ok.all():
        row = int((~ok).nonzero()[0, 0])
        raise RewriterError(f"attention_mask row {row} is not left padding ({mask[row].tolist()}): generate() "
                            "needs 0s then 1s, ending in a real token",
                            fix="pad prompts on the left (tokenizer.padding_side = 'left')")
    return input_ids.long(), mask


def cache_length(model: nn.Module, prompt_len: int, max_new_tokens: int, max_cache_len: int | None) -> int:
    """Slots of the static KV cache: ``max_cache_len``, or the need rounded up to a power of two
    (at most the model's ``max_position_embeddings``)."""
    needed = prompt_len + max_new_tokens
    if max_cache_len is not None:
        if needed > max_cache_len:
            raise RewriterError(f"the prompt ({prompt_len} tokens) plus max_new_tokens={max_new_tokens} needs "
                                f"{needed} cache slots, but max_cache_len={max_cache_len}",
                                fix="raise max_cache_len, or lower max_new_tokens")
        return max_cache_len
    limit = getattr(model.config.get_text_config(), "max_position_embeddings", None) or needed
    if needed > limit:
        raise RewriterError(f"the prompt ({prompt_len} tokens) plus max_new_tokens={max_new_tokens} is {needed} "
                            f"positions, beyond the model's max_position_embeddings={limit}",
                            fix="lower max_new_tokens, or pass max_cache_len if the model extrapolates positions")
    return min(max(MIN_CACHE_LEN, 1 << (needed - 1).bit_length()), limit)


def token_picker(do_sample: bool, temperature: float, top_k: int | None, top_p: float | None,
                 generator: torch.Generator | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """``logits [batch, vocab] -> tokens [batch]``: argmax, or a sample after temperature, top-k, top-p."""
    if not do_sample:
        if temperature != 1.0 or top_k is not None or top_p is not None:
            raise RewriterError("temperature, top_k and top_p only apply when sampling",
                                fix="pass do_sample=True, or leave them out for greedy decoding")
        return lambda logits: logits.argmax(-1)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise RewriterError(f"temperature must be > 0 when sampling, got {temperature!r}",
                            fix="use do_sample=False for greedy decoding (the limit of temperature -> 0)")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise RewriterError(f"top_k must be a positive integer or None, got {top_k!r}")
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise RewriterError(f"top_p must be in (0, 1] or None, got {top_p!r}")

    def sample(logits: torch.Tensor) -> torch.Tensor:
        scores = logits / temperature
        if top_k is not None:
            scores = keep_top_k(scores, top_k)
        if top_p is not None:
            scores = keep_top_p(scores, top_p)
        return torch.multinomial(scores.softmax(-1), 1, generator=generator).squeeze(1)
    return sample


def keep_top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Scores below the k-th largest of each row become -inf (ties with it stay)."""
    kth = scores.topk(min(k, scores.shape[-1]), dim=-1).values[..., -1:]
    return scores.masked_fill(scores < kth, float("-inf"))


def keep_top_p(scores: torch.Tensor, p: float) -> torch.Tensor:
    """Keep each row's most likely tokens until their probability reaches ``p`` (nucleus sampling):
    a token goes when the tokens ranked above it already hold ``p``."""
    if p >= 1:
        return scores  # all of them (the cumulative sum may round to 1 before the last token)
    probs, order = scores.softmax(-1).sort(dim=-1, descending=True)
    drop = (probs.cumsum(-1) - probs) >= p
    return scores.masked_fill(drop.scatter(-1, order, drop), float("-inf"))


# ---- the decoding graph -----------------------------------------------------------------------

class DecodeStep(nn.Module):
    """One decoding step of ``model`` over a static KV cache of ``length`` slots per sequence.

    ``input_ids [batch, n]`` go to cache slots ``start .. start+n-1`` at ``position_ids [batch, n]``;
    ``attention_mask [batch, length]`` marks the slots that hold real tokens (0 for left padding,
    unfilled slots are masked by causality).  Returns the logits.  The model's modules are
    registered here under their own names, so the exported graph's sites are named as the
    model's (and the Adapted's)."""

    def __init__(self, model: nn.Module, batch: int, length: int):
        super().__init__()
        from transformers import StaticCache
        from transformers.cache_utils import StaticLayer, StaticSlidingWindowLayer
        from transformers.configuration_utils import get_head_shapes
        self._model = [model]  # a list: its parameters are registered below under their own names
        for name, child in model.named_children():
            self.add_module(name, child)
        for name, param in model.named_parameters(recurse=False):
            self.register_parameter(name, param)
        config = model.config.get_text_config()
        self.cache = StaticCache(config=config, max_cache_len=length)
        for i, layer in enumerate(self.cache.layers):
            if isinstance(layer, StaticSlidingWindowLayer):  # its window logic does not export
                window = getattr(config, "sliding_window", None) or 0
                if window < length:
                    raise RewriterError(f"{type(model).__name__} has sliding-window attention over {window} tokens, "
                                        f"and generate() supports caches only up to the window ({length} asked)",
                                        fix=f"use max_cache_len <= {window}")
                self.cache.layers[i] = StaticLayer(length)  # the same attention while the window is not full
        heads, head_dim = get_head_shapes(config)
        self.cache.early_initialization(batch, heads, head_dim, model.dtype, model.device)
        for i, layer in enumerate(self.cache.layers):
            for kind in ("keys", "values", "cumulative_length"):
                self.register_buffer(f"cache_{kind}_{i}", getattr(layer, kind), persistent=False)

    def forward(self, input_ids, attention_mask, position_ids, start):
        for layer in self.cache.layers:
            layer.cumulative_length.copy_(start)  # the cache writes the new tokens from slot ``start`` on
        out = self._model[0](input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=self.cache, use_cache=True)
        return out.logits


def export_decode_step(model: nn.Module, batch: int, length: int) -> Traced:
    """``DecodeStep`` exported with a dynamic number of new tokens (1 .. length)."""
    step = DecodeStep(model, batch, length)
    device = model.device
    example = dict(input_ids=torch.zeros(batch, 2, dtype=torch.long, device=device),  # 2: no 0/1 specialisation
                   attention_mask=torch.ones(batch, length, dtype=torch.long, device=device),
                   position_ids=torch.arange(2, device=device).repeat(batch, 1),
                   start=torch.tensor(0, device=device))
    tokens = torch.export.Dim("tokens", min=1, max=length)
    dynamic = dict(input_ids={1: tokens}, attention_mask=None, position_ids={1: tokens}, start=None)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():  # no_grad: cache tensors must not require grad
            warnings.simplefilter("ignore")
            ep = torch.export.export(step, (), example, dynamic_shapes=dynamic, strict=False)
    except Exception as exc:  # torch.export raises many types; wrap with the fix
        raise TraceError(f"cannot export a static-KV-cache decoding step of {type(model).__name__}: "
                         f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                         fix="generate() needs a transformers causal LM that takes past_key_values and position_ids; "
                             "try attn_implementation='sdpa' or 'eager'") from exc
    finally:
        model.train(was_training)
    return Traced(gm=ep.module(), example_inputs=example, source=model)


def decoding_adapted(adapted, model: nn.Module, batch: int, length: int):
    """The Adapted over the decoding graph for ``(batch, length)``, kept on ``adapted`` and rebuilt
    when the model's weights, dtype or device changed since it was exported."""
    graphs = adapted.generation_graphs
    key = (batch, length)
    gen = graphs.pop(key, None)
    if gen is None or site_mismatches(adapted, gen) or _cache_differs(gen, model):
        gen = AdaptedModel(export_decode_step(model, batch, length))
        bad = site_mismatches(adapted, gen)
        if bad:
            raise RewriterError(f"the decoding graph of {type(model).__name__} does not have these sites of the "
                                f"Adapted (name, shape and weight must match): {bad[:5]}; it has e.g. "
                                f"{list(gen.sites)[:3]}",
                                fix="generate() needs the Adapted traced from the model itself: "
                                    "rewriter.apply(model, rules)")
    graphs[key] = gen  # most recently used last
    while len(graphs) > KEEP_GRAPHS:
        graphs.popitem(last=False)
    return gen


def site_mismatches(adapted, gen) -> list[str]:
    """Sites of ``adapted`` that ``gen`` lacks, or has with another shape or another weight tensor."""
    bad = []
    for name, site in adapted.sites.items():
        other = gen.sites.get(name)
        if other is None or (other.in_features, other.out_features, other.op) != \
                (site.in_features, site.out_features, site.op) or \
                gen.gm.get_parameter(other.weight) is not adapted.gm.get_parameter(site.weight):
            bad.append(name)
    return bad


def _cache_differs(gen, model: nn.Module) -> bool:
    cache = next(b for n, b in gen.gm.named_buffers() if n.startswith("cache_keys_"))
    return cache.dtype != model.dtype or cache.device != model.device


def mirror(adapted, gen) -> None:
    """Give ``gen`` the adapters that act in ``adapted`` now (the same module objects) and the same
    active, merged and disabled state.  Merged weights are folded again from the shared modules."""
    disabled = adapted.disabled
    wanted = [] if disabled else list(dict.fromkeys(adapted.merged + adapted.active_adapters))
    for name in wanted:
        record = adapted.adapters[name]
        why = get_method(record.method).cannot_generate
        if why:
            raise RewriterError(f"adapter '{name}' ({record.method}): generate() cannot decode with it: {why}",
                                fix="set_adapter() to other adapters, or generate inside disable_adapters()")
    if gen.merged:
        gen.unmerge()
    for name in list(gen.adapters):
        mine = gen.adapters[name].modules
        theirs = adapted.adapters[name].modules if name in wanted else None
        if theirs is None or mine.keys() != theirs.keys() or any(mine[s] is not theirs[s] for s in mine):
            gen.delete_adapter(name)
    for name in wanted:
        if name not in gen.adapters:
            record = adapted.adapters[name]
            # this copy never trains on its own: no second controller (AdaLoRA's would hook the shared
            # weights' gradients), and the adapter's own trained-module copies, shared
            gen.install(name, record.plan, record.ruleset, dict(record.modules), activate=False,
                        method=record.method, controller=False, trained=adapted.trained_parameters(name))
    active = [] if disabled else adapted.active_adapters
    if gen.active_adapters != active:
        gen.set_adapter(active)
    if wanted and adapted.merged:
        gen.merge(adapted.merged)


@contextlib.contextmanager
def _in_eval(adapted):
    """Adapter dropout off while generating (the traced base graph is always in eval mode)."""
    was_training = adapted.training
    adapted.train(False)
    try:
        yield
    finally:
        adapted.train(was_training)


@contextlib.contextmanager
def _keep_requires_grad(*modules: nn.Module):
    """Building and syncing the decoding Adapted sets trainable flags on the parameters it shares
    with ``modules``; put the user's flags back."""
    flags = [(p, p.requires_grad) for m in modules for p in m.parameters()]
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


# ---- the loop ---------------------------------------------------------------------------------

def decode(step, ids: torch.Tensor, mask: torch.Tensor, length: int, max_new_tokens: int,
           pick: Callable[[torch.Tensor], torch.Tensor], eos: torch.Tensor | None, pad: int | None) -> torch.Tensor:
    """Prefill the prompts in one step, then feed one token per step.  ``step(tokens, seen, positions,
    start)`` writes ``tokens`` to cache slots from ``start`` on and returns the logits."""
    batch, prompt_len = ids.shape
    seen = torch.zeros(batch, length, dtype=torch.long, device=ids.device)  # cache slots holding real tokens
    seen[:, :prompt_len] = mask
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: each prompt starts at position 0
    logits = step(ids, seen, positions, 0)
    done = torch.zeros(batch, dtype=torch.bool, device=ids.device)
    new = []
    for i in range(max_new_tokens):
        token = pick(logits[:, -1].float())
        if eos is not None:
            token = torch.where(done, torch.full_like(token, pad), token)
            done |= torch.isin(token, eos)
        new.append(token)
        if bool(done.all()) or i + 1 == max_new_tokens:
            break
        slot = prompt_len + i
        seen[:, slot] = 1
        positions = positions[:, -1:] + 1
        logits = step(token[:, None], seen, positions, slot)
    return torch.cat([ids, torch.stack(new, 1)], 1)
