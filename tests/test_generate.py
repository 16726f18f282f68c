"""Adapted.generate: our static-KV-cache loop against transformers' eager ``model.generate`` with the
adapters folded into a copy of the weights (tiny-llama; one decoding graph export for most tests)."""
import copy
import warnings

import pytest
import torch
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

import rewriter
from rewriter import RewriterError
from rewriter.generate import GRAPHS_ATTR, keep_top_k, keep_top_p
from rewriter.core.graph import fold_site
from rewriter.models import TinyMLP
from rewriter.core.tracing import Traced

QV = '[adapter]\nr = 4\nalpha = 8\ninit = false\n[[rule]]\nname = "qv"\nsuffix = ["q_proj", "v_proj"]\n'
MLP = '[adapter]\nr = 2\ninit = false\n[[rule]]\nname = "mlp"\nsuffix = ["up_proj", "q_proj"]\n'
ADALORA = ('[adapter]\nmethod = "adalora"\ninit_r = 4\ntarget_r = 2\ntotal_step = 100\ninit_lora_weights = false\n'
           '[[rule]]\nname = "attn"\nsuffix = ["k_proj", "o_proj"]\n')
IDS = torch.randint(3, 512, (2, 6), generator=torch.Generator().manual_seed(3))
NEW = 8


@pytest.fixture(scope="module")
def lm(traced_models):
    """tiny-llama with a LoRA on q/v ("default", active) and one on up/q ("mlp", inactive)."""
    with torch.random.fork_rng():  # the same adapter weights whatever ran before
        torch.manual_seed(0)
        adapted = rewriter.apply(traced_models("tiny-llama"), QV)
        adapted.add_adapter(MLP, "mlp")
    return adapted


@pytest.fixture
def adapted(lm):
    yield lm
    lm.unmerge()
    lm.set_adapter("default")


def folded(adapted, names):
    """A deep copy of the source model with the adapters ``names`` folded in, bottom first."""
    model = copy.deepcopy(adapted.source_model)
    with torch.no_grad():
        for site in adapted.sites.values():
            stack = [adapted.adapters[n].modules[site.name] for n in names if site.name in adapted.adapters[n].modules]
            if stack:
                bias = adapted.gm.get_parameter(site.bias) if site.bias else None
                weight, _ = fold_site(adapted.gm.get_parameter(site.weight), bias, stack)
                model.get_parameter(site.weight).copy_(weight)
    return model


