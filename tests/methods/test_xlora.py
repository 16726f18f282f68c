"""X-LoRA: the two-pass graph against its definition and against PEFT 0.21.2 on tiny Llama."""
from __future__ import annotations

import copy
import json
import struct
import warnings
import zlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import LoraConfig, PeftModel, XLoraConfig, get_peft_model
from safetensors.torch import load_file, save_file

import rewriter
from rewriter.adapted import Adapted
from rewriter.errors import ConfigError, MergeError, RewriterError, RuleError
from rewriter.plot import main_plot_scalings, plot_scalings
from rewriter.core.tolerance import output_tolerance

from shared import LORA_RULES

EXPERT_TARGETS = [["q_proj", "v_proj"], ["k_proj", "o_proj"], ["gate_proj", "up_proj", "down_proj", "q_proj"]]
CLASSIFIER = "base_model.internal_xlora_classifier."


def toml_value(value) -> str:
    return str(value).lower() if isinstance(value, bool) else json.dumps(value)


def xlora_rules(adapters, **fields) -> str:
    lines = ["schema = 1", "[adapter]", 'method = "xlora"'] + [f"{k} = {toml_value(v)}" for k, v in fields.items()]
    if isinstance(adapters, dict):
        return "\n".join(lines + ["[adapter.adapters]"] + [f'"{k}" = {json.dumps(v)}' for k, v in adapters.items()])
    return "\n".join(lines + [f"adapters = {json.dumps(adapters)}"])


@pytest.fixture(scope="module")
def setting(traced_models, tmp_path_factory):
    """The tiny Llama (eval), PEFT-saved LoRA experts on different layers, example ids."""
    traced = traced_models("tiny-llama")
    base = traced.source
    base.eval()
    root = tmp_path_factory.mktemp("experts")
    paths = {}
    for i, targets in enumerate(EXPERT_TARGETS):
        torch.manual_seed(i)
        expert = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                                init_lora_weights=False))
        expert.save_pretrained(root / str(i))
        paths[str(i)] = str(root / str(i))
    ids = torch.randint(0, 512, (2, 7), generator=torch.Generator().manual_seed(0))
    return traced, base, paths, ids


def peft_xlora(base, paths, seed=0, **fields):
    model = copy.deepcopy(base)
    model.config.use_cache = False
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(model, XLoraConfig(task_type="CAUSAL_LM", hidden_size=64, adapters=paths, **fields))
    return peft_model.eval()


def peft_classifier(peft_model) -> dict:
    return {k[len(CLASSIFIER):]: v for k, v in peft_model.state_dict().items() if k.startswith(CLASSIFIER)}


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def assert_close(got, expected):
    assert (got - expected).abs().max().item() <= output_tolerance(expected, torch.float32)


def ours_like_peft(traced, paths, peft_model, name="xl", **fields) -> Adapted:
    adapted = Adapted(traced.clone())
    adapted.add_adapter(xlora_rules(paths, **fields), name)
    adapted.adapters[name].modules["model"].classifier.load_state_dict(peft_classifier(peft_model))
    return adapted


# ---- the definition -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def one_expert(setting):
    """A LoRA adapter 'e', an X-LoRA over it alone, and a LoRA 'ref' to scale by hand."""
    traced = setting[0]
    adapted = Adapted(traced.clone())
    torch.manual_seed(3)
    adapted.add_adapter(LORA_RULES.format(targets='["q_proj", "v_proj", "down_proj"]'), "e")
    adapted.add_weighted_adapter(["e"], [1.0], "ref", combination_type="cat")
    adapted.add_adapter(xlora_rules(["e"], enable_softmax=False, xlora_depth=1), "xl")
    return adapted


@settings(max_examples=8)
@given(c=st.floats(-2, 2), g=st.floats(-2, 2))
def test_one_expert_with_constant_scalings_equals_that_lora_scaled(one_expert, setting, c, g):
    """Classifier output constant c (softmax off): X-LoRA == the LoRA with its delta times c*g."""
    adapted, ids = one_expert, setting[3]
    module = adapted.adapters["xl"].modules["model"]
    with torch.no_grad():
        last = module.classifier.layers[-1]
        last.weight.zero_()
        last.bias.fill_(c)
        ref = adapted.adapters["ref"].modules
        for site, m in adapted.adapters["e"].modules.items():  # 'ref' has scaling 1
            ref[site].lora_A.copy_(m.lora_A)
            ref[site].lora_B.copy_(m.lora_B * m.scaling * c * g)
    adapted.set_adapter("xl")
    adapted.set_global_scaling_weight(g)
    got = logits(adapted, ids)
    assert torch.all(adapted.get_latest_scalings() == c)
    adapted.set_adapter("ref")
    assert_close(got, logits(adapted, ids))


def test_one_expert_with_softmax_is_the_lora_whatever_the_classifier(one_expert, setting):
    adapted, ids = one_expert, setting[3]
    adapted.add_adapter(xlora_rules(["e"], xlora_depth=2, xlora_size=8), "soft")
    adapted.set_adapter("soft")
    got = logits(adapted, ids)
    assert torch.all(adapted.get_latest_scalings() == 1)
    adapted.set_adapter("e")
    assert_close(got, logits(adapted, ids))


# ---- parity with PEFT 0.21.2 ----------------------------------------------------------------

@pytest.mark.parametrize("fields", [
    {},
    {"top_k_lora": 2, "enable_softmax_topk": True, "enable_softmax": False},
    {"layerwise_scalings": True, "xlora_depth": 3, "xlora_size": 16, "softmax_temperature": 0.5},
    {"scaling_pass_value": 0.5, "global_scaling_weight": 0.7, "top_k_lora": 1},
], ids=["default", "topk-softmax_topk", "layerwise-depth3", "scaling_pass-global-top1"])
def test_matches_peft(setting, fields):
    traced, base, paths, ids = setting
    peft_model = peft_xlora(base, paths, **fields)
    adapted = ours_like_peft(traced, paths, peft_model, **fields)
    adapted.set_adapter("xl")
    expected = logits(peft_model, ids)
    assert_close(logits(adapted, ids), expected)
    assert torch.allclose(adapted.get_latest_scalings(), peft_model.base_model.get_latest_scalings(), atol=1e-6)
    module = adapted.adapters["xl"].modules["model"]
    assert len(module.layers) == len([m for m in peft_model.modules() if type(m).__name__ == "Linear"
                                      and hasattr(m, "lora_A")])  # PEFT's n_layers: 14 expert layers
    with adapted.disable_adapters():
        assert not torch.allclose(logits(adapted, ids), expected)  # the experts do change the output


def test_matches_peft_in_bfloat16(setting, traced_models):
    """A bf16 model with the same (float32-saved) experts: the logits agree within bf16 rounding, and the
    experts move them by more than that, so the agreement means something."""
    _, base, paths, ids = setting
    traced = traced_models("tiny-llama", torch.bfloat16)
    peft_model = peft_xlora(copy.deepcopy(base).to(torch.bfloat16), paths)
    adapted = ours_like_peft(traced, paths, peft_model)
    adapted.set_adapter("xl")
    expected = logits(peft_model, ids)
    got = logits(adapted, ids)
    tolerance = output_tolerance(expected, torch.bfloat16)
    assert got.dtype == expected.dtype == torch.bfloat16
    assert (got.float() - expected.float()).abs().max().item() <= tolerance
    with adapted.disable_adapters():
        assert (logits(adapted, ids).float() - expected.float()).abs().max().item() > tolerance


def saved_like_peft(setting, directory, fmt: str) -> torch.Tensor:
    """Save an X-LoRA adapter set up like PEFT's in ``fmt``; returns its logits."""
    traced, base, paths, ids = setting
    adapted = ours_like_peft(traced, paths, peft_xlora(base, paths))
    adapted.set_adapter("xl")
    adapted.save_adapter(directory, ["xl"], format=fmt)
    return logits(adapted, ids)


def test_a_saved_adapter_loads_on_renamed_modules_with_a_remap_table(setting, tmp_path):
    """The experts' layouts name the model's sites; a [remap] table renames them too."""
    traced, _, _, ids = setting
    expected = saved_like_peft(setting, tmp_path / "xl", "rewriter")
    (manifest,) = (tmp_path / "xl").rglob("rewriter_adapter.json")
    manifest.write_text(manifest.read_text().replace("model.layers.", "decoder.blocks."))  # "trained elsewhere"
    fresh = Adapted(traced.clone())
    with pytest.raises(RewriterError, match="decoder.blocks"):
        fresh.load_adapter(manifest.parent)
    fresh.load_adapter(manifest.parent, remap={"decoder.blocks": "model.layers"})
    assert torch.equal(logits(fresh, ids), expected)