def eager(model, ids=IDS, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kwargs.setdefault("do_sample", False)
        return model.generate(ids, max_new_tokens=NEW, **kwargs)


def test_greedy_equals_eager_generate_with_the_adapter_folded_in(adapted):
    out = adapted.generate(IDS, max_new_tokens=NEW)
    assert torch.equal(out, eager(folded(adapted, ["default"])))
    assert not torch.equal(out, eager(adapted.source_model))  # the adapter changes the tokens


def test_left_padded_batch_equals_eager_generate(adapted):
    ids, mask = IDS.clone(), torch.ones_like(IDS)
    ids[1, :3], mask[1, :3] = 0, 0
    out = adapted.generate(ids, max_new_tokens=NEW, attention_mask=mask, pad_token_id=0)
    assert torch.equal(out, eager(folded(adapted, ["default"]), ids, attention_mask=mask, pad_token_id=0))


def test_every_adapter_state_is_mirrored_with_one_exported_graph(adapted):
    reference = eager(folded(adapted, ["default"]))
    adapted.merge()
    assert torch.equal(adapted.generate(IDS, max_new_tokens=NEW), reference)
    with pytest.warns(UserWarning, match="unmerging the merged adapters"):
        adapted.set_adapter(["default", "mlp"])
    both = adapted.generate(IDS, max_new_tokens=NEW)
    assert torch.equal(both, eager(folded(adapted, ["default", "mlp"]))) and not torch.equal(both, reference)
    adapted.merge(["mlp"])  # one merged, one live
    assert torch.equal(adapted.generate(IDS, max_new_tokens=NEW), both)
    adapted.unmerge()
    adapted.set_adapter("mlp")
    assert torch.equal(adapted.generate(IDS, max_new_tokens=NEW), eager(folded(adapted, ["mlp"])))
    with adapted.disable_adapters():
        assert torch.equal(adapted.generate(IDS, max_new_tokens=NEW), eager(adapted.source_model))
    adapted.set_adapter("default")
    assert torch.equal(adapted.generate(IDS, max_new_tokens=NEW), reference)
    assert list(getattr(adapted, GRAPHS_ATTR)) == [(2, 64)]  # exported once, reused for every state


def test_trained_weights_are_seen_without_re_export_and_flags_are_kept(adapted):
    before = adapted.generate(IDS, max_new_tokens=NEW)
    adapted.train()
    flags = {n: p.requires_grad for n, p in adapted.named_parameters()}
    module = adapted.adapters["default"].modules["model.layers.1.self_attn.v_proj"]
    saved = module.lora_B.detach().clone()
    try:
        with torch.no_grad():
            module.lora_B.mul_(3)
        out = adapted.generate(IDS, max_new_tokens=NEW)
        assert torch.equal(out, eager(folded(adapted, ["default"]))) and not torch.equal(out, before)
        assert {n: p.requires_grad for n, p in adapted.named_parameters()} == flags
        assert adapted.training and module.training and module.lora_B.requires_grad
    finally:
        with torch.no_grad():
            module.lora_B.copy_(saved)
        adapted.train(False)


def test_adalora_generates_like_its_folded_weights_and_keeps_one_rank_allocator(adapted):
    adapted.add_adapter(ADALORA, "ada")
    try:
        adapted.set_adapter("ada")
        out = adapted.generate(IDS, max_new_tokens=NEW)
        assert torch.equal(out, eager(folded(adapted, ["ada"])))
        assert not torch.equal(out, eager(adapted.source_model))
        adapted.train()
        with warnings.catch_warnings():  # an allocator the training loop does not call would warn here
            warnings.filterwarnings("error", message="AdaLoRA")
            for step in range(3):
                adapted(input_ids=IDS).logits.sum().backward()
                adapted.update_and_allocate(step)
                for p in adapted.parameters():
                    p.grad = None
    finally:
        adapted.train(False)
        adapted.set_adapter("default")
        adapted.delete_adapter("ada")


def test_sampling_equals_eager_sampling_with_the_same_seed(adapted):
    reference = folded(adapted, ["default"])
    settings = dict(do_sample=True, temperature=0.8, top_k=40, top_p=0.9)
    for seed in range(3):
        torch.manual_seed(seed)
        ours = adapted.generate(IDS, max_new_tokens=NEW, **settings)
        torch.manual_seed(seed)
        assert torch.equal(ours, eager(reference, **settings)), seed


def test_sampling_is_reproducible_with_a_generator_and_cold_sampling_is_greedy(adapted):
    def sample(seed, **kwargs):
        return adapted.generate(IDS, max_new_tokens=NEW, do_sample=True,
                                generator=torch.Generator().manual_seed(seed), **kwargs)
    assert torch.equal(sample(7), sample(7))
    assert not torch.equal(sample(7), sample(8))
    greedy = adapted.generate(IDS, max_new_tokens=NEW)
    assert torch.equal(sample(7, temperature=1e-4), greedy)
    assert torch.equal(sample(9, top_k=1), greedy)


def test_eos_stops_each_row_pads_it_and_ends_early(adapted):
    ids = torch.randint(3, 512, (2, 6), generator=torch.Generator().manual_seed(2))  # a prompt with varied output
    prompt = ids.shape[1]
    new = adapted.generate(ids, max_new_tokens=NEW)[:, prompt:].tolist()

    def stop(row, eos):  # the step at which greedy decoding meets an eos token
        return next((i for i, t in enumerate(new[row]) if t in eos), NEW)

    # two eos tokens that stop the rows at different steps, both before the last one
    pairs = [(a, b) for a in new[0] for b in new[1]
             if stop(0, {a, b}) != stop(1, {a, b}) and max(stop(0, {a, b}), stop(1, {a, b})) < NEW - 1]
    assert pairs, f"greedy output too repetitive to test eos: {new}"
    eos = list(pairs[0])
    out = adapted.generate(ids, max_new_tokens=NEW, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(out, eager(folded(adapted, ["default"]), ids, eos_token_id=eos, pad_token_id=0))
    steps = [stop(0, set(eos)), stop(1, set(eos))]
    assert out.shape[1] == prompt + max(steps) + 1  # ends once every row has stopped
    first = steps.index(min(steps))
    assert (out[first, prompt + min(steps) + 1:] == 0).all()  # the row that stopped first is padded


def test_top_k_and_top_p_keep_what_transformers_keeps():
    scores = torch.randn(6, 50, generator=torch.Generator().manual_seed(0)) * 3
    for k in (1, 5, 50):
        assert torch.equal(keep_top_k(scores, k), TopKLogitsWarper(k)(None, scores))
    for p in (0.1, 0.5, 0.9, 1.0):
        assert torch.equal(keep_top_p(scores, p).isinf(), TopPLogitsWarper(p)(None, scores).isinf()), p
    kept = keep_top_p(torch.tensor([[2.0, 1.0, 0.0, -1.0]]), 0.7).isfinite()
    assert kept.tolist() == [[True, True, False, False]]  # 0.64 < 0.7 needs the second token


def test_bad_requests_are_refused_before_any_work(adapted):
    with pytest.raises(RewriterError, match="max_cache_len=10"):
        adapted.generate(IDS, max_new_tokens=5, max_cache_len=10)
    with pytest.raises(RewriterError, match="max_position_embeddings=256"):
        adapted.generate(IDS, max_new_tokens=251)
    right = torch.ones_like(IDS)
    right[0, -2:] = 0
    with pytest.raises(RewriterError, match="(?s)row 0 is not left padding.*padding_side"):
        adapted.generate(IDS, attention_mask=right)
    with pytest.raises(RewriterError, match="input_ids\\[None\\]"):
        adapted.generate(IDS[0])
    with pytest.raises(RewriterError, match="only apply when sampling"):
        adapted.generate(IDS, top_k=5)
    with pytest.raises(RewriterError, match="temperature must be > 0"):
        adapted.generate(IDS, do_sample=True, temperature=0.0)
    with pytest.raises(RewriterError, match="max_new_tokens must be a positive integer"):
        adapted.generate(IDS, max_new_tokens=0)


def test_models_that_are_not_causal_lms_are_refused(traced_models):
    bert = rewriter.apply(traced_models("tiny-bert"), QV.replace('["q_proj", "v_proj"]', '["query"]'))
    with pytest.raises(RewriterError, match="decoder-only transformers causal LMs; the model is Bert"):
        bert.generate(IDS)
    plain = rewriter.apply(torch.fx.symbolic_trace(TinyMLP()), '[[rule]]\nname = "up"\nsuffix = "up"\n')
    with pytest.raises(RewriterError, match="built from a GraphModule"):
        plain.generate(IDS)


def test_a_graph_whose_sites_are_not_the_models_is_refused(lm):
    other = rewriter.apply(Traced(gm=torch.fx.symbolic_trace(TinyMLP()), positional=True, source=lm.source_model),
                           '[[rule]]\nname = "up"\nsuffix = "up"\n')
    with pytest.raises(RewriterError, match="does not have these sites.*layers.0.up"):
        other.generate(IDS)


def test_a_trained_head_copy_generates_like_the_model_with_that_head(lm):
    head = '[adapter]\nr = 2\ninit = false\n[[rule]]\nname = "q"\nsuffix = "q_proj"\n' \
           '[[rule]]\nname = "head"\nmatch = "lm_head"\naction = "train"\n'
    lm.add_adapter(head, "head")
    try:
        with torch.no_grad():
            lm.trained_parameters("head")["lm_head.weight"].mul_(-1.0)
        lm.set_adapter("head")
        model = folded(lm, ["head"])
        with torch.no_grad():
            model.lm_head.weight.copy_(lm.trained_parameters("head")["lm_head.weight"])
        assert torch.equal(lm.generate(IDS, max_new_tokens=NEW), eager(model))
    finally:
        lm.set_adapter("default")
        lm.delete_adapter("head")


def test_llama_adapter_generates_as_its_full_forward_and_as_peft(traced_models, tmp_path):
    """Llama-Adapter's rewrite applies to the decoding graph (keys reach attention through the KV cache):
    greedy tokens equal decoding with the whole sequence re-run every step, and PEFT's generate."""
    import peft
    rules = open("rules/adaption-prompt-llama.toml").read()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        adapted = rewriter.apply(traced_models("tiny-llama"), rules)
    with torch.no_grad():
        for module in adapted.adapters["default"].modules.values():
            module.adaption_gate.fill_(0.8)
            module.adaption_prompt.mul_(40.0)  # large enough to change the greedy tokens
    out = adapted.generate(IDS, max_new_tokens=NEW)
    sequence = IDS
    with torch.no_grad():
        for _ in range(NEW):
            step = adapted(input_ids=sequence, attention_mask=torch.ones_like(sequence)).logits[:, -1]
            sequence = torch.cat([sequence, step.argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, sequence)
    with adapted.disable_adapters():
        assert not torch.equal(out, adapted.generate(IDS, max_new_tokens=NEW))  # the prompts change the tokens
    adapted.save_adapter(tmp_path / "peft", format="peft")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(adapted.source_model), tmp_path / "peft").eval()
    assert torch.equal(out, eager(theirs))