def test_a_peft_format_adapter_loads_on_renamed_modules_with_a_remap_table(setting, tmp_path):
    """PEFT's format keeps the module names in the experts' own checkpoints: the table renames those."""
    from safetensors.torch import load_file, save_file
    traced, _, _, ids = setting
    expected = saved_like_peft(setting, tmp_path / "xl", "peft")
    experts = [f for f in (tmp_path / "xl").rglob("adapter_model.safetensors") if f.parent != tmp_path / "xl"]
    assert experts
    for weights in experts:  # "trained elsewhere": the experts name decoder.blocks.N
        save_file({k.replace("model.layers.", "decoder.blocks."): v for k, v in load_file(weights).items()},
                  str(weights))
    with pytest.raises(RewriterError, match="(?s)expert '0'.*does not fit.*remap"):
        Adapted(traced.clone()).load_adapter(tmp_path / "xl")
    fresh = Adapted(traced.clone())
    fresh.load_adapter(tmp_path / "xl", remap={"decoder.blocks": "model.layers"})
    assert torch.equal(logits(fresh, ids), expected)


def test_fused_experts_equal_one_expert_at_a_time(setting, monkeypatch):
    """Experts without dropout or bias run as two matmuls for all of them; the same sum as the loop."""
    from rewriter.methods.xlora import module as xlora
    traced, base, paths, ids = setting
    adapted = ours_like_peft(traced, paths, peft_xlora(base, paths), global_scaling_weight=0.7)
    adapted.set_adapter("xl")
    fused = logits(adapted, ids)
    monkeypatch.setattr(xlora, "linear_in_x", lambda expert: False)
    looped = logits(adapted, ids)
    assert (fused - looped).abs().max() <= output_tolerance(looped, torch.float32) and not torch.equal(fused, looped)


def test_scaling_pass_is_only_what_the_classifier_needs(setting):
    """Value 0: no expert node in the scaling pass; the LM head is computed once (main pass only)."""
    traced, _, paths, _ = setting
    adapted = Adapted(traced.clone())
    adapted.add_adapter(xlora_rules(paths), "xl")
    stages = lambda: [n.kwargs["stage"] for n in adapted.gm.graph.nodes  # noqa: E731
                      if n.op == "call_module" and n.target.startswith("rewriter_adapters.xl")]
    expert_nodes = sum(len(adapted.sites[s].nodes) for s in adapted.adapters["xl"].modules["model"].layers)
    assert sorted(stages()) == ["mix"] * expert_nodes + ["scalings"]
    head = [n for n in adapted.gm.graph.nodes if n.op == "get_attr" and n.target == "lm_head.weight"]
    assert len(head) == 1
    adapted.set_scaling_pass_value(None)  # 1 / n: the experts take part in the scaling pass too
    assert adapted.adapters["xl"].modules["model"].config.scaling_pass_value == pytest.approx(1 / 3)
    assert stages().count("constant") == expert_nodes


def test_only_the_classifier_trains_unless_experts_are_trainable(setting):
    traced, _, paths, ids = setting
    adapted = Adapted(traced.clone())
    adapted.add_adapter(xlora_rules(paths, xlora_depth=2, xlora_size=8), "xl")
    adapted.add_adapter(xlora_rules(paths, use_trainable_adapters=True), "trainable")
    for name in ("xl", "trainable"):
        adapted.set_adapter(name)
        adapted.train()
        adapted.zero_grad(set_to_none=True)
        adapted(input_ids=ids).logits.square().mean().backward()
        module = adapted.adapters[name].modules["model"]
        assert all(p.grad is not None for p in module.classifier.parameters())
        expert_grads = [p.grad is not None for p in module.experts.parameters()]
        assert all(expert_grads) if name == "trainable" else not any(expert_grads)
        assert all(p.grad is None for n, p in adapted.gm.named_parameters() if not n.startswith("rewriter_"))
    adapted.train(False)


# ---- runtime API, refusals ------------------------------------------------------------------

def test_runtime_api(setting):
    traced, base, paths, ids = setting
    peft_model = peft_xlora(base, paths)
    adapted = ours_like_peft(traced, paths, peft_model)
    adapted.set_adapter("xl")
    logits(adapted, ids)
    assert adapted.get_scalings_log() == []  # off by default: nothing kept
    adapted.enable_scalings_logging()
    logits(adapted, ids)
    logits(adapted, ids[:, :5])
    logits(adapted, ids)
    log = adapted.get_scalings_log()
    assert [tuple(s.shape) for s in log] == [(2, 7, 14, 3), (2, 5, 14, 3), (2, 7, 14, 3)]
    buckets = adapted.get_bucketed_scalings_log()
    assert sorted(buckets) == [5, 7] and buckets[7][0] == [0, 2] and buckets[5][0] == [1]
    adapted.disable_scalings_logging()
    logits(adapted, ids)
    assert len(adapted.get_scalings_log()) == 3
    adapted.clear_scalings_log()
    assert adapted.get_scalings_log() == []
    # settings: same outputs as PEFT after the same calls; they are saved with the plan
    adapted.set_topk_lora(2)
    peft_model.base_model.set_topk_lora(2)
    adapted.set_global_scaling_weight(0.5)
    peft_model.base_model.set_global_scaling_weight(0.5)
    assert adapted.get_global_scaling_weight() == 0.5
    assert_close(logits(adapted, ids), logits(peft_model, ids))
    assert adapted.adapters["xl"].plan.decisions[0].config.top_k_lora == 2
    with pytest.raises(ConfigError, match="top_k_lora"):
        adapted.set_topk_lora(4)


def test_merge_is_refused(setting):
    traced, _, paths, _ = setting
    adapted = Adapted(traced.clone())
    adapted.add_adapter(xlora_rules(paths), "xl")
    with pytest.raises(MergeError, match="per token.*PEFT"):
        adapted.merge()
    assert adapted.merged == []


def test_generate_is_refused_with_the_reason(setting):
    traced, _, paths, ids = setting
    adapted = Adapted(traced.clone())
    adapted.add_adapter(xlora_rules(paths), "xl")
    with pytest.raises(RewriterError, match="'xl' \\(xlora\\).*scaling pass"):
        adapted.generate(ids, max_new_tokens=2)


def test_unmerged_pt2_export_runs_both_passes_without_rewriter(setting, tmp_path):
    traced, _, paths, ids = setting
    adapted = Adapted(traced.clone())
    adapted.add_adapter(xlora_rules(paths, xlora_depth=2, xlora_size=8), "xl")
    expected = logits(adapted, ids)
    rewriter.export(adapted, tmp_path / "xl.pt2", merged=False)
    program = torch.export.load(tmp_path / "xl.pt2").module()
    with torch.no_grad():
        out = program(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
    assert torch.equal(out, expected)
    with pytest.raises(MergeError, match="per token"):
        rewriter.export(adapted, tmp_path / "merged.pt2", merged=True)
    assert not (tmp_path / "merged.pt2").exists()


def test_other_adapters_at_expert_layers_are_refused(setting):
    traced, _, paths, _ = setting
    adapted = Adapted(traced.clone())
    adapted.add_adapter(LORA_RULES.format(targets='["q_proj"]'), "plain")
    adapted.add_adapter(xlora_rules(paths), "xl")
    with pytest.raises(RewriterError, match="only unmerged adapter.*'plain'"):
        adapted.set_adapter(["plain", "xl"])
    adapted.set_adapter("xl")  # alone it works


@pytest.mark.parametrize("rules, message", [
    (xlora_rules(["nope"]), "'nope' is not an adapter"),
    (xlora_rules({"0": "/does/not/exist"}), "expert '0'"),
    (xlora_rules(["e"], top_k_lora=2), "only 1 experts"),
    (xlora_rules(["e"], hidden_size=32), "hidden_size"),
])
def test_bad_configs_name_the_field(setting, rules, message):
    adapted = Adapted(setting[0].clone())
    adapted.add_adapter(LORA_RULES.format(targets='["q_proj"]'), "e")
    with pytest.raises(RuleError, match=message) as info:
        adapted.add_adapter(rules, "xl")
    assert "[adapter]" in str(info.value) or "rule 'all'" in str(info.value)


# ---- checkpoints ----------------------------------------------------------------------------

def test_save_load_round_trips_in_both_formats(setting, tmp_path):
    traced, base, paths, ids = setting
    fields = {"xlora_depth": 2, "xlora_size": 8, "top_k_lora": 2}
    peft_model = peft_xlora(base, paths, **fields)
    adapted = ours_like_peft(traced, paths, peft_model, **fields)
    adapted.set_adapter("xl")
    adapted.set_global_scaling_weight(0.8)
    expected = logits(adapted, ids)
    adapted.save_adapter(tmp_path / "ours")
    adapted.save_adapter(tmp_path / "peft", format="peft")
    fresh = rewriter.load_adapter(Adapted(traced.clone()), tmp_path / "ours")  # no experts on this model
    assert torch.equal(logits(fresh, ids), expected)
    assert fresh.get_global_scaling_weight() == 0.8
    ours_from_peft_format = rewriter.load_adapter(Adapted(traced.clone()), tmp_path / "peft")
    assert torch.equal(logits(ours_from_peft_format, ids), expected)
    peft_base = copy.deepcopy(base)
    peft_base.config.use_cache = False
    peft_loaded = PeftModel.from_pretrained(peft_base, tmp_path / "peft").eval()
    assert_close(logits(peft_loaded, ids), expected)


def test_peft_saved_checkpoint_loads(setting, tmp_path):
    """PEFT 0.21.2 drops classifier keys containing '.<expert name>.' (layers.0 here): they are named in
    a warning; with the full classifier in the file PEFT's outputs are reproduced."""
    traced, base, paths, ids = setting
    peft_model = peft_xlora(base, paths, xlora_depth=2, xlora_size=8)
    peft_model.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match=r"layers\.0\.bias', 'layers\.0\.weight'"):
        rewriter.load_adapter(Adapted(traced.clone()), tmp_path)
    full = {CLASSIFIER + k: v.contiguous() for k, v in peft_classifier(peft_model).items()}
    assert set(load_file(tmp_path / "adapter_model.safetensors")) < set(full)
    save_file(full, tmp_path / "adapter_model.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        loaded = rewriter.load_adapter(Adapted(traced.clone()), tmp_path)
    assert_close(logits(loaded, ids), logits(peft_model, ids))


# ---- plot -----------------------------------------------------------------------------------

def png_size_and_pixels(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    chunks, at = {}, 8
    while at < len(data):
        (length,), kind = struct.unpack(">I", data[at:at + 4]), data[at + 4:at + 8]
        body = data[at + 8:at + 8 + length]
        assert struct.unpack(">I", data[at + 8 + length:at + 12 + length])[0] == zlib.crc32(kind + body)
        chunks[kind] = body
        at += 12 + length
    pixels = zlib.decompress(chunks[b"IDAT"])
    assert len(pixels) == height * (1 + 3 * width)
    return width, height, pixels


def test_plot_writes_a_png_heatmap(tmp_path):
    scalings = torch.softmax(torch.randn(1, 5, 4, 3), -1)
    width, height, pixels = png_size_and_pixels(plot_scalings(scalings, tmp_path / "avg.png"))
    assert (width, height) == (3 * 16 + 1, 5 * 16 + 1)  # experts across, tokens down
    darkest = scalings[0, :, 1].argmax()  # the largest entry is the darkest cell
    token, expert = divmod(darkest.item(), 3)
    _, _, pixels = png_size_and_pixels(plot_scalings(scalings, tmp_path / "l1.png", layer=1))
    row = 1 + token * 16 + 8
    offset = row * (1 + 3 * width) + 1 + 3 * (expert * 16 + 8)
    assert tuple(pixels[offset:offset + 3]) == (8, 48, 107)
    save_file({"scalings": scalings}, tmp_path / "s.safetensors")
    assert main_plot_scalings([str(tmp_path / "s.safetensors"), "--out", str(tmp_path / "cli.png"),
                               "--tokens", "0,2"]) == 0
    assert png_size_and_pixels(tmp_path / "cli.png")[1] == 2 * 16 + 1
    assert main_plot_scalings([str(tmp_path / "s.safetensors"), "--out", str(tmp_path / "x.png"), "--layer", "9"]) == 2
    assert not (tmp_path / "x.png").exists()
